"""Building blocks shared by Stage B and Stage C (spec §2).

Layout convention (speed): activations are logical NCHW tensors ``[B, C, H, W]`` kept in
``torch.channels_last`` memory. For such a tensor ``x.permute(0, 2, 3, 1)`` is a free, contiguous NHWC
view, so the per-pixel LayerNorm-over-channels and the per-pixel Linear layers of the blocks run on it
without a permute copy, and ``.permute(0, 3, 1, 2)`` turns their NHWC result back into a channels_last NCHW
view, again for free. Convolutions keep the channels_last format.

The CPU fast paths the blocks call (oneDNN linear, prepacked and folded bf16 weights, the bf16 attention)
are in ``models.cpu_kernels``; the U-Net levels built from these blocks in ``models.levels``.

Module and parameter names reproduce the official checkpoints' ``state_dict`` keys exactly
(``depthwise``, ``channelwise.{0,2,4}``, ``attention.attn.in_proj_weight``, ``kv_mapper.1``, ``mapper_sca``...).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.cpu_kernels import attention, conv, folded_kv, linear, linear_module

LN_EPS = 1e-6  # every LayerNorm of Stage B / C: no affine, eps 1e-6
CL = torch.channels_last


# ----------------------------------------------------------------------------------------- layout helpers


def to_channels_last(x: Tensor) -> Tensor:
    """``x: [B, C, H, W]`` -> same tensor in channels_last memory (no copy if it already is)."""
    return x.contiguous(memory_format=CL)


def nhwc(x: Tensor) -> Tensor:
    """``x: [B, C, H, W]`` -> ``[B, H, W, C]`` view (contiguous when x is channels_last)."""
    return x.permute(0, 2, 3, 1)


def nchw(x: Tensor) -> Tensor:
    """``x: [B, H, W, C]`` -> ``[B, C, H, W]`` view (channels_last memory when x is contiguous)."""
    return x.permute(0, 3, 1, 2)


def layer_norm_2d(x: Tensor) -> Tensor:
    """Non-affine LayerNorm over channels at every pixel. ``x: [B, C, H, W]`` -> ``[B, C, H, W]``."""
    return nchw(F.layer_norm(nhwc(x), (x.shape[1],), eps=LN_EPS))


def conv1x1(x: Tensor, conv: nn.Conv2d, gelu: bool = False) -> Tensor:
    """A 1x1 ``conv`` as a per-pixel matmul on the NHWC view: ``[B, Cin, H, W]`` -> ``[B, Cout, H, W]``.

    Same maths as the convolution; as a GEMM on the contiguous NHWC view it needs no layout conversion
    and returns channels_last. ``gelu`` applies an exact GELU to the result (fused on CPU).
    """
    w = conv.weight
    return nchw(linear(nhwc(x), w.view(w.shape[0], w.shape[1]), conv.bias, gelu, owner=conv))



def resize_bilinear(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize with ``align_corners=True`` (the official choice everywhere in B/C).

    ``x: [B, C, h, w]`` -> ``[B, C, *size]``, computed in float32 (the official code casts to float first; it
    also keeps bf16 inputs away from a low-precision interpolation) and returned in the input dtype.
    """
    out = F.interpolate(x.float(), size=tuple(size), mode="bilinear", align_corners=True)
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------ r-embedding


def gen_r_embedding(r: Tensor, dim: int = 64, max_positions: int = 10000) -> Tensor:
    """Sinusoidal embedding of the noise condition. ``r: [B]`` float in [0, 1] -> ``[B, dim]`` float32.

    Gotcha (spec §2.7): the float32 operation order decides parity at 1e-5, because the arguments reach 1e4
    and one ulp in a frequency moves sin/cos by ~1e-3. Order: k = -ln(max_positions)/(half-1) as a Python
    double; freq = exp(arange(half) in float32 * k); arg = (r * max_positions)[:, None] * freq[None, :] in
    float32; output = [sin(arg), cos(arg)] (all sines first). The divisor is half - 1, not half.
    """
    r = r.float() * max_positions
    half = dim // 2
    k = math.log(max_positions) / (half - 1)
    freq = torch.arange(half, device=r.device).float().mul(-k).exp()
    arg = r[:, None] * freq[None, :]
    emb = torch.cat([arg.sin(), arg.cos()], dim=1)
    if dim % 2 == 1:  # never the case for released models (dim 64); zero-pad like the official code
        emb = F.pad(emb, (0, 1), mode="constant")
    return emb


def gen_r_embeddings(
    r: Tensor, t_conds: Sequence[str], values: Mapping[str, Tensor] | None, dim: int
) -> Tensor:
    """Model-level r-embedding ``[B, dim * (1 + len(t_conds))]``: emb(r) ++ emb(cond) for every t_cond.

    A condition absent from ``values`` is zeros, whose embedding is NOT zero ([0]*half ++ [1]*half): its
    mapper still contributes W @ emb(0) + b, so the mappers must exist and be loaded (spec §2.7).
    """
    values = values or {}
    unknown = set(values) - set(t_conds)
    if unknown:
        raise ValueError(
            f"t_cond_values: unknown condition(s) {sorted(unknown)}; model has {list(t_conds)}"
        )
    parts = [gen_r_embedding(r, dim)]
    for name in t_conds:
        v = values.get(name)
        parts.append(
            gen_r_embedding(torch.zeros_like(r, dtype=torch.float32) if v is None else v, dim)
        )
    return torch.cat(parts, dim=1)


