"""HTTP request and response bodies. Static limits live here; model-specific ones (sizes, step
counts) come from ``pipeline.validate`` and are checked in app.py before a job is queued."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from models.request import MAX_SEED
from service.errors import InvalidRequest

_FLOAT_FIELDS = frozenset(
    {"prior_guidance_scale", "decoder_guidance_scale", "timeout_s", "strength"}
)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class GenerateRequest(BaseModel):
    """``POST /v1/generate``. Omitted sampling fields take the loaded model's defaults."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(
        "",
        description="What to draw. Required and not blank without an image; with an image it "
        "may be empty or left out (an image variation, by default).",
    )
    negative_prompt: str = Field("", description="What to steer away from.")
    width: int | None = Field(
        None, ge=1, description="Output width in pixels (model default if omitted)."
    )
    height: int | None = Field(
        None, ge=1, description="Output height in pixels (model default if omitted)."
    )
    num_images: int = Field(1, ge=1, description="Images of this prompt; image i uses seed + i.")
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Seed of the first image; chosen at random and returned if omitted.",
    )
    prior_steps: int | None = Field(None, ge=1, description="Stage C sampling steps.")
    prior_guidance_scale: float | None = Field(
        None, ge=0, description="Stage C classifier-free guidance."
    )
    decoder_steps: int | None = Field(None, ge=1, description="Stage B sampling steps.")
    decoder_guidance_scale: float | None = Field(
        None, ge=0, description="Stage B classifier-free guidance."
    )
    response_format: Literal["png", "b64_json"] | None = Field(
        None,
        description="png: the raw image/png body (num_images must be 1); b64_json: JSON with "
        "base64 PNGs. Omitted: png if the Accept header asks for image/png, else b64_json.",
    )
    timeout_s: float | None = Field(
        None,
        ge=0.1,
        description="Shortens the server's deadline for this request to start computing (seconds).",
    )
    stream: bool = Field(
        False,
        description="true: answer with Server-Sent Events (text/event-stream) reporting the "
        "queue position, every step and previews, then the result (the JSON body) or the error; "
        "also chosen by Accept: text/event-stream. See the route's description.",
    )
    preview_every: int | None = Field(
        None,
        ge=1,
        description="Streams only: a preview picture (the Previewer's rendering of the Stage C "
        "prediction) every this many Stage C steps, and after the last. Ignored with a warning "
        "when the model has no Previewer.",
    )

    image: str | None = Field(
        None,
        description="An input image: a PNG, JPEG or WebP file, base64-encoded (or a "
        "data:image/...;base64, URL). Image-to-image (strength < 1) and/or image variation. "
        "At most CASCADE_MAX_IMAGE_BYTES of file and CASCADE_MAX_IMAGE_PIXELS pixels; EXIF "
        "orientation is applied, transparency composited on white. Omitted width/height: the "
        "image's size, scaled down to the model's largest size if needed, snapped to its size "
        "step.",
        json_schema_extra={"format": "byte", "contentEncoding": "base64"},
    )
    strength: float | None = Field(
        None,
        gt=0,
        le=1,
        description="With an image only. Below 1: Stage C starts from the image's latent noised "
        "to t = strength and runs int(prior_steps x strength) steps (lower keeps more of the "
        "image); 1: from pure noise. Default 0.8 with a prompt, 1.0 without one.",
    )
    image_variation: bool | None = Field(
        None,
        description="With an image only: also condition Stage C on the image's CLIP image "
        "embedding (the official image-variation recipe). Default true when the prompt is "
        "empty, else false.",
    )

    @field_validator("stream", mode="before")
    @classmethod
    def _json_bool(cls, value: object) -> object:
        if not isinstance(value, bool):
            raise ValueError("must be true or false (a JSON boolean)")  # noqa: TRY004
        return value

    @field_validator("image_variation", mode="before")
    @classmethod
    def _json_bool_or_null(cls, value: object) -> object:
        if value is not None and not isinstance(value, bool):
            raise ValueError("must be true or false (a JSON boolean)")
        return value

    @field_validator(
        "width",
        "height",
        "num_images",
        "seed",
        "prior_steps",
        "prior_guidance_scale",
        "decoder_steps",
        "decoder_guidance_scale",
        "timeout_s",
        "preview_every",
        "strength",
        mode="before",
    )
    @classmethod
    def _json_number(cls, value: object, info: ValidationInfo) -> object:
        return json_number(value, "a float" if info.field_name in _FLOAT_FIELDS else "an integer")

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _no_control_characters(cls, value: str) -> str:
        return no_control_characters(value)

    def check_prompt_and_image(self) -> None:
        """The rules across fields: without an image the prompt is required and not blank, and
        strength / image_variation mean nothing. InvalidRequest (422) naming the field."""
        if self.image is not None:
            return
        for name in ("strength", "image_variation"):
            if getattr(self, name) is not None:
                raise InvalidRequest(
                    f"{name} applies to an input image: add image (base64), or leave out {name}",
                    field=name,
                )
        if "prompt" not in self.model_fields_set:
            raise InvalidRequest(
                "prompt: field required (a non-blank string; it may be left out only with an "
                "image)",
                field="prompt",
            )
        if not self.prompt:
            raise InvalidRequest(
                "prompt: must have at least 1 character (what to draw); only a request with an "
                "image may leave it empty",
                field="prompt",
            )
        if not self.prompt.strip():
            raise InvalidRequest("prompt must contain non-whitespace text", field="prompt")


