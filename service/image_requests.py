"""Between an uploaded image and GenerationParams, for every route that takes one
(``POST /v1/generate``, ``/v1/images/edits``, ``/v1/images/variations``): the size checks of the
parsed body, decoding in the encode pool (service/image_input.py), and the image fields of a
request with their defaults resolved.

Defaults (spec §7.8): with an empty prompt the official variation recipe (CLIP image embedding,
Stage C from noise: ``image_variation`` true, ``strength`` 1.0); with a prompt the official
image-to-image example (``strength`` 0.8, no variation). Omitted width / height follow the image
(``output_size``). A request whose image would change nothing (strength 1 without
variation: Stage C starts from noise and never sees the image) is refused rather than silently
answered with a text-to-image picture.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from service.errors import InvalidRequest
from service.image_input import check_file_size, decode_base64_image, decode_image
from service.settings import Settings
from service.upload_limits import check_fields_size

if TYPE_CHECKING:
    from PIL import Image

    from service.runtime import Runtime
    from service.schemas import GenerateRequest

IMG2IMG_STRENGTH = 0.8  # the official image-to-image example's noise level
VARIATION_STRENGTH = 1.0  # the official variation recipe samples Stage C from noise


@dataclass(frozen=True)
class ImageInput:
    """A decoded input image and what to do with it, defaults resolved."""

    image: Image.Image
    strength: float
    image_variation: bool

    def fields(self) -> dict[str, Any]:
        """The GenerationParams fields."""
        return {
            "image": self.image,
            "strength": self.strength,
            "image_variation": self.image_variation,
        }


async def json_image_input(
    runtime: Runtime, body: GenerateRequest, body_bytes: int, settings: Settings
) -> ImageInput | None:
    """The image of a ``POST /v1/generate`` body, decoded off the event loop, with its defaults
    (None without one). The body's fields within CASCADE_MAX_BODY_BYTES and the image file
    within CASCADE_MAX_IMAGE_BYTES (413); a bad image is an InvalidRequest (422)."""
    check_fields_size(body_bytes, None if body.image is None else len(body.image), settings)
    if body.image is None:
        return None
    strength, variation = image_defaults(body.prompt, body.strength, body.image_variation)
    decode = partial(
        decode_base64_image,
        max_bytes=settings.max_image_bytes,
        max_pixels=settings.max_image_pixels,
    )
    return ImageInput(await runtime.encode(decode, body.image), strength, variation)


async def decode_file_image(
    runtime: Runtime, data: bytes, body_bytes: int, settings: Settings
) -> Image.Image:
    """An uploaded image file (a multipart part): sizes (413), then decoded off the event loop."""
    check_fields_size(body_bytes, len(data), settings)
    check_file_size(len(data), settings.max_image_bytes)
    return await runtime.encode(partial(decode_image, max_pixels=settings.max_image_pixels), data)


def image_defaults(
    prompt: str, strength: float | None, image_variation: bool | None
) -> tuple[float, bool]:
    """(strength, image_variation) with the defaults for what the request left out (module
    docstring); InvalidRequest when the image would not be used."""
    empty = not prompt.strip()
    variation = empty if image_variation is None else image_variation
    if strength is None:
        strength = VARIATION_STRENGTH if empty else IMG2IMG_STRENGTH
    if strength >= 1.0 and not variation:
        field = "image_variation" if image_variation is not None and empty else "strength"
        raise InvalidRequest(
            f"{field}: with strength 1 (Stage C from noise) and image_variation false the image "
            "would not be used: lower strength for image-to-image (e.g. 0.8), or set "
            "image_variation true to condition on the image",
            field=field,
        )
    return float(strength), variation


def output_size(
    limits: Any, image_size: tuple[int, int], width: int | None, height: int | None
) -> tuple[int, int]:
    """Width and height for a request with an image. Both left out: the image's size snapped to
    the model's ``limits`` (``Limits.snap``: scaled, aspect ratio kept, into the size range, each
    side to the nearest multiple of the size step). One given: the other follows the image's
    aspect ratio. Given sides are kept as they are (``pipeline.validate`` checks them)."""
    image_width, image_height = image_size
    if width is None and height is None:
        return tuple(limits.snap(image_width, image_height))  # type: ignore[return-value]
    if width is not None and height is not None:
        return width, height
    if width is not None:
        return width, _side(width * image_height / image_width, limits)
    assert height is not None
    return _side(height * image_width / image_height, limits), height


def _side(value: float, limits: Any) -> int:
    step = limits.size_step
    return min(limits.max_size, max(limits.min_size, step * round(value / step)))
