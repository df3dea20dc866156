"""The OpenAI routes that take an image: ``POST /v1/images/edits`` (image-to-image:
``client.images.edit``) and ``POST /v1/images/variations`` (image variation:
``client.images.create_variation``). Multipart bodies (service/openai_image_forms.py), the image
decoded and checked as on ``/v1/generate`` (service/image_input.py), then the same job and the
same answer as ``/v1/images/generations`` (``openai_api.images_answer``: ImagesResponse, or a
stream of ``image_edit.*`` events on edits).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from PIL import Image

from service.image_requests import (
    IMG2IMG_STRENGTH,
    VARIATION_STRENGTH,
    ImageInput,
    decode_file_image,
)
from service.metrics import Metrics
from service.openai_api import errors, images_answer, stream_200, to_generation
from service.openai_image_forms import (
    ImageEditRequest,
    ImageVariationRequest,
    read_upload,
    validated_fields,
)
from service.openai_schemas import ImagesResponse
from service.openai_stream import EDIT_COMPLETED, EDIT_PARTIAL
from service.runtime import Runtime
from service.settings import Settings
from service.upload_limits import body_bytes

EDIT_DESCRIPTION = """OpenAI's image edits (`client.images.edit`) as Stable Cascade's
image-to-image: Stage C starts from the input image's latent noised to t = `strength` (default
0.8, the official example; lower keeps more of the image) and runs int(`prior_steps` x
`strength`) steps towards `prompt`. multipart/form-data: one `image` file (PNG, JPEG or WebP; also
`image[]`), the parameters as text parts, with the limits and quality tiers of
`/v1/images/generations` plus our `strength`. `size` omitted or `auto`: the input image's size,
scaled down to the model's largest size if needed, snapped to its size step. `mask` and `markup`
are refused (400): the whole picture is redrawn. `stream=true`: `image_edit.partial_image` events,
then one `image_edit.completed` per image."""

VARIATION_DESCRIPTION = """OpenAI's image variations (`client.images.create_variation`) as
Stable Cascade's image variation (the official recipe): an empty caption, Stage C conditioned on
the input image's CLIP image embedding and sampled from noise. multipart/form-data: one `image`
file (PNG, JPEG or WebP), `n`, `size` (omitted or `auto`: the input's size, as on edits),
`response_format` (b64_json), `model`, and our `seed`, `negative_prompt`, step counts and
guidance. A model without an image encoder (`image_encoder/` in the weights) refuses it (400,
param `image`)."""


def _form_body(schema_name: str) -> dict[str, Any]:
    """The route's request body in the OpenAPI document: a form whose schema is a component
    (added by service/openapi.py, with the loaded model's limits)."""
    ref = {"$ref": f"#/components/schemas/{schema_name}"}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": ref}}}}


def install_openai_image_routes(
    app: FastAPI, runtime: Runtime, settings: Settings, metrics: Metrics
) -> None:
    """Add /v1/images/edits and /v1/images/variations to ``app`` (before the middleware)."""
    answer = images_answer(runtime, settings, metrics)

    async def upload(request: Request, model: Any) -> tuple[Any, Any, Image.Image]:
        """The form's fields (400), the engine (503 unless ready), then the decoded image."""
        form = await read_upload(request, settings.max_body_bytes)
        body = validated_fields(model, form)
        engine = runtime.accepting()
        image = await decode_file_image(runtime, form.image, body_bytes(request), settings)
        return body, engine, image

    @app.post(
        "/v1/images/edits",
        response_model=ImagesResponse,
        responses={
            200: stream_200(EDIT_PARTIAL, EDIT_COMPLETED),
            **errors(400, 401, 404, 409, 413, 500, 503, 504),
        },
        openapi_extra=_form_body("ImageEditRequest"),
        summary="Image-to-image (OpenAI image edits)",
        description=EDIT_DESCRIPTION,
    )
    async def edit_images(request: Request) -> Response:
        body, engine, image = await upload(request, ImageEditRequest)
        strength = IMG2IMG_STRENGTH if body.strength is None else body.strength
        generation = to_generation(body, engine, settings, ImageInput(image, strength, False))
        return await answer(request, engine, body, generation, (EDIT_PARTIAL, EDIT_COMPLETED))

    @app.post(
        "/v1/images/variations",
        response_model=ImagesResponse,
        responses=errors(400, 401, 404, 409, 413, 500, 503, 504),
        openapi_extra=_form_body("ImageVariationRequest"),
        summary="Image variations (OpenAI image variations)",
        description=VARIATION_DESCRIPTION,
    )
    async def image_variations(request: Request) -> Response:
        body, engine, image = await upload(request, ImageVariationRequest)
        variation = ImageInput(image, VARIATION_STRENGTH, image_variation=True)
        generation = to_generation(body, engine, settings, variation)
        return await answer(request, engine, body, generation)
