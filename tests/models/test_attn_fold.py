"""The folded condition path of ``AttnBlock`` (kv_mapper Linear and k/v projection as one bf16 CPU GEMM)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import models.cpu_kernels as cpu_kernels
from models.common import AttnBlock

pytestmark = pytest.mark.skipif(
    cpu_kernels._reorder_linear_weight is None, reason="no oneDNN bfloat16 support on this CPU"
)


def rel_err(got: Tensor, want: Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def random_block(c: int, c_cond: int, dtype: torch.dtype, seed: int = 0) -> AttnBlock:
    block = AttnBlock(c, c_cond, nhead=2).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(block.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return block.to(dtype)


def two_step_kv(block: AttnBlock, cond_act: Tensor) -> Tensor:
    """kv_mapper Linear, then the k/v rows of in_proj, in float64: ``[B, S, c_cond]`` -> ``[B, S, 2c]``."""
    mapper, attn = block.kv_mapper[1], block.attention.attn
    c = attn.c
    mapped = F.linear(cond_act.double(), mapper.weight.double(), mapper.bias.double())
    return F.linear(mapped, attn.in_proj_weight[c:].double(), attn.in_proj_bias[c:].double())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16_weights", "fp32_weights"])
def test_folded_condition_path_equals_the_two_step_path(dtype: torch.dtype) -> None:
    block = random_block(48, 64, dtype)
    g = torch.Generator().manual_seed(1)
    cond_act = F.silu(torch.randn(2, 9, 64, generator=g)).to(dtype)
    want = two_step_kv(block, cond_act)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        folded = block._folded_cond_kv(cond_act)
        unfolded = block.attention.attn.cond_kv(cpu_kernels.linear_module(cond_act, block.kv_mapper[1]))
    assert folded is not None and folded.dtype == torch.bfloat16 and folded.shape == (2, 9, 96)
    # One bf16 rounding of the folded weight against one of the intermediate: the same accuracy class.
    assert rel_err(folded, want) < 1e-2
    assert rel_err(folded, want) < 2 * rel_err(unfolded, want) + 2e-3


def test_folded_weight_follows_each_source_weight() -> None:
    block = random_block(48, 64, torch.bfloat16)
    mapper, attn = block.kv_mapper[1], block.attention.attn
    cond_act = F.silu(torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(2))).bfloat16()
    with torch.no_grad():
        block._folded_cond_kv(cond_act)
        for name, t in [
            ("in_proj_weight", attn.in_proj_weight),
            ("in_proj_bias", attn.in_proj_bias),
            ("kv_mapper.weight", mapper.weight),
            ("kv_mapper.bias", mapper.bias),
        ]:
            before = two_step_kv(block, cond_act)
            t.add_(0.1)  # in place: only the version counter tells
            want = two_step_kv(block, cond_act)
            assert rel_err(want.float(), before) > 0.05, name
            assert rel_err(block._folded_cond_kv(cond_act), want) < 1e-2, name
        other = random_block(48, 64, torch.bfloat16, seed=3)
        block.load_state_dict(other.state_dict())
        assert rel_err(block._folded_cond_kv(cond_act), two_step_kv(other, cond_act)) < 1e-2


def test_fold_is_skipped_where_it_does_not_apply(monkeypatch) -> None:
    cond_act = F.silu(torch.randn(1, 5, 64)).bfloat16()
    with torch.no_grad():
        # c_cond >= 2c: folding would add FLOPs
        assert random_block(32, 64, torch.bfloat16)._folded_cond_kv(cond_act) is None
        block = random_block(48, 64, torch.bfloat16)
        assert block._folded_cond_kv(cond_act.float()) is None  # float32 compute
        monkeypatch.setattr(cpu_kernels, "FOLD_KV_MAPPER", False)
        assert block._folded_cond_kv(cond_act) is None
    monkeypatch.setattr(cpu_kernels, "FOLD_KV_MAPPER", True)
    assert block._folded_cond_kv(cond_act) is None  # autograd on: no cached weights
    with torch.inference_mode():
        inference_block = random_block(48, 64, torch.bfloat16)
        assert inference_block._folded_cond_kv(cond_act) is None  # no version counters to watch
