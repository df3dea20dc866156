"""The OpenAI-compatible routes: ``POST /v1/images/generations``, ``GET /v1/models`` and
``GET /v1/models/{model_id}``, so the official ``openai`` client (``client.images.generate``,
``client.models.list``) works against this server. Errors are in OpenAI's shape
(service/openai_errors.py).

A generation is three pieces, shared by the JSON answer and the stream (service/openai_stream.py:
SSE ``image_generation.partial_image`` / ``image_generation.completed`` events): ``to_generation``
(request -> validated GenerationParams, quality and format), the job (Runtime.submit, then wait or
stream, as /v1/generate), and ``images_body`` (the finished job's encoded images -> the body).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from models.request import GenerationParams, SamplingDefaults
from service.auth import request_owner
from service.engine import Engine
from service.errors import InvalidRequest, NotReady
from service.image_formats import encode_b64
from service.image_requests import ImageInput, output_size
from service.imaging import png_parameters_of
from service.jobs import JobResult
from service.metrics import Metrics
from service.openai_errors import ModelNotFound
from service.openai_schemas import (
    ImageGenerationRequest,
    ImagesResponse,
    InputTokensDetails,
    ModelList,
    ModelObject,
    OpenAIErrorResponse,
    OpenAIImage,
    Usage,
)
from service.openai_stream import COMPLETED, PARTIAL, openai_event_stream
from service.responses import encode_each, prompt_warnings, validated_params, warning_header
from service.runtime import Runtime
from service.settings import Settings
from service.streaming import event_schema, spread_over_steps

logger = logging.getLogger("service.openai_api")

# Share of the model's default step counts (Stage C and Stage B alike) per quality tier, rounded
# up: official defaults 20 / 10 -> high 20 / 10, medium 12 / 6, low 6 / 3. Guidance is unchanged.
QUALITY_SHARE = {"high": 1.0, "medium": 0.6, "low": 0.3}
NO_PREVIEWER = (
    "partial images are off: the loaded model has no Previewer (previewer.safetensors in "
    "CASCADE_WEIGHTS_DIR); the stream carries the completed images only"
)
# Our field names as the OpenAI request calls them, for validated_params' messages.
OPENAI_NAMES = {"num_images": "n", "width": "size", "height": "size"}
_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")

_STATUSES: dict[int, str] = {
    400: "Invalid parameter, unknown parameter or body that is not JSON (BadRequestError); "
    "error.param names the parameter",
    401: "Missing or wrong API key (only when CASCADE_API_KEYS is configured)",
    404: "The model is not the one this server serves (code model_not_found)",
    409: "Cancelled by DELETE /v1/requests/{id}, or an X-Request-ID still in flight",
    413: "The body is over CASCADE_MAX_BODY_BYTES (body_too_large), or the image over "
    "CASCADE_MAX_IMAGE_BYTES (image_too_large)",
    500: "Generation failed",
    503: "Queue full, still loading, or shutting down (the client retries)",
    504: "The deadline passed before the request's first step",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI responses of these error statuses, in OpenAI's error shape."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        responses[status] = {"model": OpenAIErrorResponse, "description": _STATUSES[status]}
    if 503 in responses:
        responses[503]["headers"] = {
            "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}
        }
    return responses


def stream_200(partial_event: str, completed_event: str) -> dict[str, Any]:
    """The OpenAPI 200 of a route that answers JSON, or with stream=true these events."""
    return {
        "description": "JSON, or with stream=true Server-Sent Events",
        "content": {
            "text/event-stream": event_schema(
                [partial_event, completed_event, "error"],
                f"stream=true: {partial_event} events, then one {completed_event} per image, "
                "or an error event",
            )
        },
    }


GENERATE_DESCRIPTION = """OpenAI's Images API (`client.images.generate`). `quality` sets the step
counts from the model's defaults (`prior_steps` / `decoder_steps`, rounded up): `auto` and `high`
use them as they are, `medium` 60% of them, `low` 30% (official defaults 20 / 10: high 20 / 10,
medium 12 / 6, low 6 / 3). Our own fields (`seed`, `negative_prompt`, `prior_steps`,
`prior_guidance_scale`, `decoder_steps`, `decoder_guidance_scale`, `timeout_s`; the client's
`extra_body`) have the limits of `POST /v1/generate`; explicit step counts override `quality`.
`response_format=url`, `background=transparent` and `style` are refused with 400. The seeds
used are in `data[].seed` and the `X-Seed` header (comma-separated). `stream=true` answers with
Server-Sent Events (`text/event-stream`): `partial_images` (0-3) `image_generation.partial_image`
events, previews of the Stage C prediction spread over its steps, then one
`image_generation.completed` per image (service/openai_stream.py)."""


@dataclass(frozen=True)
class Generation:
    """A validated OpenAI request: what to compute and how to answer."""

    params: GenerationParams
    quality: str  # low / medium / high (auto resolved)
    output_format: str  # png / jpeg / webp
    compression: int  # JPEG / WebP quality


def served_model_id(info: dict[str, str | bool]) -> str:
    """The OpenAI model id of the loaded model: its name (demo "demo-shapes", real weights
    "stable-cascade-<prior>-<decoder>", e.g. stable-cascade-lite-lite)."""
    return str(info.get("name", "stable-cascade"))


def quality_steps(defaults: SamplingDefaults, quality: str) -> tuple[int, int]:
    """(prior_steps, decoder_steps) of a quality tier."""
    share = QUALITY_SHARE[quality]
    return math.ceil(defaults.prior_steps * share), math.ceil(defaults.decoder_steps * share)


def parse_size(size: str | None, defaults: SamplingDefaults) -> tuple[int, int]:
    """ "WxH" -> (width, height); None or auto -> the model's default size. The model's limits are
    checked later, with every other field (validated_params)."""
    if size is None or size == "auto":
        return defaults.width, defaults.height
    match = _SIZE.fullmatch(size)
    if match is None:  # the schema's pattern refuses this first; kept for direct callers
        raise InvalidRequest(f"size: must be WIDTHxHEIGHT or auto, got {size!r}", field="size")
    return int(match.group(1)), int(match.group(2))


def to_generation(
    body: Any, engine: Engine, settings: Settings, image: ImageInput | None = None
) -> Generation:
    """An OpenAI request (ImageGenerationRequest, ImageEditRequest or ImageVariationRequest) ->
    validated GenerationParams, the quality tier and the output format; raises ModelNotFound
    (404) or InvalidRequest / Unsupported (400). With an ``image``, size auto (or omitted) is the
    image's size within the model's limits. Variations have no prompt, quality or output format:
    an empty caption, the default steps, PNG."""
    served = served_model_id(engine.model_info)
    if body.model is not None and body.model != served:
        raise ModelNotFound(
            f"the model {body.model!r} does not exist on this server; it serves {served!r} "
            "(GET /v1/models), or omit model",
            field="model",
        )
    if image is not None and body.size in (None, "auto"):
        width, height = output_size(engine.limits, image.image.size, None, None)
    else:
        width, height = parse_size(body.size, engine.defaults)
    asked = getattr(body, "quality", None)
    quality = "high" if asked in (None, "auto") else asked
    prior_steps, decoder_steps = quality_steps(engine.defaults, quality)
    sampling = {
        "width": width,
        "height": height,
        "prior_steps": body.prior_steps if body.prior_steps is not None else prior_steps,
        "prior_guidance_scale": body.prior_guidance_scale,
        "decoder_steps": body.decoder_steps if body.decoder_steps is not None else decoder_steps,
        "decoder_guidance_scale": body.decoder_guidance_scale,
    }
    params = validated_params(
        engine,
        settings,
        prompt=getattr(body, "prompt", ""),
        negative_prompt=body.negative_prompt,
        num_images=body.n if body.n is not None else 1,
        seed=body.seed,
        sampling=sampling,
        names=OPENAI_NAMES,
        image=image,
    )
    compression = getattr(body, "output_compression", None)
    output_format = getattr(body, "output_format", None) or "png"
    return Generation(params, quality, output_format, 100 if compression is None else compression)


def count_text_tokens(pipeline: Any, texts: list[str]) -> int:
    """CLIP tokens the text encoder reads of ``texts`` (BOS and EOS included, at most its
    max_length each; empty texts use the precomputed unconditional embedding and count 0). 0 when
    the pipeline exposes no tokenizer. Runs in the encode pool: the slow CLIP tokenizer is Python."""
    encoder = getattr(pipeline, "text_encoder", None)
    tokenizer = getattr(encoder, "tokenizer", None)
    limit = getattr(encoder, "max_length", None)
    if tokenizer is None or limit is None:
        return 0
    return sum(
        len(tokenizer(text, truncation=True, max_length=limit)["input_ids"])
        for text in texts
        if text
    )


def images_body(
    done: JobResult, b64_images: list[str], generation: Generation, tokens: int
) -> ImagesResponse:
    """The response of a finished job whose images [n, 3, H, W] are encoded in ``b64_images``."""
    images = done.result.images
    return ImagesResponse(
        created=int(time.time()),
        data=[
            OpenAIImage(b64_json=b64, seed=seed)
            for b64, seed in zip(b64_images, done.result.seeds, strict=True)
        ],
        output_format=generation.output_format,  # type: ignore[arg-type]
        quality=generation.quality,  # type: ignore[arg-type]
        size=f"{int(images.shape[-1])}x{int(images.shape[-2])}",
        usage=Usage(
            input_tokens=tokens,
            input_tokens_details=InputTokensDetails(text_tokens=tokens, image_tokens=0),
            output_tokens=0,
            total_tokens=tokens,
        ),
    )


Answer = Callable[..., Awaitable[Response]]


def images_answer(runtime: Runtime, settings: Settings, metrics: Metrics) -> Answer:
    """The second half of every image route: queue the job, then stream its events (``events``:
    the partial and completed event names of the route) or wait and answer with the
    ImagesResponse. The job is the same as ``/v1/generate``'s: queue, deadline, cancellation by
    request id, metrics."""

    async def answer(
        request: Request,
        engine: Engine,
        body: Any,
        generation: Generation,
        events: tuple[str, str] = (PARTIAL, COMPLETED),
    ) -> Response:
        user = getattr(body, "safety_identifier", None) or getattr(body, "user", None)
        if user:  # accepted for compatibility, used for nothing
            logger.debug("%s user=%r", request.state.request_id, user)
        params = generation.params
        warnings = prompt_warnings(params, engine.model_info)
        stream = bool(getattr(body, "stream", False))
        partial_images = getattr(body, "partial_images", None)
        previews = frozenset[int]()
        if stream and partial_images:
            if engine.previews:
                previews = spread_over_steps(partial_images, params.prior_start[0])
            else:
                warnings.append(NO_PREVIEWER)
        job = runtime.submit(
            params, body.timeout_s, request.state.request_id, request_owner(request), previews
        )

        async def encoded(done: JobResult) -> tuple[ImagesResponse, list[str]]:
            encode = partial(
                encode_b64, output_format=generation.output_format, quality=generation.compression
            )
            png_texts = png_parameters_of(params, engine.model_info, settings.png_metadata)
            (b64, seconds), tokens = await asyncio.gather(
                encode_each(runtime.encode, encode, done.result.images, png_texts),
                runtime.encode(
                    count_text_tokens, engine.pipeline, [params.prompt, params.negative_prompt]
                ),
            )
            label = "b64_json" if generation.output_format == "png" else generation.output_format
            metrics.encode_duration.labels(label).observe(seconds)
            return images_body(done, b64, generation, tokens), b64

        headers = {
            "X-Seed": ",".join(str(params.seed + i) for i in range(job.images)),
            **warning_header(warnings),
        }
        if stream:
            request.state.outcome = "stream"

            async def completed(done: JobResult) -> tuple[list[str], dict[str, Any]]:
                response, b64 = await encoded(done)
                return b64, response.usage.model_dump()

            response = openai_event_stream(
                runtime,
                job,
                output_format=generation.output_format,
                quality=generation.quality,
                compression=generation.compression,
                completed=completed,
                events=events,
            )
            response.headers.update(headers)
            return response
        done = await runtime.wait(job, request.receive)
        request.state.outcome = "ok"
        body_out, _ = await encoded(done)
        return JSONResponse(body_out.model_dump(), headers=headers)

    return answer


def install_openai_routes(
    app: FastAPI, runtime: Runtime, settings: Settings, metrics: Metrics
) -> None:
    """Add the OpenAI-compatible routes to ``app`` (before the middleware is added): generations
    and models here, edits and variations in service/openai_image_routes.py."""
    started = int(time.time())
    answer = images_answer(runtime, settings, metrics)

    def loaded() -> Engine:
        if runtime.engine is None:  # listing the model needs it loaded; draining still lists it
            raise NotReady(
                runtime.failure or "the model is still loading; retry after the Retry-After delay"
            )
        return runtime.engine

    def model_object(engine: Engine) -> ModelObject:
        info = engine.model_info
        # The real weights are Stability AI's; the demo and tiny models are this project's.
        owner = "cascade-serve" if info.get("demo") else "stabilityai"
        return ModelObject(id=served_model_id(info), created=started, owned_by=owner)

    @app.post(
        "/v1/images/generations",
        response_model=ImagesResponse,
        responses={
            200: stream_200(PARTIAL, COMPLETED),
            **errors(400, 401, 404, 409, 413, 500, 503, 504),
        },
        summary="Generate images (OpenAI Images API)",
        description=GENERATE_DESCRIPTION,
    )
    async def generate_images(body: ImageGenerationRequest, request: Request) -> Response:
        engine = runtime.accepting()
        return await answer(request, engine, body, to_generation(body, engine, settings))

    @app.get(
        "/v1/models",
        response_model=ModelList,
        responses=errors(401, 503),
        summary="The served model (OpenAI list shape)",
    )
    async def list_models() -> JSONResponse:
        """One entry: the loaded model. Its id is what ``model`` may name in a request."""
        return JSONResponse(ModelList(data=[model_object(loaded())]).model_dump())

    @app.get(
        "/v1/models/{model_id}",
        response_model=ModelObject,
        responses=errors(401, 404, 503),
        summary="One model by id (OpenAI shape)",
    )
    async def get_model(model_id: str) -> JSONResponse:
        engine = loaded()
        found = model_object(engine)
        if model_id != found.id:
            raise ModelNotFound(
                f"the model {model_id!r} does not exist on this server; it serves {found.id!r}",
                field="model",
            )
        return JSONResponse(found.model_dump())
