"""create_app(settings) -> FastAPI: the routes, the lifespan, and the one place errors become
responses.

Path of a generate request: RequestMiddleware (413, metrics) -> GenerateRequest (400/422) ->
build_params (422) -> Runtime.submit (503) -> JobQueue -> BatchWorker -> Engine (compute thread) ->
Runtime.wait (504 / disconnect) -> PNG encoding (thread pool) -> JSON or image/png.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.access_log import install_access_log
from service.api_docs import install_docs
from service.auth import install_auth, request_owner
from service.cors import install_cors
from service.engine import Pipeline, load_pipeline
from service.errors import InternalError, InvalidJson, InvalidRequest, ServiceError
from service.image_requests import json_image_input
from service.imaging import encode_b64_png, encode_png, png_parameters_of
from service.jobs import JobResult
from service.metrics import Metrics
from service.middleware import RequestMiddleware
from service.openai_api import install_openai_routes
from service.openai_errors import error_body, from_validation, is_openai_path
from service.openai_image_routes import install_openai_image_routes
from service.openapi import install_openapi
from service.playground import install_playground
from service.responses import (
    build_params,
    encode_each,
    png_response,
    prompt_warnings,
    response_body,
    timings_of,
    wants_png,
    warning_header,
)
from service.runtime import Runtime
from service.schemas import ErrorResponse, GenerateRequest, GenerateResponse, Health, RequestState
from service.settings import Settings
from service.streaming import event_schema, event_stream, every_k_steps, wants_stream
from service.upload_limits import body_bytes, oversized, route_limits

logger = logging.getLogger("service.app")

RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}
}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The body is not valid JSON (code invalid_json)"},
    401: {
        "model": ErrorResponse,
        "description": "Missing or wrong API key (only when CASCADE_API_KEYS is configured)",
    },
    409: {
        "model": ErrorResponse,
        "description": "Cancelled by DELETE /v1/requests/{id} (cancelled), or a client-chosen "
        "X-Request-ID still in flight (request_id_in_use)",
    },
    413: {
        "model": ErrorResponse,
        "description": "The body is over CASCADE_MAX_BODY_BYTES (body_too_large), or its "
        "image over CASCADE_MAX_IMAGE_BYTES (image_too_large)",
    },
    422: {
        "model": ErrorResponse,
        "description": "A field is invalid; error.field names it (invalid_field)",
    },
    500: {
        "model": ErrorResponse,
        "description": "Generation failed (generation_failed, non_finite_output, "
        "gpu_out_of_memory, internal_error)",
    },
    503: {
        "model": ErrorResponse,
        "description": "Queue full, still loading, or shutting down "
        "(queue_full, not_ready, draining)",
        "headers": RETRY_AFTER,
    },
    504: {
        "model": ErrorResponse,
        "description": "The deadline passed before the request's first step (deadline_exceeded)",
    },
}
PNG_200: dict[str, Any] = {
    "description": "JSON with base64 PNGs, or (Accept: image/png / response_format=png) the raw "
    "PNG with X-Seed, X-Prompt-Truncated, X-Demo-Weights and Server-Timing headers. Either way, "
    "X-Cascade-Warning (only when there is one) repeats the body's warnings on one ASCII line: "
    "the demo model's notice that a prompt is outside what it was trained on",
    "content": {
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "text/event-stream": event_schema(
            ["queued", "started", "step", "preview", "result", "error"],
            "stream=true or Accept: text/event-stream: Server-Sent Events queued, started, "
            "step, preview, then result (this route's JSON body) or error",
        ),
    },
    "headers": {
        "X-Cascade-Warning": {
            "description": "The warnings of the request, on one ASCII line; absent when none",
            "schema": {"type": "string"},
        }
    },
}
NO_PREVIEWER = (
    "previews are off: the loaded model has no Previewer (previewer.safetensors in "
    "CASCADE_WEIGHTS_DIR); the stream carries progress events only"
)
HEALTH_BODY = (
    "Both health routes return the same body, a snapshot of the server (status, ready, model, "
    "demo_weights, queue_depth, inflight_jobs, message); only their status codes differ."
)


def create_app(
    settings: Settings | None = None, pipeline_factory: Callable[[Settings], Pipeline] | None = None
) -> FastAPI:
    """One app = one model replica. ``pipeline_factory`` builds the pipeline (default: from
    settings)."""
    settings = settings if settings is not None else Settings.from_env()
    metrics = Metrics(settings.max_batch_images)
    runtime = Runtime(settings, metrics, pipeline_factory or load_pipeline)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.start()  # loads and warms up in the background; /health/ready is 503 until done
        yield
        await runtime.stop()

    app = FastAPI(
        title="Stable Cascade inference",
        version="0.1.0",
        description="Text-to-image with Stable Cascade. Errors share one envelope: "
        '{"error": {"code", "message", "field", "request_id"}}.',
        lifespan=lifespan,
        docs_url=None,  # served offline by install_docs; no /redoc
        redoc_url=None,
    )
    app.state.runtime, app.state.settings, app.state.metrics = runtime, settings, metrics
    _add_error_handlers(app, metrics, settings)

    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        responses={200: PNG_200, **ERRORS},
        summary="Generate images from a prompt",
    )
    async def generate(body: GenerateRequest, request: Request) -> Response:
        received_at: float = getattr(request.state, "received_at", time.monotonic())
        body.check_prompt_and_image()
        engine = runtime.accepting()
        accept = request.headers.get("accept", "")
        streaming = wants_stream(body.stream, accept)
        if streaming and body.response_format == "png":
            raise InvalidRequest(
                "a stream carries its images as base64 in its result event: leave out "
                "response_format=png (or stream=false for a raw image/png body)",
                field="response_format",
            )
        raw_png = not streaming and wants_png(body.response_format, accept)
        image = await json_image_input(runtime, body, body_bytes(request), settings)
        params = build_params(body, engine, settings, raw_png, image)
        warnings = prompt_warnings(params, engine.model_info)
        preview_steps = frozenset[int]()
        if body.preview_every is not None:
            if not streaming:
                raise InvalidRequest(
                    "previews are sent as events of a stream: add stream=true (or Accept: "
                    "text/event-stream), or leave out preview_every",
                    field="preview_every",
                )
            if engine.previews:
                preview_steps = every_k_steps(body.preview_every, params.prior_start[0])
            else:
                warnings.append(NO_PREVIEWER)
        request_id = request.state.request_id
        job = runtime.submit(params, body.timeout_s, request_id, _owner(request), preview_steps)

        texts = png_parameters_of(params, engine.model_info, settings.png_metadata)

        async def b64_body(done: JobResult) -> dict[str, Any]:
            b64, seconds = await encode_each(
                runtime.encode, encode_b64_png, done.result.images, texts
            )
            metrics.encode_duration.labels("b64_json").observe(seconds)
            timings = timings_of(done, seconds, received_at)
            return response_body(
                done, b64, timings, engine.model_info, request_id, warnings, params
            )

        if streaming:
            request.state.outcome = "stream"
            response = event_stream(runtime, job, metrics, b64_body)
            response.headers.update(warning_header(warnings))
            return response
        done = await runtime.wait(job, request.receive)
        request.state.outcome = "ok"
        if raw_png:
            (png,), seconds = await encode_each(
                runtime.encode, encode_png, done.result.images, texts
            )
            metrics.encode_duration.labels("png").observe(seconds)
            timings = timings_of(done, seconds, received_at)
            return png_response(done, png, timings, engine.model_info, warnings, params)
        return JSONResponse(await b64_body(done), headers=warning_header(warnings))

    @app.get(
        "/v1/requests/{request_id}",
        response_model=RequestState,
        responses={404: {"model": ErrorResponse, "description": "No such request (not_found)"}},
        summary="The state of a queued, running or recently finished request",
    )
    async def request_state(request_id: str, request: Request) -> JSONResponse:
        """queued (with queue_position), running (stage, step, total), done, failed or
        cancelled. With API keys on, only the key that submitted the request sees it."""
        return JSONResponse(runtime.describe(request_id, _owner(request)))

    @app.delete(
        "/v1/requests/{request_id}",
        response_model=RequestState,
        responses={404: {"model": ErrorResponse, "description": "No such request (not_found)"}},
        summary="Cancel a queued or running request",
    )
    async def cancel_request(request_id: str, request: Request) -> JSONResponse:
        """Cancels the request whose id its response or X-Request-ID header carries: the waiting
        request is answered 409 ``cancelled`` at once and its images leave the running batch at
        the next denoising step. ``cancelled`` is false when it had already finished. With API
        keys on, only the key that submitted it may cancel it (others get 404)."""
        return JSONResponse(runtime.cancel(request_id, _owner(request)))

    def health() -> Health:
        """The one snapshot both probes report (consistent: model is set exactly when loaded)."""
        model = runtime.engine.model_info if runtime.engine is not None else None
        # "stopped" is the last moment of draining, after the drain has finished
        state = "draining" if runtime.state == "stopped" else runtime.state
        return Health(
            status=state,  # type: ignore[arg-type]
            ready=runtime.state == "ready",
            model=model,
            demo_weights=bool(model.get("demo")) if model is not None else None,
            queue_depth=len(runtime.queue),
            inflight_jobs=len(runtime.inflight),
            message=runtime.failure,
        )

    @app.get(
        "/health/live",
        response_model=Health,
        responses={503: {"model": Health, "description": "Loading the model failed"}},
        description="200 while the process serves HTTP, whether loading, ready or draining; 503 "
        "only if loading the model failed (the process then exits). " + HEALTH_BODY,
    )
    async def live() -> JSONResponse:
        body = health()
        return JSONResponse(body.model_dump(), status_code=503 if body.status == "failed" else 200)

    @app.get(
        "/health/ready",
        response_model=Health,
        responses={
            503: {
                "model": Health,
                "description": "Loading, draining or failed",
                "headers": RETRY_AFTER,
            }
        },
        description="200 once the model is loaded and warmed up and while the server takes "
        "requests; 503 (with Retry-After) before that, while draining, or after a failed load. "
        + HEALTH_BODY,
    )
    async def ready() -> JSONResponse:
        body = health()
        headers = {} if body.ready else {"Retry-After": str(settings.retry_after_s)}
        return JSONResponse(
            body.model_dump(), status_code=200 if body.ready else 503, headers=headers
        )

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}
        },
    )
    async def prometheus_metrics() -> Response:
        """Prometheus text format; every metric is prefixed cascade_."""
        if runtime.engine is not None:
            metrics.set_gpu_memory(runtime.engine.memory_stats())
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    install_openai_routes(app, runtime, settings, metrics)
    install_openai_image_routes(app, runtime, settings, metrics)
    install_docs(app)
    install_playground(app)
    endpoints = frozenset(r.path for r in app.routes if hasattr(r, "path"))
    # Last added is outermost: access log -> CORS -> RequestMiddleware (413, metrics) -> API keys
    # -> routes, so refusals carry the request id and CORS headers, are counted and are logged.
    auth = install_auth(app)
    app.state.auth_enabled = auth.enabled
    install_openapi(app, runtime, settings, auth)
    app.add_middleware(
        RequestMiddleware,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        endpoints=endpoints,
        route_limits=route_limits(settings),
    )
    install_cors(app, settings)
    install_access_log(app)
    return app


def _add_error_handlers(app: FastAPI, metrics: Metrics, settings: Settings) -> None:
    def reply(request: Request, error: ServiceError) -> JSONResponse:
        request.state.outcome = error.reason or error.code
        if error.reason is not None:
            metrics.rejected.labels(error.reason).inc()
        if error.status == 500:
            logger.error("%s %s: %s", request.state.request_id, error.code, error.message)
        # the OpenAI routes answer in OpenAI's shape (service/openai_errors.py), the others in ours
        status, body = error_body(
            request.url.path,
            error.status,
            error.code,
            error.message,
            error.field,
            getattr(request.state, "request_id", None),
        )
        return JSONResponse(body, status_code=status, headers=error.headers(settings.retry_after_s))

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return reply(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # a body over the JSON limit without an image is too large before it is invalid
        too_large = oversized(request.url.path, body_bytes(request), exc.body, settings)
        if too_large is not None:
            return reply(request, too_large)
        if is_openai_path(request.url.path):
            return reply(request, from_validation(exc, request.url.path))
        return reply(request, _from_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI could not decode the body (bad UTF-8, nesting depth)
            return reply(
                request,
                InvalidJson(
                    "the request body could not be parsed (not UTF-8, or nested too deeply); "
                    "send a UTF-8 JSON object"
                ),
            )
        error = ServiceError(str(exc.detail))
        error.status, error.code = exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error")
        response = reply(request, error)
        response.headers.update(exc.headers or {})  # e.g. Allow on 405
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return reply(
            request, InternalError(f"internal error ({type(exc).__name__}); please report it")
        )


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def _owner(request: Request) -> str | None:
    """Who submitted a request, as a digest of its API key (None while keys are off): the only
    one who may see or cancel it."""
    return request_owner(request)


def _from_validation(exc: RequestValidationError) -> ServiceError:
    """Pydantic's errors -> one InvalidRequest naming the first bad field (all are listed in the
    message)."""
    problems: list[str] = []
    first_field: str | None = None
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ()) if part != "body"]
        if err.get("type") == "json_invalid":
            detail = err.get("ctx", {}).get("error", "")
            return InvalidJson(f"the request body is not valid JSON ({detail}); send a JSON object")
        field = ".".join(loc) or None
        if field is None:
            problems.append(
                "the body must be a JSON object (Content-Type: application/json) with at least "
                "a prompt"
            )
            continue
        message = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            message = f"unknown field; allowed fields: {', '.join(GenerateRequest.model_fields)}"
        elif err.get("type") == "missing":
            message = "field required"
        first_field = first_field or field
        problems.append(f"{field}: {message}")
    return InvalidRequest("; ".join(problems) or "invalid request", field=first_field)
