"""A simple pixel classifier of the demo's pictures: background colour, foreground colour, position and shape.

- background = the per-channel median of the border pixels (a 3-pixel ring), snapped to the nearest palette colour;
- foreground = the pixels whose RGB distance from that background is over 0.2 (clearly different); the object is
  the largest 8-connected region of them (isolated speckles elsewhere are not the object); its colour = the
  per-channel median of its pixels, snapped to the nearest palette colour;
- position = which third of the width holds the object's centre (mean x);
- shape = bounding-box fill of the object (its pixels / its bounding-box area): a triangle fills 1/2 of its box, a
  circle pi/4, a square all of it; the thresholds sit half-way (0.64, 0.89).
A picture without foreground gets label -1 everywhere except the background.
It scores 100% on true renders, also with speckles added (tests/demo/test_classify.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from training.data import PALETTE, SHAPES, Attributes

BORDER = 3
FOREGROUND_DISTANCE = 0.2
FILL_THRESHOLDS = (0.64, 0.89)  # triangle < 0.64 <= circle < 0.89 <= square
CIRCLE, SQUARE, TRIANGLE = (SHAPES.index(s) for s in ("circle", "square", "triangle"))


def _nearest_colour(rgb: Tensor) -> Tensor:
    """rgb: [N, 3] -> palette index [N]."""
    return torch.cdist(rgb[None].float(), PALETTE[None])[0].argmin(dim=1)


def largest_region(masks: Tensor) -> Tensor:
    """The largest 8-connected region of each mask: masks [B, H, W] bool -> [B, H, W] bool.

    Every pixel starts with its own label; labels spread by 3x3 max-pooling inside the mask until nothing changes,
    so each region ends up labelled by its largest pixel index.
    """
    b, h, w = masks.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w).expand(b, h, w)
    labels = torch.where(masks, ids, torch.zeros(()))
    while True:
        spread = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * masks
        if torch.equal(spread, labels):
            break
        labels = spread
    out = torch.zeros_like(masks)
    for i in range(b):
        if masks[i].any():
            values, counts = labels[i][masks[i]].unique(return_counts=True)
            out[i] = labels[i] == values[counts.argmax()]
    return out


def classify(images: Tensor) -> Attributes:
    """images: [B, 3, H, W], float in [0, 1] or uint8 -> predicted labels (fg, bg, shape, position; [B] each)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {list(images.shape)}")
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    n, _, h, w = x.shape
    ring = torch.ones(h, w, dtype=torch.bool)
    ring[BORDER:h - BORDER, BORDER:w - BORDER] = False
    bg_rgb = x[:, :, ring].median(dim=2).values  # [B, 3]
    objects = largest_region((x - bg_rgb[:, :, None, None]).norm(dim=1) > FOREGROUND_DISTANCE)  # [B, H, W]
    bg = _nearest_colour(bg_rgb)
    fg = torch.full((n,), -1, dtype=torch.long)
    shape = torch.full((n,), -1, dtype=torch.long)
    position = torch.full((n,), -1, dtype=torch.long)
    for i in range(n):
        mask = objects[i]
        if not mask.any():
            continue
        fg[i] = _nearest_colour(x[i][:, mask].median(dim=1).values[None])[0]
        ys, xs = torch.nonzero(mask, as_tuple=True)
        position[i] = min(int((xs.float().mean() + 0.5) / w * 3), 2)
        fill = len(xs) / float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        shape[i] = TRIANGLE if fill < FILL_THRESHOLDS[0] else (CIRCLE if fill < FILL_THRESHOLDS[1] else SQUARE)
    return Attributes(fg, bg, shape, position)


def accuracies(predicted: Attributes, truth: Attributes) -> dict[str, float]:
    """Fractions correct: fg colour, bg colour, both colours, position, shape."""
    fg = predicted.fg == truth.fg
    bg = predicted.bg == truth.bg
    return {
        "fg colour": fg.float().mean().item(),
        "bg colour": bg.float().mean().item(),
        "both colours": (fg & bg).float().mean().item(),
        "position": (predicted.position == truth.position).float().mean().item(),
        "shape": (predicted.shape == truth.shape).float().mean().item(),
    }
