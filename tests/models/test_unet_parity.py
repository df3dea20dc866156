"""Stage B / Stage C against diffusers' ``StableCascadeUNet`` (the reference), plus the format conversions.

Both implementations get the same fully random weights (every parameter, GRN gamma/beta included, drawn
from N(0, 0.05^2): default init leaves zeros that would hide wiring bugs), moved across formats with
``models.convert``. The forward outputs must agree to 1e-5 relative in float32. Those comparisons would fail
for a misplaced skip concatenation, a wrong r-embedding operation order, a missing repeat pass, a wrong
resize or a scrambled token layout.

diffusers quirks respected here: pooled text goes in as [B, 1, P]; the prior gets clip_text AND clip_img
(one alone is silently dropped); sca/crp are never passed (a batched value crashes it).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from torch import Tensor, nn

import models.cpu_kernels as cpu_kernels
from models import convert
from models.common import gen_r_embedding
from models.config import StageAConfig, StageBConfig, StageCConfig
from models.stage_b import StageB
from models.stage_c import StageC

diffusers = pytest.importorskip("diffusers")
from diffusers import StableCascadeUNet  # noqa: E402

TOL = 1e-5


def randomize_(module: nn.Module, seed: int, std: float = 0.05) -> None:
    """Overwrite every parameter with seeded N(0, std^2) noise, in sorted-name order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def diffusers_unet(config: dict) -> StableCascadeUNet:
    return StableCascadeUNet(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()


def rel_err(ours: Tensor, ref: Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


# Tiny configs with the real wiring. Stage C: 2 levels, CTA, sca+crp, no resampling. Stage B: 4 levels
# CT/CT/CTA/CTA, patch 2, effnet 16 / pixels 3 mappers, up repeats (3,3,2,2), sca only. Two layers per level
# so that repeated blocks and the skip-only-on-the-first-ResBlock rule are exercised.
C_CFG = replace(StageCConfig.tiny(), blocks=((2, 1), (1, 2)), dropout=(0.1, 0.1))
B_CFG = replace(StageBConfig.tiny(), blocks=((1, 2, 1, 1), (1, 1, 2, 1)), dropout=(0.0, 0.0, 0.1, 0.1))


@pytest.fixture(scope="module")
def stage_c_pair() -> tuple[StageC, StableCascadeUNet]:
    ref = diffusers_unet(convert.stage_c_config_to_diffusers(C_CFG))
    randomize_(ref, seed=1)
    ours = StageC(C_CFG).eval()
    ours.load_state_dict(convert.unet_diffusers_to_official(ref.state_dict()), strict=True)
    return ours, ref


@pytest.fixture(scope="module")
def stage_b_pair() -> tuple[StageB, StableCascadeUNet]:
    ref = diffusers_unet(convert.stage_b_config_to_diffusers(B_CFG))
    randomize_(ref, seed=2)
    ours = StageB(B_CFG).eval()
    ours.load_state_dict(convert.unet_diffusers_to_official(ref.state_dict()), strict=True)
    return ours, ref


def stage_c_inputs(batch: int, h: int, w: int, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(batch, 16, h, w, generator=g),
        r=torch.rand(batch, generator=g),
        clip_text=torch.randn(batch, 9, C_CFG.c_clip_text, generator=g),
        clip_text_pooled=torch.randn(batch, 1, C_CFG.c_clip_text_pooled, generator=g),
        clip_img=torch.randn(batch, 1, C_CFG.c_clip_img, generator=g),
    )


def stage_b_inputs(batch: int, h: int, w: int, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(batch, 4, h, w, generator=g),
        r=torch.rand(batch, generator=g),
        effnet=torch.randn(batch, 16, 3, 5, generator=g),
        clip=torch.randn(batch, 1, B_CFG.c_clip, generator=g),
    )


def run_ref_c(ref: StableCascadeUNet, i: dict[str, Tensor]) -> Tensor:
    return ref(i["x"], i["r"], clip_text_pooled=i["clip_text_pooled"], clip_text=i["clip_text"],
               clip_img=i["clip_img"]).sample


def run_ref_b(ref: StableCascadeUNet, i: dict[str, Tensor], pixels: Tensor | None = None) -> Tensor:
    return ref(i["x"], i["r"], clip_text_pooled=i["clip"], effnet=i["effnet"], pixels=pixels).sample


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("size", [(6, 6), (5, 7)])
def test_stage_c_matches_diffusers(stage_c_pair, size) -> None:
    ours, ref = stage_c_pair
    inputs = stage_c_inputs(2, *size)
    with torch.inference_mode():
        want = run_ref_c(ref, inputs)
        got = ours(**inputs)
    assert got.shape == want.shape == inputs["x"].shape
    assert want.abs().max() > 0.1 and want.std() > 0.01  # non-trivial reference output
    assert rel_err(got, want) < TOL


def test_stage_c_accepts_2d_pooled_and_image(stage_c_pair) -> None:
    ours, ref = stage_c_pair
    inputs = stage_c_inputs(2, 4, 4, seed=3)
    with torch.inference_mode():
        want = run_ref_c(ref, inputs)
        got = ours(inputs["x"], inputs["r"], inputs["clip_text"], inputs["clip_text_pooled"][:, 0],
                   inputs["clip_img"][:, 0])
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("size", [(32, 32), (40, 24), (22, 18)])
def test_stage_b_matches_diffusers(stage_b_pair, size) -> None:
    """32x32: power of two. 40x24 and 22x18: odd sizes inside the U-Net, so the up path resizes to the skip."""
    ours, ref = stage_b_pair
    inputs = stage_b_inputs(2, *size)
    with torch.inference_mode():
        want = run_ref_b(ref, inputs)
        got = ours(**inputs)
    assert got.shape == want.shape == inputs["x"].shape
    assert want.abs().max() > 0.1 and want.std() > 0.01
    assert rel_err(got, want) < TOL


def test_portable_kernels_match_diffusers_too(stage_b_pair, stage_c_pair, monkeypatch) -> None:
    """The F.linear path (GPU, autograd) must satisfy the same parity bar as the CPU oneDNN path."""
    monkeypatch.setattr(cpu_kernels, "USE_ONEDNN_LINEAR", False)
    for (ours, ref), inputs, run_ref in (
        (stage_b_pair, stage_b_inputs(2, 40, 24), run_ref_b),
        (stage_c_pair, stage_c_inputs(2, 5, 7), run_ref_c),
    ):
        with torch.inference_mode():
            assert rel_err(ours(**inputs), run_ref(ref, inputs)) < TOL


def test_stage_b_with_pixels_matches_diffusers(stage_b_pair) -> None:
    ours, ref = stage_b_pair
    inputs = stage_b_inputs(2, 24, 16, seed=5)
    pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        want = run_ref_b(ref, inputs, pixels)
        got = ours(**inputs, pixels=pixels)
        without = ours(**inputs)
    assert rel_err(got, want) < TOL
    assert rel_err(without, want) > 1e-3  # the pixels branch really contributes


def test_wrong_weights_are_detected(stage_b_pair) -> None:
    """Guards the parity bar itself: swapping two repeated blocks' weights must break it."""
    ours, ref = stage_b_pair
    broken = StageB(B_CFG).eval()
    sd = convert.unet_diffusers_to_official(ref.state_dict())
    key = "up_blocks.1.0.channelwise.2.gamma"  # GRN gamma of the first up ResBlock of level 2
    sd[key] = sd[key].flip(-1)
    broken.load_state_dict(sd)
    inputs = stage_b_inputs(2, 16, 16)
    with torch.inference_mode():
        assert rel_err(broken(**inputs), run_ref_b(ref, inputs)) > 1e-3


# ------------------------------------------------------------------------------------ behaviour checks


def test_eval_outputs_are_deterministic_and_batch_independent(stage_b_pair, stage_c_pair) -> None:
    ours_b, _ = stage_b_pair
    ours_c, _ = stage_c_pair
    ib = stage_b_inputs(3, 40, 24, seed=7)
    ic = stage_c_inputs(3, 6, 6, seed=8)
    with torch.inference_mode():
        b1, b2 = ours_b(**ib), ours_b(**ib)
        c1, c2 = ours_c(**ic), ours_c(**ic)
        b_single = ours_b(**{k: v[1:2] for k, v in ib.items()})
        c_single = ours_c(**{k: v[1:2] for k, v in ic.items()})
    assert torch.equal(b1, b2) and torch.equal(c1, c2)
    assert rel_err(b_single, b1[1:2]) < TOL and rel_err(c_single, c1[1:2]) < TOL


@pytest.mark.parametrize("bf16_weights", [False, True], ids=["fp32_weights", "bf16_weights"])
def test_bf16_autocast_runs_and_stays_close(stage_b_pair, stage_c_pair, bf16_weights) -> None:
    """Official inference runs bf16 weights under bf16 autocast; results must stay near float32."""
    ib, ic = stage_b_inputs(2, 40, 24), stage_c_inputs(2, 6, 6)
    for (model, _), inputs in ((stage_b_pair, ib), (stage_c_pair, ic)):
        with torch.inference_mode():
            want = model(**inputs)
            if bf16_weights:
                model = copy.deepcopy(model).to(torch.bfloat16)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = model(**inputs)
        assert got.shape == want.shape and torch.isfinite(got).all()
        assert rel_err(got.float(), want) < 0.05  # bf16 keeps ~3 significant digits


def test_cached_conv_weights_follow_weight_changes(stage_b_pair) -> None:
    """Stage B caches channels_last copies of its 2x2 conv weights; loading new weights must refresh them."""
    ours, ref = stage_b_pair
    inputs = stage_b_inputs(1, 16, 16)
    other = StageB(B_CFG).eval()
    randomize_(other, seed=11)
    model = copy.deepcopy(ours)
    with torch.inference_mode():
        before = model(**inputs)  # fills the caches
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        after, want = model(**inputs), other(**inputs)
    model.to(torch.float64).to(torch.float32)  # new tensors (maybe at recycled addresses): caches follow
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # in-place edit: version counters change
    with torch.inference_mode():
        again = model(**inputs)
    other_scaled = copy.deepcopy(other)
    with torch.no_grad():
        for p in other_scaled.parameters():
            p.mul_(1.5)
    with torch.inference_mode():
        want_again = other_scaled(**inputs)
    assert rel_err(after, before) > 1e-2
    assert torch.equal(after, want) and torch.equal(again, want_again)


needs_onednn_bf16 = pytest.mark.skipif(
    cpu_kernels._reorder_linear_weight is None, reason="no oneDNN bfloat16 support on this CPU"
)


def derived_weight_keys(model: nn.Module) -> set[str]:
    return {k for m in model.modules() for k in m.__dict__.get("_derived_weights", {})}


@needs_onednn_bf16
def test_prepacked_bf16_weights_follow_weight_changes(stage_b_pair) -> None:
    """bf16 CPU linears reuse oneDNN-packed weights; new, edited or moved weights must refresh them."""
    ours, _ = stage_b_pair
    inputs = stage_b_inputs(1, 16, 16)
    model = copy.deepcopy(ours).to(torch.bfloat16)
    other = StageB(B_CFG).eval()
    randomize_(other, seed=12)
    other.to(torch.bfloat16)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.inference_mode(), bf16:
        before = model(**inputs)  # fills the caches
    assert any(k.startswith("onednn_bf16:") for k in derived_weight_keys(model))
    model.load_state_dict(other.state_dict())
    with torch.inference_mode(), bf16:
        after, want = model(**inputs), other(**inputs)
    model.to(torch.float32)
    assert not derived_weight_keys(model)  # .to() drops the caches together with their sources
    model.to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # in-place edit: version counters change
        for p in other.parameters():
            p.mul_(1.5)
    with torch.inference_mode(), bf16:
        again, want_again = model(**inputs), other(**inputs)
    # The packed tensors are not copied: the copy rebuilds its own. (A copy made in inference mode would
    # hold inference tensors, which are never packed or folded.)
    copied = copy.deepcopy(model)
    assert not derived_weight_keys(copied)
    with torch.inference_mode(), bf16:
        assert torch.equal(copied(**inputs), again)
    assert rel_err(after.float(), before.float()) > 1e-2
    assert torch.equal(after, want) and torch.equal(again, want_again)


@needs_onednn_bf16
def test_prepacked_bf16_weights_give_the_plain_results(stage_c_pair, monkeypatch) -> None:
    ours, _ = stage_c_pair
    inputs = stage_c_inputs(2, 6, 6)
    model = copy.deepcopy(ours).to(torch.bfloat16)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        packed = model(**inputs)
        monkeypatch.setattr(cpu_kernels, "PREPACK_BF16_WEIGHTS", False)
        plain = model(**inputs)
    assert rel_err(packed.float(), plain.float()) < 1e-2  # bit-identical in practice; bf16 rounding bar


def test_cpu_bf16_attention_keeps_float32_scores(monkeypatch) -> None:
    """The CPU bf16 attention: as accurate as SDPA's bf16 kernel, unaffected by autocast, chunked or not."""
    monkeypatch.setattr(cpu_kernels, "USE_CPU_BF16_ATTENTION", True)  # on CPUs that default to SDPA too
    g = torch.Generator().manual_seed(4)
    B, nh, N, S, d = 2, 3, 37, 53, 16
    qkv = torch.randn(B, N, 3, nh, d, generator=g).bfloat16()  # strided views, as the model passes them
    q = qkv[:, :, 0].transpose(1, 2)
    k = torch.randn(B, S, nh, d, generator=g).bfloat16().transpose(1, 2) * 3  # peaked softmax
    v = torch.randn(B, S, nh, d, generator=g).bfloat16().transpose(1, 2)
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    got = cpu_kernels.attention(q, k, v)
    assert got.dtype == torch.bfloat16 and got.shape == (B, nh, N, d)
    assert rel_err(got.double(), want) < 2 * rel_err(sdpa.double(), want) + 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(cpu_kernels.attention(q, k, v), got)  # autocast would round the scores to bf16
    monkeypatch.setattr(cpu_kernels, "_ATTN_SCORES_BYTES", 4 * B * nh * S * 8)  # 8 query rows per chunk
    assert rel_err(cpu_kernels.attention(q, k, v).double(), want) < 2 * rel_err(sdpa.double(), want) + 1e-3
    assert torch.backends.mkldnn.matmul.fp32_precision == "none"  # the score GEMM's setting does not leak


def test_onednn_score_gemm_keep_float32_gemms_exact_and_restore_the_setting() -> None:
    """Inside ``_onednn_score_gemm``, a float32 GEMM of upcast bf16 values is the float32 GEMM (the rounding
    to bf16 it allows is exact on such values); outside, float32 matmuls are untouched, even after errors."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(12, 40, 64, generator=g).bfloat16().float()
    b = torch.randn(12, 64, 75, generator=g).bfloat16().float() * 128  # wide range; a power of two keeps the values bf16
    want = torch.bmm(a.double(), b.double())
    setting = torch.backends.mkldnn.matmul
    before = setting.fp32_precision
    with cpu_kernels._onednn_score_gemm():
        assert setting.fp32_precision == "bf16"
        got = torch.baddbmm(a.new_empty(1, 1, 1), a, b, beta=0.0)
    assert got.dtype == torch.float32
    assert rel_err(got.double(), want) < 1e-6  # float32 accumulation only; rounding to bf16 would give ~1e-3
    assert setting.fp32_precision == before
    with pytest.raises(RuntimeError, match="inside"), cpu_kernels._onednn_score_gemm():
        raise RuntimeError("inside")
    assert setting.fp32_precision == before
    with cpu_kernels._onednn_score_gemm(enabled=False):
        assert setting.fp32_precision == before

def test_sca_condition_changes_output(stage_b_pair) -> None:
    ours, _ = stage_b_pair
    inputs = stage_b_inputs(2, 16, 16)
    with torch.inference_mode():
        base = ours(**inputs)
        zero = ours(**inputs, t_cond_values={"sca": torch.zeros(2)})
        other = ours(**inputs, t_cond_values={"sca": torch.full((2,), 0.5)})
    assert torch.equal(base, zero)
    assert rel_err(other, base) > 1e-3
    with pytest.raises(ValueError, match="crp"):
        ours(**inputs, t_cond_values={"crp": torch.zeros(2)})


def test_bad_inputs_raise_clear_errors(stage_b_pair, stage_c_pair) -> None:
    ours_b, _ = stage_b_pair
    ours_c, _ = stage_c_pair
    ib = stage_b_inputs(1, 16, 16)
    with pytest.raises(ValueError, match="patch_size"):
        ours_b(**{**ib, "x": torch.randn(1, 4, 15, 16)})
    with pytest.raises(ValueError, match="effnet"):
        ours_b(**{**ib, "effnet": torch.randn(1, 8, 3, 3)})
    with pytest.raises(ValueError, match="clip"):
        ours_b(**{**ib, "clip": torch.randn(1, 4, B_CFG.c_clip)})
    ic = stage_c_inputs(1, 4, 4)
    with pytest.raises(ValueError, match="clip_text"):
        ours_c(**{**ic, "clip_text": torch.randn(1, 9, 5)})
    with pytest.raises(ValueError, match="r:"):
        ours_c(**{**ic, "r": torch.rand(2)})


def test_r_embedding_layout_and_values() -> None:
    """sin block then cos block, divisor half-1 = 31, argument 10000*r; checked against float64 maths."""
    r = torch.tensor([0.0, 0.25, 0.731])
    emb = gen_r_embedding(r)
    assert emb.dtype == torch.float32 and emb.shape == (3, 64)
    assert torch.equal(emb[0], torch.cat([torch.zeros(32), torch.ones(32)]))
    j = torch.arange(32, dtype=torch.float64)
    arg = (r.double() * 10000)[:, None] * torch.exp(-j * math.log(10000) / 31)[None]
    want = torch.cat([arg.sin(), arg.cos()], dim=1)
    # float32 arguments reach 1e4, where one ulp is ~1e-3 rad: agreement is to a few 1e-3, not better.
    assert (emb.double() - want).abs().max() < 5e-3
    assert (emb[:, :32].double() - arg.sin()).abs().max() < 5e-3  # sines first


# ------------------------------------------------------------------------------------------- conversions


@pytest.mark.parametrize("which", ["c", "b"])
def test_state_dict_conversion_round_trips(stage_c_pair, stage_b_pair, which) -> None:
    ours, _ = stage_c_pair if which == "c" else stage_b_pair
    official = ours.state_dict()
    diff = convert.unet_official_to_diffusers(official)
    n_attn = sum(k.endswith("attention.attn.in_proj_weight") for k in official)
    assert n_attn > 0 and len(diff) == len(official) + 4 * n_attn
    assert not any("in_proj" in k or "out_proj" in k or k.startswith("clip_mapper.") for k in diff)
    back = convert.unet_diffusers_to_official(diff)
    assert list(back) == list(official)
    assert all(torch.equal(back[k], official[k]) for k in official)


@pytest.mark.parametrize(
    "cfg", [StageCConfig.big(), StageCConfig.lite(), StageBConfig.big(), StageBConfig.lite()],
    ids=["c", "c_lite", "b", "b_lite"],
)
def test_full_size_conversion_matches_diffusers_layout(cfg) -> None:
    """Our config -> diffusers config builds a diffusers model whose keys/shapes equal our converted ones."""
    to_d = convert.stage_c_config_to_diffusers if isinstance(cfg, StageCConfig) else convert.stage_b_config_to_diffusers
    from_d = convert.stage_c_config_from_diffusers if isinstance(cfg, StageCConfig) else convert.stage_b_config_from_diffusers
    d = to_d(cfg)
    assert from_d(d) == cfg
    with torch.device("meta"):
        ref = diffusers_unet(d)
        ours = StageC(cfg) if isinstance(cfg, StageCConfig) else StageB(cfg)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in convert.unet_official_to_diffusers(ours.state_dict()).items()}
    assert got == want


def test_hf_style_config_values() -> None:
    """The released decoder_lite config.json writes 0 heads for attention-free levels; we keep -1 (official)."""
    d = convert.stage_b_config_to_diffusers(StageBConfig.lite())
    assert d["num_attention_heads"] == [0, 9, 18, 18]
    assert d["block_types_per_layer"][0] == ["SDCascadeResBlock", "SDCascadeTimestepBlock"]
    d["num_attention_heads"] = [0, 9, 18, 18]
    assert convert.stage_b_config_from_diffusers(d).nhead == (-1, 9, 18, 18)
    c = convert.stage_c_config_to_diffusers(StageCConfig.lite())
    assert c["switch_level"] == [False] and c["effnet_in_channels"] is None


def test_config_conversion_rejects_wrong_stage() -> None:
    with pytest.raises(ValueError, match="effnet_in_channels"):
        convert.stage_c_config_from_diffusers(convert.stage_b_config_to_diffusers(StageBConfig.lite()))
    with pytest.raises(ValueError, match="effnet_in_channels"):
        convert.stage_b_config_from_diffusers(convert.stage_c_config_to_diffusers(StageCConfig.lite()))
    bad = convert.stage_b_config_to_diffusers(StageBConfig.tiny())
    bad["block_types_per_layer"][0] = ["SDCascadeResBlock", "SomethingElse"]
    with pytest.raises(ValueError, match="SomethingElse"):
        convert.stage_b_config_from_diffusers(bad)
    del bad["block_out_channels"]
    with pytest.raises(ValueError, match="block_out_channels"):
        convert.stage_b_config_from_diffusers(bad)


def test_incomplete_diffusers_attention_is_refused() -> None:
    sd = {"down_blocks.0.2.attention.to_q.weight": torch.zeros(4, 4),
          "down_blocks.0.2.attention.to_v.weight": torch.zeros(4, 4)}
    with pytest.raises(ValueError, match="to_k"):
        convert.unet_diffusers_to_official(sd)


def test_stage_a_config_and_codebook_conversion() -> None:
    for cfg in (StageAConfig.default(), StageAConfig.tiny(), replace(StageAConfig.tiny(), scale_factor=0.3764)):
        d = convert.stage_a_config_to_diffusers(cfg)
        assert d["embed_dim"] == cfg.c_hidden and d["num_vq_embeddings"] == cfg.codebook_size
        assert convert.stage_a_config_from_diffusers(d) == cfg
    with pytest.raises(ValueError, match="up_down_scale_factor"):
        convert.stage_a_config_from_diffusers({**d, "up_down_scale_factor": 4})
    book = torch.randn(16, 4)
    official = {"in_block.1.weight": torch.zeros(1), "vquantizer.codebook.weight": book}
    diff = convert.vq_official_to_diffusers(official)
    assert list(diff) == ["in_block.1.weight", "vquantizer.embedding.weight"]
    assert diff["vquantizer.embedding.weight"] is book
    assert list(convert.vq_diffusers_to_official(diff)) == list(official)


def test_stage_a_conversion_matches_diffusers_vq_layout() -> None:
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel

    from models.stage_a import StageA

    cfg = StageAConfig.tiny()
    d = convert.stage_a_config_to_diffusers(cfg)
    ref = PaellaVQModel(**{k: v for k, v in d.items() if not k.startswith("_")})
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in convert.vq_official_to_diffusers(StageA(cfg).state_dict()).items()}
    assert got == want
