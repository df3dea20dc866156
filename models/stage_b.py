"""Stage B: the latent decoder from Stage C latents to 4-channel Stage A latents (spec §4).

``StageB(StageBConfig.lite())`` has exactly the official ``stage_b_lite`` state_dict (keys, order, shapes).
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
    resize_bilinear,
    to_channels_last,
)
from models.config import StageBConfig
from models.cpu_kernels import conv as cpu_conv
from models.cpu_kernels import linear_module
from models.derived_weights import CachedWeightsModule, channels_last_weight
from models.levels import add_levels, run_levels


def _mapper(c_in: int, c: int) -> nn.Sequential:
    """effnet / pixels mapper: 0 Conv1x1(c_in -> 4c), 1 GELU, 2 Conv1x1(4c -> c), 3 LN2d."""
    return nn.Sequential(
        nn.Conv2d(c_in, 4 * c, 1), nn.GELU(), nn.Conv2d(4 * c, c, 1), LayerNorm2d()
    )


def _run_mapper(mapper: nn.Sequential, x: Tensor) -> Tensor:
    """``x: [B, c_in, H, W]`` (channels_last) -> ``[B, c, H, W]`` through a ``_mapper``."""
    return layer_norm_2d(conv1x1(conv1x1(x, mapper[0], gelu=True), mapper[2]))


class _Resample2x2(nn.Sequential):
    """A level switch of Stage B: LN2d (key ``0``, no parameters), then the stride-2 2x2 Conv2d down or
    ConvTranspose2d up (key ``1``), with its weight in channels_last (cached). ``[B, c_in, H, W]`` ->
    ``[B, c_out, H / 2, W / 2]`` (down) or ``[B, c_out, 2H, 2W]`` (up)."""

    def __init__(self, conv: nn.Conv2d | nn.ConvTranspose2d) -> None:
        super().__init__(LayerNorm2d(), conv)

    def forward(self, x: Tensor) -> Tensor:
        conv = self[1]
        op = F.conv_transpose2d if isinstance(conv, nn.ConvTranspose2d) else F.conv2d
        return cpu_conv(op, layer_norm_2d(x), channels_last_weight(conv), conv.bias, stride=2)


class StageB(CachedWeightsModule):
    """Stage B decoder. ``forward(x, r, effnet, clip, pixels=None) -> eps``.

    Shapes: ``x [B, c_in, H, W]`` with H, W even (the Stage A latent, 256 x 256 at 1024 px), ``r [B]``,
    ``effnet [B, c_effnet, h, w]`` (the Stage C latent, any size: it is resized), ``clip [B, 1, c_clip]``
    (pooled text; ``[B, c_clip]`` accepted), ``pixels [B, c_pixels, hp, wp] | None`` (zeros 8x8 when None)
    -> ``eps [B, c_out, H, W]`` (contiguous NCHW).
    """

    def __init__(self, config: StageBConfig) -> None:
        super().__init__()
        self.config = cfg = config
        n = len(cfg.c_hidden)
        if not (
            len(cfg.nhead) == len(cfg.level_config) == n
            and all(len(b) == n for b in cfg.blocks)
            and all(len(b) == n for b in cfg.block_repeat)
        ):
            raise ValueError(
                "StageBConfig: c_hidden, nhead, level_config, blocks[i] and block_repeat[i] "
                "must have one entry per level"
            )
        c0 = cfg.c_hidden[0]

        self.effnet_mapper = _mapper(cfg.c_effnet, c0)
        self.pixels_mapper = _mapper(cfg.c_pixels, c0)
        self.clip_mapper = nn.Linear(cfg.c_clip, cfg.c_cond * cfg.c_clip_seq)
        self.clip_norm = nn.LayerNorm(cfg.c_cond, elementwise_affine=False, eps=LN_EPS)
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(cfg.patch_size),
            nn.Conv2d(cfg.c_in * cfg.patch_size**2, c0, kernel_size=1),
            LayerNorm2d(),
        )

        add_levels(
            self,
            cfg,
            downscaler=lambda i: _Resample2x2(
                nn.Conv2d(cfg.c_hidden[i - 1], cfg.c_hidden[i], 2, stride=2)
            ),
            # ConvTranspose weight is [c_in, c_out, 2, 2] (in-channels first)
            upscaler=lambda i: _Resample2x2(
                nn.ConvTranspose2d(cfg.c_hidden[i], cfg.c_hidden[i - 1], 2, stride=2)
            ),
        )
        self.clf = nn.Sequential(
            LayerNorm2d(),
            nn.Conv2d(c0, cfg.c_out * cfg.patch_size**2, kernel_size=1),
            nn.PixelShuffle(cfg.patch_size),
        )

    def gen_c_embeddings(self, clip: Tensor) -> Tensor:
        """Pooled text ``[B, 1, c_clip]`` -> LN(view(clip_mapper(clip))) ``[B, c_clip_seq, c_cond]``."""
        tokens = linear_module(clip, self.clip_mapper).view(clip.shape[0], -1, self.config.c_cond)
        return self.clip_norm(tokens)

    def _check_inputs(
        self, x: Tensor, r: Tensor, effnet: Tensor, clip: Tensor, pixels: Tensor | None
    ) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.c_in:
            raise ValueError(f"x: expected [B, {cfg.c_in}, H, W], got {list(x.shape)}")
        B, p = x.shape[0], cfg.patch_size
        if x.shape[2] % p or x.shape[3] % p:
            raise ValueError(
                f"x: latent size {list(x.shape[2:])} must be divisible by patch_size {p} "
                "(Stage B needs even latent sides)"
            )
        if r.shape != (B,):
            raise ValueError(f"r: expected shape [{B}], got {list(r.shape)}")
        if effnet.ndim != 4 or effnet.shape[0] != B or effnet.shape[1] != cfg.c_effnet:
            raise ValueError(
                f"effnet: expected [{B}, {cfg.c_effnet}, h, w], got {list(effnet.shape)}"
            )
        if (
            clip.ndim != 3
            or clip.shape[0] != B
            or clip.shape[1] != 1
            or clip.shape[2] != cfg.c_clip
        ):
            raise ValueError(f"clip: expected [{B}, 1, {cfg.c_clip}], got {list(clip.shape)}")
        if pixels is not None and (
            pixels.ndim != 4 or pixels.shape[0] != B or pixels.shape[1] != cfg.c_pixels
        ):
            raise ValueError(
                f"pixels: expected [{B}, {cfg.c_pixels}, h, w], got {list(pixels.shape)}"
            )

    def forward(
        self,
        x: Tensor,
        r: Tensor,
        effnet: Tensor,
        clip: Tensor,
        pixels: Tensor | None = None,
        *,
        t_cond_values: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """Predict eps. Shapes in the class docstring; ``t_cond_values`` ({'sca': [B]}) default to zeros."""
        cfg = self.config
        if clip.ndim == 2:
            clip = clip[:, None]
        self._check_inputs(x, r, effnet, clip, pixels)

        r_embed = gen_r_embeddings(r, cfg.t_conds, t_cond_values, cfg.c_r)
        clip_act = F.silu(self.gen_c_embeddings(clip))  # see run_level

        h = to_channels_last(self.embedding[0](x))
        h = layer_norm_2d(conv1x1(h, self.embedding[1]))
        size = h.shape[-2:]
        # effnet: resize first (align_corners=True, in float32 as officially), THEN map.
        h = h + _run_mapper(
            self.effnet_mapper, to_channels_last(resize_bilinear(effnet.float(), size))
        )
        # pixels: map first at its own size, THEN resize. With pixels=None (all official inference) the
        # input is zeros [B,3,8,8]: the mapped map is one constant vector per image and its bilinear resize is
        # that same constant, so it is computed at 1x1 and broadcast (identical maths, no 8x8->HxW resize).
        if pixels is None:
            zeros = x.new_zeros(x.shape[0], cfg.c_pixels, 1, 1, dtype=torch.float32)
            h = h + _run_mapper(self.pixels_mapper, zeros)
        else:
            h = h + to_channels_last(
                resize_bilinear(
                    _run_mapper(self.pixels_mapper, to_channels_last(pixels.float())), size
                )
            )

        h = run_levels(self, h, r_embed, clip_act)
        h = conv1x1(layer_norm_2d(h), self.clf[1])
        return self.clf[2](h.contiguous())
