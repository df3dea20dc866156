"""Architectures of the demo model (4.4 M parameters for Stages A + B + C, about 17 MB in float32).

Every attention level uses width / 64 heads (``models.config.HEAD_DIM``), the convention the weight loader relies
on when it reads an architecture back from a flat checkpoint.
"""

from __future__ import annotations

from models.config import StageAConfig, StageBConfig, StageCConfig

STAGE_A = StageAConfig(levels=2, bottleneck_blocks=2, c_hidden=32, c_latent=4, codebook_size=16)

STAGE_B = StageBConfig(
    c_cond=64,
    c_hidden=(32, 64, 128, 128),
    nhead=(-1, -1, 2, 2),
    blocks=((1, 1, 2, 1), (1, 2, 1, 1)),
    block_repeat=((1, 1, 1, 1), (1, 1, 1, 1)),
    level_config=("CT", "CT", "CTA", "CTA"),
    c_clip=64,
    c_clip_seq=4,
    c_effnet=16,
    dropout=(0.0, 0.0, 0.0, 0.0),
    t_conds=("sca",),
)

STAGE_C = StageCConfig(
    c_cond=128,
    c_hidden=(128, 128),
    nhead=(2, 2),
    blocks=((2, 2), (2, 2)),
    block_repeat=((1, 1), (1, 1)),
    level_config=("CTA", "CTA"),
    c_clip_text=64,
    c_clip_text_pooled=64,
    c_clip_img=16,
    dropout=(0.0, 0.0),
)
