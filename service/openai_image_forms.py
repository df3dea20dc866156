"""The multipart/form-data bodies of ``POST /v1/images/edits`` and ``POST /v1/images/variations``,
as the official ``openai`` client sends them (``client.images.edit``,
``client.images.create_variation``): one file part ``image`` (the client names it ``image[]`` when
given a list), the other parameters as text parts.

``read_upload`` parses the body within the server's limits and separates the image from the
fields; the fields are then validated by ``ImageEditRequest`` / ``ImageVariationRequest`` (form
values are text, so numbers are parsed from it: "2" is 2, "true" is true). Every refusal is a 400
in OpenAI's shape (service/openai_errors.py), or 413 for an image over CASCADE_MAX_IMAGE_BYTES.
"""

from __future__ import annotations

from copy import copy
from dataclasses import dataclass
from typing import Any, Literal

# Starlette parses forms with python-multipart; imported here so a missing install stops the app
# from being built instead of failing every upload.
import python_multipart  # noqa: F401
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect

from service.errors import ClientDisconnected, InvalidForm, InvalidRequest
from service.openai_errors import Unsupported
from service.openai_schemas import ImageGenerationRequest
from service.schemas import no_control_characters

IMAGE_PARTS = ("image", "image[]")
# File parameters of OpenAI's edits that this server does not implement, and why.
REFUSED_FILES = {
    "mask": "inpainting with a mask is not supported: image-to-image here redraws the whole "
    "picture, strength sets how much (lower keeps more); leave out mask",
    "markup": "markup images are not supported; leave out markup",
}
_MAX_PARTS = 8  # a few more files than the one allowed, so that two images get their own message


def _same(name: str, **changes: Any) -> Any:
    """The field ``name`` of ImageGenerationRequest (its type limits and description), for a form
    model; ``changes`` replace some of its attributes."""
    info = copy(ImageGenerationRequest.model_fields[name])
    return FieldInfo.merge_field_infos(info, **changes) if changes else info


