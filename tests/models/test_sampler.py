"""The DDPM sampler and CFG against an independent float64 implementation of the spec formulas
(stable_cascade_spec.md §7.1-7.5)."""

from __future__ import annotations

import math

import torch

from models.sampler import cfg_denoiser, draw_noise, guided_eps, sample
from models.schedule import logsnr_grid

# ---- independent float64 reference, written from the spec text ----

S = 0.008


def ref_logsnr(t: float, shift: float) -> float:
    min_var = math.cos(S / (1 + S) * math.pi / 2) ** 2

    def raw(t: float) -> float:
        var = min(max(math.cos((t + S) / (1 + S) * math.pi / 2) ** 2 / min_var, 1e-4), 0.9999)
        return math.log(var / (1 - var))

    return min(max(raw(t) - 2 * math.log(shift), raw(1.0)), raw(0.0))


def ref_r(logsnr: float) -> float:
    min_var = math.cos(S / (1 + S) * math.pi / 2) ** 2
    var = 1 / (1 + math.exp(-logsnr)) * min_var
    return min(max(math.acos(math.sqrt(var)) / (math.pi / 2) * (1 + S) - S, 0.0), 1.0)


def ref_ab(logsnr: float) -> tuple[float, float]:
    sig = 1 / (1 + math.exp(-logsnr))
    return math.sqrt(sig), math.sqrt(1 - sig)


def ref_sample(eps_fn, x, steps, shift, generators):
    """Spec §7.5 loop in float64: returns (last x0, list of r fed to the model, post-step x)."""
    ts = [1 - i / steps for i in range(steps + 1)]
    logsnrs = [ref_logsnr(t, shift) for t in ts]
    x, rs, x0 = x.double(), [], None
    for i in range(steps):
        r = ref_r(logsnrs[i])
        rs.append(r)
        eps = eps_fn(x, torch.full((x.shape[0],), r, dtype=torch.float64))
        a, b = ref_ab(logsnrs[i])
        a2, b2 = ref_ab(logsnrs[i + 1])
        x0 = (x - b * eps) / a
        sigma = math.sqrt(b2**2 / b**2) * math.sqrt(1 - a**2 / a2**2)
        z = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).double()
        x = a2 * x0 + math.sqrt(b2**2 - sigma**2) * eps + sigma * z
    return x0, rs, x


def toy_eps(x, r):
    """A deterministic stand-in network: eps depends non-linearly on x and on r."""
    return 0.8 * x + 0.3 * torch.sin(3 * x) * r.view(-1, 1, 1, 1).to(x) - 0.1


def ref_guided(ec, eu, w, rho):
    ec, eu = ec.double(), eu.double()
    out = []
    for i in range(ec.shape[0]):
        cfg = eu[i] + w[i] * (ec[i] - eu[i])
        rescaled = cfg * (ec[i].std() / (cfg.std() + 1e-9))
        out.append(rho[i] * rescaled + (1 - rho[i]) * cfg)
    return torch.stack(out)


# ---- tests ----


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_sample_matches_float64_spec_loop_and_returns_last_x0():
    x = draw_noise((4, 5, 6), _generators([1, 2]), "cpu")
    seen_r = []

    def denoiser(x, r):
        seen_r.append(r.clone())
        return toy_eps(x, r)

    out = sample(denoiser, x, logsnr_grid(3, 2.0), _generators([11, 12]))
    ref, ref_rs, post_step = ref_sample(toy_eps, x, 3, 2.0, _generators([11, 12]))
    torch.testing.assert_close(out.double(), ref, rtol=2e-4, atol=1e-4)
    torch.testing.assert_close(
        torch.stack(seen_r)[:, 0].double(),
        torch.tensor(ref_rs, dtype=torch.float64),
        atol=2e-5,
        rtol=0,
    )
    # The result is x0 of the last step, not the x after it; the two are far apart here.
    assert (post_step - out.double()).abs().max() > 1e-2


def test_one_step_matches_spec_formula():
    x = draw_noise((3, 4, 4), _generators([5]), "cpu")
    out = sample(toy_eps, x, logsnr_grid(1, 1.0), _generators([6]))
    ref = ref_sample(toy_eps, x, 1, 1.0, _generators([6]))[0]
    torch.testing.assert_close(out.double(), ref, rtol=2e-4, atol=1e-4)


