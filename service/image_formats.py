"""Image tensors -> PNG, JPEG or WebP files (and base64), for the OpenAI-compatible route. Runs in
the encode thread pool (``Runtime.encode``), never on the event loop. PNG is service/imaging.py's
encoder, so both routes give the same PNG bytes."""

from __future__ import annotations

import base64
import io

import torch
from PIL import Image

from service.imaging import encode_png

FORMATS = ("png", "jpeg", "webp")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(
    image: torch.Tensor, output_format: str, quality: int = 100, parameters: str | None = None
) -> bytes:
    """image: uint8 [3, H, W] on the CPU -> the file bytes. ``quality`` (0-100, 100 = best) is
    Pillow's JPEG / WebP quality; PNG is lossless and ignores it. ``parameters``: the PNG's
    ``parameters`` text chunk (service/imaging.py; JPEG and WebP carry none)."""
    if output_format == "png":
        return encode_png(image, parameters)
    if output_format not in FORMATS:
        raise ValueError(f"unknown output format {output_format!r}; expected one of {FORMATS}")
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 [3, H, W] image, got {image.dtype} {list(image.shape)}")
    array = image.permute(1, 2, 0).contiguous().numpy()  # (3, H, W) -> (H, W, 3)
    buffer = io.BytesIO()
    if output_format == "jpeg":
        # 4:4:4 at high quality: Pillow's default 4:2:0 halves the colour resolution, which shows
        # on the sharp colour edges this model draws; at lower quality size matters more.
        subsampling = 0 if quality >= 90 else 2
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality, subsampling=subsampling)
    else:
        # method 4 (Pillow's default) of 0-6: 6 is ~2x slower for a few percent smaller files
        Image.fromarray(array).save(buffer, format="WEBP", quality=quality, method=4)
    return buffer.getvalue()


def encode_b64(
    image: torch.Tensor,
    parameters: str | None = None,
    *,
    output_format: str = "png",
    quality: int = 100,
) -> str:
    """image: uint8 [3, H, W] -> the file, base64 (ASCII); the argument order of
    ``responses.encode_each``'s encoders."""
    data = encode_image(image, output_format, quality, parameters)
    return base64.b64encode(data).decode("ascii")
