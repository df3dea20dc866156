"""The synthetic shapes renderer and captions of the demo model's training data."""

from __future__ import annotations

import pytest
import torch

from training import data


def _render(n: int, seed: int) -> tuple[data.Attributes, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    attrs = data.sample_attributes(n, g)
    return attrs, data.render(attrs, g)


def test_captions_cover_every_combination_once():
    captions = data.all_captions()
    assert len(captions) == 8 * 7 * 3 * 3 == len(set(captions))
    assert data.caption("red", "circle", "left", "blue") == "a red circle at the left on a blue background"
    assert data.caption("red", "square", "centre", "white") == "a red square on a white background"
    assert data.caption("black", "triangle", "right", "green") == "a black triangle at the right on a green background"


def test_caption_rejects_unknown_words():
    with pytest.raises(ValueError, match="colour"):
        data.caption("pink", "circle", "left", "blue")
    with pytest.raises(ValueError, match="shape"):
        data.caption("red", "hexagon", "left", "blue")
    with pytest.raises(ValueError, match="position"):
        data.caption("red", "circle", "top", "blue")


def test_attributes_are_valid_and_uniform_enough():
    g = torch.Generator().manual_seed(0)
    a = data.sample_attributes(4000, g)
    assert bool((a.fg != a.bg).all())
    for labels, k in ((a.fg, 8), (a.bg, 8), (a.shape, 3), (a.position, 3)):
        counts = torch.bincount(labels, minlength=k).float()
        assert counts.min() > 0.8 * len(a) / k, counts


def test_render_is_seeded_and_in_range():
    a1, x1 = _render(16, 3)
    a2, x2 = _render(16, 3)
    _, x3 = _render(16, 4)
    assert x1.shape == (16, 3, 128, 128) and x1.dtype == torch.float32
    assert torch.equal(a1.stacked(), a2.stacked()) and torch.equal(x1, x2)
    assert not torch.equal(x1, x3)
    assert float(x1.min()) >= 0.0 and float(x1.max()) <= 1.0


def test_render_draws_the_labelled_picture():
    attrs, images = _render(120, 1)
    for i in range(len(attrs)):
        img = images[i]
        bg = data.PALETTE[attrs.bg[i]]
        fg = data.PALETTE[attrs.fg[i]]
        corner = img[:, :4, :4].reshape(3, -1).mean(1)
        assert (corner - bg).abs().max() < 0.2  # jitter std 0.04
        inside = (img - corner[:, None, None]).norm(dim=0) > 0.2
        centre = img[:, inside].median(dim=1).values
        assert (centre - fg).abs().max() < 0.2
        xs = torch.nonzero(inside, as_tuple=True)[1]
        cx = (xs.float().mean() + 0.5) / 128
        assert abs(cx - data.POSITION_X[attrs.position[i]]) < 0.06
        area = inside.float().sum() / 128**2
        assert 0.02 < area < 0.2  # radius 0.14..0.20 of the width


def test_shapes_have_their_area_ratio():
    """Same centre and radius: square (side 1.76 r) > circle > triangle (circumradius 1.35 r)."""
    cov = data._coverage(torch.tensor([0, 1, 2]), torch.full((3,), 20.0), torch.full((3,), 64.0),
                         torch.full((3,), 64.0), 128).sum((1, 2))
    r = 20.0
    assert cov[0] == pytest.approx(torch.pi * r**2, rel=0.01)
    assert cov[1] == pytest.approx((1.76 * r) ** 2, rel=0.01)
    assert cov[2] == pytest.approx(3 * 3**0.5 / 4 * (1.35 * r) ** 2, rel=0.02)
