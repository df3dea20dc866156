"""Image-to-image: a picture -> the noised Stage C latent that sampling starts from (spec §7.8).

The official recipe: resize the picture so its shorter side is 768 px (antialiased), encode it with
the EfficientNet encoder (stride 32: 768 -> 24, the Stage C latent of a 1024 px image), noise the
latent to t = strength with ``gdf.diffuse``, and sample Stage C from t_start = strength for
int(steps * strength) steps.

Two things are fixed here that the recipe leaves to its fixed 1024 px output:
- The encoder input is 32 x the Stage C latent of the *requested* output size, so the latent always
  has the shape Stage C samples: a picture is centre-cropped to the output's aspect ratio, then
  resized (bilinear, antialiased, as torchvision's Resize on tensors). For a 1024 x 1024 output
  that is the recipe's 768 x 768; for 1536 x 1024 it is 1152 x 768 (shorter side 768 again).
- ``diffuse`` uses the *unshifted* (shift 1) schedule while the sampler then runs the shift-2 grid
  from the same t: at t = 0.8 the start latent has logSNR -3.65 where the grid assumes -2.27. That
  is the official behaviour and is kept for parity.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from models.schedule import alpha_sigma, cosine_logsnr

ENCODER_STRIDE = 32  # EfficientNet output stride: encoder pixels per Stage C latent cell


def encoder_pixels(image: Image.Image, latent_hw: tuple[int, int]) -> Tensor:
    """An RGB picture -> the encoder's input [3, 32 h, 32 w] float32 in [0, 1] for a Stage C
    latent of ``latent_hw`` = (h, w): centre crop to the aspect w : h, then resize."""
    h, w = latent_hw
    out_h, out_w = ENCODER_STRIDE * h, ENCODER_STRIDE * w
    width, height = image.size
    # The largest centre window of the picture with the output's aspect ratio.
    if width * out_h > height * out_w:
        crop_w, crop_h = max(1, round(height * out_w / out_h)), height
    else:
        crop_w, crop_h = width, max(1, round(width * out_h / out_w))
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    window = image.convert("RGB").crop((left, top, left + crop_w, top + crop_h))
    pixels = torch.from_numpy(np.asarray(window).copy()).permute(2, 0, 1).float().div(255)
    resized = F.interpolate(
        pixels[None], size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False
    )
    return resized[0].clamp(0.0, 1.0)


def start_scales(strength: float) -> tuple[float, float]:
    """(a, b) of ``gdf.diffuse`` at t = strength: the shift-1 cosine schedule (see module doc)."""
    a, b = alpha_sigma(cosine_logsnr(torch.tensor(float(strength)), shift=1.0))
    return float(a), float(b)


def noised_latent(latent: Tensor, noise: Tensor, strength: float) -> Tensor:
    """x_init = a * latent + b * noise, with (a, b) = start_scales(strength).

    latent: [1, C, h, w] (one picture's encoding, broadcast over the images of a request) or
    [n, C, h, w]; noise: [n, C, h, w], drawn from each image's own generator. Returns float32.
    """
    if not 0.0 < strength <= 1.0 or not math.isfinite(strength):
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    a, b = start_scales(strength)
    return (a * latent.float() + b * noise.float()).float()
