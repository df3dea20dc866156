"""The demo's training-only semantic encoder: the stand-in for EfficientNetV2-S that defines Stage C's latent.

Stage C of the released model generates EfficientNet features (16 x 24 x 24 at 1024 px) and Stage B decodes them.
The demo replaces EfficientNet by this small encoder: image -> 16 x 3 x 3 (the Stage C latent of a 128 px image).
It is used only while training (to make Stage C's targets and Stage B's condition); it is never shipped.

Encoder: image resized to 96 px, scaled to [-1, 1]; five stride-2 3x3 convs (24, 48, 96, 128, 128 channels) with an
extra 3x3 conv at each of the last three levels, GELU after each; a 1x1 conv to 16 channels and an affine-free
BatchNorm (so the latent is about unit-variance per channel, like a diffusion target should be).

Training extras (dropped afterwards): a small decoder back to a 48 px image and a linear head that predicts the four
attribute labels. The head is what makes the latent carry the shape: reconstruction alone hardly cares about it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from training.data import COLOUR_NAMES, POSITIONS, SHAPES

LATENT_CHANNELS = 16
INPUT_SIZE = 96
RECON_SIZE = 48
ATTRIBUTE_CLASSES = (len(COLOUR_NAMES), len(COLOUR_NAMES), len(SHAPES), len(POSITIONS))  # fg, bg, shape, position


def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GELU())


class SemanticEncoder(nn.Module):
    """``forward(image [B, 3, H, W] in [0, 1]) -> latent [B, 16, 3, 3]`` (for H = W = 128 or any size: it resizes)."""

    def __init__(self) -> None:
        super().__init__()
        widths = (24, 48, 96, 128, 128)
        layers: list[nn.Module] = []
        c_prev = 3
        for level, c in enumerate(widths):
            layers.append(_conv(c_prev, c, 2))
            if level >= 2:
                layers.append(_conv(c, c, 1))
            c_prev = c
        self.features = nn.Sequential(*layers)
        self.to_latent = nn.Conv2d(c_prev, LATENT_CHANNELS, 1)
        self.norm = nn.BatchNorm2d(LATENT_CHANNELS, affine=False)

    def forward(self, image: Tensor) -> Tensor:
        x = F.interpolate(image, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return self.norm(self.to_latent(self.features(x * 2 - 1)))


class EncoderTrainingHeads(nn.Module):
    """The training-only extras: ``decode(latent) -> [B, 3, 48, 48]`` in [-1, 1] and ``classify(latent)`` ->
    four logit tensors (fg [B, 8], bg [B, 8], shape [B, 3], position [B, 3])."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.Sequential(
            nn.Conv2d(LATENT_CHANNELS, 128, 3, padding=1), nn.GELU(),
            nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1), nn.GELU(),  # 3 -> 6
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.GELU(),  # 6 -> 12
            nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.GELU(),  # 12 -> 24
            nn.ConvTranspose2d(16, 16, 4, stride=2, padding=1), nn.GELU(),  # 24 -> 48
            nn.Conv2d(16, 3, 3, padding=1),
        )
        self.head = nn.Linear(LATENT_CHANNELS * 9, sum(ATTRIBUTE_CLASSES))

    def decode(self, latent: Tensor) -> Tensor:
        return self.decoder(latent)

    def classify(self, latent: Tensor) -> list[Tensor]:
        return list(self.head(latent.flatten(1)).split(ATTRIBUTE_CLASSES, dim=1))
