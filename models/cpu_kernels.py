"""CPU fast paths of the networks' linears, convolutions and attention, chosen by what the CPU has.

- ``linear``: oneDNN's fused linear (bias and exact GELU inside the GEMM) where it is the faster kernel,
  F.linear elsewhere; bfloat16 weights prepacked once into oneDNN's GEMM layout (``prepacked_bf16_weight``).
- ``folded_kv``: an attention block's kv_mapper Linear and the k/v projection as one bf16 GEMM.
- ``attention``: SDPA, except bfloat16 on a CPU with oneDNN bf16 kernels (float32 scores, float32 softmax).
- ``linear`` / ``conv`` in bfloat16 on a CPU without bf16 kernels: float32 kernels on the bf16 values.

Which path runs on which CPU (``models.cpu_features``; measured in docs/bench_forward.md, one table per
CPU kind):

| path (switch) | AVX-512 + oneDNN bf16 (Zen 5) | AVX2 only (Zen 3) |
|---|---|---|
| float32 linears via oneDNN (``ONEDNN_FLOAT32_LINEAR``) | yes | no: F.linear (MKL) |
| bf16 linears via oneDNN, prepacked (``PREPACK_BF16_WEIGHTS``) | yes | no oneDNN bf16 |
| bf16 condition path folded (``FOLD_KV_MAPPER``) | yes | no |
| bf16 linears and convolutions as float32 kernels (``BF16_VIA_FLOAT32``) | no | yes |
| bf16 attention, float32 scores (``USE_CPU_BF16_ATTENTION``, ``ONEDNN_SCORE_GEMM``) | yes | no: SDPA |

Every switch is a module attribute for A/B measurements (``bench/bench_forward.py --off / --on``);
``USE_ONEDNN_LINEAR`` turns oneDNN off altogether. Every path agrees with the plain one to float rounding.
Derived weights are cached on the module that owns the source weights (``models.derived_weights``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import cpu_features
from models.derived_weights import cached_derived


# oneDNN's fused linear (the kernel that torch.compile uses on CPU). Measured on the 2-core AMD EPYC Zen 5
# (AVX-512, AVX-512-BF16) dev machine at Stage B/C shapes: float32 about 2.5x faster than F.linear (whose
# MKL sgemm takes a slow path on AMD CPUs), bfloat16 5-15% faster (bias and GELU fused into the GEMM
# instead of extra passes).
_onednn_linear = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if torch.backends.mkldnn.is_available()
    else None
)
_onednn_bf16 = _onednn_linear is not None and torch.ops.mkldnn._is_mkldnn_bf16_supported()
USE_ONEDNN_LINEAR = True  # module switch for A/B measurements; both paths agree to float rounding
# float32 through oneDNN only where it was measured to win (AVX-512). On the AVX2-only Zen 3 (2 cores)
# MKL's AVX2 sgemm (F.linear, as diffusers runs) is the faster float32 kernel: see docs/bench_forward.md.
ONEDNN_FLOAT32_LINEAR = cpu_features.AVX512
# bfloat16 where the CPU has no oneDNN bf16 kernels (AVX2): torch's bf16 GEMMs and convolutions there are
# scalar fallbacks, 5-50x slower than float32 (measured on the Zen 3: a 288x1536x6144 GEMM 579 vs 113 ms,
# a 3x3 depthwise conv at 320x64x64 166 vs 5 ms). Run them as float32 kernels on the bf16-rounded
# operands instead, rounding the result to bf16: the products of bf16 values are exact in float32 and
# the sums are float32 either way, so this is the bf16 kernel's arithmetic, at float32 speed.
BF16_VIA_FLOAT32 = not _onednn_bf16


def _cpu_dtype(x: Tensor, weight: Tensor) -> torch.dtype | None:
    """The dtype an op of ``x`` and ``weight`` computes in on the CPU, honouring CPU autocast, or None
    where the plain op must run unchanged (GPU, autograd through the operands, mismatched dtypes)."""
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return None  # the fused kernel has no autograd formula
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")  # our ops are not autocast-aware: cast as autocast would
    if x.dtype == weight.dtype:
        return x.dtype
    return None  # F.linear raises its usual dtype-mismatch error


def _onednn_dtype(x: Tensor, weight: Tensor) -> torch.dtype | None:
    """Compute dtype for the oneDNN path, or None where F.linear must run (GPU, autograd, fp16...)."""
    if not USE_ONEDNN_LINEAR or _onednn_linear is None:
        return None
    dtype = _cpu_dtype(x, weight)
    if (dtype == torch.float32 and ONEDNN_FLOAT32_LINEAR) or (dtype == torch.bfloat16 and _onednn_bf16):
        return dtype
    return None


def _bf16_via_float32(x: Tensor, weight: Tensor) -> bool:
    """Whether an op of ``x`` and ``weight`` computes in bf16 on the CPU and runs as float32 there."""
    return BF16_VIA_FLOAT32 and _cpu_dtype(x, weight) == torch.bfloat16


def _as_bf16_values(t: Tensor | None) -> Tensor | None:
    """``t`` rounded to bf16 as autocast would, held in float32 (exactly). Memory format is kept."""
    return None if t is None else t.to(torch.bfloat16).float()


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
    fused linear (bias and GELU inside the GEMM) where it is the faster kernel, honouring CPU autocast;
    bf16 on a CPU without bf16 kernels a float32 GEMM (``BF16_VIA_FLOAT32``); elsewhere F.linear (+ F.gelu).
    ``owner`` / ``key``: the module that owns ``weight`` and a name for it there; given them, a bfloat16
    CPU call reuses a weight prepacked for oneDNN (see ``prepacked_bf16_weight``).
    """
    dtype = _onednn_dtype(x, weight)
    if dtype is None:
        if _bf16_via_float32(x, weight):
            with torch.autocast("cpu", enabled=False):
                args = (_as_bf16_values(x), _as_bf16_values(weight), _as_bf16_values(bias))
                return linear(*args, gelu).to(torch.bfloat16)
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


