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
    CachedWeightsModule,
    LayerNorm2d,
    channels_last_weight,
    conv1x1,
    gen_r_embeddings,
    layer_norm_2d,
    level_block_kwargs,
    linear_module,
    make_level,
    resize_bilinear,
    run_level,
    to_channels_last,
)
from models.config import StageBConfig


def _mapper(c_in: int, c: int) -> nn.Sequential:
    """effnet / pixels mapper: 0 Conv1x1(c_in -> 4c), 1 GELU, 2 Conv1x1(4c -> c), 3 LN2d."""
    return nn.Sequential(
        nn.Conv2d(c_in, 4 * c, 1), nn.GELU(), nn.Conv2d(4 * c, c, 1), LayerNorm2d()
    )


def _run_mapper(mapper: nn.Sequential, x: Tensor) -> Tensor:
    """``x: [B, c_in, H, W]`` (channels_last) -> ``[B, c, H, W]`` through a ``_mapper``."""
    return layer_norm_2d(conv1x1(conv1x1(x, mapper[0], gelu=True), mapper[2]))


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

        kw = level_block_kwargs(cfg, n)

        # Attribute order = official state_dict order.
        self.down_blocks = nn.ModuleList()
        self.down_downscalers = nn.ModuleList()
        self.down_repeat_mappers = nn.ModuleList()
        for i in range(n):
            if i == 0:
                self.down_downscalers.append(nn.Identity())
            else:  # stride-2 2x2 conv: the only spatial downsampling
                self.down_downscalers.append(
                    nn.Sequential(
                        LayerNorm2d(),
                        nn.Conv2d(cfg.c_hidden[i - 1], cfg.c_hidden[i], kernel_size=2, stride=2),
                    )
                )
            self.down_blocks.append(
                make_level(cfg.blocks[0][i], cfg.level_config[i], cfg.c_hidden[i], **kw[i])
            )
            self.down_repeat_mappers.append(
                nn.ModuleList(
                    nn.Conv2d(cfg.c_hidden[i], cfg.c_hidden[i], 1)
                    for _ in range(cfg.block_repeat[0][i] - 1)
                )
            )

        self.up_blocks = nn.ModuleList()
        self.up_upscalers = nn.ModuleList()
        self.up_repeat_mappers = nn.ModuleList()
        for i in reversed(
            range(n)
        ):  # up index u <-> level n-1-u; blocks[1] / block_repeat[1] deepest first
            u = n - 1 - i
            if i == 0:
                self.up_upscalers.append(nn.Identity())
            else:  # ConvTranspose weight is [c_in, c_out, 2, 2] (in-channels first)
                self.up_upscalers.append(
                    nn.Sequential(
                        LayerNorm2d(),
                        nn.ConvTranspose2d(
                            cfg.c_hidden[i], cfg.c_hidden[i - 1], kernel_size=2, stride=2
                        ),
                    )
                )
            skip = cfg.c_hidden[i] if i < n - 1 else 0
            self.up_blocks.append(
                make_level(
                    cfg.blocks[1][u], cfg.level_config[i], cfg.c_hidden[i], skip_first=skip, **kw[i]
                )
            )
            self.up_repeat_mappers.append(
                nn.ModuleList(
                    nn.Conv2d(cfg.c_hidden[i], cfg.c_hidden[i], 1)
                    for _ in range(cfg.block_repeat[1][u] - 1)
                )
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

        level_outputs: list[Tensor] = []
        for blocks, downscaler, repmap in zip(
            self.down_blocks, self.down_downscalers, self.down_repeat_mappers
        ):
            if not isinstance(downscaler, nn.Identity):  # LN2d, then the stride-2 2x2 conv
                conv = downscaler[1]
                h = F.conv2d(layer_norm_2d(h), channels_last_weight(conv), conv.bias, stride=2)
            h = run_level(blocks, repmap, h, r_embed, clip_act)
            level_outputs.insert(0, h)  # index 0 = deepest level

        h = level_outputs[0]
        for u, (blocks, upscaler, repmap) in enumerate(
            zip(self.up_blocks, self.up_upscalers, self.up_repeat_mappers)
        ):
            # The skip is re-concatenated on every repeat pass (run_level); sizes are reconciled there.
            h = run_level(
                blocks, repmap, h, r_embed, clip_act, skip=level_outputs[u] if u > 0 else None
            )
            if not isinstance(upscaler, nn.Identity):  # LN2d, then the stride-2 2x2 ConvTranspose
                conv = upscaler[1]
                h = F.conv_transpose2d(layer_norm_2d(h), channels_last_weight(conv), conv.bias, stride=2)

        h = conv1x1(layer_norm_2d(h), self.clf[1])
        return self.clf[2](h.contiguous())