class _FormFields(BaseModel):
    """What the form models share: form values are text, so the JSON route's strict number and
    boolean checks do not apply; NaN and infinities are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("negative_prompt", check_fields=False)
    @classmethod
    def _no_control_characters(cls, value: str) -> str:
        return no_control_characters(value)


class ImageEditRequest(_FormFields):
    """``POST /v1/images/edits`` (besides the ``image`` file): image-to-image. OpenAI's
    parameters, then ours."""

    prompt: str = _same("prompt", description="What to draw from the image (not blank).")
    model: str | None = _same("model")
    n: int | None = _same("n")
    size: str | None = _same(
        "size",
        description="WIDTHxHEIGHT within the model's limits, or auto / omitted: the input "
        "image's size, scaled down to the model's largest size if needed and snapped to its "
        "size step.",
    )
    quality: Literal["auto", "low", "medium", "high"] | None = _same("quality")
    response_format: Literal["b64_json"] | None = _same("response_format")
    output_format: Literal["png", "jpeg", "webp"] | None = _same("output_format")
    output_compression: int | None = _same("output_compression")
    background: Literal["auto", "opaque"] | None = _same("background")
    user: str | None = _same("user")
    safety_identifier: str | None = _same("safety_identifier")
    stream: bool | None = _same(
        "stream",
        description="true: Server-Sent Events, image_edit.partial_image events then "
        "image_edit.completed (one per image).",
    )
    partial_images: int | None = _same("partial_images")
    strength: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="How much of the image is redrawn: Stage C starts from the image's latent "
        "noised to t = strength and runs int(prior_steps x strength) steps. Default 0.8 (the "
        "official image-to-image example); lower keeps more of the image.",
    )
    seed: int | None = _same("seed")
    negative_prompt: str = _same("negative_prompt")
    prior_steps: int | None = _same("prior_steps")
    prior_guidance_scale: float | None = _same("prior_guidance_scale")
    decoder_steps: int | None = _same("decoder_steps")
    decoder_guidance_scale: float | None = _same("decoder_guidance_scale")
    timeout_s: float | None = _same("timeout_s")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must contain non-whitespace text")
        return no_control_characters(value)


class ImageVariationRequest(_FormFields):
    """``POST /v1/images/variations`` (besides the ``image`` file): the official image-variation
    recipe (empty caption, Stage C conditioned on the image's CLIP embedding, from noise)."""

    model: str | None = _same("model")
    n: int | None = _same("n")
    size: str | None = _same(
        "size",
        description="WIDTHxHEIGHT within the model's limits, or auto / omitted: the input "
        "image's size, scaled down to the model's largest size if needed and snapped to its "
        "size step.",
    )
    response_format: Literal["b64_json"] | None = _same("response_format")
    user: str | None = _same("user")
    seed: int | None = _same("seed")
    negative_prompt: str = _same("negative_prompt")
    prior_steps: int | None = _same("prior_steps", description="Stage C steps.")
    prior_guidance_scale: float | None = _same("prior_guidance_scale")
    decoder_steps: int | None = _same("decoder_steps", description="Stage B steps.")
    decoder_guidance_scale: float | None = _same("decoder_guidance_scale")
    timeout_s: float | None = _same("timeout_s")


# path -> the model of its form fields (errors list its fields; the OpenAPI document its schema)
FORM_MODELS: dict[str, type[_FormFields]] = {
    "/v1/images/edits": ImageEditRequest,
    "/v1/images/variations": ImageVariationRequest,
}


@dataclass
class Upload:
    """A parsed form: the image file's bytes and the text fields."""

    image: bytes
    fields: dict[str, str]


async def read_upload(request: Request, max_field_bytes: int) -> Upload:
    """Parse the multipart body: exactly one image file part (``image`` or ``image[]``), text
    fields of at most ``max_field_bytes`` each. Raises InvalidForm, InvalidRequest, Unsupported
    (400 on these routes)."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "multipart/form-data":
        raise InvalidForm(
            "send the image as multipart/form-data (a file part named image, the parameters as "
            f"text parts); got Content-Type {content_type or 'none'!r}"
        )
    try:
        form = await request.form(
            max_files=_MAX_PARTS, max_fields=_MAX_PARTS * 4, max_part_size=max_field_bytes
        )
    except ClientDisconnect:
        raise ClientDisconnected("the client went away while sending its upload") from None
    except (HTTPException, MultiPartException) as exc:
        detail = getattr(exc, "detail", None) or getattr(exc, "message", str(exc))
        raise InvalidForm(f"the multipart/form-data body could not be parsed: {detail}") from None
    try:
        images: list[UploadFile] = []
        fields: dict[str, str] = {}
        for name, value in form.multi_items():
            if name in REFUSED_FILES:
                raise Unsupported(f"{name}: {REFUSED_FILES[name]}", field=name)
            if isinstance(value, UploadFile):
                if name not in IMAGE_PARTS:
                    raise _unknown_file(name)
                images.append(value)
            elif name in IMAGE_PARTS:
                raise InvalidRequest(
                    "image: must be a file part (Content-Disposition with a filename), not a text "
                    "field",
                    field="image",
                )
            elif name in fields:
                raise InvalidRequest(f"{name}: given more than once", field=name)
            else:
                fields[name] = value
        if not images:
            error = InvalidRequest(
                "image: parameter required (a PNG, JPEG or WebP file)", field="image"
            )
            error.code = "missing_required_parameter"
            raise error
        if len(images) > 1:
            raise InvalidRequest(
                f"image: {len(images)} images were sent; this route takes one image",
                field="image",
            )
        return Upload(image=await images[0].read(), fields=fields)
    finally:
        await form.close()


def _unknown_file(name: str) -> InvalidRequest:
    error = InvalidRequest(f"{name}: unknown file parameter; the only file is image", field=name)
    error.code = "unknown_parameter"
    return error


def validated_fields(model: type[_FormFields], upload: Upload) -> Any:
    """The text fields as ``model``; a ValidationError becomes the route's 400 (the
    RequestValidationError handler names the first bad parameter)."""
    from fastapi.exceptions import RequestValidationError

    try:
        return model.model_validate(upload.fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(), body=upload.fields) from None


def form_schema(model: type[_FormFields]) -> dict[str, Any]:
    """The OpenAPI schema of a form: the model's fields plus the image file part. A form cannot
    send null, so an optional field is described by its value's type alone (left out: its
    default)."""
    schema = model.model_json_schema()
    for field in schema["properties"].values():
        if "anyOf" in field:
            branches = [b for b in field.pop("anyOf") if b.get("type") != "null"]
            if len(branches) == 1:
                field.update(branches[0])
            else:
                field["anyOf"] = branches
        if "default" in field and field["default"] is None:
            del field["default"]
    image = {
        "type": "string",
        "format": "binary",
        "description": "The input image: one PNG, JPEG or WebP file (also accepted as image[], "
        "the client's spelling for a list; more than one is refused). At most "
        "CASCADE_MAX_IMAGE_BYTES and CASCADE_MAX_IMAGE_PIXELS; EXIF orientation applied, "
        "transparency composited on white.",
    }
    schema["properties"] = {"image": image, **schema["properties"]}
    schema["required"] = ["image", *schema.get("required", [])]
    return schema
