"""Training pieces shared by Stages B and C: noising, the adaptive loss weight, EMA, LR schedule, initialisation.

The noising uses the same functions as the sampler (``models.schedule``): t ~ U(0, 1), logSNR = cosine schedule with
shift 1, x_t = a x0 + b eps with a = sqrt(sigmoid(logSNR)), and the network sees r = noise_cond(logSNR) (not t), so
training and sampling agree on what r means. The target is eps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.common import GlobalResponseNorm, ResBlock, TimestepBlock
from models.schedule import LOGSNR_MAX, LOGSNR_MIN, cosine_logsnr, noise_cond


def noised(x0: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Draw t ~ U(0, 1) and eps per sample; return (x_t, eps, r [B], logSNR [B]). x0: [B, C, H, W]."""
    n = x0.shape[0]
    t = torch.rand(n, generator=generator)
    logsnr = cosine_logsnr(t, 1.0)
    a = torch.sigmoid(logsnr).sqrt().view(-1, 1, 1, 1)
    b = torch.sigmoid(-logsnr).sqrt().view(-1, 1, 1, 1)
    eps = torch.randn(x0.shape, generator=generator)
    return a * x0 + b * eps, eps, noise_cond(logsnr), logsnr


class AdaptiveLossWeight:
    """Weight = 1 / (running mean loss of the sample's logSNR bucket): every noise level contributes equally.

    Without it the loss is dominated by the mid-noise levels, and the nearly-pure-noise levels (where the sampler's
    first step divides the eps error by a ~ 0.01) stay poorly fitted: sampling then returns noise.
    """

    def __init__(self, buckets: int = 100, beta: float = 0.95, weight_range: tuple[float, float] = (1e-7, 1e7)):
        self.losses = torch.ones(buckets)
        self.beta = beta
        self.weight_range = weight_range

    def _bucket(self, logsnr: Tensor) -> Tensor:
        n = self.losses.shape[0]
        pos = (logsnr.detach().float() - LOGSNR_MIN) / (LOGSNR_MAX - LOGSNR_MIN) * n
        return pos.floor().long().clamp(0, n - 1)

    def weight(self, logsnr: Tensor) -> Tensor:
        """[B] weights for the samples' noise levels."""
        return (1.0 / self.losses[self._bucket(logsnr)]).clamp(*self.weight_range)

    def update(self, logsnr: Tensor, loss: Tensor) -> None:
        """Move each touched bucket towards the mean unweighted loss of its samples (loss: [B])."""
        idx = self._bucket(logsnr)
        total = torch.zeros_like(self.losses).index_add_(0, idx, loss.detach().float())
        count = torch.zeros_like(self.losses).index_add_(0, idx, torch.ones_like(loss, dtype=torch.float32))
        hit = count > 0
        mean = total[hit] / count[hit]
        self.losses[hit] = self.beta * self.losses[hit] + (1 - self.beta) * mean


class Ema:
    """Exponential moving average of a model's parameters and buffers (decay 0.998, warmed up at the start)."""

    def __init__(self, model: nn.Module, decay: float = 0.998) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        # Early on the average would mostly remember the random init; ramp the decay up.
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.detach(), 1 - decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.shadow.items()}


def learning_rate(peak: float, progress: float, step: int, warmup: int = 200, final_ratio: float = 0.05) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``peak`` to ``final_ratio * peak`` as
    ``progress`` goes 0 -> 1."""
    warm = min(1.0, (step + 1) / warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return peak * warm * (final_ratio + (1 - final_ratio) * cosine)


def init_unet_(model: nn.Module, generator_seed: int) -> nn.Module:
    """Initialise a Stage B / Stage C network for training from scratch (deterministic from the seed).

    Xavier-uniform linears and convs; the output projection (``clf.1``) and the r-embedding FiLM mappers start at
    zero, so every block starts as the identity in time and the first prediction is eps = 0 (loss 1); residual
    MLP outputs are scaled by 1/sqrt(number of down blocks) so the residual stream does not blow up with depth.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        n_down = sum(model.config.blocks[0])
        for module in model.modules():
            if isinstance(module, ResBlock):
                module.channelwise[-1].weight.data.mul_(math.sqrt(1 / n_down))
            elif isinstance(module, TimestepBlock):
                for layer in module.modules():
                    if isinstance(layer, nn.Linear):
                        nn.init.zeros_(layer.weight)
        nn.init.zeros_(model.clf[1].weight)
    return model


class ZeroSafeGlobalResponseNorm(GlobalResponseNorm):
    """``GlobalResponseNorm`` with the same forward but a finite gradient when a channel is all zeros.

    GELU returns exactly 0 below about -6, so at the small deepest levels (2 x 2 in Stage B, 3 x 3 in Stage C) a
    channel can be all zeros; the inference module's sqrt(sum of squares) then has an infinite derivative and the
    backward pass gives NaN (this stopped a Stage B run at step ~300). ``vector_norm``'s backward is 0 there.
    """

    def forward(self, x: Tensor) -> Tensor:
        g = torch.linalg.vector_norm(x.float(), dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        scale = torch.addcmul(torch.ones_like(n), self.gamma.float(), n).to(x.dtype)
        return torch.addcmul(self.beta.to(x.dtype), x, scale)


def use_zero_safe_grn_(model: nn.Module) -> nn.Module:
    """Switch every GRN of ``model`` to ``ZeroSafeGlobalResponseNorm`` (same parameters and state_dict keys)."""
    for module in model.modules():
        if type(module) is GlobalResponseNorm:
            module.__class__ = ZeroSafeGlobalResponseNorm
    return model
