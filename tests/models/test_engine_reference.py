"""The step engine gives the images the pipeline gave before generation became resumable state
(tests/models/engine_reference.py recorded them), and jobs that join a running group at another
step get the images they get alone."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from models.demo import load_demo_pipeline
from models.job_state import Stage
from models.request import GenerationParams
from tests.models.engine_reference import FILE, cases, render


@pytest.fixture(scope="module")
def demo():
    return load_demo_pipeline()


def assert_same_image(new: torch.Tensor, old: torch.Tensor) -> None:
    """uint8 [n, 3, H, W]: equal up to one level on a few values (the last-bit rounding of
    batched kernels differs between CPU kinds and batch compositions)."""
    assert new.shape == old.shape and new.dtype == old.dtype == torch.uint8
    diff = (new.int() - old.int()).abs()
    assert int(diff.max()) <= 1, f"{int((diff > 1).sum())} values differ by more than one level"
    assert float((diff > 0).float().mean()) < 0.01


def test_generate_reproduces_the_recorded_images(demo):
    reference = load_file(str(FILE))
    images = render(demo)
    assert set(images) == set(reference) == set(cases())
    for name in reference:
        assert_same_image(images[name], reference[name])


def test_jobs_joining_at_other_steps_get_their_solo_images(demo):
    """Three jobs of two step counts and guidance settings enter one group at steps 0, 3 and 7 of
    the first one and share every forward from then on (rows at different steps, in both
    stages)."""
    requests = [
        GenerationParams.from_defaults(demo.defaults, "a red circle on a blue background", seed=1),
        GenerationParams.from_defaults(
            demo.defaults, "a green square at the left on a white background", seed=2,
            num_images=2, prior_steps=14, prior_guidance_scale=1.0,
        ),
        GenerationParams.from_defaults(
            demo.defaults, "a yellow triangle on a black background", seed=3, decoder_steps=6,
            decoder_guidance_scale=1.0,
        ),
    ]
    solo = [demo.generate([p]).results[0].images for p in requests]

    states, joins, steps = [], {0: 0, 3: 1, 7: 2}, 0
    with torch.inference_mode():
        while len(states) < len(requests) or any(s.stage is not Stage.VQGAN for s in states):
            if steps in joins:
                states += demo.start([requests[joins[steps]]])
            groups: dict = {}
            for s in states:
                if s.stage is not Stage.VQGAN:
                    groups.setdefault(s.group_key, []).append(s)
            for group in groups.values():
                demo.step(group)
            steps += 1
        results = demo.decode(states)
    for result, alone in zip(results, solo, strict=True):
        assert_same_image(result.images, alone)