# ------------------------------------------------------------------------------------------------ blocks


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dim at every pixel, no affine, eps 1e-6. ``[B,C,H,W]`` -> ``[B,C,H,W]``.

    Parameter-free: it contributes no state_dict keys, but it occupies a Sequential index.
    """

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm_2d(x)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on NHWC input. ``x: [B, H, W, C]`` -> ``[B, H, W, C]``.

    Y = gamma * (X * N) + beta + X with N = G / (mean_C(G) + 1e-6), G = L2 norm of X over (H, W).
    Computed as X * (1 + gamma * N) + beta: the [B,1,1,C] factor is tiny, so this is one fused
    multiply-add over the big tensor instead of three passes. gamma/beta are [1,1,1,C] (spec §2.2).
    """

    def __init__(self, c: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, c))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, c))

    def forward(self, x: Tensor) -> Tensor:
        # Sum of squares: 4-8x faster than linalg.vector_norm on CPU (measured); square() is half the cost
        # of x * x in bf16. No dtype= argument: that would copy the whole 4c-wide activation to float32;
        # reductions accumulate in float32 anyway.
        g = x.square().sum(dim=(1, 2), keepdim=True).float().sqrt()
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        # The factor is [B,1,1,C]; cast it (not x) so a bf16 activation stays bf16 under autocast.
        scale = torch.addcmul(torch.ones_like(n), self.gamma.float(), n).to(x.dtype)
        return torch.addcmul(self.beta.to(x.dtype), x, scale)


def _mlp(c_in: int, c: int, dropout: float) -> nn.Sequential:
    """Per-pixel MLP of ResBlock / FeedForwardBlock: indices 0 Linear, 1 GELU, 2 GRN, 3 Dropout, 4 Linear."""
    return nn.Sequential(
        nn.Linear(c_in, 4 * c),
        nn.GELU(),
        GlobalResponseNorm(4 * c),
        nn.Dropout(dropout),
        nn.Linear(4 * c, c),
    )


def _run_mlp(mlp: nn.Sequential, h: Tensor) -> Tensor:
    """``_mlp`` on NHWC ``h: [B, H, W, c_in]`` -> ``[B, H, W, c]``, GELU fused into the first linear."""
    h = mlp[2](linear_module(h, mlp[0], gelu=True))
    return linear_module(mlp[3](h), mlp[4])


class ResBlock(nn.Module):
    """Depthwise conv -> LN2d -> [concat skip] -> per-pixel MLP -> + input (spec §2.3).

    ``x: [B, c, H, W]``, ``skip: [B, c_skip, H, W] | None`` -> ``[B, c, H, W]``.
    Gotchas: the skip is concatenated AFTER depthwise + norm, and the residual is the block input without it.
    """

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d()
        self.channelwise = _mlp(c + c_skip, c, dropout)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        dw = self.depthwise
        h = nhwc(conv(F.conv2d, x, dw.weight, dw.bias, dw.stride, dw.padding, dw.dilation, dw.groups))
        h = F.layer_norm(h, (h.shape[-1],), eps=LN_EPS)
        if skip is not None:
            h = torch.cat([h, nhwc(skip).to(h.dtype)], dim=-1)
        return x + nchw(_run_mlp(self.channelwise, h))