def json_number(value: object, kind: str) -> object:
    """A before-validator for numeric fields: ``kind`` is "an integer" or "a float"."""
    # pydantic's lax mode would read true as 1 and "20" as 20; the schema says number. (Strict
    # mode would refuse 2.0 for an integer, which JSON Schema counts as an integer.)
    if isinstance(value, bool | str):
        raise ValueError(f"must be {kind} (a JSON number), not a string or true/false")  # noqa: TRY004
    return value


def no_control_characters(value: str) -> str:
    """A validator for prompts: they mean nothing to the text encoder and corrupt logs and
    terminals; tab and newlines pass. Text that is not Unicode (a lone surrogate, which JSON's
    \\ud800 escapes can carry) is refused too: the tokenizer cannot read it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"not valid Unicode text: a lone surrogate U+{ord(value[exc.start]):04X} at index "
            f"{exc.start}"
        ) from None
    bad = _CONTROL.search(value)
    if bad:
        raise ValueError(
            f"control character U+{ord(bad.group()):04X} at index {bad.start()} is not allowed"
        )
    return value


class ImageData(BaseModel):
    b64_json: str = Field(..., description="The PNG file, base64-encoded.")
    seed: int = Field(
        ..., description="The seed that reproduces this image (request seed + index)."
    )


class Timings(BaseModel):
    """Seconds. Stage times are those of the compute calls this request took part in (shared with
    whatever else was in them)."""

    queue_wait: float = Field(..., description="Arrival to admission (text encoding).")
    first_step: float = Field(..., description="Arrival to the end of the first denoising step.")
    text: float
    prior: float
    decoder: float
    vqgan: float
    encode: float = Field(..., description="PNG (and base64) encoding of this request's images.")
    total: float = Field(..., description="Arrival to response, as seen by the server.")


class GenerateResponse(BaseModel):
    id: str = Field(..., description="Request id (also the X-Request-ID header).")
    created: int = Field(..., description="Unix time the response was made.")
    model: dict[str, str | bool] = Field(
        ..., description="Identity of the loaded model; demo=true: demo weights."
    )
    data: list[ImageData]
    seed: int = Field(..., description="Seed of the first image.")
    width: int
    height: int
    batch_images: int = Field(..., description="Images in the batch this request was computed in.")
    prompt_truncated: bool = Field(
        ..., description="The prompt was longer than the text encoder reads."
    )
    negative_prompt_truncated: bool
    warnings: list[str] = Field(
        default_factory=list,
        description="Things about this request the model could not honour, for a person to read "
        "(also the X-Cascade-Warning header). Today only the demo model warns: about a prompt or "
        "negative prompt outside the words and sentence form it was trained on. Empty otherwise.",
    )
    timings: Timings
    strength: float | None = Field(
        None,
        description="With an input image: the strength used (the request's, or its default); "
        "null without an image.",
    )
    image_variation: bool | None = Field(
        None,
        description="With an input image: whether Stage C was conditioned on it (the request's "
        "value, or its default); null without an image.",
    )


class ErrorDetail(BaseModel):
    code: str = Field(
        ..., description="Stable machine-readable code, e.g. invalid_field, queue_full."
    )
    message: str = Field(..., description="What went wrong and what to do about it.")
    field: str | None = Field(None, description="The request field at fault, if any.")
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    """The body of both health probes: the same snapshot of the server; only the HTTP status
    differs (``/health/live``: 503 only after a failed model load; ``/health/ready``: 200 only
    when ready)."""

    status: Literal["starting", "ready", "draining", "failed"] = Field(
        ...,
        description="starting: loading or warming up the model; ready: taking requests; "
        "draining: shutting down, finishing admitted requests; failed: the model could not load.",
    )
    ready: bool = Field(..., description="status == ready: new requests are admitted.")
    model: dict[str, str | bool] | None = Field(
        None, description="Identity of the loaded model; null until it has loaded."
    )
    demo_weights: bool | None = Field(
        None, description="The loaded model is the built-in demo model; null until it has loaded."
    )
    queue_depth: int = Field(..., description="Jobs waiting in the queue.")
    inflight_jobs: int = Field(
        ..., description="Jobs admitted and not yet answered (queued or computing)."
    )
    message: str | None = Field(None, description="Why loading failed, when status is failed.")


class RequestState(BaseModel):
    """The state of one request (GET / DELETE /v1/requests/{id})."""

    id: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    stage: Literal["queued", "prior", "decoder", "vqgan", "done"] = Field(
        description="Where the job is: queued, prior (Stage C), decoder (Stage B), vqgan "
        "(Stage A), done"
    )
    step: int | None = Field(None, description="Steps done in the current stage")
    total: int | None = Field(None, description="Steps of the current stage")
    queue_position: int | None = Field(None, description="0 = next to be admitted")
    cancelled: bool | None = Field(
        None, description="DELETE only: whether this call cancelled the request"
    )