def test_each_generator_advances_by_one_noise_tensor_per_step():
    gens = _generators([3, 4])
    sample(toy_eps, torch.zeros(2, 2, 3, 3), logsnr_grid(5, 1.0), gens)
    for seed, g in zip([3, 4], gens, strict=True):
        fresh = torch.Generator().manual_seed(seed)
        for _ in range(5):
            torch.randn((2, 3, 3), generator=fresh)
        torch.testing.assert_close(
            torch.randn(7, generator=g), torch.randn(7, generator=fresh), rtol=0, atol=0
        )


def test_noise_depends_only_on_the_samples_own_generator():
    alone = draw_noise((4, 3, 3), _generators([42]), "cpu")
    in_batch = draw_noise((4, 3, 3), _generators([7, 42, 9]), "cpu")
    assert torch.equal(alone[0], in_batch[1])


def test_guided_eps_matches_float64_reference_per_sample():
    g = torch.Generator().manual_seed(0)
    ec, eu = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    w, rho = torch.tensor([4.0, 1.1, 0.0]), torch.tensor([0.7, 0.0, 1.0])
    torch.testing.assert_close(
        guided_eps(ec, eu, w, rho).double(), ref_guided(ec, eu, w, rho), rtol=1e-5, atol=1e-6
    )
    # Per-sample rescale: a sample's result does not change with its neighbours.
    torch.testing.assert_close(
        guided_eps(ec[1:2], eu[1:2], w[1:2], rho[1:2]), guided_eps(ec, eu, w, rho)[1:2]
    )
    # For a single image it equals the official batch-wide formula.
    cfg = eu[:1] + 4.0 * (ec[:1] - eu[:1])
    official = 0.7 * cfg * ec[:1].std() / (cfg.std() + 1e-9) + 0.3 * cfg
    torch.testing.assert_close(guided_eps(ec[:1], eu[:1], w[:1], torch.tensor([0.7])), official)


def test_plain_guidance_and_unit_scale():
    g = torch.Generator().manual_seed(1)
    ec, eu = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    plain = guided_eps(ec, eu, torch.tensor([3.0, 3.0]), torch.zeros(2))
    torch.testing.assert_close(plain, torch.lerp(eu, ec, 3.0))
    unit = guided_eps(ec, eu, torch.ones(2), torch.full((2,), 0.7))
    torch.testing.assert_close(unit, ec)


class CountingModel:
    """model(x, r, cond=...) -> eps; records the batch size of every call."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, r, *, text):
        self.batches.append(x.shape[0])
        return toy_eps(x, r) + text.view(-1, 1, 1, 1)


def test_cfg_denoiser_runs_cond_and_uncond_as_one_forward():
    model = CountingModel()
    cond, uncond = {"text": torch.tensor([1.0, 2.0])}, {"text": torch.tensor([0.0, 0.0])}
    w, rho = torch.tensor([4.0, 1.5]), torch.tensor([0.7, 0.0])
    x, r = torch.randn(2, 3, 4, 4), torch.full((2,), 0.5)
    eps = cfg_denoiser(model, cond, uncond, w, rho)(x, r)
    assert model.batches == [4]
    expected = guided_eps(model(x, r, text=cond["text"]), model(x, r, text=uncond["text"]), w, rho)
    torch.testing.assert_close(eps, expected)


def test_cfg_denoiser_skips_uncond_when_every_scale_is_one():
    model = CountingModel()
    cond, uncond = {"text": torch.tensor([1.0, 2.0])}, {"text": torch.tensor([0.0, 0.0])}
    x, r = torch.randn(2, 3, 4, 4), torch.full((2,), 0.5)
    eps = cfg_denoiser(model, cond, uncond, torch.ones(2), torch.full((2,), 0.7))(x, r)
    assert model.batches == [2]
    torch.testing.assert_close(eps, model(x, r, text=cond["text"]))


def test_sample_from_an_init_latent_draws_no_initial_noise():
    """Started from a given latent (image-to-image), each generator draws exactly one noise
    tensor per step and nothing else."""
    gens = _generators([1, 2])
    x_init = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    out = sample(toy_eps, x_init, logsnr_grid(4, 2.0, t_start=0.8), gens)
    assert out.shape == (2, 4, 3, 3) and bool(torch.isfinite(out).all())
    for seed, g in zip((1, 2), gens, strict=True):
        fresh = torch.Generator().manual_seed(seed)
        for _ in range(4):
            torch.randn((4, 3, 3), generator=fresh)
        assert torch.equal(torch.randn(5, generator=g), torch.randn(5, generator=fresh))
