"""Building blocks shared by Stage B and Stage C (spec §2).

Layout convention (speed): activations are logical NCHW tensors ``[B, C, H, W]`` kept in
``torch.channels_last`` memory. For such a tensor ``x.permute(0, 2, 3, 1)`` is a free, contiguous NHWC
view, so the per-pixel LayerNorm-over-channels and the per-pixel Linear layers of the blocks run on it
without a permute copy, and ``.permute(0, 3, 1, 2)`` turns their NHWC result back into a channels_last NCHW
view, again for free. Convolutions keep the channels_last format.

Module and parameter names reproduce the official checkpoints' ``state_dict`` keys exactly
(``depthwise``, ``channelwise.{0,2,4}``, ``attention.attn.in_proj_weight``, ``kv_mapper.1``, ``mapper_sca``...).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


# oneDNN's fused linear (the kernel that torch.compile uses on CPU). Measured on the 2-core AMD EPYC dev
# machine at Stage B/C shapes: float32 about 2.5x faster than F.linear (whose MKL sgemm takes a slow path
# on AMD CPUs), bfloat16 5-15% faster (bias and GELU fused into the GEMM instead of extra passes).
_onednn_linear = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if torch.backends.mkldnn.is_available()
    else None
)
_onednn_bf16 = _onednn_linear is not None and torch.ops.mkldnn._is_mkldnn_bf16_supported()
USE_ONEDNN_LINEAR = True  # module switch for A/B measurements; both paths agree to float rounding


def _onednn_dtype(x: Tensor, weight: Tensor) -> torch.dtype | None:
    """Compute dtype for the oneDNN path, or None where F.linear must run (GPU, autograd, fp16...)."""
    if not USE_ONEDNN_LINEAR or _onednn_linear is None:
        return None
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return None  # the fused kernel has no autograd formula
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")  # the op is not autocast-aware: cast as autocast would
    elif x.dtype == weight.dtype:
        dtype = x.dtype
    else:
        return None  # F.linear raises its usual dtype-mismatch error
    if dtype == torch.float32 or (dtype == torch.bfloat16 and _onednn_bf16):
        return dtype
    return None


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    gelu: bool = False,
    owner: nn.Module | None = None,
    key: str = "weight",
) -> Tensor:
    """``x @ weight.T + bias`` over the last dim, then exact (erf) GELU if ``gelu``.

    ``x: [..., in]``, ``weight: [out, in]`` -> ``[..., out]``. On CPU without autograd this is oneDNN's
    fused linear (bias and GELU inside the GEMM), honouring CPU autocast; elsewhere F.linear (+ F.gelu).
    ``owner`` / ``key``: the module that owns ``weight`` and a name for it there; given them, a bfloat16
    CPU call reuses a weight prepacked for oneDNN (see ``prepacked_bf16_weight``).
    """
    dtype = _onednn_dtype(x, weight)
    if dtype is None:
        y = F.linear(x, weight, bias)
        return F.gelu(y) if gelu else y
    b = None if bias is None else bias.to(dtype)
    w = None
    if dtype == torch.bfloat16 and owner is not None:
        w = prepacked_bf16_weight(owner, key, weight, rows=x.numel() // max(x.shape[-1], 1))
    if w is None:
        w = weight.to(dtype)
    x = x.to(dtype)
    if gelu:
        return _onednn_linear(x, w, b, "gelu", [], "none")
    return _onednn_linear(x, w, b, "none", [], "")


def linear_module(x: Tensor, module: nn.Linear, gelu: bool = False) -> Tensor:
    """``linear`` with an ``nn.Linear``'s parameters."""
    return linear(x, module.weight, module.bias, gelu, owner=module)


def conv1x1(x: Tensor, conv: nn.Conv2d, gelu: bool = False) -> Tensor:
    """A 1x1 ``conv`` as a per-pixel matmul on the NHWC view: ``[B, Cin, H, W]`` -> ``[B, Cout, H, W]``.

    Same maths as the convolution; as a GEMM on the contiguous NHWC view it needs no layout conversion
    and returns channels_last. ``gelu`` applies an exact GELU to the result (fused on CPU).
    """
    w = conv.weight
    return nchw(linear(nhwc(x), w.view(w.shape[0], w.shape[1]), conv.bias, gelu, owner=conv))


