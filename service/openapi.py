"""/openapi.json with the loaded model's request limits.

The static schema only knows type-level limits; sizes, step counts and guidance ranges belong to the
model (``pipeline.limits``) and the per-request caps to the settings. Once the model is loaded they are
written into the GenerateRequest schema, so a client (or a schema-driven test tool) generating requests
from the document gets no 422 for a request the document calls valid.

With API keys on, the document declares an HTTP bearer scheme required by every operation except those
the keys middleware leaves open (``security: []``), exactly as ``AuthConfig.requires_key`` decides; /docs
then shows an Authorize button. With keys off it declares no scheme.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.auth import AuthConfig
from service.openai_image_forms import FORM_MODELS, form_schema
from service.responses import OPTIONAL_SAMPLING
from service.runtime import Runtime
from service.settings import Settings

_TEXT = r"[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"
_VISIBLE = r"[^\s\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"
BEARER = "bearer"
_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def install_openapi(
    app: FastAPI, runtime: Runtime, settings: Settings, auth: AuthConfig | None = None
) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        fields = schema["components"]["schemas"]["GenerateRequest"]["properties"]
        for name in ("prompt", "negative_prompt"):
            _constrain(fields[name], maxLength=settings.max_prompt_chars)
        # no control characters but tab and newlines; the prompt also not blank without an image
        _constrain(fields["prompt"], pattern=f"^{_TEXT}*$")
        _constrain(fields["negative_prompt"], pattern=f"^{_TEXT}*$")
        # raw PNG holds one image; a stream carries base64 images and is the only place for
        # previews (Accept: text/event-stream also asks for a stream: the schema cannot say so)
        request = schema["components"]["schemas"]["GenerateRequest"]
        request["allOf"] = [
            {
                "if": {
                    "properties": {"response_format": {"const": "png"}},
                    "required": ["response_format"],
                },
                "then": {
                    "properties": {
                        "num_images": {"maximum": 1},
                        "stream": {"const": False},
                    }
                },
            },
            {
                "if": {
                    "properties": {"preview_every": {"type": "integer"}},
                    "required": ["preview_every"],
                },
                "then": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
            },
            *IMAGE_RULES,
        ]
        max_images = settings.max_batch_images
        if runtime.engine is not None:
            limits = runtime.engine.pipeline.limits
            for name in ("width", "height"):
                _constrain(
                    fields[name],
                    minimum=limits.min_size,
                    maximum=limits.max_size,
                    multipleOf=limits.size_step,
                )
            for name in ("prior_steps", "decoder_steps"):
                _constrain(fields[name], maximum=limits.max_steps)
            for name in ("prior_guidance_scale", "decoder_guidance_scale"):
                _constrain(fields[name], maximum=limits.max_guidance_scale)
            # what an omitted field becomes with this model (the playground prefills its form)
            defaults = runtime.engine.pipeline.defaults
            for name in OPTIONAL_SAMPLING:
                fields[name]["default"] = getattr(defaults, name)
            max_images = min(max_images, limits.max_num_images)
            app.openapi_schema = schema  # final once the model is known
        _constrain(fields["num_images"], maximum=max_images)
        _constrain_openai(schema, runtime, settings, max_images)
        if auth is not None and auth.enabled:
            _add_bearer_security(schema, auth)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


_NOT_BLANK = {"pattern": f"^{_TEXT}*{_VISIBLE}{_TEXT}*$"}
_NULL = {"type": "null"}
_HAS_IMAGE = {"required": ["image"], "properties": {"image": {"type": "string"}}}
# The rules of schemas.GenerateRequest.check_prompt_and_image and image_requests.image_defaults:
# without an image the prompt is required and not blank, strength / image_variation null; with
# one, the image must be used: not strength 1 (given, or by default with an empty prompt)
# together with image_variation false (given, or by default with a prompt).
IMAGE_RULES: list[dict[str, Any]] = [
    {
        "if": _HAS_IMAGE,
        "then": {
            "not": {
                "anyOf": [
                    {
                        "required": ["strength"],
                        "properties": {"strength": {"const": 1}},
                        "anyOf": [
                            {
                                "required": ["image_variation"],
                                "properties": {"image_variation": {"const": False}},
                            },
                            {
                                "required": ["prompt"],
                                "properties": {"prompt": _NOT_BLANK, "image_variation": _NULL},
                            },
                        ],
                    },
                    {
                        "required": ["image_variation"],
                        "properties": {
                            "image_variation": {"const": False},
                            "strength": _NULL,
                            "prompt": {"pattern": r"^\s*$"},
                        },
                    },
                ]
            }
        },
        "else": {
            "required": ["prompt"],
            "properties": {"prompt": _NOT_BLANK, "strength": _NULL, "image_variation": _NULL},
        },
    }
]


def _constrain(field: dict[str, Any], **constraints: Any) -> None:
    """Add JSON-schema constraints to a field, or to the non-null branch of an optional field."""
    branches = [b for b in field.get("anyOf", [field]) if b.get("type") != "null"]
    for branch in branches:
        branch.update(constraints)


def _constrain_openai(
    schema: dict[str, Any], runtime: Runtime, settings: Settings, max_images: int
) -> None:
    """The same limits on the OpenAI route's request (service/openai_api.py), plus what only the
    loaded model decides there: its id for ``model`` and its sizes, spelled out in ``size``'s
    pattern. The OpenAI routes answer 400, never 422: FastAPI's default 422 is dropped."""
    for path, operations in schema["paths"].items():
        if path.startswith(("/v1/images/", "/v1/models")):
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
    components = schema["components"]["schemas"]
    for model in FORM_MODELS.values():  # the multipart bodies, which FastAPI does not describe
        components[model.__name__] = form_schema(model)
    for name in ("ImageGenerationRequest", *(m.__name__ for m in FORM_MODELS.values())):
        if name in components:
            _constrain_openai_request(components[name]["properties"], runtime, settings, max_images)


