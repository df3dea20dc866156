"""The GDF schedule against the official tables (stable_cascade_spec.md §7.7) and its
defining properties."""

from __future__ import annotations

import math

import pytest
import torch

from models.schedule import (
    LOGSNR_MAX,
    LOGSNR_MIN,
    alpha_sigma,
    cosine_logsnr,
    logsnr_grid,
    noise_cond,
)

# Produced by running the official gdf package in float32 (spec §7.7).
C20_SHIFT2_LOGSNR = [
    -9.21024,
    -6.48632,
    -5.08779,
    -4.25624,
    -3.65150,
    -3.16655,
    -2.75319,
    -2.38514,
    -2.04598,
    -1.72423,
    -1.41092,
    -1.09821,
    -0.77832,
    -0.44254,
    -0.07989,
    0.32506,
    0.79663,
    1.37842,
    2.16427,
    3.43491,
    7.82378,
]
C20_SHIFT2_R = [
    0.99358,
    0.97496,
    0.94969,
    0.92396,
    0.89751,
    0.87007,
    0.84134,
    0.81096,
    0.77854,
    0.74362,
    0.70564,
    0.66397,
    0.61786,
    0.56646,
    0.50886,
    0.44414,
    0.37152,
    0.29064,
    0.20181,
    0.10627,
]
B10_SHIFT1_LOGSNR = [
    -9.21024,
    -3.70150,
    -2.26521,
    -1.36690,
    -0.65969,
    -0.02463,
    0.60797,
    1.30640,
    2.18293,
    3.55056,
    9.21007,
]
B10_SHIFT1_R = [0.99358, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]


@pytest.mark.parametrize(
    ("steps", "shift", "logsnr", "r"),
    [(20, 2.0, C20_SHIFT2_LOGSNR, C20_SHIFT2_R), (10, 1.0, B10_SHIFT1_LOGSNR, B10_SHIFT1_R)],
    ids=["stage_c_20_shift2", "stage_b_10_shift1"],
)
def test_grid_and_noise_condition_match_official_tables(steps, shift, logsnr, r):
    grid = logsnr_grid(steps, shift)
    assert grid.shape == (steps + 1,)
    torch.testing.assert_close(
        grid.double(), torch.tensor(logsnr, dtype=torch.float64), atol=1e-4, rtol=0
    )
    # The network sees r of every evaluated level (all but the last grid point), never the raw t.
    torch.testing.assert_close(
        noise_cond(grid[:-1]).double(), torch.tensor(r, dtype=torch.float64), atol=1e-4, rtol=0
    )


def test_shift_subtracts_2_ln_shift_then_clamps_to_unshifted_limits():
    t = torch.linspace(0.1, 0.9, 9)
    torch.testing.assert_close(cosine_logsnr(t, 3.0), cosine_logsnr(t, 1.0) - 2 * math.log(3.0))
    # t = 1 is already at the floor and stays there; shift < 1 pushes t = 0 above the ceiling.
    assert float(cosine_logsnr(1.0, 2.0)) == pytest.approx(LOGSNR_MIN)
    assert float(cosine_logsnr(0.0, 0.5)) == pytest.approx(LOGSNR_MAX)
    assert pytest.approx(-9.21024, abs=1e-4) == LOGSNR_MIN
    assert pytest.approx(9.21007, abs=1e-4) == LOGSNR_MAX


def test_noise_condition_inverts_the_unshifted_schedule():
    t = torch.linspace(0.02, 0.98, 25)
    torch.testing.assert_close(noise_cond(cosine_logsnr(t)), t, atol=2e-5, rtol=0)
    # With a shift the network sees an earlier (noisier) time than the grid's t: r > t inside the
    # range.
    assert bool((noise_cond(cosine_logsnr(t, 2.0)) > t).all())


def test_alpha_sigma_is_a_variance_preserving_split():
    logsnr = torch.linspace(-9, 9, 19)
    a, b = alpha_sigma(logsnr)
    torch.testing.assert_close(a**2 + b**2, torch.ones(19, dtype=torch.float64))
    torch.testing.assert_close(torch.log(a**2 / b**2), logsnr.double(), atol=1e-5, rtol=0)


def test_partial_grid_starts_at_t_start():
    grid = logsnr_grid(16, 2.0, t_start=0.8)
    assert grid.shape == (17,)
    assert float(grid[0]) == pytest.approx(float(cosine_logsnr(0.8, 2.0)))
    assert float(grid[-1]) == pytest.approx(float(cosine_logsnr(0.0, 2.0)))


@pytest.mark.parametrize(("steps", "t_start"), [(0, 1.0), (-1, 1.0), (4, 0.0), (4, 1.5)])
def test_grid_rejects_bad_arguments(steps, t_start):
    with pytest.raises(ValueError, match="num_steps|t_start"):
        logsnr_grid(steps, 1.0, t_start)
