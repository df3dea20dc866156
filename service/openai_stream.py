"""``stream: true`` on ``POST /v1/images/generations``: Server-Sent Events as the official
``openai`` client parses them (``client.images.generate(..., stream=True)`` yields
``ImageGenPartialImageEvent`` then ``ImageGenCompletedEvent``); on ``POST /v1/images/edits``
the same events are named ``image_edit.partial_image`` / ``image_edit.completed``
(``client.images.edit(..., stream=True)``).

- ``image_generation.partial_image``: ``partial_images`` (0-3) previews spread evenly over the
  Stage C steps (fewer only when Stage C has fewer steps), each the Previewer's picture of the
  current Stage C prediction, scaled to the requested size and encoded in ``output_format``;
  ``partial_image_index`` counts them from 0.
- ``image_generation.completed``: the final image with ``usage``.
With ``n`` > 1 there is one event per image and preview, in image order, each with our extra
field ``image_index`` (the client keeps fields it does not know). A failure after the stream has
begun is an ``error`` event whose data is OpenAI's error body, which the client raises as
``openai.APIError``. Heartbeats are SSE comments, which parsers skip.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import torch
import torch.nn.functional as F
from fastapi.responses import StreamingResponse

from service.errors import ServiceError
from service.image_formats import encode_b64
from service.jobs import Job, JobResult
from service.openai_errors import error_body
from service.runtime import Runtime
from service.streaming import SSE_HEADERS, sse

PARTIAL = "image_generation.partial_image"
COMPLETED = "image_generation.completed"
# /v1/images/edits: the same events under the names client.images.edit(stream=True) parses
EDIT_PARTIAL = "image_edit.partial_image"
EDIT_COMPLETED = "image_edit.completed"


def scaled(picture: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """A preview uint8 [3, h, w] scaled (bilinear) to [3, height, width]: the Previewer draws at
    1/5 of the image size or less, and clients show a partial image where the final one goes."""
    grown = F.interpolate(picture[None].float(), size=(height, width), mode="bilinear")
    return grown[0].round().clamp(0, 255).to(torch.uint8)


def openai_event_stream(
    runtime: Runtime,
    job: Job,
    *,
    output_format: str,
    quality: str,
    compression: int,
    completed: Callable[[JobResult], Awaitable[tuple[list[str], dict[str, Any]]]],
    events: tuple[str, str] = (PARTIAL, COMPLETED),
) -> StreamingResponse:
    """The streaming response of ``job``. ``completed`` encodes the finished images and returns
    them (base64) with the usage object; ``events`` names the partial and completed events."""
    partial_event, completed_event = events
    params = job.params
    size = f"{params.width}x{params.height}"
    common = {"background": "opaque", "output_format": output_format, "quality": quality}

    def encode(picture: torch.Tensor) -> str:
        picture = scaled(picture, params.width, params.height)
        return encode_b64(picture, output_format=output_format, quality=compression)

    async def events() -> AsyncIterator[bytes]:
        partial_index = 0
        async for event in runtime.stream(job):
            if event.type == "heartbeat":
                yield b": keep-alive\n\n"
            elif event.type == "preview":
                for i, picture in enumerate(event.data["images"]):
                    b64 = await runtime.encode(encode, picture)
                    yield sse(partial_event, {
                        "b64_json": b64, "created_at": int(time.time()), "size": size, **common,
                        "partial_image_index": partial_index, "image_index": i,
                    })  # fmt: skip
                partial_index += 1
            elif event.type == "result":
                images, usage = await completed(event.data["result"])
                for i, b64 in enumerate(images):
                    yield sse(completed_event, {
                        "b64_json": b64, "created_at": int(time.time()), "size": size, **common,
                        "usage": usage, "image_index": i, "seed": params.seed + i,
                    })  # fmt: skip
            elif event.type == "error":
                yield _error_event(event.data["error"], job.request_id)
            # queued / started / step: OpenAI's stream has no such events

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


def _error_event(error: BaseException, request_id: str) -> bytes:
    if not isinstance(error, ServiceError):
        error = ServiceError(f"internal error ({type(error).__name__}); please report it")
    _, body = error_body(
        "/v1/images/generations", error.status, error.code, error.message, error.field, request_id
    )
    return f"event: error\ndata: {json.dumps(body, separators=(',', ':'))}\n\n".encode()
