"""Bodies of the OpenAI-compatible routes, checked against the ``openai`` package's types
(``openai.types.ImagesResponse``, ``image.Image``, ``images_response.Usage``, ``Model``) so the
official client parses them. Our own sampling fields ride in the same request body (what the client
sends through ``extra_body``), with the limits of ``POST /v1/generate``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from models.request import MAX_SEED
from service.schemas import json_number, no_control_characters

_FLOATS = frozenset({"prior_guidance_scale", "decoder_guidance_scale", "timeout_s"})
SIZE_PATTERN = r"^(auto|[1-9][0-9]{0,4}x[1-9][0-9]{0,4})$"


class ImageGenerationRequest(BaseModel):
    """``POST /v1/images/generations``. OpenAI's parameters, then ours."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, description="What to draw (not blank).")
    model: str | None = Field(
        None, description="The served model's id (GET /v1/models); omitted: that model."
    )
    n: int | None = Field(1, ge=1, description="Images; image i uses seed + i. Default 1.")
    size: str | None = Field(
        None,
        pattern=SIZE_PATTERN,
        description="WIDTHxHEIGHT within the model's limits, or auto (the model's default size).",
    )
    quality: Literal["auto", "low", "medium", "high"] | None = Field(
        None, description="Step counts (see the route description); auto = high = defaults."
    )
    response_format: Literal["b64_json"] | None = Field(
        None, description="b64_json only: the server keeps no images, so it has no URLs."
    )
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="Default png.")
    output_compression: int | None = Field(
        None,
        ge=0,
        le=100,
        description="jpeg / webp quality, 0-100 (default 100: the best, largest). Ignored for png, "
        "which is lossless.",
    )
    background: Literal["auto", "opaque"] | None = Field(
        None, description="Images are always opaque; transparent is refused."
    )
    moderation: Literal["auto", "low"] | None = Field(
        None, description="Accepted for compatibility; this server applies no moderation filter."
    )
    style: None = Field(None, description="DALL-E 3 only: any value is refused.")
    user: str | None = Field(None, description="Accepted and ignored (logged at debug level).")
    safety_identifier: str | None = Field(None, description="As user: accepted and ignored.")
    stream: bool | None = Field(
        None,
        description="true: Server-Sent Events, image_generation.partial_image events then "
        "image_generation.completed (one per image).",
    )
    partial_images: int | None = Field(
        None,
        ge=0,
        le=3,
        description="0-3 previews of the Stage C prediction streamed before the final image "
        "(fewer only when Stage C has fewer steps); only with stream.",
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Seed of the first image; random if omitted."
    )
    negative_prompt: str = Field("", description="What to steer away from.")
    prior_steps: int | None = Field(None, ge=1, description="Stage C steps (overrides quality).")
    prior_guidance_scale: float | None = Field(None, ge=0, description="Stage C guidance.")
    decoder_steps: int | None = Field(None, ge=1, description="Stage B steps (overrides quality).")
    decoder_guidance_scale: float | None = Field(None, ge=0, description="Stage B guidance.")
    timeout_s: float | None = Field(
        None, ge=0.1, description="Shortens the deadline for this request to start computing."
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must contain non-whitespace text")
        return value

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _no_control_characters(cls, value: str) -> str:
        return no_control_characters(value)

    @field_validator(
        "n",
        "output_compression",
        "partial_images",
        "seed",
        "prior_steps",
        "prior_guidance_scale",
        "decoder_steps",
        "decoder_guidance_scale",
        "timeout_s",
        mode="before",
    )
    @classmethod
    def _json_number(cls, value: object, info: ValidationInfo) -> object:
        return json_number(value, "a float" if info.field_name in _FLOATS else "an integer")

    @field_validator("stream", mode="before")
    @classmethod
    def _json_bool(cls, value: object) -> object:
        # lax mode would read "true", 1 and "yes" as true
        if value is not None and not isinstance(value, bool):
            raise ValueError("must be true or false (a JSON boolean)")
        return value


class OpenAIImage(BaseModel):
    b64_json: str = Field(..., description="The image file (output_format), base64-encoded.")
    revised_prompt: None = Field(None, description="Always null: prompts are used as given.")
    seed: int = Field(..., description="The seed that reproduces this image (seed + index).")


class InputTokensDetails(BaseModel):
    text_tokens: int = Field(..., description="CLIP tokens of the prompt and negative prompt.")
    image_tokens: int = Field(
        0, description="Always 0: input images (edits, variations) are not counted in tokens."
    )


class Usage(BaseModel):
    """OpenAI's usage object. Input: the CLIP tokens the text encoder read (BOS and EOS included,
    at most 77 per text; 0 when the loaded pipeline exposes no tokenizer). Output: 0, nothing is
    metered by tokens here."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int = 0
    total_tokens: int


class ImagesResponse(BaseModel):
    created: int = Field(..., description="Unix time the response was made.")
    data: list[OpenAIImage]
    background: Literal["opaque"] = "opaque"
    output_format: Literal["png", "jpeg", "webp"]
    quality: Literal["low", "medium", "high"] = Field(
        ..., description="The quality tier used (auto resolves to high)."
    )
    size: str = Field(..., description="WIDTHxHEIGHT of the images.")
    usage: Usage


class ModelObject(BaseModel):
    id: str = Field(..., description="The loaded model's name (model_info.name).")
    object: Literal["model"] = "model"
    created: int = Field(..., description="Unix time this server started.")
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class OpenAIErrorDetail(BaseModel):
    message: str = Field(..., description="What went wrong and what to do about it.")
    type: Literal["invalid_request_error", "server_error"]
    param: str | None = Field(None, description="The request parameter at fault, if any.")
    code: str | None = Field(
        None, description="e.g. invalid_value, unknown_parameter, model_not_found, queue_full."
    )


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail
