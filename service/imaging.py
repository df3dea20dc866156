"""Image tensors -> PNG bytes (and base64). Runs in a thread pool, never on the event loop.

compress_level=1: about half the time of Pillow's default level 6 for ~16% larger files (see
performance.md §4.1); level 9 costs ~20x more for ~20% smaller files.

Each PNG may carry its generation parameters in a ``parameters`` text chunk, in the layout other
image tools (AUTOMATIC1111's web UI) use, adapted to Stable Cascade's two sampled stages::

    a red circle on a blue background
    Negative prompt: blurry
    Prior steps: 20, Prior CFG: 4.0, Decoder steps: 10, Decoder CFG: 1.5, Seed: 42, Size: 128x128, Model: demo-shapes

The negative prompt line is left out when it is empty; ``Seed`` is the image's own (seed + i for
image i). A request with an input image adds ``Strength: 0.8, Image variation: false`` (the
effective values; the input image itself is never stored). Nothing in it varies between runs (no time, no request id), so the same request and seed
still give the same bytes. The chunk is tEXt (Latin-1), or iTXt (UTF-8) when the prompts have other
characters.
"""

from __future__ import annotations

import base64
import io

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from models.request import GenerationParams

PNG_COMPRESS_LEVEL = 1
PARAMETERS_KEY = "parameters"


def encode_png(image: torch.Tensor, parameters: str | None = None) -> bytes:
    """image: uint8 [3, H, W] on the CPU -> PNG file bytes, with ``parameters`` (the text of
    ``png_parameters``) in a ``parameters`` text chunk when given."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 [3, H, W] image, got {image.dtype} {list(image.shape)}")
    array = image.permute(1, 2, 0).contiguous().numpy()  # (3, H, W) -> (H, W, 3)
    info = None
    if parameters is not None:
        info = PngInfo()
        info.add_text(PARAMETERS_KEY, parameters)  # iTXt by itself when not Latin-1
    buffer = io.BytesIO()
    Image.fromarray(array).save(
        buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, pnginfo=info
    )
    return buffer.getvalue()


def encode_b64_png(image: torch.Tensor, parameters: str | None = None) -> str:
    """image: uint8 [3, H, W] -> the PNG file (as ``encode_png``), base64 (ASCII)."""
    return base64.b64encode(encode_png(image, parameters)).decode("ascii")


def png_parameters(params: GenerationParams, index: int, model: str) -> str:
    """The ``parameters`` text of image ``index`` of a request (module docstring)."""
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    settings = {
        "Prior steps": params.prior_steps,
        "Prior CFG": float(params.prior_guidance_scale),
        "Decoder steps": params.decoder_steps,
        "Decoder CFG": float(params.decoder_guidance_scale),
        "Seed": params.seed + index,
        "Size": f"{params.width}x{params.height}",
        "Model": model,
    }
    if params.image is not None:  # what was done with it; never the image itself
        settings["Strength"] = float(params.strength)
        settings["Image variation"] = str(params.image_variation).lower()
    lines.append(", ".join(f"{name}: {value}" for name, value in settings.items()))
    return "\n".join(lines)


def png_parameters_of(
    params: GenerationParams, model_info: dict[str, str | bool], enabled: bool
) -> list[str | None]:
    """The ``parameters`` text of each image of a request, or None for each when disabled
    (CASCADE_PNG_METADATA=false)."""
    model = str(model_info.get("name", "unknown"))
    return [png_parameters(params, i, model) if enabled else None for i in range(params.num_images)]
