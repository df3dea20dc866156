"""CPU fast paths chosen by what the CPU has: feature detection, the bf16 warning, bf16 via float32."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

import models.cpu_features as cpu_features
import models.cpu_kernels as cpu_kernels
from models import weights
from models.config import StageAConfig, StageBConfig, StageCConfig
from models.stage_a import StageA
from models.stage_b import StageB
from models.stage_c import StageC

X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx fma f16c avx2 avx512f avx512bw avx512vl avx512dq avx512_bf16
processor\t: 1
flags\t\t: fpu
"""
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd bf16 sve\n"


def rel_err(got: Tensor, want: Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def test_flags_are_read_from_cpuinfo() -> None:
    flags = cpu_features.read_flags(X86_CPUINFO)
    assert {"avx2", "avx512_bf16", "avx512dq"} <= flags and "processor" not in flags
    assert "sve" in cpu_features.read_flags(ARM_CPUINFO)
    assert cpu_features.read_flags("model name : no flags line\n") == frozenset()


@pytest.fixture
def cpu_without_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU without native bf16 that has not warned yet, and the bf16-via-float32 kernels on (the
    oneDNN bf16 path off, so that they run on every CPU)."""
    monkeypatch.setattr(cpu_features, "NATIVE_BF16", False)
    monkeypatch.setattr(cpu_features, "_warned_bf16", False)
    monkeypatch.setattr(cpu_kernels, "_onednn_bf16", False)
    monkeypatch.setattr(cpu_kernels, "BF16_VIA_FLOAT32", True)


def test_bf16_on_a_cpu_without_native_bf16_warns_once(cpu_without_bf16, caplog) -> None:
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="models.cpu"):
        assert not cpu_features.warn_if_bf16_is_emulated(torch.float32, cpu)
        assert not cpu_features.warn_if_bf16_is_emulated(torch.bfloat16, torch.device("cuda"))
        assert cpu_features.warn_if_bf16_is_emulated(torch.bfloat16, cpu)
        assert not cpu_features.warn_if_bf16_is_emulated(torch.bfloat16, cpu)  # once per process
    lines = [r.getMessage() for r in caplog.records if r.name == "models.cpu"]
    assert len(lines) == 1 and "no native bf16" in lines[0] and "float32" in lines[0]


def test_bf16_on_a_cpu_with_native_bf16_does_not_warn(monkeypatch, caplog) -> None:
    monkeypatch.setattr(cpu_features, "NATIVE_BF16", True)
    monkeypatch.setattr(cpu_features, "_warned_bf16", False)
    with caplog.at_level(logging.WARNING, logger="models.cpu"):
        assert not cpu_features.warn_if_bf16_is_emulated(torch.bfloat16, torch.device("cpu"))
    assert not caplog.records


def test_loading_weights_in_bf16_warns_on_such_a_cpu(cpu_without_bf16, tmp_path, caplog) -> None:
    path = tmp_path / "stage_a.safetensors"
    save_file({k: v.contiguous() for k, v in StageA(StageAConfig.tiny()).state_dict().items()}, str(path))
    with caplog.at_level(logging.WARNING, logger="models.cpu"):
        weights.load_stage_a(path)  # float32: the CPU default, no warning
        assert not caplog.records
        model = weights.load_stage_a(path, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert len(caplog.records) == 1 and "bfloat16" in caplog.records[0].getMessage()


def bf16_values(t: Tensor) -> Tensor:
    return t.to(torch.bfloat16).float()


def recording(op, seen: list[torch.dtype]):
    """``op``, noting the dtype of its first argument at every call."""

    def call(x, *args, **kwargs):
        seen.append(x.dtype)
        return op(x, *args, **kwargs)

    return call


@pytest.mark.parametrize("gelu", [False, True])
def test_bf16_linear_via_float32_is_the_float32_gemm_of_bf16_values(cpu_without_bf16, monkeypatch,
                                                                    gelu) -> None:
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 7, 48, generator=g), torch.randn(40, 48, generator=g), torch.randn(40, generator=g)
    y = F.linear(bf16_values(x), bf16_values(w), bf16_values(b))
    want = (F.gelu(y) if gelu else y).to(torch.bfloat16)
    monkeypatch.setattr(cpu_kernels, "ONEDNN_FLOAT32_LINEAR", False)  # the float32 GEMM is F.linear
    seen: list[torch.dtype] = []
    monkeypatch.setattr(F, "linear", recording(F.linear, seen))
    with torch.no_grad():
        got = cpu_kernels.linear(x.bfloat16(), w.bfloat16(), b.bfloat16(), gelu)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 operands, rounded as autocast does
            got_autocast = cpu_kernels.linear(x, w, b, gelu)
    assert seen == [torch.float32, torch.float32]
    assert got.dtype == got_autocast.dtype == torch.bfloat16
    assert torch.equal(got, want) and torch.equal(got_autocast, want)


@pytest.mark.parametrize("op", [F.conv2d, F.conv_transpose2d], ids=["conv2d", "conv_transpose2d"])
def test_bf16_conv_via_float32_is_the_float32_conv_of_bf16_values(cpu_without_bf16, op) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 8, 10, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(6, 6, 2, 2, generator=g), torch.randn(6, generator=g)
    want = op(bf16_values(x), bf16_values(w), bf16_values(b), stride=2).to(torch.bfloat16)
    seen: list[torch.dtype] = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = cpu_kernels.conv(recording(op, seen), x, w, b, stride=2)
    assert seen == [torch.float32]
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    with torch.no_grad():  # float32: the plain convolution
        assert torch.equal(cpu_kernels.conv(op, x, w, b, stride=2), op(x, w, b, stride=2))


def test_bf16_attention_is_sdpa_where_the_cpu_has_no_bf16_kernels(cpu_without_bf16, monkeypatch) -> None:
    monkeypatch.setattr(cpu_kernels, "USE_CPU_BF16_ATTENTION", False)  # the default there
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g).bfloat16() for n in (37, 53, 53))
    assert torch.equal(cpu_kernels.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


C_CFG = replace(StageCConfig.tiny(), blocks=((2, 1), (1, 2)))
B_CFG = replace(StageBConfig.tiny(), blocks=((1, 2, 1, 1), (1, 1, 2, 1)))


def random_net(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(net.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


@pytest.mark.parametrize("stage", ["b", "c"])
def test_bf16_forward_via_float32_is_as_accurate_as_bf16_kernels(cpu_without_bf16, monkeypatch, stage):
    """A whole bf16 forward (weights bf16, autocast) with and without the float32 kernels: both as close
    to the float32 forward of the same weights as bf16 allows."""
    g = torch.Generator().manual_seed(2)
    if stage == "b":
        net = random_net(StageB(B_CFG), seed=3)
        inputs = (torch.randn(2, 4, 16, 16, generator=g), torch.rand(2, generator=g),
                  torch.randn(2, 16, 3, 5, generator=g), torch.randn(2, 1, B_CFG.c_clip, generator=g))
    else:
        net = random_net(StageC(C_CFG), seed=4)
        inputs = (torch.randn(2, 16, 6, 6, generator=g), torch.rand(2, generator=g),
                  torch.randn(2, 9, C_CFG.c_clip_text, generator=g),
                  torch.randn(2, 1, C_CFG.c_clip_text_pooled, generator=g),
                  torch.randn(2, 1, C_CFG.c_clip_img, generator=g))
    with torch.no_grad():
        want = net(*inputs)
        net.to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            via_float32 = net(*inputs)
            monkeypatch.setattr(cpu_kernels, "BF16_VIA_FLOAT32", False)
            bf16_kernels = net(*inputs)
    assert via_float32.dtype == torch.bfloat16 and want.abs().max() > 0.1
    assert rel_err(via_float32, want) < 3e-2
    assert rel_err(via_float32, want) < 1.5 * rel_err(bf16_kernels, want) + 5e-3

