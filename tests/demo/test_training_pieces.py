"""Pieces of the demo training program that the sampler relies on: noising on the sampler's schedule, the adaptive
loss weight, the learning-rate schedule, the word-level tokenizer."""

from __future__ import annotations

import pytest
import torch

from models.schedule import cosine_logsnr, noise_cond
from training.data import vocabulary
from training.diffusion import AdaptiveLossWeight, learning_rate, noised
from training.text_tower import build_word_tokenizer


def test_noising_follows_the_sampler_schedule():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(512, 4, 2, 2, generator=g)
    x_t, eps, r, logsnr = noised(x0, g)
    a = torch.sigmoid(logsnr).sqrt().view(-1, 1, 1, 1)
    b = torch.sigmoid(-logsnr).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a * x0 + b * eps)
    torch.testing.assert_close(r, noise_cond(logsnr))
    # r is the unshifted cosine time of logsnr: feeding it back gives the same logSNR (away from the clamps)
    inner = (r > 0.01) & (r < 0.99)
    torch.testing.assert_close(cosine_logsnr(r[inner]), logsnr[inner], atol=2e-3, rtol=1e-3)
    assert float(r.min()) >= 0 and float(r.max()) <= 1


def test_adaptive_weight_equalises_noise_levels():
    w = AdaptiveLossWeight(buckets=100, beta=0.95)
    logsnr = torch.linspace(-9, 9, 200)
    loss = torch.where(logsnr < 0, torch.full_like(logsnr, 0.01), torch.full_like(logsnr, 1.0))
    for _ in range(300):
        w.update(logsnr, loss)
    weighted = w.weight(logsnr) * loss
    torch.testing.assert_close(weighted, torch.ones_like(weighted), rtol=1e-3, atol=1e-3)


def test_learning_rate_warms_up_then_decays():
    assert learning_rate(1e-3, 0.0, 0) == pytest.approx(1e-3 / 200)
    assert learning_rate(1e-3, 0.0, 199) == pytest.approx(1e-3)
    assert learning_rate(1e-3, 0.5, 5000) == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5))
    assert learning_rate(1e-3, 1.0, 9000) == pytest.approx(5e-5)


def test_tokenizer_makes_every_caption_word_one_token():
    tok = build_word_tokenizer(vocabulary())
    ids = [tok(w, add_special_tokens=False)["input_ids"] for w in vocabulary()]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(ids)
    # other text still tokenizes (into bytes): nothing is unknown
    assert len(tok("zebra", add_special_tokens=False)["input_ids"]) > 1
