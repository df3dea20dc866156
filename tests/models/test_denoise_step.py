"""One batched step with every row at its own step: against the float64 spec loop of
test_sampler.py, guidance rows, padding, and rollback on failure."""

from __future__ import annotations

import pytest
import torch

from models.denoise_step import bucket_size, denoise_step, pad_rows
from models.job_state import Conditioning, GridPosition, JobState, Stage
from models.request import GenerationParams
from tests.models.test_sampler import ref_guided, ref_sample, toy_eps


def toy_forward(x, r, *, c):
    """A per-row stand-in network whose output depends on x, r and the condition c [B, 1]."""
    return toy_eps(x, r) + 0.2 * c.view(-1, 1, 1, 1).to(x) * torch.cos(x)


def make_state(seed, steps, shift, scale, images=1, rho=0.7):
    params = GenerationParams("p", num_images=images, seed=seed, prior_steps=steps,
                              prior_shift=shift, prior_guidance_scale=scale, cfg_rho=rho)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(images)]
    x = torch.stack([torch.randn(3, 4, 4, generator=g) for g in gens])
    cond = {"c": torch.full((images, 1), 1.0 + 0.1 * seed)}
    uncond = {"c": torch.full((images, 1), -0.5)}
    return JobState(
        params=params, generators=gens, stage=Stage.PRIOR,
        position=GridPosition.on_grid(steps, shift, torch.device("cpu")),
        conditioning=Conditioning(cond, uncond, scale, rho), x=x,
        decoder_clip=(torch.zeros(images, 1, 1), torch.zeros(images, 1, 1)),
    )


def reference(seed, steps, shift, scale, images=1, rho=0.7):
    """The same job alone through the float64 spec loop: its final x0 [images, 3, 4, 4]."""
    gens = [torch.Generator().manual_seed(seed + i) for i in range(images)]
    x = torch.stack([torch.randn(3, 4, 4, generator=g) for g in gens])
    c, u = torch.full((images, 1), 1.0 + 0.1 * seed), torch.full((images, 1), -0.5)
    w, rr = torch.full((images,), scale), torch.full((images,), rho)

    def eps_fn(x, r):
        ec = toy_forward(x, r, c=c.double())
        if scale == 1.0:
            return ec
        return ref_guided(ec, toy_forward(x, r, c=u.double()), w, rr)

    return ref_sample(eps_fn, x, steps, shift, gens)[0]


JOBS = [  # seed, steps, shift, guidance, images; joining at different steps below
    (1, 6, 2.0, 4.0, 1),
    (2, 4, 1.0, 1.0, 2),
    (5, 5, 3.0, 2.5, 1),
]


def test_rows_at_different_steps_match_each_job_alone():
    states = [make_state(*JOBS[0])]
    joins = {1: JOBS[1], 3: JOBS[2]}
    rows_seen = []

    def forward(x, r, **kw):
        rows_seen.append(x.shape[0])
        return toy_forward(x, r, **kw)

    for i in range(12):
        if i in joins:
            states.append(make_state(*joins[i]))
        live = [s for s in states if s.position.step < s.position.total]
        if live:
            denoise_step(forward, live)
    for state, job in zip(states, [JOBS[0], JOBS[1], JOBS[2]], strict=True):
        assert state.position.step == state.position.total
        torch.testing.assert_close(state.x0.double(), reference(*job), rtol=2e-4, atol=1e-4)
    # step 2: job 0 (guided) + job 1 (two unguided images): 3 cond rows + 1 uncond row
    assert rows_seen[1] == 4


def test_padding_rows_never_change_real_rows():
    """The same step with the group padded (row 0 repeated) to a bucket gives the real rows
    exactly what the unpadded step gives, and the padded outputs are dropped."""
    plain = [make_state(*job) for job in JOBS]
    padded = [make_state(*job) for job in JOBS]
    sizes = []

    def forward(x, r, **kw):
        sizes.append(x.shape[0])
        return toy_forward(x, r, **kw)

    a = denoise_step(forward, plain)
    b = denoise_step(forward, padded, pad_to=lambda rows: bucket_size(rows, (1, 2, 4, 8, 16)))
    assert sizes == [6, 8]  # 4 cond rows + 2 uncond rows; padded to the bucket 8
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert pad_rows(torch.arange(3.0), 5).tolist() == [0, 1, 2, 0, 0]
    assert bucket_size(9, (1, 2, 4, 8)) == 9


def test_a_failing_step_leaves_states_and_generators_untouched():
    states = [make_state(*job) for job in JOBS]
    before = [(s.x.clone(), s.position.step, [g.get_state() for g in s.generators]) for s in states]

    def forward(x, r, **kw):
        raise torch.OutOfMemoryError("injected")

    with pytest.raises(torch.OutOfMemoryError):
        denoise_step(forward, states)
    for s, (x, step, gens) in zip(states, before, strict=True):
        assert torch.equal(s.x, x) and s.position.step == step and s.x0 is None
        assert all(torch.equal(g.get_state(), st) for g, st in zip(s.generators, gens, strict=True))
