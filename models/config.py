"""Architecture configs of every Stable Cascade network, as frozen dataclasses.

Field names follow the official code (`c_hidden`, `nhead`, `blocks`, `block_repeat`, `level_config`, ...)
so anyone who knows the model can read them. Level configs are strings of block codes:
``C`` = ResBlock, ``T`` = TimestepBlock (r-conditioned FiLM), ``A`` = AttnBlock, ``F`` = FeedForwardBlock.

Two-level lists follow the official convention: ``blocks[0]`` / ``block_repeat[0]`` are the down path in
level order (level 0 first); ``blocks[1]`` / ``block_repeat[1]`` are the up path **deepest level first**.
"""

from __future__ import annotations

from dataclasses import dataclass

BLOCK_CODES = {"C": "ResBlock", "T": "TimestepBlock", "A": "AttnBlock", "F": "FeedForwardBlock"}
HEAD_DIM = 64  # every released model uses width / 64 heads; config inference relies on it


@dataclass(frozen=True)
class StageCConfig:
    """Stage C, the text-conditional prior (16-channel latents, 24x24 at 1024 px)."""

    c_in: int = 16
    c_out: int = 16
    c_r: int = 64
    patch_size: int = 1
    c_cond: int = 2048
    c_hidden: tuple[int, ...] = (2048, 2048)
    nhead: tuple[int, ...] = (32, 32)
    blocks: tuple[tuple[int, ...], tuple[int, ...]] = ((8, 24), (24, 8))
    block_repeat: tuple[tuple[int, ...], tuple[int, ...]] = ((1, 1), (1, 1))
    level_config: tuple[str, ...] = ("CTA", "CTA")
    c_clip_text: int = 1280
    c_clip_text_pooled: int = 1280
    c_clip_img: int = 768
    c_clip_seq: int = 4
    kernel_size: int = 3
    dropout: tuple[float, ...] = (0.1, 0.1)
    self_attn: bool = True
    t_conds: tuple[str, ...] = ("sca", "crp")
    # One entry per level transition: False = LN + 1x1 conv without resampling (all released models).
    switch_level: tuple[bool, ...] = (False,)

    @classmethod
    def big(cls) -> StageCConfig:
        """The 3.6B prior (`stage_c*.safetensors`, diffusers `prior/`)."""
        return cls()

    @classmethod
    def lite(cls) -> StageCConfig:
        """The 1B prior (`stage_c_lite*.safetensors`, diffusers `prior_lite/`)."""
        return cls(c_cond=1536, c_hidden=(1536, 1536), nhead=(24, 24), blocks=((4, 12), (12, 4)))

    @classmethod
    def tiny(cls) -> StageCConfig:
        """A few-block prior for tests: same wiring as the released ones, narrow widths."""
        return cls(
            c_cond=64,
            c_hidden=(64, 64),
            nhead=(1, 1),
            blocks=((1, 1), (1, 1)),
            c_clip_text=32,
            c_clip_text_pooled=32,
            c_clip_img=16,
            dropout=(0.0, 0.0),
        )


