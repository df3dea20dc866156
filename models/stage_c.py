"""Stage C: the text-conditional prior that predicts noise on 16-channel EfficientNet latents (spec §3).

``StageC(StageCConfig.lite())`` has exactly the official ``stage_c_lite`` state_dict (keys, order, shapes).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.common import (
    LN_EPS,
    LayerNorm2d,
    conv1x1,
    gen_r_embeddings,
    layer_norm_2d,
    to_channels_last,
)
from models.config import StageCConfig
from models.cpu_kernels import linear_module
from models.derived_weights import CachedWeightsModule
from models.levels import add_levels, run_levels


class UpDownBlock2d(nn.Module):
    """Stage C level switch: 1x1 conv plus an optional bilinear x0.5 (down) / x2 (up) resample.

    Keys: down mode ``blocks.0`` = conv, ``blocks.1`` = resample; up mode the other way round. Every released
    model has ``enabled=False`` (switch_level [False]), so both Stage C levels share one resolution.
    ``x: [B, c_in, H, W]`` -> ``[B, c_out, H', W']``.
    """

    def __init__(self, c_in: int, c_out: int, mode: str, enabled: bool) -> None:
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"UpDownBlock2d mode must be 'up' or 'down', got {mode!r}")
        self.mode, self.enabled = mode, enabled
        conv = nn.Conv2d(c_in, c_out, kernel_size=1)
        self.blocks = nn.ModuleList(
            [conv, nn.Identity()] if mode == "down" else [nn.Identity(), conv]
        )

    def _resample(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        scale = 2.0 if self.mode == "up" else 0.5
        out = F.interpolate(x.float(), scale_factor=scale, mode="bilinear", align_corners=True)
        return to_channels_last(out.to(x.dtype))

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "down":
            return self._resample(conv1x1(x, self.blocks[0]))
        return conv1x1(self._resample(x), self.blocks[1])


class StageC(CachedWeightsModule):
    """Stage C prior. ``forward(x, r, clip_text, clip_text_pooled, clip_img) -> eps``.

    Shapes: ``x [B, c_in, h, w]`` (16 x 24 x 24 at 1024 px), ``r [B]`` in [0, 1],
    ``clip_text [B, S, c_clip_text]`` (S = 77, pre-final-LN hidden states), ``clip_text_pooled [B, 1, P]``
    (``[B, P]`` accepted), ``clip_img [B, n, c_clip_img]`` (``[B, c_clip_img]`` accepted; zeros when unused)
    -> ``eps [B, c_out, h, w]`` (contiguous NCHW).
    """

    def __init__(self, config: StageCConfig) -> None:
        super().__init__()
        self.config = cfg = config
        n = len(cfg.c_hidden)
        if not (
            len(cfg.nhead) == len(cfg.level_config) == n and all(len(b) == n for b in cfg.blocks)
        ):
            raise ValueError(
                "StageCConfig: c_hidden, nhead, level_config and blocks[i] must have one entry per level"
            )
        if len(cfg.switch_level) != n - 1:
            raise ValueError(
                f"StageCConfig.switch_level: expected {n - 1} entries, got {len(cfg.switch_level)}"
            )

        self.clip_txt_mapper = nn.Linear(cfg.c_clip_text, cfg.c_cond)
        self.clip_txt_pooled_mapper = nn.Linear(cfg.c_clip_text_pooled, cfg.c_cond * cfg.c_clip_seq)
        self.clip_img_mapper = nn.Linear(cfg.c_clip_img, cfg.c_cond * cfg.c_clip_seq)
        self.clip_norm = nn.LayerNorm(cfg.c_cond, elementwise_affine=False, eps=LN_EPS)
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(cfg.patch_size),
            nn.Conv2d(cfg.c_in * cfg.patch_size**2, cfg.c_hidden[0], kernel_size=1),
            LayerNorm2d(),
        )

        add_levels(
            self,
            cfg,
            downscaler=lambda i: nn.Sequential(
                LayerNorm2d(),
                UpDownBlock2d(
                    cfg.c_hidden[i - 1], cfg.c_hidden[i], "down", cfg.switch_level[i - 1]
                ),
            ),
            upscaler=lambda i: nn.Sequential(
                LayerNorm2d(),
                UpDownBlock2d(cfg.c_hidden[i], cfg.c_hidden[i - 1], "up", cfg.switch_level[i - 1]),
            ),
        )
        self.clf = nn.Sequential(
            LayerNorm2d(),
            nn.Conv2d(cfg.c_hidden[0], cfg.c_out * cfg.patch_size**2, kernel_size=1),
            nn.PixelShuffle(cfg.patch_size),
        )

    def gen_c_embeddings(
        self, clip_text: Tensor, clip_text_pooled: Tensor, clip_img: Tensor
    ) -> Tensor:
        """Condition sequence ``[B, S + 4 + 4n, c_cond]``: text tokens, pooled (4), image (4 each), then LN."""
        B, c = clip_text.shape[0], self.config.c_cond
        txt = linear_module(clip_text, self.clip_txt_mapper)
        pooled = linear_module(clip_text_pooled, self.clip_txt_pooled_mapper).view(B, -1, c)
        img = linear_module(clip_img, self.clip_img_mapper).view(B, -1, c)
        dtype = txt.dtype
        return self.clip_norm(torch.cat([txt, pooled.to(dtype), img.to(dtype)], dim=1))

    def _check_inputs(
        self, x: Tensor, r: Tensor, clip_text: Tensor, pooled: Tensor, img: Tensor
    ) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.c_in:
            raise ValueError(f"x: expected [B, {cfg.c_in}, h, w], got {list(x.shape)}")
        B = x.shape[0]
        if x.shape[2] % cfg.patch_size or x.shape[3] % cfg.patch_size:
            raise ValueError(
                f"x: spatial size {list(x.shape[2:])} not divisible by patch_size {cfg.patch_size}"
            )
        if r.shape != (B,):
            raise ValueError(f"r: expected shape [{B}], got {list(r.shape)}")
        for name, t, width in (
            ("clip_text", clip_text, cfg.c_clip_text),
            ("clip_text_pooled", pooled, cfg.c_clip_text_pooled),
            ("clip_img", img, cfg.c_clip_img),
        ):
            if t.ndim != 3 or t.shape[0] != B or t.shape[2] != width:
                raise ValueError(f"{name}: expected [{B}, n, {width}], got {list(t.shape)}")

    def forward(
        self,
        x: Tensor,
        r: Tensor,
        clip_text: Tensor,
        clip_text_pooled: Tensor,
        clip_img: Tensor | None = None,
        *,
        t_cond_values: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """Predict eps. Shapes in the class docstring; ``t_cond_values`` ({'sca': [B], ...}) default to zeros."""
        cfg = self.config
        if clip_text_pooled.ndim == 2:  # the official 2-D branch is broken; accept [B, P] properly
            clip_text_pooled = clip_text_pooled[:, None]
        if clip_img is None:
            clip_img = clip_text.new_zeros(x.shape[0], 1, cfg.c_clip_img)
        elif clip_img.ndim == 2:
            clip_img = clip_img[:, None]
        self._check_inputs(x, r, clip_text, clip_text_pooled, clip_img)

        r_embed = gen_r_embeddings(r, cfg.t_conds, t_cond_values, cfg.c_r)
        clip_act = F.silu(
            self.gen_c_embeddings(clip_text, clip_text_pooled, clip_img)
        )  # see run_level

        x = to_channels_last(self.embedding[0](x))
        x = layer_norm_2d(conv1x1(x, self.embedding[1]))

        x = run_levels(self, x, r_embed, clip_act)
        x = conv1x1(layer_norm_2d(x), self.clf[1])
        return self.clf[2](x.contiguous())
