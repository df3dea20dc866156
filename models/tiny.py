"""A tiny, randomly initialised Stable Cascade for tests, demos without weights and the CLI default.

Same wiring as the released models (StageCConfig.tiny(), StageBConfig.tiny(), StageAConfig.tiny(), a
2-layer CLIP text tower of width 32 and the offline byte tokenizer), with every parameter drawn from
seeded generators, so the same seed always gives the same model. Its pictures are structured noise,
not art: nothing here was trained.
"""

from __future__ import annotations

import torch
from torch import nn

from models.clip_image import ClipImageEncoder, ClipPreprocessing, random_clip_vision_model
from models.config import (
    EfficientNetConfig,
    PreviewerConfig,
    StageAConfig,
    StageBConfig,
    StageCConfig,
)
from models.effnet import EfficientNetEncoder
from models.pipeline import CascadePipeline, Limits
from models.previewer import Previewer
from models.request import SamplingDefaults
from models.stage_a import StageA
from models.stage_b import StageB
from models.stage_c import StageC
from models.text import TextEncoder, build_byte_tokenizer, random_clip_text_model

# Small enough for a 2-core CPU (a 128 px image in well under a second); official guidance, shift
# and rho.
TINY_DEFAULTS = SamplingDefaults(width=128, height=128, prior_steps=6, decoder_steps=4)
# CLIP's preprocessing at the tiny tower's 32 px input.
TINY_CLIP_PREPROCESSING = ClipPreprocessing(shortest_edge=32, crop=(32, 32))


def randomize_(module: nn.Module, seed: int, std: float) -> nn.Module:
    """Overwrite every parameter with N(0, std^2) noise from a generator seeded with ``seed``, in
    sorted name order. Freshly constructed blocks are partly trivial (zero GRN / Stage A gammas make
    blocks the identity), which would hide wiring bugs; fully random weights exercise every path."""
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(module.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32) * std)
    return module


def _unit_gains_(module: nn.Module) -> None:
    """He-scaled convolutions (std sqrt(2 / fan-in)), BatchNorm gains 1 + N(0, 0.1^2) and small
    biases: with N(0, 0.2^2) everywhere the signal shrinks at every block until the biases alone set
    the output, and the encoder's output would not depend on its picture (which would hide a
    picture given to the wrong row)."""
    generator = torch.Generator("cpu").manual_seed(0)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Conv2d):
                fan_in = layer.weight[0].numel()
                noise = torch.randn(layer.weight.shape, generator=generator)
                layer.weight.copy_(noise * (2 / fan_in) ** 0.5)
                if layer.bias is not None:
                    layer.bias.mul_(0.1)
            elif isinstance(layer, nn.BatchNorm2d) and layer.affine:
                layer.weight.copy_(1 + 0.1 * torch.randn(layer.weight.shape, generator=generator))
                layer.bias.mul_(0.1)


def build_tiny_text_encoder(
    seed: int = 0, device: torch.device | str = "cpu", num_layers: int = 2
) -> TextEncoder:
    """Byte tokenizer + CLIPTextModelWithProjection (width 32, projection 32, 4 heads)."""
    tokenizer = build_byte_tokenizer()
    model = random_clip_text_model(
        tokenizer, width=32, layers=num_layers, heads=4, mlp=64, seed=seed
    )
    return TextEncoder(tokenizer, model, device=device)


def build_tiny_pipeline(seed: int = 0, device: torch.device | str = "cpu") -> CascadePipeline:
    """The tiny random pipeline: deterministic for a given ``seed``; float32; 64-512 px."""
    stage_c = randomize_(StageC(StageCConfig.tiny()), seed * 10 + 1, 0.05)
    stage_b = randomize_(StageB(StageBConfig.tiny()), seed * 10 + 2, 0.05)
    stage_a = randomize_(StageA(StageAConfig.tiny()), seed * 10 + 3, 0.1)
    previewer = Previewer(PreviewerConfig(c_in=stage_c.config.c_in, c_hidden=32))
    # Random image encoders (image-to-image, variations): BatchNorm at its initial statistics.
    image_encoder = randomize_(EfficientNetEncoder(EfficientNetConfig.tiny()), seed * 10 + 5, 0.2)
    _unit_gains_(image_encoder)
    clip_vision = random_clip_vision_model(stage_c.config.c_clip_img, seed=seed * 10 + 6)
    clip_image = ClipImageEncoder(clip_vision, TINY_CLIP_PREPROCESSING, device=device)
    return CascadePipeline(
        stage_c,
        stage_b,
        stage_a,
        build_tiny_text_encoder(seed, device),
        defaults=TINY_DEFAULTS,
        limits=Limits.for_models(stage_a.config, stage_b.config, min_size=64, max_size=512),
        model_info={
            "name": "tiny-random",
            "demo": True,
            "prior": "tiny",
            "decoder": "tiny",
            "weights": f"random tiny weights (seed {seed}), untrained: images are noise",
        },
        device=device,
        dtype=torch.float32,
        previewer=randomize_(previewer, seed * 10 + 4, 0.1),
        image_encoder=image_encoder,
        clip_image=clip_image,
    )
