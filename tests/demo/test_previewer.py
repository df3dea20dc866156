"""The demo model's Previewer (assets/demo-model/previewer.safetensors, training/train_previewer.py).

It loads through the real-weights loader, and its preview of the Stage C latent of a real demo run
looks like the picture that run ends with (PSNR, background colour), which a random-init Previewer
does not; half-way x0 predictions give a blurrier but still right preview."""

from __future__ import annotations

import time

import pytest
import torch

from models.config import PreviewerConfig
from models.demo import DEMO_DIR, load_demo_pipeline
from models.previewer import Previewer
from models.request import GenerationParams
from models.weights import load_previewer
from training.classify import classify
from training.data import Attributes
from training.evaluate import prompt_set
from training.train_previewer import area_target, psnr, sample_run

PREVIEWER = DEMO_DIR / "previewer.safetensors"
EXPECTED = PreviewerConfig(c_in=16, c_hidden=64, c_out=3)
# Prompts 0, 7, ... of the 54 of training/evaluate.py: 8 prompts, every shape and position.
EVERY = 7
KEPT = (10, 20)  # Stage C steps (of 20) whose x0 is previewed: half-way and final
# Mean PSNR (dB) of the clamped preview of the final latent vs the area-downsampled final picture:
# the shipped weights score 24.3 dB here (the worst image 21.2), a random-init Previewer 7.0 dB.
MIN_PSNR = 20.0
MIN_PSNR_HALF_WAY = 18.0  # the x0 after 10 of 20 steps (shipped: 22.9 dB)


@pytest.fixture(scope="module")
def run():
    """(pipeline, x0 [8, 2, 16, 3, 3] after Stage C steps 10 and 20, target [8, 3, 24, 24], truth)
    of 8 demo generations at the defaults."""
    torch.manual_seed(0)
    pipeline = load_demo_pipeline()
    prompts, seeds, truth = prompt_set()
    rows = list(range(0, len(prompts), EVERY))
    params = [
        GenerationParams.from_defaults(pipeline.defaults, prompts[i], seed=seeds[i]) for i in rows
    ]
    x0, images = sample_run(pipeline, params, kept=KEPT)
    target = area_target(images, x0.shape[-2:])
    return pipeline, x0, target, Attributes.from_stacked(truth.stacked()[rows])


@pytest.fixture(scope="module")
def previewer():
    return load_previewer(PREVIEWER)


def test_shipped_file_loads_with_the_expected_config(previewer):
    assert previewer.config == EXPECTED
    assert not previewer.training
    assert PREVIEWER.stat().st_size < 500e3
    preview = previewer(torch.zeros(2, 16, 3, 5))
    assert preview.shape == (2, 3, 24, 40)


def test_preview_of_the_final_latent_is_the_picture(run, previewer):
    _, x0, target, _ = run
    with torch.no_grad():
        shipped = psnr(previewer(x0[:, -1]), target)
        torch.manual_seed(0)
        random_init = psnr(Previewer(EXPECTED).eval()(x0[:, -1]), target)
    print(
        f"previewer PSNR, final latent: shipped {shipped.mean():.1f} dB (min {shipped.min():.1f}), "
        f"random init {random_init.mean():.1f} dB"
    )
    assert shipped.mean() >= MIN_PSNR, shipped
    assert random_init.mean() < MIN_PSNR - 5, random_init  # the check can fail


def test_preview_colours_match_the_prompt(run, previewer):
    _, x0, _, truth = run
    with torch.no_grad():
        found = classify(previewer(x0[:, -1]).clamp(0, 1))
        torch.manual_seed(0)
        random_found = classify(Previewer(EXPECTED).eval()(x0[:, -1]).clamp(0, 1))
    bg = (found.bg == truth.bg).float().mean().item()
    fg = (found.fg == truth.fg).float().mean().item()
    random_bg = (random_found.bg == truth.bg).float().mean().item()
    print(
        f"previewer colours: background {bg:.0%}, shape colour {fg:.0%} (random init background "
        f"{random_bg:.0%})"
    )
    assert bg >= 0.75
    assert random_bg < 0.75


def test_half_way_previews_degrade_gracefully(run, previewer):
    _, x0, target, truth = run
    with torch.no_grad():
        preview = previewer(x0[:, 0])
    score = psnr(preview, target)
    bg = (classify(preview.clamp(0, 1)).bg == truth.bg).float().mean().item()
    print(f"previewer after 10 of 20 steps: PSNR {score.mean():.1f} dB, background {bg:.0%}")
    assert score.mean() >= MIN_PSNR_HALF_WAY, score
    assert bg >= 0.75


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def test_cost_against_a_stage_c_step(run, previewer):
    """Prints only: one preview [1, 16, 3, 3] -> [1, 3, 24, 24] vs one guided Stage C step."""
    pipeline, x0, _, _ = run
    params = GenerationParams.from_defaults(
        pipeline.defaults, "a red circle on a blue background", seed=1
    )
    states = pipeline.start([params] * 10)
    latent = x0[:1, -1]
    with torch.no_grad():
        preview_s = _median_seconds(lambda: previewer(latent), 30)
    step_s = _median_seconds(lambda: pipeline.step([states.pop()]), 10)
    print(
        f"previewer cost at 128 px on the CPU ({torch.get_num_threads()} thread(s)): "
        f"preview {preview_s * 1e3:.2f} ms, one Stage C step {step_s * 1e3:.2f} ms "
        f"({preview_s / step_s:.1%} of a step)"
    )