# ------------------------------------------------------------------------------ derived-weight caches


class _DerivedWeights(dict):
    """Per-module cache ``key -> (source weights, their versions, derived value)``.

    Derived tensors are rebuilt on demand, so a copy or a pickle of the module starts with an empty cache
    (oneDNN's packed tensors could not be deep-copied or saved anyway).
    """

    def __deepcopy__(self, memo: dict) -> _DerivedWeights:
        return _DerivedWeights()

    def __reduce__(self) -> tuple:
        return (_DerivedWeights, ())


def _cached_derived(
    module: nn.Module, key: str, weight: Tensor | tuple[Tensor, ...], make: Callable
) -> Any:
    """``make(weight)`` cached on ``module`` under ``key`` while ``weight`` is unchanged.

    ``weight`` may be a tuple of tensors (a value derived from several weights): ``make`` then gets the
    tuple, and the cache is refreshed when any of them changes. A change is: ``load_state_dict`` and
    in-place edits (version counter), ``.to()`` (new memory). The cache holds the source tensors, so their
    memory cannot be freed and reused by a new weight: an equal data pointer then really means the same
    memory. Callers must skip inference tensors (no version counter, so an in-place change could not be
    detected).
    """
    sources = weight if isinstance(weight, tuple) else (weight,)
    cache = module.__dict__.get("_derived_weights")
    if cache is None:
        cache = module.__dict__["_derived_weights"] = _DerivedWeights()  # plain attribute, not saved
    entry = cache.get(key)
    if entry is not None:
        srcs, versions, out = entry
        if len(srcs) == len(sources) and all(
            _same_tensor(src, w, version) for src, w, version in zip(srcs, sources, versions)
        ):
            return out
    srcs = tuple(w.detach() for w in sources)
    out = make(srcs if isinstance(weight, tuple) else srcs[0])
    cache[key] = (srcs, tuple(w._version for w in sources), out)
    return out


def _same_tensor(src: Tensor, weight: Tensor, version: int) -> bool:
    """Whether ``weight`` is still the tensor ``src`` was taken from, unmodified since ``version``."""
    return (
        src.data_ptr() == weight.data_ptr()
        and src.dtype == weight.dtype
        and src.shape == weight.shape
        and src.stride() == weight.stride()
        and src.device == weight.device
        and weight._version == version
    )


def clear_derived_weights(model: nn.Module) -> None:
    """Drop every derived-weight cache in ``model`` (their sources would otherwise stay in memory)."""
    for m in model.modules():
        m.__dict__.pop("_derived_weights", None)


class CachedWeightsModule(nn.Module):
    """Base of the networks whose blocks cache derived weights (``_cached_derived``): ``.to()``,
    ``.cuda()``, ``.bfloat16()``... drop the caches first, so that the tensors they were derived from
    (and the derived copies) are freed now, not at the next forward (which on another device would never
    touch them)."""

    def _apply(self, fn, recurse=True):
        clear_derived_weights(self)
        return super()._apply(fn, recurse)


def channels_last_weight(conv: nn.Conv2d | nn.ConvTranspose2d) -> Tensor:
    """``conv.weight`` in channels_last memory, cached on the module while the weight is unchanged.

    A convolution over channels_last input otherwise copies a contiguous weight into that layout on every
    call (measured: ~10 MB per call for Stage B's 1152-wide 2x2 convs). With autograd active, or for
    inference tensors (see ``_cached_derived``), the parameter itself is used.
    """
    w = conv.weight
    if torch.is_grad_enabled() or w.is_inference() or w.is_contiguous(memory_format=CL):
        return w
    return _cached_derived(conv, "channels_last", w, lambda t: t.contiguous(memory_format=CL))


