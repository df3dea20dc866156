"""Errors on the OpenAI-compatible routes (``/v1/images/*``, ``/v1/models``): OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` with the statuses the official client maps to
its exception types (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 409
ConflictError, 5xx InternalServerError, which it retries).

Every other route keeps the service's own envelope (``{"error": {"code", "message", "field",
"request_id"}}``) and its 422s. ``error_body`` is the one switch, by path; app.py's exception
handlers, RequestMiddleware (413) and the API-key middleware (401) all call it, so a refusal has
the same shape whichever layer answers it.

Deliberately light (no torch, no FastAPI at import): service/auth.py imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service.errors import InvalidJson, InvalidRequest, NotFound, ServiceError

if TYPE_CHECKING:
    from fastapi.exceptions import RequestValidationError

OPENAI_PREFIXES = ("/v1/images/", "/v1/models/")
OPENAI_PATHS = frozenset({"/v1/models"})

# Our codes that OpenAI names otherwise; the rest (queue_full, deadline_exceeded, ...) pass as
# they are: the client only reads `code` as a string.
_OPENAI_CODES = {"invalid_field": "invalid_value", "unauthorized": "invalid_api_key"}

# OpenAI parameters of images.generate that this server does not implement: named in the
# message instead of "unknown parameter" (they would otherwise look like typos).
UNSUPPORTED = {
    "complexity": "it plans GPT Image renderings",
    "frame_count": "GIF output is not available",
    "frame_duration_ms": "GIF output is not available",
    "svg": "SVG output is not available",
    "prompt_rewriter": "prompts are used as given",
    "input_fidelity": "use strength instead: lower keeps more of the input image",
}

# Why an OpenAI value is refused, appended to pydantic's "Input should be ..." message.
_HINTS = {
    "response_format": "url is not available: this server keeps no images after answering, so a "
    "URL would point at nothing; use b64_json (the default)",
    "background": "transparent is not available: the model draws opaque RGB images",
    "output_format": "gif and svg are not available",
    "quality": "auto and high use the model's default step counts, medium and low fewer",
    "style": "style is a DALL-E 3 parameter this model does not have: describe the style in "
    "the prompt",
}


class ModelNotFound(NotFound):
    """A request (or GET /v1/models/{id}) names a model this server does not serve."""

    code, reason = "model_not_found", "invalid"


class Unsupported(InvalidRequest):
    """A valid OpenAI value this server does not implement (400 on the OpenAI routes)."""

    code = "unsupported_value"


def is_openai_path(path: str) -> bool:
    return path in OPENAI_PATHS or path.startswith(OPENAI_PREFIXES)


def error_body(
    path: str, status: int, code: str, message: str, field: str | None, request_id: str | None
) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of an error answered on ``path``: OpenAI's shape on its routes (a 422
    becomes 400, the status the client raises BadRequestError for), ours elsewhere."""
    if not is_openai_path(path):
        return status, {
            "error": {"code": code, "message": message, "field": field, "request_id": request_id}
        }
    if status == 422:
        status = 400
    kind = "server_error" if status >= 499 else "invalid_request_error"
    param = None if status == 401 else field  # the header is no request parameter
    return status, {
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": _OPENAI_CODES.get(code, code),
        }
    }


def from_validation(exc: RequestValidationError, path: str = "") -> ServiceError:
    """pydantic's errors for an OpenAI request body (on ``path``) -> one error naming the first
    bad parameter (all are listed in the message), with OpenAI's codes: unknown_parameter,
    missing_required_parameter, invalid_type, invalid_value."""
    # Imported here: the schemas pull in torch (models.request), which auth.py need not load.
    from service.openai_image_forms import FORM_MODELS
    from service.openai_schemas import ImageGenerationRequest

    model = FORM_MODELS.get(path, ImageGenerationRequest)
    allowed = ("image", *model.model_fields) if path in FORM_MODELS else tuple(model.model_fields)

    problems: list[str] = []
    first: tuple[str, str] | None = None
    for err in exc.errors():
        kind = err.get("type", "")
        if kind == "json_invalid":
            detail = err.get("ctx", {}).get("error", "")
            return InvalidJson(f"the request body is not valid JSON ({detail}); send a JSON object")
        loc = [str(part) for part in err.get("loc", ()) if part != "body"]
        if not loc:
            problems.append("the body must be a JSON object (Content-Type: application/json)")
            first = first or ("", "invalid_type")
            continue
        param = loc[0]  # every parameter is top level; a nested loc is inside a bad value
        if kind == "extra_forbidden":
            code = "unknown_parameter"
            why = UNSUPPORTED.get(param)
            message = (
                f"unknown parameter: this server does not support it ({why})"
                if why
                else "unknown parameter; allowed: " + ", ".join(allowed)
            )
        elif kind == "missing":
            code, message = "missing_required_parameter", "parameter required"
        else:
            code = "invalid_type" if kind.endswith("_type") else "invalid_value"
            message = err.get("msg", "invalid")
            if param in _HINTS and kind in ("literal_error", "none_required", "value_error"):
                message = f"{message}; {_HINTS[param]}"
        first = first or (param, code)
        problems.append(f"{param}: {message}")
    error = InvalidRequest(
        "; ".join(problems) or "invalid request", field=(first or ("",))[0] or None
    )
    error.code = first[1] if first else "invalid_value"
    return error