def _constrain_openai_request(
    fields: dict[str, Any], runtime: Runtime, settings: Settings, max_images: int
) -> None:
    """One OpenAI request body's limits (the fields it has of these)."""
    if "prompt" in fields:
        _constrain(fields["prompt"], pattern=f"^{_TEXT}*{_VISIBLE}{_TEXT}*$")
        _constrain(fields["prompt"], maxLength=settings.max_prompt_chars)
    _constrain(fields["negative_prompt"], maxLength=settings.max_prompt_chars)
    _constrain(fields["negative_prompt"], pattern=f"^{_TEXT}*$")
    _constrain(fields["n"], maximum=max_images)
    if runtime.engine is None:
        return
    limits = runtime.engine.pipeline.limits
    sizes = "|".join(
        str(s) for s in range(limits.min_size, limits.max_size + 1) if s % limits.size_step == 0
    )
    _constrain(fields["size"], pattern=f"^(auto|({sizes})x({sizes}))$")
    _constrain(fields["model"], enum=[str(runtime.engine.model_info.get("name"))])
    for name in ("prior_steps", "decoder_steps"):
        _constrain(fields[name], maximum=limits.max_steps)
    for name in ("prior_guidance_scale", "decoder_guidance_scale"):
        _constrain(fields[name], maximum=limits.max_guidance_scale)


def _add_bearer_security(schema: dict[str, Any], auth: AuthConfig) -> None:
    """Declare the bearer scheme, require it by default, and mark the open operations
    ``security: []`` (the health probes, /metrics unless CASCADE_METRICS_REQUIRE_KEY)."""
    schema.setdefault("components", {})["securitySchemes"] = {
        BEARER: {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key of CASCADE_API_KEYS / CASCADE_API_KEYS_FILE, sent as "
            "'Authorization: Bearer <key>'",
        }
    }
    schema["security"] = [{BEARER: []}]
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            if method in _METHODS:
                operation["security"] = [{BEARER: []}] if auth.requires_key(path) else []
