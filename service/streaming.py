"""Server-Sent Events for ``POST /v1/generate`` with ``"stream": true`` (or ``Accept:
text/event-stream``): a job's progress as it happens, in the format browsers' EventSource parsers
and ``curl -N`` read.

Every event has its type on the ``event:`` line and again as ``type`` in the JSON ``data:`` line
(one line, so any SSE parser reads it whole), and carries the request ``id``:

    queued    {"queue_position"}                       on arrival and whenever it changes
    started   {"stage": "prior", "total"}              admitted: text encoded, Stage C begins
    step      {"stage", "step", "total"}               after every step; counted per stage
    preview   {"stage", "step", "total", "images": [{"index", "seed", "width", "height", "b64_json"}]}
    result    the body POST /v1/generate answers with as JSON (same fields), then the stream ends
    error     {"status", "error": {"code", "message", "field", "request_id"}}, then the stream ends

A comment line (``: keep-alive``) goes out after 15 s without news, so proxies keep the connection.
Errors found before the job is queued (422, 503, ...) are plain JSON responses with their status,
as without streaming; once the stream has begun (HTTP 200), a failure is an ``error`` event. A
client that closes the stream cancels its job at the next step.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from service.errors import ServiceError
from service.imaging import encode_b64_png
from service.jobs import Job, JobResult
from service.metrics import Metrics
from service.runtime import Runtime

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: pass events on as they come instead of buffering them
}


def event_schema(events: list[str], description: str) -> dict[str, Any]:
    """The OpenAPI media type object of an event stream (OpenAPI 3.1: ``schema`` describes one
    event, as SSE parsers hand them out: its ``event`` name and its ``data`` text, JSON)."""
    return {
        "schema": {
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "event": {"type": "string", "enum": events},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "description": "one line of JSON whose type repeats the event name",
                },
            },
        },
        "description": description,
    }


def wants_stream(stream: bool, accept: str) -> bool:
    """``stream: true``, or an Accept header naming text/event-stream."""
    return stream or any(
        part.split(";")[0].strip().lower() == "text/event-stream" for part in accept.split(",")
    )


def every_k_steps(k: int, total: int) -> frozenset[int]:
    """Stage C steps done after which a preview is drawn for ``preview_every=k``: k, 2k, ... up to
    ``total`` (the last one is the final Stage C latent, before Stage B runs)."""
    return frozenset(range(k, total + 1, k))


def spread_over_steps(count: int, total: int) -> frozenset[int]:
    """``count`` preview steps spread evenly over ``total`` Stage C steps (fewer only when
    total < count): the i-th of count at ceil(total * i / (count + 1)), i = 1..count."""
    return frozenset(math.ceil(total * i / (count + 1)) for i in range(1, count + 1)) - {0}


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One event: ``event: <type>`` and one ``data:`` line of compact JSON (json.dumps escapes
    newlines, so the data never spans lines)."""
    payload = json.dumps({"type": event, **data}, separators=(",", ":"))
    return f"event: {event}\ndata: {payload}\n\n".encode()


def error_event(error: BaseException, request_id: str) -> bytes:
    if not isinstance(error, ServiceError):
        error = ServiceError(f"internal error ({type(error).__name__}); please report it")
    return sse(
        "error",
        {
            "id": request_id,
            "status": error.status,
            "error": {
                "code": error.code,
                "message": error.message,
                "field": error.field,
                "request_id": request_id,
            },
        },
    )


async def preview_images(runtime: Runtime, job: Job, data: dict[str, Any]) -> list[dict[str, Any]]:
    """The preview pictures of an event (uint8 [n, 3, h, w]) as base64 PNGs, encoded in the
    encode pool; image i has the request's seed + i."""
    pictures = data["images"]
    encoded = [await runtime.encode(encode_b64_png, picture) for picture in pictures]
    height, width = int(pictures.shape[-2]), int(pictures.shape[-1])
    return [
        {"index": i, "seed": job.params.seed + i, "width": width, "height": height, "b64_json": b}
        for i, b in enumerate(encoded)
    ]


def event_stream(
    runtime: Runtime,
    job: Job,
    metrics: Metrics,
    result_body: Callable[[JobResult], Awaitable[dict[str, Any]]],
) -> StreamingResponse:
    """The streaming response of ``job``; ``result_body`` makes the final body from its result
    (the JSON response's fields)."""

    async def events() -> AsyncIterator[bytes]:
        rid = job.request_id
        async for event in runtime.stream(job):
            if event.type == "heartbeat":
                yield b": keep-alive\n\n"
            elif event.type == "preview":
                images = await preview_images(runtime, job, event.data)
                yield sse("preview", {"id": rid, **event.data, "images": images})
            elif event.type == "result":
                yield sse("result", await result_body(event.data["result"]))
            elif event.type == "error":
                error = event.data["error"]
                if isinstance(error, ServiceError) and error.reason is not None:
                    metrics.rejected.labels(error.reason).inc()
                yield error_event(error, rid)
            else:
                yield sse(event.type, {"id": rid, **event.data})

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)
