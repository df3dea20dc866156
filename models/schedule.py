"""The GDF noise schedule of Stable Cascade as pure functions (stable_cascade_spec.md §7.1-7.4).

Notation: ``t`` in [0, 1] is the sampling time (1 = pure noise), ``logsnr`` = ln(a^2 / b^2),
``a``/``b`` are the VP scaler's signal and noise scales (x_t = a * x0 + b * eps, a^2 + b^2 = 1), and
``r`` is the noise condition the networks receive. t -> logSNR -> r run in float32 exactly as the
official code does, so the grids reproduce its tables (e.g. the upper limit +9.21007 comes from
float32 rounding of the 0.9999 clamp); the step coefficients derived from them (``alpha_sigma``) are
computed in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

S = 0.008  # cosine schedule offset (Nichol & Dhariwal 2021)
VAR_CLAMP = (1e-4, 0.9999)  # clamp on a^2, which bounds logSNR to about [-9.21, +9.21]
# a^2(0) before normalisation; float32, as in the official code.
_MIN_VAR = torch.cos(torch.tensor(S / (1 + S)) * math.pi / 2) ** 2


def _cosine_logsnr_unshifted(t: Tensor) -> Tensor:
    """Cosine schedule: a^2(t) = cos^2((t + s)/(1 + s) * pi/2) / a^2(0), clamped to VAR_CLAMP."""
    t = t.clamp(0.0, 1.0)
    var = torch.cos((t + S) / (1 + S) * math.pi / 2).clamp(0.0, 1.0) ** 2 / _MIN_VAR
    var = var.clamp(*VAR_CLAMP)
    return torch.log(var / (1 - var))


# The schedule's limits are those of the *unshifted* schedule; shifted values are re-clamped to them
# (§7.1), so with shift 2 the grid still starts at -9.21 while it ends at +7.82 instead of +9.21.
_LIMITS = _cosine_logsnr_unshifted(torch.tensor([1.0, 0.0]))
LOGSNR_MIN, LOGSNR_MAX = float(_LIMITS[0]), float(_LIMITS[1])


def cosine_logsnr(t: Tensor | float, shift: float = 1.0) -> Tensor:
    """logSNR(t) of the shifted cosine schedule: logSNR_1(t) - 2 ln(shift), then clamped.

    The clamp uses the unshifted limits. t: any shape (float32 result, same shape). ``shift`` > 1
    moves every step towards more noise (SNR / shift^2).
    """
    t = torch.as_tensor(t, dtype=torch.float32)
    logsnr = _cosine_logsnr_unshifted(t)
    if shift != 1.0:
        logsnr = logsnr - 2 * math.log(shift)
    return logsnr.clamp(LOGSNR_MIN, LOGSNR_MAX)


def noise_cond(logsnr: Tensor) -> Tensor:
    """The network's ``r``: the *unshifted* cosine time that has this logSNR, in [0, 1] (§7.4).

    Feeding r instead of the grid's t keeps the network seeing the true noise level, whatever the
    shift.
    """
    var = torch.sigmoid(logsnr.to(torch.float32)) * _MIN_VAR
    r = torch.acos(var.sqrt()) / (math.pi / 2) * (1 + S) - S
    return r.clamp(0.0, 1.0)


def alpha_sigma(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """VP scales: a = sqrt(sigmoid(logSNR)), b = sqrt(sigmoid(-logSNR)) (so a^2 + b^2 = 1)."""
    logsnr = logsnr.to(torch.float64)
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def logsnr_grid(num_steps: int, shift: float = 1.0, t_start: float = 1.0) -> Tensor:
    """The sampler's noise levels: logSNR at t = linspace(t_start, 0, num_steps + 1).

    Returns [num_steps + 1] float32. Step i denoises from grid[i] to grid[i + 1]; the last point
    (t = 0) is only the target of the final step.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start must be in (0, 1], got {t_start}")
    t = torch.linspace(t_start, 0.0, num_steps + 1, dtype=torch.float32)
    return cosine_logsnr(t, shift)