class FeedForwardBlock(nn.Module):
    """LN2d -> per-pixel MLP -> + input ('F' blocks; unused by released configs). ``[B,c,H,W]`` -> same."""

    def __init__(self, c: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = LayerNorm2d()
        self.channelwise = _mlp(c, c, dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = F.layer_norm(nhwc(x), (x.shape[1],), eps=LN_EPS)
        return x + nchw(_run_mlp(self.channelwise, h))


class TimestepBlock(nn.Module):
    """FiLM by the r-embedding (spec §2.5). ``x: [B,c,H,W]``, ``r_embed: [B, c_r*(1+len(conds))]``.

    Each mapper sees its own c_r-wide chunk; outputs are summed, then split into a = [:, :c] (scale) and
    b = [:, c:] (shift); output x * (1 + a) + b.
    """

    def __init__(self, c: int, c_timestep: int = 64, conds: Sequence[str] = ()) -> None:
        super().__init__()
        self.c_timestep = c_timestep
        self.conds = tuple(conds)
        self.mapper = nn.Linear(c_timestep, 2 * c)
        for name in self.conds:
            setattr(self, f"mapper_{name}", nn.Linear(c_timestep, 2 * c))

    def forward(self, x: Tensor, r_embed: Tensor) -> Tensor:
        chunks = r_embed.split(self.c_timestep, dim=1)
        ab = linear_module(chunks[0], self.mapper)
        for name, chunk in zip(self.conds, chunks[1:]):
            ab = ab + linear_module(chunk, getattr(self, f"mapper_{name}"))
        a, b = ab[:, :, None, None].chunk(2, dim=1)
        return torch.addcmul(b.to(x.dtype), x, (1 + a).to(x.dtype))



class PackedMultiheadAttention(nn.Module):
    """Multi-head attention with ``torch.nn.MultiheadAttention``'s packed parameter layout.

    Parameters: ``in_proj_weight [3c, c]`` (rows q, k, v), ``in_proj_bias [3c]``, ``out_proj`` Linear(c, c).
    Forward: ``x: [B, N, c]`` (queries, and the first N keys/values when self-attending),
    ``cond: [B, S, c]`` (extra keys/values) -> ``[B, N, c]``. The image tokens get one matmul for q, k, v
    together and the condition tokens one matmul for k, v only (their queries are never needed).
    """

    def __init__(self, c: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        if c % nhead:
            raise ValueError(f"attention width {c} is not divisible by nhead={nhead}")
        self.c, self.nhead, self.dropout = c, nhead, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * c, c))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * c))
        self.out_proj = nn.Linear(c, c)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, cond: Tensor, self_attn: bool = True) -> Tensor:
        return self.attend_kv(x, self.cond_kv(cond), self_attn)

    def cond_kv(self, cond: Tensor) -> Tensor:
        """Keys and values of the condition tokens: ``cond: [B, S, c]`` -> ``[B, S, 2c]`` (k then v)."""
        c, w, b = self.c, self.in_proj_weight, self.in_proj_bias
        return linear(cond, w[c:], b[c:], owner=self, key="in_proj_kv")

    def attend_kv(self, x: Tensor, kv_c: Tensor, self_attn: bool = True) -> Tensor:
        """``forward`` with the condition's keys and values given: ``kv_c: [B, S, 2c]`` (``cond_kv``)."""
        B, N, c = x.shape
        nh, d = self.nhead, c // self.nhead
        w, b = self.in_proj_weight, self.in_proj_bias
        kv_c = kv_c.view(B, kv_c.shape[1], 2, nh, d)
        if self_attn:
            qkv = linear(x, w, b, owner=self, key="in_proj_qkv").view(B, N, 3, nh, d)
            q = qkv[:, :, 0]
            # keys / values: the image tokens, then the condition tokens
            kv = torch.cat([qkv[:, :, 1:], kv_c.to(qkv.dtype)], dim=1)
        else:
            q = linear(x, w[:c], b[:c], owner=self, key="in_proj_q").view(B, N, nh, d)
            kv = kv_c
        k, v = kv[:, :, 0], kv[:, :, 1]
        drop = self.dropout if self.training else 0.0
        o = attention(
            q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype), drop
        )  # [B, nh, N, d]
        return linear_module(o.transpose(1, 2).reshape(B, N, c), self.out_proj)


class Attention2D(nn.Module):
    """Holder whose attribute ``attn`` gives the official key prefix ``attention.attn.*``."""

    def __init__(self, c: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = PackedMultiheadAttention(c, nhead, dropout)

    def forward(self, x: Tensor, cond: Tensor, self_attn: bool = True) -> Tensor:
        return self.attn(x, cond, self_attn)


class AttnBlock(nn.Module):
    """x + MHA(LN2d(x) tokens, [LN2d(x) tokens ; Linear(SiLU(cond))]) (spec §2.4).

    ``x: [B, c, H, W]``, ``cond: [B, S, c_cond]`` -> ``[B, c, H, W]``. Tokens are row-major (h, w), taken
    from the NHWC view, and the result is mapped back through the same view (a plain reshape of the
    [B, HW, c] output to [B, c, H, W] would scramble it).
    """

    def __init__(
        self, c: int, c_cond: int, nhead: int, self_attn: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.norm = LayerNorm2d()
        self.attention = Attention2D(c, nhead, dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        return self.attend(x, self.kv_mapper[0](cond))

    def attend(self, x: Tensor, cond_act: Tensor) -> Tensor:
        """As ``forward`` with ``cond_act = SiLU(cond)`` given: every AttnBlock of a model applies SiLU to the
        same condition sequence, so the model computes it once per forward."""
        B, c, H, W = x.shape
        attn = self.attention.attn
        kv_c = self._folded_cond_kv(cond_act)
        if kv_c is None:
            kv_c = attn.cond_kv(linear_module(cond_act, self.kv_mapper[1]))
        xn = F.layer_norm(nhwc(x), (c,), eps=LN_EPS).reshape(B, H * W, c)
        a = attn.attend_kv(xn, kv_c, self.self_attn)
        return x + nchw(a.view(B, H, W, c))

    def _folded_cond_kv(self, cond_act: Tensor) -> Tensor | None:
        """The condition's keys and values through one bf16 GEMM with a folded weight
        (``cpu_kernels.folded_kv``), or None where the two-step path must run.
        ``cond_act: [B, S, c_cond]`` -> ``[B, S, 2c]``."""
        attn = self.attention.attn
        return folded_kv(self, cond_act, self.kv_mapper[1], attn.in_proj_weight, attn.in_proj_bias)
