"""The U-Net levels shared by Stage B and Stage C: building them from a config and running them.

A level is ``blocks[i]`` repetitions of its block pattern (``level_config``, e.g. "CTA": ResBlock,
TimestepBlock, AttnBlock) as one flat ModuleList, run ``block_repeat[i]`` times with a 1x1 repeat mapper
between the passes. ``add_levels`` gives a network its down and up levels in the official state_dict
order; ``run_levels`` is the U-Net body over them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from models.common import (
    AttnBlock,
    FeedForwardBlock,
    ResBlock,
    TimestepBlock,
    conv1x1,
    resize_bilinear,
    to_channels_last,
)


def make_block(
    code: str,
    c: int,
    *,
    c_cond: int,
    nhead: int,
    c_r: int,
    t_conds: Sequence[str],
    kernel_size: int,
    dropout: float,
    self_attn: bool,
    c_skip: int = 0,
) -> nn.Module:
    """One block from its level-config code: C ResBlock, T TimestepBlock, A AttnBlock, F FeedForwardBlock."""
    if code == "C":
        return ResBlock(c, c_skip, kernel_size, dropout)
    if code == "T":
        return TimestepBlock(c, c_r, t_conds)
    if code == "A":
        return AttnBlock(c, c_cond, nhead, self_attn, dropout)
    if code == "F":
        return FeedForwardBlock(c, dropout)
    raise ValueError(f"level_config: unknown block code {code!r} (expected one of C, T, A, F)")


def make_level(
    n: int, level_config: str, c: int, *, skip_first: int = 0, **block_kwargs
) -> nn.ModuleList:
    """``n`` repetitions of the level's block pattern as one flat ModuleList (indices 0, 1, 2, ...).

    ``skip_first`` is the c_skip of the very first block (the up path's first ResBlock of a non-deepest
    level); all other blocks get none.
    """
    blocks = nn.ModuleList()
    for j in range(n):
        for k, code in enumerate(level_config):
            c_skip = skip_first if j == 0 and k == 0 else 0
            blocks.append(make_block(code, c, c_skip=c_skip, **block_kwargs))
    return blocks


def run_level(
    blocks: nn.ModuleList,
    repeat_mappers: nn.ModuleList,
    x: Tensor,
    r_embed: Tensor,
    clip_act: Tensor,
    skip: Tensor | None = None,
) -> Tensor:
    """Run a level: ``len(repeat_mappers) + 1`` passes over its blocks with a 1x1 repeat mapper in between.

    ``x: [B, c, H, W]``, ``r_embed: [B, c_r * (1 + n_conds)]``, ``clip_act: [B, S, c_cond]`` = SiLU of the
    normalised condition sequence (the first op of every AttnBlock's kv_mapper, hoisted out).

    ``skip`` (up path only) goes to the level's first ResBlock on EVERY pass (spec §4.4 step 8). If x and
    skip differ in size (odd sizes in Stage B), x is bilinearly resized to the skip size first.
    """
    for j in range(len(repeat_mappers) + 1):
        for k, block in enumerate(blocks):
            if isinstance(block, ResBlock):
                s = skip if k == 0 else None
                if s is not None and x.shape[-2:] != s.shape[-2:]:
                    x = to_channels_last(resize_bilinear(x, s.shape[-2:]))
                x = block(x, s)
            elif isinstance(block, AttnBlock):
                x = block.attend(x, clip_act)
            elif isinstance(block, TimestepBlock):
                x = block(x, r_embed)
            else:
                x = block(x)
        if j < len(repeat_mappers):
            x = conv1x1(x, repeat_mappers[j])
    return x


def add_levels(
    net: nn.Module,
    cfg: Any,
    downscaler: Callable[[int], nn.Module],
    upscaler: Callable[[int], nn.Module],
) -> None:
    """Give ``net`` the U-Net levels of a Stage B / Stage C config, as attributes in the official
    state_dict order: down_blocks, down_downscalers, down_repeat_mappers, up_blocks, up_upscalers,
    up_repeat_mappers.

    ``downscaler(i)`` is the module entering level i from level i - 1, ``upscaler(i)`` the one leaving
    level i upwards (i >= 1; level 0 has ``nn.Identity`` for both). The up path lists levels deepest
    first: up index u is level n-1-u, and ``blocks[1]`` / ``block_repeat[1]`` follow that order.
    """
    n = len(cfg.c_hidden)
    kw = level_block_kwargs(cfg, n)
    net.down_blocks = nn.ModuleList()
    net.down_downscalers = nn.ModuleList()
    net.down_repeat_mappers = nn.ModuleList()
    for i in range(n):
        net.down_downscalers.append(nn.Identity() if i == 0 else downscaler(i))
        net.down_blocks.append(
            make_level(cfg.blocks[0][i], cfg.level_config[i], cfg.c_hidden[i], **kw[i])
        )
        net.down_repeat_mappers.append(_repeat_mappers(cfg.c_hidden[i], cfg.block_repeat[0][i]))
    net.up_blocks = nn.ModuleList()
    net.up_upscalers = nn.ModuleList()
    net.up_repeat_mappers = nn.ModuleList()
    for u, i in enumerate(reversed(range(n))):
        net.up_upscalers.append(nn.Identity() if i == 0 else upscaler(i))
        skip = cfg.c_hidden[i] if i < n - 1 else 0
        net.up_blocks.append(
            make_level(
                cfg.blocks[1][u], cfg.level_config[i], cfg.c_hidden[i], skip_first=skip, **kw[i]
            )
        )
        net.up_repeat_mappers.append(_repeat_mappers(cfg.c_hidden[i], cfg.block_repeat[1][u]))


def _repeat_mappers(c: int, repeats: int) -> nn.ModuleList:
    """The 1x1 convs between a level's ``repeats`` passes."""
    return nn.ModuleList(nn.Conv2d(c, c, 1) for _ in range(repeats - 1))


def run_levels(net: nn.Module, h: Tensor, r_embed: Tensor, clip_act: Tensor) -> Tensor:
    """The U-Net body over ``add_levels``' modules. ``h: [B, c_hidden[0], H, W]`` -> the same shape.

    Down: scaler, then the level; every level's output is kept. Up: the level (with the kept output of
    its depth as skip, except the deepest), then the scaler.
    """
    level_outputs: list[Tensor] = []
    for blocks, downscaler, repmap in zip(
        net.down_blocks, net.down_downscalers, net.down_repeat_mappers
    ):
        h = run_level(blocks, repmap, downscaler(h), r_embed, clip_act)
        level_outputs.insert(0, h)  # index 0 = deepest level
    h = level_outputs[0]
    for u, (blocks, upscaler, repmap) in enumerate(
        zip(net.up_blocks, net.up_upscalers, net.up_repeat_mappers)
    ):
        # The skip is re-concatenated on every repeat pass (run_level); sizes are reconciled there.
        skip = level_outputs[u] if u > 0 else None
        h = upscaler(run_level(blocks, repmap, h, r_embed, clip_act, skip=skip))
    return h


def per_level(value: float | bool | Sequence, n_levels: int, name: str) -> tuple:
    """Broadcast a scalar config field to one value per level; check a sequence's length."""
    if isinstance(value, (int, float, bool)):
        return (value,) * n_levels
    value = tuple(value)
    if len(value) != n_levels:
        raise ValueError(f"{name}: expected {n_levels} per-level values, got {len(value)}")
    return value


def level_block_kwargs(cfg: Any, n_levels: int) -> list[dict[str, Any]]:
    """The block arguments each level of a Stage B or Stage C config passes to ``make_level``."""
    dropout = per_level(cfg.dropout, n_levels, "dropout")
    self_attn = per_level(cfg.self_attn, n_levels, "self_attn")
    return [
        dict(
            c_cond=cfg.c_cond,
            nhead=cfg.nhead[i],
            c_r=cfg.c_r,
            t_conds=cfg.t_conds,
            kernel_size=cfg.kernel_size,
            dropout=dropout[i],
            self_attn=self_attn[i],
        )
        for i in range(n_levels)
    ]