# oneDNN's own weight layout for the bfloat16 GEMM. Given a plain [out, in] weight, _linear_pointwise
# reorders it into that layout on every call, an extra read and write of the whole weight. Measured on the
# 2-core AVX-512-BF16 dev machine at Stage B/C shapes, with bit-identical results: a weight reordered once
# makes the GEMM ~5% faster in a hot loop and 10-20% faster inside a forward, where every weight comes cold
# from memory (Stage C lite bf16: GEMM time 811 -> 678 ms per forward). Costs one packed copy of each bf16
# linear weight that runs on the CPU (about the model's bf16 size again). float32 is left alone.
PREPACK_BF16_WEIGHTS = True  # module switch for A/B measurements
_reorder_linear_weight = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) if _onednn_bf16 else None


# The condition path of every AttnBlock, kv_mapper Linear then the k/v projection, as one GEMM with a weight
# folded from the two (``AttnBlock._folded_cond_kv``): 1/3 fewer FLOPs on the condition tokens, which at
# 512 px are 85 of the 229 keys/values of every Stage C attention. Measured on the 2-core dev machine,
# Stage C lite bf16 at 512 px: 0.769 -> 0.736 s per forward, rms error against float32 1.51e-2 -> 1.49e-2.
# Costs one [2c, c_cond] bf16 weight per block in place of the kv_mapper's packed copy (Stage C lite
# +0.15 GB, big +0.54 GB) and, once, the folding GEMMs at the first bf16 forward: ~0.5 s for Stage C lite,
# ~2.3 s for big.
FOLD_KV_MAPPER = True  # module switch for A/B measurements


def _pack_bf16(w: Tensor, rows: int) -> Tensor:
    """``w [out, in]`` as a bf16 tensor in oneDNN's GEMM layout, chosen for about ``rows`` input rows."""
    return _reorder_linear_weight(w.to(torch.bfloat16).contiguous(), max(rows, 1))


def can_prepack_bf16(weight: Tensor) -> bool:
    """Whether a bf16 oneDNN-packed copy of ``weight`` may be made and cached: switch on, oneDNN bf16
    available, a CPU tensor that is not an inference tensor, autograd off."""
    return (
        PREPACK_BF16_WEIGHTS
        and _reorder_linear_weight is not None
        and not torch.is_grad_enabled()
        and not weight.is_inference()
        and weight.device.type == "cpu"
    )


def prepacked_bf16_weight(owner: nn.Module, key: str, weight: Tensor, rows: int) -> Tensor | None:
    """``weight [out, in]`` (any float dtype, CPU) as a bf16 oneDNN-packed tensor for ``_linear_pointwise``.

    Cached on ``owner`` under ``key`` (see ``_cached_derived``); ``rows`` (the GEMM's row count at the
    first call) only guides oneDNN's choice of layout, any row count works with the result. None where the
    plain weight must be used (``can_prepack_bf16``).
    """
    if not can_prepack_bf16(weight):
        return None
    return _cached_derived(owner, "onednn_bf16:" + key, weight, lambda w: _pack_bf16(w, rows))


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
        h = nhwc(self.depthwise(x))
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


USE_CPU_BF16_ATTENTION = True  # module switch for A/B measurements
ONEDNN_SCORE_GEMM = True  # module switch for A/B measurements (see ``_onednn_score_gemm``)
_ATTN_SCORES_BYTES = 64 << 20  # float32 scores held at once by the CPU bf16 attention (bounds memory)


def attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """Softmax attention, scale 1/sqrt(d). ``q: [B, nh, N, d]``, ``k, v: [B, nh, S, d]`` -> ``[B, nh, N, d]``.

    SDPA everywhere except bfloat16 on the CPU without autograd or dropout, where ``_attention_cpu_bf16``
    does the same maths faster than the CPU flash kernel (measured on the 2-core AVX-512-BF16 dev machine:
    a Stage C lite forward, 32 calls, takes 34 ms longer with SDPA; Stage B lite 2.0 vs 2.1-2.6 ms per call).
    """
    if (
        USE_CPU_BF16_ATTENTION
        and q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == torch.bfloat16
        and dropout_p == 0.0
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    ):
        return _attention_cpu_bf16(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


def _attention_cpu_bf16(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """bf16 attention on the CPU with the precision of the flash kernel. Shapes as ``attention``.

    Scores are float32 (bf16 products are exact in float32, accumulated in float32) and so is the softmax;
    the probabilities are rounded to bf16 for the product with v (float32 accumulation), as the flash kernel
    does. Plain batched GEMMs beat the flash kernel's small tiles on CPUs without AMX. Queries are processed
    in chunks so that the float32 scores stay under ``_ATTN_SCORES_BYTES``.
    """
    B, nh, N, d = q.shape
    S = k.shape[2]
    q32 = q.to(torch.float32, memory_format=torch.contiguous_format).view(B * nh, N, d)
    k32 = k.to(torch.float32, memory_format=torch.contiguous_format).view(B * nh, S, d)
    v16 = v.reshape(B * nh, S, d)
    chunk = max(1, min(N, _ATTN_SCORES_BYTES // (4 * B * nh * S)))
    outs = []
    # Autocast would run the score GEMM in bf16 and round the scores: keep it off in here.
    with torch.autocast("cpu", enabled=False), _onednn_score_gemm(ONEDNN_SCORE_GEMM):
        for i in range(0, N, chunk):
            scores = torch.baddbmm(
                q32.new_empty(1, 1, 1), q32[:, i : i + chunk], k32.transpose(1, 2), beta=0.0, alpha=d**-0.5
            )  # [B*nh, chunk, S] float32
            outs.append(torch.bmm(torch.softmax(scores, dim=-1).to(torch.bfloat16), v16))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return out.view(B, nh, N, d)


@contextmanager
def _onednn_score_gemm(enabled: bool = True) -> Iterator[None]:
    """Run float32 matmuls inside this block through oneDNN (by allowing its ``fp32_precision="bf16"``).

    Without the setting, PyTorch sends float32 batched matmuls to MKL, which reaches half the float32 peak
    on the attention's small [144 x 64] x [64 x 229] GEMMs; oneDNN's float32 kernels reach it (measured:
    0.51 vs 1.03 ms per Stage C lite score GEMM on the 2-core AVX-512-BF16 dev machine). The setting also
    lets oneDNN round float32 operands to bf16 where it has bf16 math for them (AMX CPUs): it is used only
    on upcast bf16 values, for which that rounding is exact, so the result is the float32 GEMM's either
    way. The setting is process-wide; it is restored on exit, and the model runs on one thread at a time.
    """
    if not enabled:
        yield
        return
    setting = torch.backends.mkldnn.matmul
    before = setting.fp32_precision
    setting.fp32_precision = "bf16"
    try:
        yield
    finally:
        setting.fp32_precision = before


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
        """The condition's keys and values through one GEMM, or None where the two-step path must run.

        ``cond_act: [B, S, c_cond]`` -> ``[B, S, 2c]``. The kv_mapper Linear and the k/v rows of the
        attention's in_proj are two affine maps in a row, so ``W_kv (W_m a + b_m) + b_kv`` equals
        ``(W_kv W_m) a + (W_kv b_m + b_kv)``: one [2c, c_cond] GEMM instead of a [c, c_cond] and a [2c, c]
        one, fewer FLOPs whenever c_cond < 2c (Stage C, where c_cond = c: 2/3 of them). Used for bfloat16
        on the CPU, where the folded weight joins the other prepacked ones (see ``FOLD_KV_MAPPER``).
        """
        mapper, attn = self.kv_mapper[1], self.attention.attn
        c = attn.c
        if not FOLD_KV_MAPPER or mapper.in_features >= 2 * c:
            return None
        if _onednn_dtype(cond_act, mapper.weight) != torch.bfloat16:
            return None
        weights = (attn.in_proj_weight, attn.in_proj_bias, mapper.weight, mapper.bias)
        if not all(can_prepack_bf16(t) for t in weights):
            return None

        def fold(sources: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
            w_in, b_in, w_m, b_m = sources
            w_kv, b_kv = w_in[c:], b_in[c:]
            # bf16 weights: a bf16 GEMM (exact products, float32 sums, one rounding), 4x faster here than
            # a float32 one; float32 weights (autocast): a float32 GEMM.
            dtype = torch.bfloat16 if w_kv.dtype == w_m.dtype == torch.bfloat16 else torch.float32
            w = w_kv.to(dtype) @ w_m.to(dtype)  # [2c, c_cond]
            b = w_kv.float() @ b_m.float() + b_kv.float()  # [2c]
            rows = cond_act.numel() // cond_act.shape[-1]
            return _pack_bf16(w, rows), b.to(torch.bfloat16)

        w, b = _cached_derived(self, "onednn_bf16:kv_folded", weights, fold)
        return _onednn_linear(cond_act.to(torch.bfloat16), w, b, "none", [], "")


# ---------------------------------------------------------------------------------- level construction


def make_block(
    code: str,
    c: int,
    *,
    c_cond: int,
    nhead: int,
    c_r: int,
    t_conds: Sequence[str],
    kernel_size: int,
    dropout: float,
    self_attn: bool,
    c_skip: int = 0,
) -> nn.Module:
    """One block from its level-config code: C ResBlock, T TimestepBlock, A AttnBlock, F FeedForwardBlock."""
    if code == "C":
        return ResBlock(c, c_skip, kernel_size, dropout)
    if code == "T":
        return TimestepBlock(c, c_r, t_conds)
    if code == "A":
        return AttnBlock(c, c_cond, nhead, self_attn, dropout)
    if code == "F":
        return FeedForwardBlock(c, dropout)
    raise ValueError(f"level_config: unknown block code {code!r} (expected one of C, T, A, F)")


def make_level(
    n: int, level_config: str, c: int, *, skip_first: int = 0, **block_kwargs
) -> nn.ModuleList:
    """``n`` repetitions of the level's block pattern as one flat ModuleList (indices 0, 1, 2, ...).

    ``skip_first`` is the c_skip of the very first block (the up path's first ResBlock of a non-deepest
    level); all other blocks get none.
    """
    blocks = nn.ModuleList()
    for j in range(n):
        for k, code in enumerate(level_config):
            c_skip = skip_first if j == 0 and k == 0 else 0
            blocks.append(make_block(code, c, c_skip=c_skip, **block_kwargs))
    return blocks


def run_level(
    blocks: nn.ModuleList,
    repeat_mappers: nn.ModuleList,
    x: Tensor,
    r_embed: Tensor,
    clip_act: Tensor,
    skip: Tensor | None = None,
) -> Tensor:
    """Run a level: ``len(repeat_mappers) + 1`` passes over its blocks with a 1x1 repeat mapper in between.

    ``x: [B, c, H, W]``, ``r_embed: [B, c_r * (1 + n_conds)]``, ``clip_act: [B, S, c_cond]`` = SiLU of the
    normalised condition sequence (the first op of every AttnBlock's kv_mapper, hoisted out).

    ``skip`` (up path only) goes to the level's first ResBlock on EVERY pass (spec §4.4 step 8). If x and
    skip differ in size (odd sizes in Stage B), x is bilinearly resized to the skip size first.
    """
    for j in range(len(repeat_mappers) + 1):
        for k, block in enumerate(blocks):
            if isinstance(block, ResBlock):
                s = skip if k == 0 else None
                if s is not None and x.shape[-2:] != s.shape[-2:]:
                    x = to_channels_last(resize_bilinear(x, s.shape[-2:]))
                x = block(x, s)
            elif isinstance(block, AttnBlock):
                x = block.attend(x, clip_act)
            elif isinstance(block, TimestepBlock):
                x = block(x, r_embed)
            else:
                x = block(x)
        if j < len(repeat_mappers):
            x = conv1x1(x, repeat_mappers[j])
    return x


def add_levels(
    net: nn.Module,
    cfg: Any,
    downscaler: Callable[[int], nn.Module],
    upscaler: Callable[[int], nn.Module],
) -> None:
    """Give ``net`` the U-Net levels of a Stage B / Stage C config, as attributes in the official
    state_dict order: down_blocks, down_downscalers, down_repeat_mappers, up_blocks, up_upscalers,
    up_repeat_mappers.

    ``downscaler(i)`` is the module entering level i from level i - 1, ``upscaler(i)`` the one leaving
    level i upwards (i >= 1; level 0 has ``nn.Identity`` for both). The up path lists levels deepest
    first: up index u is level n-1-u, and ``blocks[1]`` / ``block_repeat[1]`` follow that order.
    """
    n = len(cfg.c_hidden)
    kw = level_block_kwargs(cfg, n)
    net.down_blocks = nn.ModuleList()
    net.down_downscalers = nn.ModuleList()
    net.down_repeat_mappers = nn.ModuleList()
    for i in range(n):
        net.down_downscalers.append(nn.Identity() if i == 0 else downscaler(i))
        net.down_blocks.append(
            make_level(cfg.blocks[0][i], cfg.level_config[i], cfg.c_hidden[i], **kw[i])
        )
        net.down_repeat_mappers.append(_repeat_mappers(cfg.c_hidden[i], cfg.block_repeat[0][i]))
    net.up_blocks = nn.ModuleList()
    net.up_upscalers = nn.ModuleList()
    net.up_repeat_mappers = nn.ModuleList()
    for u, i in enumerate(reversed(range(n))):
        net.up_upscalers.append(nn.Identity() if i == 0 else upscaler(i))
        skip = cfg.c_hidden[i] if i < n - 1 else 0
        net.up_blocks.append(
            make_level(
                cfg.blocks[1][u], cfg.level_config[i], cfg.c_hidden[i], skip_first=skip, **kw[i]
            )
        )
        net.up_repeat_mappers.append(_repeat_mappers(cfg.c_hidden[i], cfg.block_repeat[1][u]))


def _repeat_mappers(c: int, repeats: int) -> nn.ModuleList:
    """The 1x1 convs between a level's ``repeats`` passes."""
    return nn.ModuleList(nn.Conv2d(c, c, 1) for _ in range(repeats - 1))


def run_levels(net: nn.Module, h: Tensor, r_embed: Tensor, clip_act: Tensor) -> Tensor:
    """The U-Net body over ``add_levels``' modules. ``h: [B, c_hidden[0], H, W]`` -> the same shape.

    Down: scaler, then the level; every level's output is kept. Up: the level (with the kept output of
    its depth as skip, except the deepest), then the scaler.
    """
    level_outputs: list[Tensor] = []
    for blocks, downscaler, repmap in zip(
        net.down_blocks, net.down_downscalers, net.down_repeat_mappers
    ):
        h = run_level(blocks, repmap, downscaler(h), r_embed, clip_act)
        level_outputs.insert(0, h)  # index 0 = deepest level
    h = level_outputs[0]
    for u, (blocks, upscaler, repmap) in enumerate(
        zip(net.up_blocks, net.up_upscalers, net.up_repeat_mappers)
    ):
        # The skip is re-concatenated on every repeat pass (run_level); sizes are reconciled there.
        skip = level_outputs[u] if u > 0 else None
        h = upscaler(run_level(blocks, repmap, h, r_embed, clip_act, skip=skip))
    return h


def per_level(value: float | bool | Sequence, n_levels: int, name: str) -> tuple:
    """Broadcast a scalar config field to one value per level; check a sequence's length."""
    if isinstance(value, (int, float, bool)):
        return (value,) * n_levels
    value = tuple(value)
    if len(value) != n_levels:
        raise ValueError(f"{name}: expected {n_levels} per-level values, got {len(value)}")
    return value


def level_block_kwargs(cfg: Any, n_levels: int) -> list[dict[str, Any]]:
    """The block arguments each level of a Stage B or Stage C config passes to ``make_level``."""
    dropout = per_level(cfg.dropout, n_levels, "dropout")
    self_attn = per_level(cfg.self_attn, n_levels, "self_attn")
    return [
        dict(
            c_cond=cfg.c_cond,
            nhead=cfg.nhead[i],
            c_r=cfg.c_r,
            t_conds=cfg.t_conds,
            kernel_size=cfg.kernel_size,
            dropout=dropout[i],
            self_attn=self_attn[i],
        )
        for i in range(n_levels)
    ]