@dataclass(frozen=True)
class StageBConfig:
    """Stage B, the latent decoder from Stage C latents to Stage A latents (4 channels, H/4)."""

    c_in: int = 4
    c_out: int = 4
    c_r: int = 64
    patch_size: int = 2
    c_cond: int = 1280
    c_hidden: tuple[int, ...] = (320, 640, 1280, 1280)
    nhead: tuple[int, ...] = (-1, -1, 20, 20)
    blocks: tuple[tuple[int, ...], tuple[int, ...]] = ((2, 6, 28, 6), (6, 28, 6, 2))
    block_repeat: tuple[tuple[int, ...], tuple[int, ...]] = ((1, 1, 1, 1), (3, 3, 2, 2))
    level_config: tuple[str, ...] = ("CT", "CT", "CTA", "CTA")
    c_clip: int = 1280
    c_clip_seq: int = 4
    c_effnet: int = 16
    c_pixels: int = 3
    kernel_size: int = 3
    dropout: tuple[float, ...] = (0.0, 0.0, 0.1, 0.1)
    self_attn: bool = True
    t_conds: tuple[str, ...] = ("sca",)

    @classmethod
    def big(cls) -> StageBConfig:
        """The 1.5B decoder (`stage_b*.safetensors`, diffusers `decoder/`)."""
        return cls()

    @classmethod
    def lite(cls) -> StageBConfig:
        """The 700M decoder (`stage_b_lite*.safetensors`, diffusers `decoder_lite/`)."""
        return cls(
            c_hidden=(320, 576, 1152, 1152),
            nhead=(-1, 9, 18, 18),
            blocks=((2, 4, 14, 4), (4, 14, 4, 2)),
            block_repeat=((1, 1, 1, 1), (2, 2, 2, 2)),
        )

    @classmethod
    def tiny(cls) -> StageBConfig:
        """A few-block decoder for tests, with repeats and the effnet/pixels mappers."""
        return cls(
            c_cond=32,
            c_hidden=(16, 32, 64, 64),
            nhead=(-1, -1, 1, 1),
            blocks=((1, 1, 1, 1), (1, 1, 1, 1)),
            block_repeat=((1, 1, 1, 1), (3, 3, 2, 2)),
            c_clip=32,
            dropout=(0.0, 0.0, 0.0, 0.0),
        )


@dataclass(frozen=True)
class StageAConfig:
    """Stage A, the VQGAN between RGB in [0, 1] and 4-channel latents at H/4."""

    levels: int = 2
    bottleneck_blocks: int = 12
    c_hidden: int = 384
    c_latent: int = 4
    codebook_size: int = 8192
    # Official StageA uses 0.43 (the diffusers vqgan/config.json says 0.3764); the loader sets it from
    # whatever was loaded, so it is a config value rather than a constant.
    scale_factor: float = 0.43

    @classmethod
    def default(cls) -> StageAConfig:
        return cls()

    @classmethod
    def tiny(cls) -> StageAConfig:
        return cls(bottleneck_blocks=1, c_hidden=32, codebook_size=16)


# EfficientNetV2-S stages 1..6: (block type, expand ratio, kernel, stride, in channels, out
# channels, layers). Only the first layer of a stage strides and changes width.
V2_S_STAGES: tuple[tuple[str, int, int, int, int, int, int], ...] = (
    ("fused", 1, 3, 1, 24, 24, 2),
    ("fused", 4, 3, 2, 24, 48, 4),
    ("fused", 4, 3, 2, 48, 64, 4),
    ("mb", 4, 3, 2, 64, 128, 6),
    ("mb", 6, 3, 1, 128, 160, 9),
    ("mb", 6, 3, 2, 160, 256, 15),
)
# The stride of each of the six stages (with the stride-2 stem: output stride 32); a smaller
# encoder keeps them, so any checkpoint's architecture can be read back from its tensor shapes.
V2_S_STRIDES = tuple(stage[3] for stage in V2_S_STAGES)


@dataclass(frozen=True)
class EfficientNetConfig:
    """EfficientNet features + 1x1 mapper to the 16-channel Stage C latent (stride 32).

    The defaults are EfficientNetV2-S (the official encoder); ``stem`` / ``stages`` / ``head``
    describe a smaller one of the same structure (e.g. the demo model's)."""

    c_latent: int = 16
    stem: int = 24
    stages: tuple[tuple[str, int, int, int, int, int, int], ...] = V2_S_STAGES
    head: int = 1280

    @classmethod
    def tiny(cls) -> EfficientNetConfig:
        """One layer per stage, narrow: a few thousand parameters, for tests."""
        widths = (8, 8, 16, 16, 24, 24)
        stages, c_in = [], 8
        for (kind, expand, k, stride, *_), c_out in zip(V2_S_STAGES, widths, strict=True):
            stages.append((kind, min(expand, 2), k, stride, c_in, c_out, 1))
            c_in = c_out
        return cls(stem=8, stages=tuple(stages), head=32)


@dataclass(frozen=True)
class PreviewerConfig:
    """Stage C latent -> RGB preview at 8x the latent resolution."""

    c_in: int = 16
    c_hidden: int = 512
    c_out: int = 3

    @classmethod
    def tiny(cls) -> PreviewerConfig:
        return cls(c_hidden=32)
