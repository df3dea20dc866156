"""Weight loading: config inference, official-file and diffusers-folder round trips, dtypes, snapshot layout.

Round trips use tiny networks whose every parameter (and BatchNorm statistic) is random, so a tensor loaded
into the wrong place, transposed, or left at its constructor value changes the output. Official-format files
must give bit-identical outputs (torch.equal); diffusers folders are written by diffusers itself and the loaded
network is compared with the diffusers model's own forward (different code, so 1e-5 relative).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from models import convert, weight_sources, weights
from models.config import (
    EfficientNetConfig,
    PreviewerConfig,
    StageAConfig,
    StageBConfig,
    StageCConfig,
)
from models.effnet import EfficientNetEncoder
from models.infer_config import describe_checkpoint
from models.previewer import Previewer
from models.stage_a import StageA
from models.stage_b import StageB
from models.stage_c import StageC
from tests.models.checkpoint_keys import read_key_list

TOL = 1e-5


def key_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """The released checkpoint ``name``'s keys -> shapes."""
    return {key: tuple(shape) for key, shape in read_key_list(name)}


def randomize_(module: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """Seeded noise in every parameter and float buffer (BN variances positive); BN counters non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, b in sorted(module.named_buffers()):
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif b.dtype.is_floating_point:
                b.copy_(torch.randn(b.shape, generator=g) * std)
            else:
                b.fill_(7)
    return module.eval()


def save_official(module: nn.Module, path: Path, dtype: torch.dtype | None = None) -> Path:
    sd = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
        for k, v in module.state_dict().items()
    }
    save_file(sd, str(path))
    return path


def c_inputs(cfg: StageCConfig, seed: int = 0) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, cfg.c_in, 5, 6, generator=g),
        torch.rand(2, generator=g),
        torch.randn(2, 7, cfg.c_clip_text, generator=g),
        torch.randn(2, 1, cfg.c_clip_text_pooled, generator=g),
        torch.randn(2, 1, cfg.c_clip_img, generator=g),
    )


def b_inputs(cfg: StageBConfig, seed: int = 0) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, cfg.c_in, 16, 16, generator=g),
        torch.rand(2, generator=g),
        torch.randn(2, cfg.c_effnet, 3, 3, generator=g),
        torch.randn(2, 1, cfg.c_clip, generator=g),
    )


# ------------------------------------------------------------------------------------ config inference


@pytest.mark.parametrize(
    "name, expected",
    [
        ("stage_c", StageCConfig.big()),
        ("stage_c_lite", StageCConfig.lite()),
        ("stage_b", StageBConfig.big()),
        ("stage_b_lite", StageBConfig.lite()),
        ("stage_a", StageAConfig.default()),
        ("previewer", PreviewerConfig()),
        ("effnet_encoder", EfficientNetConfig()),
    ],
)
def test_config_inferred_from_real_key_lists_is_the_preset(name: str, expected) -> None:
    infer = {
        "stage_c": weights.infer_stage_c_config,
        "stage_b": weights.infer_stage_b_config,
        "stage_a": weights.infer_stage_a_config,
        "previewer": weights.infer_previewer_config,
        "effnet": weights.infer_effnet_config,
    }[name.removesuffix("_lite").removesuffix("_encoder")]
    assert infer(key_shapes(name)) == expected


@pytest.mark.parametrize("name", ["stage_c", "stage_c_lite", "stage_b", "stage_b_lite"])
def test_inferred_config_builds_exactly_the_real_key_list(name: str) -> None:
    shapes = key_shapes(name)
    infer = (
        weights.infer_stage_c_config if name.startswith("stage_c") else weights.infer_stage_b_config
    )
    network = StageC if name.startswith("stage_c") else StageB
    with torch.device("meta"):
        model = network(infer(shapes))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes


def test_non_preset_variants_are_inferred_from_shapes() -> None:
    """Any consistent architecture, not only the released ones: widths, depths, repeats, conds, clip widths."""
    c_cfg = StageCConfig(
        c_in=8,
        c_out=8,
        c_cond=128,
        c_hidden=(64, 128, 128),
        nhead=(-1, 2, 2),
        blocks=((1, 2, 1), (2, 1, 1)),
        block_repeat=((1, 2, 1), (1, 1, 3)),
        level_config=("CT", "CTA", "CTA"),
        c_clip_text=24,
        c_clip_text_pooled=20,
        c_clip_img=12,
        c_clip_seq=2,
        kernel_size=5,
        dropout=(0.0,) * 3,
        t_conds=("sca",),
        switch_level=(False, False),
    )
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in StageC(c_cfg).state_dict().items()}
    assert weights.infer_stage_c_config(shapes) == c_cfg

    b_cfg = StageBConfig(
        c_in=3,
        c_out=5,
        c_cond=64,
        c_hidden=(32, 64, 128),
        nhead=(-1, 1, 2),
        blocks=((1, 1, 2), (2, 1, 1)),
        block_repeat=((1, 1, 1), (2, 1, 3)),
        level_config=("C", "CTA", "CTA"),
        c_clip=48,
        c_clip_seq=3,
        c_effnet=8,
        c_pixels=4,
        dropout=(0.0,) * 3,
        t_conds=("sca", "crp"),
    )
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in StageB(b_cfg).state_dict().items()}
    assert weights.infer_stage_b_config(shapes) == b_cfg


def test_describe_checkpoint_names_stage_and_variant() -> None:
    assert "Stage B" in describe_checkpoint(key_shapes("stage_b_lite"))
    assert "lite" in describe_checkpoint(key_shapes("stage_b_lite"))
    assert "big" in describe_checkpoint(key_shapes("stage_c"))
    assert "Stage A" in describe_checkpoint(key_shapes("stage_a"))
    assert "EfficientNet" in describe_checkpoint(key_shapes("effnet_encoder"))


# --------------------------------------------------------------------------------- official round trip


def test_stage_c_official_round_trip(tmp_path: Path) -> None:
    cfg = replace(StageCConfig.tiny(), blocks=((2, 1), (1, 2)))
    ref = randomize_(StageC(cfg), seed=1)
    loaded = weights.load_stage_c(save_official(ref, tmp_path / "stage_c_lite.safetensors"))
    assert loaded.config == replace(cfg, dropout=(0.0, 0.0))  # dropout is not in a file
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(*c_inputs(cfg)), ref(*c_inputs(cfg)))


def test_stage_b_official_round_trip(tmp_path: Path) -> None:
    cfg = StageBConfig.tiny()
    ref = randomize_(StageB(cfg), seed=2)
    loaded = weights.load_stage_b(save_official(ref, tmp_path / "stage_b_lite.safetensors"))
    assert loaded.config == cfg
    with torch.no_grad():
        assert torch.equal(loaded(*b_inputs(cfg)), ref(*b_inputs(cfg)))


def test_stage_a_official_round_trip_and_scale(tmp_path: Path) -> None:
    cfg = StageAConfig.tiny()
    ref = randomize_(StageA(cfg), seed=3)
    loaded = weights.load_stage_a(save_official(ref, tmp_path / "stage_a.safetensors"))
    assert loaded.config == cfg and loaded.config.scale_factor == 0.43  # the official file's scale
    nbt = [b for n, b in loaded.named_buffers() if n.endswith("num_batches_tracked")]
    assert nbt and all(b.dtype == torch.int64 and b.item() == 7 for b in nbt)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.encode(image), ref.encode(image))
        assert torch.equal(loaded.decode(ref.encode(image)), ref.decode(ref.encode(image)))


def test_previewer_official_round_trip(tmp_path: Path) -> None:
    cfg = PreviewerConfig.tiny()
    ref = randomize_(Previewer(cfg), seed=4)
    loaded = weights.load_previewer(save_official(ref, tmp_path / "previewer.safetensors"))
    assert loaded.config == cfg
    x = torch.randn(1, 16, 3, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), ref(x))


def test_effnet_official_round_trip(tmp_path: Path) -> None:
    ref = randomize_(EfficientNetEncoder(EfficientNetConfig()), seed=5, std=0.02)
    loaded = weights.load_effnet(save_official(ref, tmp_path / "effnet_encoder.safetensors"))
    assert loaded.config == EfficientNetConfig()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = loaded(x)
        assert torch.isfinite(out).all() and torch.equal(out, ref(x))


def _mapping_of(t: Tensor) -> str | None:
    """The file whose memory mapping contains the tensor's storage (Linux), else None (anonymous memory)."""
    ptr = t.untyped_storage().data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi:
            return parts[5] if len(parts) > 5 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_cpu_load_without_conversion_is_zero_copy_and_conversion_is_not(tmp_path: Path) -> None:
    ref = randomize_(StageB(StageBConfig.tiny()), seed=6)
    f32 = save_official(ref, tmp_path / "b.safetensors")
    loaded = weights.load_stage_b(f32)
    w = loaded.down_blocks[0][0].channelwise[0].weight
    # The parameter IS the mapped file: no copy was made.
    assert _mapping_of(w) == str(f32.resolve())
    bf16 = save_official(ref, tmp_path / "b_bf16.safetensors", torch.bfloat16)
    converted = weights.load_stage_b(bf16).down_blocks[0][0].channelwise[0].weight
    assert converted.dtype == torch.float32 and _mapping_of(converted) != str(bf16.resolve())


# ----------------------------------------------------------------------------------------------- dtypes


def test_bf16_file_dtype_handling(tmp_path: Path) -> None:
    cfg = StageAConfig.tiny()
    ref = randomize_(StageA(cfg), seed=7)
    path = save_official(ref, tmp_path / "stage_a_bf16.safetensors", torch.bfloat16)
    as_f32 = weights.load_stage_a(path)  # CPU default: float32
    as_bf16 = weights.load_stage_a(path, dtype=torch.bfloat16)
    for name, p in ref.state_dict().items():
        a, b = as_f32.state_dict()[name], as_bf16.state_dict()[name]
        if p.is_floating_point():
            assert a.dtype == torch.float32 and b.dtype == torch.bfloat16
            assert torch.equal(a, p.to(torch.bfloat16).float())
            assert torch.equal(b, p.to(torch.bfloat16))
        else:
            assert a.dtype == b.dtype == torch.int64 and torch.equal(a, p)
    with pytest.raises(ValueError, match="float16"):
        weights.load_stage_a(path, dtype=torch.float16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_load_defaults_to_bf16_on_the_device(tmp_path: Path) -> None:
    ref = randomize_(StageB(StageBConfig.tiny()), seed=11)
    loaded = weights.load_stage_b(save_official(ref, tmp_path / "b.safetensors"), device="cuda")
    for name, want in ref.state_dict().items():
        got = loaded.state_dict()[name]
        assert got.is_cuda and got.dtype == (
            torch.bfloat16 if want.is_floating_point() else want.dtype
        )
        assert torch.equal(got.cpu(), want.to(got.dtype))


def test_default_dtype_follows_device() -> None:
    assert weights._resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert weights._resolve_dtype(None, torch.device("cuda")) == torch.bfloat16


def test_a_tensor_the_checkpoint_did_not_provide_is_an_error_not_a_meta_leftover() -> None:
    class WithTable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.register_buffer("table", torch.arange(5.0) * 2, persistent=False)

    with torch.device("meta"):
        m = WithTable()
    m.lin.to_empty(device="cpu")  # stands in for the checkpoint's tensors
    with pytest.raises(RuntimeError, match="buffer table of WithTable was left on the meta device"):
        weights._place_remaining(m, torch.device("cpu"), torch.float32)


# ------------------------------------------------------------------------------------ diffusers folders

diffusers = pytest.importorskip("diffusers")


def diffusers_unet(cfg: dict):
    from diffusers import StableCascadeUNet

    return StableCascadeUNet(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()


def diffusers_vq(cfg: dict):
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel

    return PaellaVQModel(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()


def rel_err(ours: Tensor, ref: Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("shard", [None, "60KB"])
def test_stage_c_diffusers_folder(tmp_path: Path, shard: str | None) -> None:
    cfg = replace(StageCConfig.tiny(), blocks=((2, 1), (1, 2)))
    ref = randomize_(diffusers_unet(convert.stage_c_config_to_diffusers(cfg)), seed=8)
    folder = tmp_path / "prior_lite"
    ref.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (folder / weight_sources.DIFFUSERS_INDEX).is_file()
        assert len(list(folder.glob("*.safetensors"))) > 1
    loaded = weights.load_stage_c(folder)
    assert loaded.config == replace(cfg, dropout=tuple(ref.config.dropout))
    x, r, text, pooled, img = c_inputs(cfg)
    with torch.no_grad():
        want = ref(x, r, clip_text_pooled=pooled, clip_text=text, clip_img=img).sample
        assert rel_err(loaded(x, r, text, pooled, img), want) < TOL


def test_stage_b_diffusers_folder_sharded_with_bf16_variant(tmp_path: Path) -> None:
    cfg = StageBConfig.tiny()
    ref = randomize_(diffusers_unet(convert.stage_b_config_to_diffusers(cfg)), seed=9)
    folder = tmp_path / "decoder_lite"
    ref.save_pretrained(folder, max_shard_size="100KB")
    bf16_ref = diffusers_unet(convert.stage_b_config_to_diffusers(cfg))
    bf16_ref.load_state_dict(ref.state_dict())
    bf16_ref.to(torch.bfloat16).save_pretrained(folder, variant="bf16")

    loaded = weights.load_stage_b(folder)  # float32 -> the full-precision shards
    assert loaded.config == cfg
    x, r, effnet, clip = b_inputs(cfg)
    with torch.no_grad():
        want = ref(x, r, clip_text_pooled=clip, effnet=effnet).sample
        assert rel_err(loaded(x, r, effnet, clip), want) < TOL

    as_bf16 = weights.load_stage_b(folder, dtype=torch.bfloat16)  # bfloat16 -> the .bf16 file
    official = convert.unet_diffusers_to_official(bf16_ref.state_dict())
    assert all(torch.equal(as_bf16.state_dict()[k], v) for k, v in official.items())
    forced = weights.load_stage_b(folder, variant="bf16")  # explicit variant, loaded as float32
    assert all(torch.equal(forced.state_dict()[k], v.float()) for k, v in official.items())


def test_stage_a_diffusers_vqgan_folder(tmp_path: Path) -> None:
    cfg = replace(StageAConfig.tiny(), scale_factor=0.3764)
    ref = randomize_(diffusers_vq(convert.stage_a_config_to_diffusers(cfg)), seed=10, std=0.1)
    ref.save_pretrained(tmp_path / "vqgan")
    loaded = weights.load_stage_a(tmp_path / "vqgan")
    assert loaded.config == cfg  # scale_factor from the folder's config.json
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        raw = ref.encode(image).latents
        assert rel_err(loaded.encode(image) * cfg.scale_factor, raw) < TOL
        latent = raw / cfg.scale_factor
        assert rel_err(loaded.decode(latent), ref.decode(raw, force_not_quantize=True).sample) < TOL


# ------------------------------------------------------------------------------------ snapshot layout


def touch(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_find_stage_files_official_layout_and_load(tmp_path: Path) -> None:
    save_official(
        randomize_(StageC(StageCConfig.tiny()), 1),
        tmp_path / "stage_c_lite_bf16.safetensors",
        torch.bfloat16,
    )
    save_official(randomize_(StageB(StageBConfig.tiny()), 2), tmp_path / "stage_b_lite.safetensors")
    touch(tmp_path / "stage_b_lite_bf16.safetensors")
    save_official(randomize_(StageA(StageAConfig.tiny()), 3), tmp_path / "stage_a.safetensors")
    touch(tmp_path / "previewer.safetensors")
    touch(tmp_path / "stage_c.safetensors")  # big prior present too: must not be picked for "lite"

    files = weights.find_stage_files(tmp_path)
    assert files == weights.StageFiles(
        stage_c=tmp_path / "stage_c_lite_bf16.safetensors",
        stage_b=tmp_path / "stage_b_lite.safetensors",
        stage_a=tmp_path / "stage_a.safetensors",
        effnet=None,
        previewer=tmp_path / "previewer.safetensors",
    )
    assert (
        weights.find_stage_files(tmp_path, prefer_bf16=True).stage_b
        == tmp_path / "stage_b_lite_bf16.safetensors"
    )
    assert weights.load_stage_c(files.stage_c).config == StageCConfig.tiny()
    assert weights.load_stage_b(files.stage_b).config == StageBConfig.tiny()
    assert weights.load_stage_a(files.stage_a).config == StageAConfig.tiny()


def test_find_stage_files_diffusers_layout_over_two_snapshots(tmp_path: Path) -> None:
    cascade, prior = tmp_path / "stable-cascade", tmp_path / "stable-cascade-prior"
    touch(cascade / "decoder" / "config.json", "{}")
    touch(cascade / "decoder" / "diffusion_pytorch_model.bf16.safetensors")
    touch(cascade / "vqgan" / "config.json", "{}")
    touch(cascade / "vqgan" / "diffusion_pytorch_model.safetensors")
    touch(cascade / "decoder_lite" / "config.json", "{}")  # no weights: not a usable folder
    touch(prior / "prior" / "config.json", "{}")
    touch(prior / "prior" / weight_sources.DIFFUSERS_INDEX, json.dumps({"weight_map": {}}))

    files = weights.find_stage_files([cascade, prior], prior_variant="big", decoder_variant="big")
    assert (files.stage_c, files.stage_b, files.stage_a) == (
        prior / "prior",
        cascade / "decoder",
        cascade / "vqgan",
    )
    with pytest.raises(weights.CheckpointError) as e:
        # lite: decoder_lite/ has no weights and there is no prior_lite/
        weights.find_stage_files([cascade, prior])
    msg = str(e.value)
    assert "Stage C" in msg and "stage_c_lite.safetensors" in msg and "prior_lite/" in msg
    assert "Stage B" in msg and "decoder_lite/" in msg and "Stage A" not in msg


def test_find_stage_files_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(weights.CheckpointError, match="not found"):
        weights.find_stage_files(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="prior_variant"):
        weights.find_stage_files(tmp_path, prior_variant="medium")
    with pytest.raises(
        weights.CheckpointError, match=r"Stage A \(VQGAN\): stage_a.safetensors or vqgan/"
    ):
        weights.find_stage_files(tmp_path)