def conv(
    op: Callable[..., Tensor], x: Tensor, weight: Tensor, bias: Tensor | None, *args, **kwargs
) -> Tensor:
    """``op(x, weight, bias, *args, **kwargs)`` for ``F.conv2d`` / ``F.conv_transpose2d``; bf16 on a CPU
    without bf16 kernels as the float32 convolution of the bf16-rounded operands (``BF16_VIA_FLOAT32``).
    Shapes as ``op``'s."""
    if _bf16_via_float32(x, weight):
        with torch.autocast("cpu", enabled=False):
            y = op(_as_bf16_values(x), _as_bf16_values(weight), _as_bf16_values(bias), *args, **kwargs)
        return y.to(torch.bfloat16)
    return op(x, weight, bias, *args, **kwargs)


def linear_module(x: Tensor, module: nn.Linear, gelu: bool = False) -> Tensor:
    """``linear`` with an ``nn.Linear``'s parameters."""
    return linear(x, module.weight, module.bias, gelu, owner=module)


# oneDNN's own weight layout for the bfloat16 GEMM. Given a plain [out, in] weight, _linear_pointwise
# reorders it into that layout on every call, an extra read and write of the whole weight. Measured on the
# 2-core AVX-512-BF16 dev machine at Stage B/C shapes, with bit-identical results: a weight reordered once
# makes the GEMM ~5% faster in a hot loop and 10-20% faster inside a forward, where every weight comes cold
# from memory (Stage C lite bf16: GEMM time 811 -> 678 ms per forward). Costs one packed copy of each bf16
# linear weight that runs on the CPU (about the model's bf16 size again). float32 is left alone.
PREPACK_BF16_WEIGHTS = True  # module switch for A/B measurements
_reorder_linear_weight = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) if _onednn_bf16 else None


# The condition path of every AttnBlock, kv_mapper Linear then the k/v projection, as one GEMM with a weight
# folded from the two (``folded_kv``): 1/3 fewer FLOPs on the condition tokens, which at
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

    Cached on ``owner`` under ``key`` (see ``cached_derived``); ``rows`` (the GEMM's row count at the
    first call) only guides oneDNN's choice of layout, any row count works with the result. None where the
    plain weight must be used (``can_prepack_bf16``).
    """
    if not can_prepack_bf16(weight):
        return None
    return cached_derived(owner, "onednn_bf16:" + key, weight, lambda w: _pack_bf16(w, rows))



def folded_kv(
    owner: nn.Module, x: Tensor, mapper: nn.Linear, in_proj_weight: Tensor, in_proj_bias: Tensor
) -> Tensor | None:
    """``mapper`` then the k/v rows of an attention's in_proj through one GEMM, or None where the
    two-step path must run.

    ``x: [B, S, c_cond]`` -> ``[B, S, 2c]``, with ``in_proj_weight: [3c, c]`` (rows q, k, v) and
    ``in_proj_bias: [3c]``. The two are affine maps in a row, so ``W_kv (W_m x + b_m) + b_kv`` equals
    ``(W_kv W_m) x + (W_kv b_m + b_kv)``: one [2c, c_cond] GEMM instead of a [c, c_cond] and a [2c, c]
    one, fewer FLOPs whenever c_cond < 2c (Stage C, where c_cond = c: 2/3 of them). Used for bfloat16
    on the CPU, where the folded weight, cached on ``owner``, joins the other prepacked ones (see
    ``FOLD_KV_MAPPER``).
    """
    c = in_proj_weight.shape[0] // 3
    if not FOLD_KV_MAPPER or mapper.in_features >= 2 * c:
        return None
    if _onednn_dtype(x, mapper.weight) != torch.bfloat16:
        return None
    weights = (in_proj_weight, in_proj_bias, mapper.weight, mapper.bias)
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
        rows = x.numel() // x.shape[-1]
        return _pack_bf16(w, rows), b.to(torch.bfloat16)

    w, b = cached_derived(owner, "onednn_bf16:kv_folded", weights, fold)
    return _onednn_linear(x.to(torch.bfloat16), w, b, "none", [], "")


# Only where oneDNN has bf16 kernels: on the AVX2-only Zen 3 SDPA's flash kernel is the faster one (Stage C
# lite shapes, one thread: 9.4 vs 15.4 ms per call with float32 products, 78 ms with torch's bf16 bmm).
USE_CPU_BF16_ATTENTION = _onednn_bf16  # module switch for A/B measurements
ONEDNN_SCORE_GEMM = True  # module switch for A/B measurements (see ``_onednn_score_gemm``)
_ATTN_SCORES_BYTES = 64 << 20  # float32 scores held at once by the CPU bf16 attention (bounds memory)


def attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """Softmax attention, scale 1/sqrt(d). ``q: [B, nh, N, d]``, ``k, v: [B, nh, S, d]`` -> ``[B, nh, N, d]``.

    SDPA everywhere except bfloat16 on a CPU with oneDNN bf16 kernels, without autograd or dropout, where
    ``_attention_cpu_bf16`` does the same maths faster than the CPU flash kernel (measured on the 2-core
    AVX-512-BF16 dev machine: a Stage C lite forward, 32 calls, takes 34 ms longer with SDPA; Stage B lite
    2.0 vs 2.1-2.6 ms per call; see ``USE_CPU_BF16_ATTENTION``).
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
