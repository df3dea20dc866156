"""The pixel classifier used to score the demo model: it must be right on true renders."""

from __future__ import annotations

import pytest
import torch

from training import data
from training.classify import accuracies, classify


def test_classifier_is_right_on_true_renders():
    g = torch.Generator().manual_seed(123)
    truth = data.sample_attributes(400, g)
    images = data.render(truth, g)
    scores = accuracies(classify(images), truth)
    assert scores == {"fg colour": 1.0, "bg colour": 1.0, "both colours": 1.0, "position": 1.0, "shape": 1.0}
    as_uint8 = (images * 255).round().to(torch.uint8)
    assert accuracies(classify(as_uint8), truth)["both colours"] == 1.0


def test_classifier_reports_missing_foreground():
    flat = torch.zeros(2, 3, 128, 128)
    flat[1] = 1.0
    pred = classify(flat)
    assert pred.bg.tolist() == [data.COLOUR_NAMES.index("black"), data.COLOUR_NAMES.index("white")]
    assert pred.fg.tolist() == pred.shape.tolist() == pred.position.tolist() == [-1, -1]


def test_classifier_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        classify(torch.zeros(3, 64, 64))


def test_classifier_ignores_speckles_away_from_the_object():
    """Small specks of other colours (a sampler artefact) are not the object: labels must not change."""
    g = torch.Generator().manual_seed(9)
    truth = data.sample_attributes(60, g)
    images = data.render(truth, g)
    for i in range(len(truth)):
        # 2x2 specks in bands no object reaches (top >= 20 px: triangle apex; bottom <= 100 px: circle bottom)
        for _ in range(6):
            y = int(torch.randint(4, 16, (1,), generator=g)) + (0 if torch.rand(1, generator=g) < 0.5 else 100)
            x = int(torch.randint(4, 122, (1,), generator=g))
            images[i, :, y:y + 2, x:x + 2] = torch.rand(3, 1, 1, generator=g)
    assert accuracies(classify(images), truth)["shape"] == 1.0
    assert accuracies(classify(images), truth)["position"] == 1.0


def test_largest_region_keeps_only_the_biggest_blob():
    from training.classify import largest_region

    m = torch.zeros(1, 10, 10, dtype=torch.bool)
    m[0, 1:4, 1:4] = True  # 9 pixels
    m[0, 6:8, 6:8] = True  # 4 pixels
    m[0, 4, 4] = True  # touches the first blob diagonally: 8-connected to it
    out = largest_region(m)
    assert int(out.sum()) == 10 and not bool(out[0, 6:8, 6:8].any())
