"""The official GDF DDPM sampler (DDIM, eta = 1) and classifier-free guidance (spec §7.5).

Notation: ``x`` is the noisy latent [B, C, H, W], ``eps`` the network's noise prediction (epsilon
target), ``x0`` the clean-latent estimate (x - b * eps) / a, ``r`` [B] the noise condition fed to
the network, and ``logsnrs`` [N + 1] the noise levels of an N-step grid (models/schedule.py).

Randomness is per image: every sample owns a CPU ``torch.Generator``. Noise is drawn on the CPU in
float32, one tensor per image, and then moved to the device, so an image depends only on its own
seed, never on the device or on its batch neighbours. Each image's generator is consumed in the
order initial noise (``draw_noise``), then one noise tensor per step, including the last step,
whose result is discarded; that is the order diffusers uses for one image.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from models.schedule import alpha_sigma, noise_cond

# denoiser(x [B, C, H, W], r [B] float32) -> eps [B, C, H, W]
Denoiser = Callable[[Tensor, Tensor], Tensor]
# on_step(step, total): called after step `step` (1-based) of `total` has finished.
StepCallback = Callable[[int, int], None]


def draw_noise(
    shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device | str
) -> Tensor:
    """One standard-normal tensor of ``shape`` per generator, drawn on the CPU.

    Returns [len(generators), *shape] float32 on ``device``.
    """
    noise = torch.stack(
        [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators]
    )
    return noise.to(device)


@dataclass(frozen=True)
class StepCoefficients:
    """The scalars of one DDPM step from level i to i + 1 (python floats, computed in float64).

    x0 = (x - b * eps) / a;  x_next = a_next * x0 + c * eps + sigma * z, with
    sigma = (b_next / b) * sqrt(1 - a^2 / a_next^2) and c = sqrt(b_next^2 - sigma^2).
    """

    a: float
    b: float
    a_next: float
    c: float
    sigma: float


def step_coefficients(logsnrs: Tensor) -> list[StepCoefficients]:
    """One StepCoefficients per step of the grid ``logsnrs`` [N + 1] (N entries)."""
    a_all, b_all = alpha_sigma(logsnrs)
    out = []
    for i in range(logsnrs.shape[0] - 1):
        a, b, a_next, b_next = (float(v) for v in (a_all[i], b_all[i], a_all[i + 1], b_all[i + 1]))
        sigma = (b_next / b) * max(1.0 - (a / a_next) ** 2, 0.0) ** 0.5
        out.append(StepCoefficients(a, b, a_next, max(b_next**2 - sigma**2, 0.0) ** 0.5, sigma))
    return out


def sample(
    denoiser: Denoiser,
    x: Tensor,
    logsnrs: Tensor,
    generators: Sequence[torch.Generator],
    on_step: StepCallback | None = None,
) -> Tensor:
    """Run the DDPM sampler from ``x`` at ``logsnrs[0]`` down the grid; return the last x0.

    Each iteration i predicts eps at logsnrs[i], forms x0, and moves x to logsnrs[i + 1] with fresh
    noise (x <- a' x0 + sqrt(b'^2 - sigma^2) eps + sigma z, sigma = (b'/b) sqrt(1 - a^2/a'^2)).
    Between iterations x is a sample at logsnrs[i + 1]. Like the official code, the result is the x0
    predicted at the last evaluated level (logsnrs[-2]); the last step's noise is still drawn so
    each generator advances the same way every run. The step engine (models/denoise_step.py) does
    the same arithmetic with every row at its own step; this loop is its one-grid reference.

    Args:
        x: [B, C, H, W] float32 starting latent (pure noise for t_start = 1, or a noised
            ``x_init``).
        logsnrs: [N + 1] noise levels, N >= 1 steps.
        generators: B CPU generators, one per sample, for the per-step noise.
    Returns:
        x0: [B, C, H, W] float32.
    """
    if len(generators) != x.shape[0]:
        raise ValueError(f"need one generator per sample: {len(generators)} for batch {x.shape[0]}")
    num_steps = logsnrs.shape[0] - 1
    r_all = noise_cond(logsnrs[:-1]).to(device=x.device, dtype=torch.float32)
    x0 = x
    for i, k in enumerate(step_coefficients(logsnrs)):
        eps = denoiser(x, r_all[i].expand(x.shape[0])).float()
        x0 = (x - k.b * eps) / k.a
        z = draw_noise(x.shape[1:], generators, x.device)
        if i < num_steps - 1:
            x = k.a_next * x0 + k.c * eps + k.sigma * z
        if on_step is not None:
            on_step(i + 1, num_steps)
    return x0


def guided_eps(eps_cond: Tensor, eps_uncond: Tensor, scale: Tensor, rho: Tensor) -> Tensor:
    """CFG with the official std rescale, per sample.

    eps_cfg = eps_u + w (eps_c - eps_u); eps = rho * eps_cfg * std(eps_c) / (std(eps_cfg) + 1e-9) +
    (1 - rho) * eps_cfg. The official code takes each std over the whole conditional batch, which
    would make an image depend on its batch neighbours; here each std is over one sample (all of C,
    H, W), which is identical to the official result for a batch of one. torch's unbiased std, as
    official (the ratio cancels the correction anyway).

    eps_cond, eps_uncond: [B, C, H, W]; scale (w), rho: [B]. Returns [B, C, H, W].
    """
    shape = (-1,) + (1,) * (eps_cond.dim() - 1)
    w, rho = scale.view(shape).to(eps_cond), rho.view(shape).to(eps_cond)
    eps_cfg = eps_uncond + w * (eps_cond - eps_uncond)
    dims = tuple(range(1, eps_cond.dim()))
    ratio = eps_cond.std(dim=dims, keepdim=True) / (eps_cfg.std(dim=dims, keepdim=True) + 1e-9)
    return rho * eps_cfg * ratio + (1 - rho) * eps_cfg


def cfg_denoiser(
    model: Callable[..., Tensor],
    cond: Mapping[str, Tensor],
    uncond: Mapping[str, Tensor],
    scale: Tensor,
    rho: Tensor,
) -> Denoiser:
    """Wrap ``model(x, r, **conditions)`` into a guided denoiser: cond and uncond in ONE forward.

    cond / uncond: the keyword conditions for the B samples, each [B, ...]. scale, rho: [B]
    per-sample guidance scale and rescale strength. If every scale is exactly 1 the guided eps
    equals the conditional one (up to the 1e-9 in the rescale's denominator), so the unconditional
    half is skipped entirely.
    """
    if bool((scale == 1).all()):
        return lambda x, r: model(x, r, **cond)
    both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}

    def denoise(x: Tensor, r: Tensor) -> Tensor:
        eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([r, r]), **both).float().chunk(2)
        return guided_eps(eps_cond, eps_uncond, scale, rho)

    return denoise
