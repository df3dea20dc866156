"""The synthetic dataset of the demo model: one coloured shape on a plain background, with its caption.

Every picture is described by four attribute labels (indices into the tables below):
``fg`` and ``bg`` (colours, never equal), ``shape`` and ``position``. The caption is
"a {fg} {shape} [at the left |at the right ]on a {bg} background" (8 * 7 * 3 * 3 = 504 captions).

Rendering (``render``) is vectorised over the batch, in float32 on the CPU:
- colours are the palette entries plus per-image jitter N(0, 0.04) per channel, clamped to [0, 1];
- circle radius r ~ U(0.14, 0.20) * W; square half-side 0.88 r; upward equilateral triangle of circumradius 1.35 r;
- centre x = {0.27, 0.5, 0.73}[position] + U(-0.04, 0.04), y = 0.5 + U(-0.08, 0.08) (fractions of the size);
- edges are anti-aliased over one pixel: coverage = clamp(0.5 - signed distance in pixels, 0, 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.08, 0.08),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.10, 0.20, 0.90),
    "yellow": (0.96, 0.93, 0.12),
    "white": (0.97, 0.97, 0.97),
    "black": (0.05, 0.05, 0.05),
    "purple": (0.55, 0.15, 0.70),
    "orange": (0.98, 0.48, 0.02),
}
COLOUR_NAMES = tuple(COLOURS)
PALETTE = torch.tensor([COLOURS[c] for c in COLOUR_NAMES])  # [8, 3]
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "centre", "right")
POSITION_X = (0.27, 0.5, 0.73)
POSITION_PHRASE = {"left": "at the left ", "centre": "", "right": "at the right "}
COLOUR_JITTER = 0.04


@dataclass(frozen=True)
class Attributes:
    """Labels of a batch of pictures, each [B] int64: indices into COLOUR_NAMES / SHAPES / POSITIONS."""

    fg: Tensor
    bg: Tensor
    shape: Tensor
    position: Tensor

    def __len__(self) -> int:
        return int(self.fg.shape[0])

    def stacked(self) -> Tensor:
        """[B, 4] int64 in the order fg, bg, shape, position."""
        return torch.stack([self.fg, self.bg, self.shape, self.position], dim=1)

    @classmethod
    def from_stacked(cls, labels: Tensor) -> Attributes:
        return cls(labels[:, 0], labels[:, 1], labels[:, 2], labels[:, 3])


def caption(fg: str, shape: str, position: str, bg: str) -> str:
    """The caption of one picture, e.g. "a red circle at the left on a blue background"."""
    if fg not in COLOURS or bg not in COLOURS:
        raise ValueError(f"unknown colour in ({fg!r}, {bg!r}); known: {', '.join(COLOUR_NAMES)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; known: {', '.join(POSITIONS)}")
    return f"a {fg} {shape} {POSITION_PHRASE[position]}on a {bg} background"


def captions_of(attrs: Attributes) -> list[str]:
    """One caption per picture of ``attrs``."""
    return [
        caption(COLOUR_NAMES[f], SHAPES[s], POSITIONS[p], COLOUR_NAMES[b])
        for f, b, s, p in attrs.stacked().tolist()
    ]


def all_captions() -> list[str]:
    """Every caption of the dataset, in a fixed order (504 of them)."""
    return [
        caption(fg, shape, pos, bg)
        for fg in COLOUR_NAMES
        for bg in COLOUR_NAMES
        if bg != fg
        for shape in SHAPES
        for pos in POSITIONS
    ]


def vocabulary() -> list[str]:
    """The words the captions use (what the demo tokenizer turns into single tokens)."""
    words = {w for c in all_captions() for w in c.split()}
    return sorted(words)


def sample_attributes(n: int, generator: torch.Generator) -> Attributes:
    """``n`` uniformly drawn label sets (fg != bg)."""
    fg = torch.randint(0, len(COLOUR_NAMES), (n,), generator=generator)
    # Draw bg among the 7 other colours so that the pair is uniform.
    bg = (fg + 1 + torch.randint(0, len(COLOUR_NAMES) - 1, (n,), generator=generator)) % len(COLOUR_NAMES)
    shape = torch.randint(0, len(SHAPES), (n,), generator=generator)
    position = torch.randint(0, len(POSITIONS), (n,), generator=generator)
    return Attributes(fg, bg, shape, position)


def render(attrs: Attributes, generator: torch.Generator, size: int = 128) -> Tensor:
    """Draw the pictures of ``attrs``: [B, 3, size, size] float32 RGB in [0, 1].

    The random geometry and colour jitter come from ``generator`` (same generator state -> same pictures).
    """
    n = len(attrs)
    fg = (PALETTE[attrs.fg] + COLOUR_JITTER * torch.randn(n, 3, generator=generator)).clamp(0, 1)
    bg = (PALETTE[attrs.bg] + COLOUR_JITTER * torch.randn(n, 3, generator=generator)).clamp(0, 1)
    radius = (0.14 + 0.06 * torch.rand(n, generator=generator)) * size  # pixels
    cx = (torch.tensor(POSITION_X)[attrs.position] + 0.08 * (torch.rand(n, generator=generator) - 0.5)) * size
    cy = (0.5 + 0.16 * (torch.rand(n, generator=generator) - 0.5)) * size
    coverage = _coverage(attrs.shape, radius, cx, cy, size)  # [B, H, W]
    alpha = coverage[:, None]
    return alpha * fg[:, :, None, None] + (1 - alpha) * bg[:, :, None, None]


def _coverage(shape: Tensor, radius: Tensor, cx: Tensor, cy: Tensor, size: int) -> Tensor:
    """Anti-aliased shape masks [B, H, W] from signed distances in pixels (negative inside)."""
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    dx = centres[None, None, :] - cx[:, None, None]  # [B, 1, W]
    dy = centres[None, :, None] - cy[:, None, None]  # [B, H, 1]
    r = radius[:, None, None]
    circle = torch.sqrt(dx**2 + dy**2) - r
    square = torch.maximum(dx.abs(), dy.abs()) - 0.88 * r
    # Upward equilateral triangle (image y grows downwards): outward edge normals (0, 1) and (+-sin60, -cos60);
    # every edge lies at the inradius = circumradius / 2 from the centre.
    circum = 1.35 * r
    s60, c60 = math.sin(math.pi / 3), 0.5
    triangle = torch.maximum(torch.maximum(dy, s60 * dx - c60 * dy), -s60 * dx - c60 * dy) - circum / 2
    sd = torch.where(shape[:, None, None] == 0, circle, torch.where(shape[:, None, None] == 1, square, triangle))
    return (0.5 - sd).clamp(0.0, 1.0)
