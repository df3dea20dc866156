"""Stage A (VQGAN), the EfficientNet encoder and the Previewer.

* Full-size networks built on ``meta`` match the official checkpoint key lists and parameter
  counts exactly.
* Stage A encode/decode agree numerically with diffusers' PaellaVQModel (the reference
  implementation) on identical, fully randomised weights.
* EfficientNet blocks agree with a functional re-computation written out here from the
  architecture description, and the encoder has output stride 32 with ceil semantics.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import EfficientNetConfig, PreviewerConfig, StageAConfig
from models.effnet import EfficientNetEncoder, FusedMBConv, MBConv
from models.previewer import Previewer
from models.stage_a import StageA
from tests.models.checkpoint_keys import read_key_list


def randomize_(module: nn.Module, seed: int, std: float = 0.2) -> None:
    """Overwrite every parameter and BatchNorm running stat with seeded noise (sorted-name order).

    Constructors leave gammas at zero, BN stats at 0/1 and so on, which would hide wiring bugs;
    running_var stays positive.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            scale = 0.5 if name.endswith("gammas") else std
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        for name, b in sorted(module.named_buffers()):
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)


def rel_err(ours: Tensor, ref: Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


# ------------------------------------------------------------------------------ checkpoint layout


@pytest.mark.parametrize(
    ("name", "build", "n_params"),
    [
        ("stage_a", lambda: StageA(StageAConfig.default()), 18_406_894),
        ("effnet_encoder", lambda: EfficientNetEncoder(EfficientNetConfig()), 20_197_968),
        ("previewer", lambda: Previewer(PreviewerConfig()), 3_979_651),
    ],
)
def test_meta_state_dict_matches_official_keys(name: str, build, n_params: int) -> None:
    with torch.device("meta"):
        model = build()
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == read_key_list(name)
    # Parameters only: BatchNorm buffers (running stats, num_batches_tracked) are not counted.
    assert sum(p.numel() for p in model.parameters()) == n_params


# ---------------------------------------------------------------------------------------- Stage A


def test_stage_a_encode_decode_shapes_and_quantize() -> None:
    torch.manual_seed(0)
    config = StageAConfig.tiny()
    model = StageA(config).eval()
    randomize_(model, seed=5)
    image = torch.rand(2, 3, 16, 24)
    with torch.no_grad():
        latent = model.encode(image)
        assert latent.shape == (2, config.c_latent, 4, 6)
        assert model.decode(latent).shape == (2, 3, 16, 24)

        quantized = model.encode(image, quantize=True) * config.scale_factor
    assert quantized.shape == latent.shape
    # Every latent pixel becomes the codebook row nearest (L2) to the unquantized BN output.
    book = model.vquantizer.codebook.weight
    raw = (latent * config.scale_factor).permute(0, 2, 3, 1).reshape(-1, config.c_latent)
    nearest = torch.cdist(raw.double(), book.double()).argmin(dim=1)
    got = quantized.permute(0, 2, 3, 1).reshape(-1, config.c_latent)
    torch.testing.assert_close(got, book[nearest], rtol=0, atol=1e-6)
    assert nearest.unique().numel() > 1  # weak check if every pixel mapped to one code


def test_stage_a_rejects_bad_inputs() -> None:
    model = StageA(StageAConfig.tiny())
    with pytest.raises(ValueError, match="multiples of 4"):
        model.encode(torch.rand(1, 3, 18, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.encode(torch.rand(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\]"):
        model.decode(torch.rand(1, 16, 4, 4))


@pytest.mark.parametrize(("levels", "bottleneck_blocks", "c_hidden"), [(2, 2, 32), (3, 1, 64)])
def test_stage_a_matches_diffusers_paella(
    levels: int, bottleneck_blocks: int, c_hidden: int
) -> None:
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel

    scale = 0.43
    ref = PaellaVQModel(
        levels=levels,
        bottleneck_blocks=bottleneck_blocks,
        embed_dim=c_hidden,
        latent_channels=4,
        num_vq_embeddings=8,
        scale_factor=scale,
    ).eval()
    randomize_(ref, seed=levels)
    config = StageAConfig(
        levels=levels,
        bottleneck_blocks=bottleneck_blocks,
        c_hidden=c_hidden,
        codebook_size=8,
        scale_factor=scale,
    )
    ours = StageA(config).eval()
    # The only key that differs between the official and diffusers layouts is the codebook's.
    state = {
        k.replace("vquantizer.embedding.", "vquantizer.codebook."): v
        for k, v in ref.state_dict().items()
    }
    ours.load_state_dict(state, strict=True)

    g = torch.Generator().manual_seed(10 + levels)
    image = torch.rand(2, 3, 16, 24, generator=g)
    latent = torch.randn(2, 4, 16 // 2**levels, 24 // 2**levels, generator=g)
    with torch.no_grad():
        ref_raw = ref.encode(image).latents  # raw BatchNorm output
        ours_latent = ours.encode(image)
        ref_image = ref.decode(latent * scale).sample  # diffusers decodes the raw latent
        ours_image = ours.decode(latent)
    assert ours_latent.shape == ref_raw.shape
    assert rel_err(ours_latent * scale, ref_raw) < 1e-5
    assert ours_image.shape == ref_image.shape == (2, 3, 16, 24)
    assert rel_err(ours_image, ref_image) < 1e-5
    # Guard against a vacuous comparison (e.g. an all-zero output).
    assert ref_image.abs().max() > 1e-2


# ----------------------------------------------------------------------------------- EfficientNet


def _ref_conv_bn(
    x: Tensor,
    sd: dict[str, Tensor],
    prefix: str,
    stride: int = 1,
    groups: int = 1,
    act: bool = True,
) -> Tensor:
    """Conv (no bias, padding (k-1)/2) + BatchNorm eps 1e-3 (+ SiLU), torchvision-named weights."""
    w = sd[f"{prefix}.0.weight"]
    y = F.conv2d(x, w, stride=stride, padding=(w.shape[-1] - 1) // 2, groups=groups)
    bn = {k: sd[f"{prefix}.1.{k}"] for k in ("running_mean", "running_var", "weight", "bias")}
    y = F.batch_norm(y, **bn, training=False, eps=1e-3)
    return F.silu(y) if act else y


def _ref_fused_mbconv(x: Tensor, sd: dict[str, Tensor], stride: int, expand: int) -> Tensor:
    if expand == 1:
        y = _ref_conv_bn(x, sd, "block.0", stride=stride)
    else:
        y = _ref_conv_bn(_ref_conv_bn(x, sd, "block.0", stride=stride), sd, "block.1", act=False)
    return y + x if y.shape == x.shape and stride == 1 else y


def _ref_mbconv(x: Tensor, sd: dict[str, Tensor], stride: int) -> Tensor:
    y = _ref_conv_bn(x, sd, "block.0")
    y = _ref_conv_bn(y, sd, "block.1", stride=stride, groups=y.shape[1])
    s = y.mean(dim=(2, 3), keepdim=True)
    s = F.silu(F.conv2d(s, sd["block.2.fc1.weight"], sd["block.2.fc1.bias"]))
    y = y * torch.sigmoid(F.conv2d(s, sd["block.2.fc2.weight"], sd["block.2.fc2.bias"]))
    y = _ref_conv_bn(y, sd, "block.3", act=False)
    return y + x if y.shape == x.shape and stride == 1 else y


@pytest.mark.parametrize(
    ("kind", "expand", "stride", "c_in", "c_out"),
    [
        ("fused", 1, 1, 8, 8),
        ("fused", 4, 2, 8, 16),
        ("fused", 4, 1, 16, 16),
        ("mb", 4, 2, 16, 24),
        ("mb", 6, 1, 16, 16),
    ],
)
def test_effnet_block_matches_functional(
    kind: str, expand: int, stride: int, c_in: int, c_out: int
) -> None:
    block_cls = FusedMBConv if kind == "fused" else MBConv
    block = block_cls(expand, 3, stride, c_in, c_out).eval()
    randomize_(block, seed=c_in + c_out + stride)
    sd = block.state_dict()
    if kind == "mb":  # SE width comes from the block input: max(1, c_in // 4)
        assert sd["block.2.fc1.weight"].shape == (c_in // 4, c_in * expand, 1, 1)
    x = torch.randn(2, c_in, 9, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = block(x)
        if kind == "fused":
            ref = _ref_fused_mbconv(x, sd, stride, expand)
        else:
            ref = _ref_mbconv(x, sd, stride)
    assert ours.shape == (2, c_out, -(-9 // stride), -(-7 // stride))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("hw", "out_hw"), [((768, 768), (24, 24)), ((1000, 744), (32, 24)), ((1024, 1024), (32, 32))]
)
def test_effnet_output_stride_on_meta(hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
    with torch.device("meta"):
        model = EfficientNetEncoder(EfficientNetConfig()).eval()
        out = model(torch.empty(1, 3, *hw))
    assert tuple(out.shape) == (1, 16, *out_hw)


def test_effnet_cpu_forward_ceil_and_deterministic() -> None:
    torch.manual_seed(0)
    model = EfficientNetEncoder(EfficientNetConfig()).eval()
    image = torch.rand(2, 3, 40, 72, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x = model.preprocess(image)
        a = model(x)
        b = model(x)
    assert a.shape == (2, 16, 2, 3)  # ceil(40/32), ceil(72/32)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_effnet_preprocess_is_imagenet_normalisation() -> None:
    image = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = EfficientNetEncoder.preprocess(image)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(out * std + mean, image)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        EfficientNetEncoder.preprocess(torch.rand(3, 4, 4))


# -------------------------------------------------------------------------------------- Previewer


def test_previewer_upsamples_by_8() -> None:
    torch.manual_seed(0)
    model = Previewer(PreviewerConfig.tiny()).eval()
    randomize_(model, seed=7)
    with torch.no_grad():
        out = model(torch.randn(2, 16, 3, 5))
    assert out.shape == (2, 3, 24, 40)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"\[B, 16, h, w\]"):
        model(torch.randn(2, 4, 3, 5))
