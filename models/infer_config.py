"""Architecture configs recovered from a checkpoint's tensor names and shapes alone.

An official Stable Cascade file is a flat state dict with no config, so the loader reads the structure back from
the tensors (spec §10): widths per level, block counts and types, repeat mappers, the conditioning widths, the
timestep-condition mappers, Stage A's depth and codebook, the Previewer's width.

What the shapes cannot tell is fixed per stage:
- patch_size: 1 for Stage C, 2 for Stage B (``embedding.1`` only shows ``c_in * patch**2``);
- the order of the timestep conditions: ('sca', 'crp') for C, ('sca',) for B (files store keys sorted by name);
- self_attn True; heads = width / 64 on levels that have attention (every released model);
- dropout (inference only) and, on levels without attention, the unused head count.
When the recovered structure equals a released preset (big / lite) or the test preset (tiny), the preset itself is
returned, so its dropout and unused head counts are the official ones; otherwise dropout is 0 and unused heads -1.

Every function takes ``shapes``: a mapping from official state-dict key to tensor shape (e.g. read from a
safetensors header) and raises ``CheckpointError`` when the tensors do not describe that network.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

from models.config import (
    HEAD_DIM,
    V2_S_STRIDES,
    EfficientNetConfig,
    PreviewerConfig,
    StageAConfig,
    StageBConfig,
    StageCConfig,
)

Shapes = Mapping[str, Sequence[int]]

STAGE_A_OFFICIAL_SCALE = 0.43  # official StageA's scale_factor (spec §5.1); not stored in the file
KNOWN_T_CONDS = (
    "sca",
    "crp",
)  # the official order; a file cannot tell it (keys are sorted by name)


class CheckpointError(ValueError):
    """A checkpoint (file or folder) cannot be loaded as the requested network; the message says why."""


# --------------------------------------------------------------------------------------------- helpers


def _shape(shapes: Shapes, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"missing tensor {key!r}, needed to infer the {what} config")
    return tuple(int(d) for d in shapes[key])


def _exact_div(a: int, b: int, what: str) -> int:
    if b <= 0 or a % b:
        raise CheckpointError(f"{what}: {a} is not a multiple of {b}")
    return a // b


_BLOCK_KEY = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(\d+)\.(.+)$")


def _group_blocks(shapes: Shapes) -> dict[str, dict[int, dict[int, dict[str, tuple[int, ...]]]]]:
    """``{"down_blocks"|"up_blocks": {list index: {block index: {sub key: shape}}}}``."""
    out: dict[str, dict[int, dict[int, dict[str, tuple[int, ...]]]]] = {
        "down_blocks": {},
        "up_blocks": {},
    }
    for key, shape in shapes.items():
        m = _BLOCK_KEY.match(key)
        if m:
            path, level, idx, sub = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
            out[path].setdefault(level, {}).setdefault(idx, {})[sub] = tuple(int(d) for d in shape)
    return out


def _block_code(prefix: str, sub: Mapping[str, tuple[int, ...]]) -> str:
    """C ResBlock, T TimestepBlock, A AttnBlock, F FeedForwardBlock, from a block's own keys."""
    if "depthwise.weight" in sub:
        return "C"
    if "mapper.weight" in sub:
        return "T"
    if "attention.attn.in_proj_weight" in sub or "kv_mapper.1.weight" in sub:
        return "A"
    if "channelwise.0.weight" in sub:
        return "F"
    if any(k.startswith("attention.to_") for k in sub):
        raise CheckpointError(
            f"{prefix}: diffusers-style attention keys (attention.to_q ...) in an official-format "
            "file; load the diffusers folder (with its config.json) instead"
        )
    raise CheckpointError(f"{prefix}: unrecognised block with keys {sorted(sub)[:4]}")


def _period(seq: str) -> str:
    """Shortest pattern p with seq == p * k ('CTACTA' -> 'CTA')."""
    for n in range(1, len(seq) + 1):
        if len(seq) % n == 0 and seq[:n] * (len(seq) // n) == seq:
            return seq[:n]
    return seq


def _count_indices(shapes: Shapes, prefix: str) -> int:
    """Number of consecutive indices ``prefix.<i>.`` present, from 0 (repeat mappers)."""
    n = 0
    while any(k.startswith(f"{prefix}.{n}.") for k in shapes):
        n += 1
    return n


@dataclasses.dataclass
class _UNetBody:
    c_hidden: tuple[int, ...]
    nhead: tuple[int, ...]
    has_attn: tuple[bool, ...]
    blocks: tuple[tuple[int, ...], tuple[int, ...]]
    block_repeat: tuple[tuple[int, ...], tuple[int, ...]]
    level_config: tuple[str, ...]
    c_r: int | None
    kernel_size: int | None
    t_conds: tuple[str, ...] | None
    c_cond_attn: int | None  # kv_mapper in-features, when any attention block exists


def _infer_unet_body(
    shapes: Shapes, c_hidden: tuple[int, ...], stage_t_conds: tuple[str, ...]
) -> _UNetBody:
    """The level structure shared by Stage B and C: block types and counts, repeats, heads, c_r, t_conds."""
    n = len(c_hidden)
    groups = _group_blocks(shapes)
    for path in ("down_blocks", "up_blocks"):
        extra = sorted(set(groups[path]) - set(range(n)))
        if extra:
            raise CheckpointError(
                f"{path}.{extra[0]}: level index beyond the {n} levels implied by the "
                "embedding / downscaler tensors"
            )
    patterns: list[str] = []
    counts: tuple[list[int], list[int]] = ([], [])
    c_r = kernel_size = c_cond_attn = None
    t_conds: set[str] | None = None
    for level in range(n):
        seqs = []
        for path, list_idx in (("down_blocks", level), ("up_blocks", n - 1 - level)):
            blocks = groups[path].get(list_idx, {})
            if sorted(blocks) != list(range(len(blocks))):
                raise CheckpointError(
                    f"{path}.{list_idx}: block indices are not contiguous from 0 "
                    f"({sorted(blocks)[:6]} ...)"
                )
            codes = []
            for idx in range(len(blocks)):
                sub = blocks[idx]
                prefix = f"{path}.{list_idx}.{idx}"
                code = _block_code(prefix, sub)
                codes.append(code)
                if code == "C" and kernel_size is None:
                    kernel_size = sub["depthwise.weight"][-1]
                if code == "T":
                    c_r = c_r if c_r is not None else sub["mapper.weight"][1]
                    found = {
                        k[len("mapper_") : -len(".weight")]
                        for k in sub
                        if k.startswith("mapper_") and k.endswith(".weight")
                    }
                    if t_conds is not None and found != t_conds:
                        raise CheckpointError(
                            f"{prefix}: timestep-condition mappers {sorted(found)} differ from "
                            f"other blocks' {sorted(t_conds)}"
                        )
                    t_conds = found
                if code == "A" and c_cond_attn is None and "kv_mapper.1.weight" in sub:
                    c_cond_attn = sub["kv_mapper.1.weight"][1]
            seqs.append("".join(codes))
        down_seq, up_seq = seqs
        pattern = _period(down_seq or up_seq)
        if not pattern:
            raise CheckpointError(
                f"level {level} has no blocks on either path; its block types cannot be inferred"
            )
        for path, seq, store in (("down", down_seq, counts[0]), ("up", up_seq, counts[1])):
            if seq != pattern * (len(seq) // len(pattern)):
                raise CheckpointError(
                    f"level {level}: {path} path block types {seq[:12]!r} do not repeat the "
                    f"level pattern {pattern!r}"
                )
            store.append(len(seq) // len(pattern))
        patterns.append(pattern)

    has_attn = tuple("A" in p for p in patterns)
    nhead = []
    for level, (c, attn) in enumerate(zip(c_hidden, has_attn)):
        nhead.append(
            _exact_div(c, HEAD_DIM, f"level {level} attention width (heads = width / {HEAD_DIM})")
            if attn
            else -1
        )

    if t_conds is None:
        ordered = stage_t_conds
    else:
        unknown = sorted(t_conds - set(KNOWN_T_CONDS))
        if unknown:
            raise CheckpointError(
                f"timestep-condition mapper(s) {unknown}: unknown condition, their order "
                "cannot be recovered from a file"
            )
        ordered = tuple(name for name in KNOWN_T_CONDS if name in t_conds)

    repeat_down = tuple(_count_indices(shapes, f"down_repeat_mappers.{i}") + 1 for i in range(n))
    repeat_up = tuple(_count_indices(shapes, f"up_repeat_mappers.{u}") + 1 for u in range(n))
    return _UNetBody(
        c_hidden=c_hidden,
        nhead=tuple(nhead),
        has_attn=has_attn,
        blocks=(tuple(counts[0]), tuple(counts[1][::-1])),  # blocks[1] is deepest level first
        block_repeat=(repeat_down, repeat_up),
        level_config=tuple(patterns),
        c_r=c_r,
        kernel_size=kernel_size,
        t_conds=ordered,
        c_cond_attn=c_cond_attn,
    )


def _match_preset(inferred, presets: Sequence, has_attn: Sequence[bool]):
    """The preset whose every recoverable field equals ``inferred``, else ``inferred`` itself."""
    for preset in presets:
        comparable = (
            dataclasses.replace(
                preset,
                dropout=inferred.dropout,
                nhead=tuple(h if a else -1 for h, a in zip(preset.nhead, has_attn)),
            )
            if len(preset.nhead) == len(has_attn)
            else preset
        )
        if comparable == inferred:
            return preset
    return inferred


def _level_widths(shapes: Shapes, downscaler_weight: str, what: str) -> tuple[int, ...]:
    """c_hidden per level: level 0 from ``embedding.1``, level l from its downscaler's output channels."""
    widths = [_shape(shapes, "embedding.1.weight", what)[0]]
    level = 1
    while f"down_downscalers.{level}.1.{downscaler_weight}" in shapes:
        widths.append(shapes[f"down_downscalers.{level}.1.{downscaler_weight}"][0])
        level += 1
    return tuple(int(w) for w in widths)


# --------------------------------------------------------------------------------------------- networks


def infer_stage_c_config(shapes: Shapes) -> StageCConfig:
    """StageCConfig from an official Stage C state dict's shapes (``stage_c*.safetensors``)."""
    what = "Stage C"
    if any(re.match(r"down_downscalers\.\d+\.1\.weight$", k) for k in shapes):
        raise CheckpointError(
            "strided-conv level transitions (down_downscalers.N.1.weight): a Stage B layout, "
            "not Stage C"
        )
    c_hidden = _level_widths(shapes, "blocks.0.weight", what)
    body = _infer_unet_body(shapes, c_hidden, StageCConfig().t_conds)
    txt = _shape(shapes, "clip_txt_mapper.weight", what)
    pooled = _shape(shapes, "clip_txt_pooled_mapper.weight", what)
    img = _shape(shapes, "clip_img_mapper.weight", what)
    c_cond = txt[0]
    n = len(c_hidden)
    inferred = StageCConfig(
        c_in=_shape(shapes, "embedding.1.weight", what)[1],  # patch_size 1
        c_out=_shape(shapes, "clf.1.weight", what)[0],
        c_r=body.c_r if body.c_r is not None else StageCConfig.c_r,
        patch_size=1,
        c_cond=c_cond,
        c_hidden=c_hidden,
        nhead=body.nhead,
        blocks=body.blocks,
        block_repeat=body.block_repeat,
        level_config=body.level_config,
        c_clip_text=txt[1],
        c_clip_text_pooled=pooled[1],
        c_clip_img=img[1],
        c_clip_seq=_exact_div(pooled[0], c_cond, "clip_txt_pooled_mapper rows / c_cond (clip_seq)"),
        kernel_size=body.kernel_size if body.kernel_size is not None else StageCConfig.kernel_size,
        dropout=(0.0,) * n,
        self_attn=True,
        t_conds=body.t_conds,
        switch_level=(False,) * (n - 1),
    )
    return _match_preset(
        inferred, (StageCConfig.big(), StageCConfig.lite(), StageCConfig.tiny()), body.has_attn
    )


def infer_stage_b_config(shapes: Shapes) -> StageBConfig:
    """StageBConfig from an official Stage B state dict's shapes (``stage_b*.safetensors``)."""
    what = "Stage B"
    if any(re.match(r"down_downscalers\.\d+\.1\.blocks\.", k) for k in shapes):
        raise CheckpointError(
            "1x1-conv level transitions (down_downscalers.N.1.blocks.0): a Stage C layout, "
            "not Stage B"
        )
    patch = 2
    c_hidden = _level_widths(shapes, "weight", what)
    body = _infer_unet_body(shapes, c_hidden, StageBConfig().t_conds)
    clip = _shape(shapes, "clip_mapper.weight", what)
    # c_cond shows in the attention kv mappers; without attention only c_cond * clip_seq is known.
    c_cond = (
        body.c_cond_attn if body.c_cond_attn is not None else clip[0] // StageBConfig.c_clip_seq
    )
    emb = _shape(shapes, "embedding.1.weight", what)
    inferred = StageBConfig(
        c_in=_exact_div(emb[1], patch * patch, "embedding.1 input channels / patch_size**2"),
        c_out=_exact_div(
            _shape(shapes, "clf.1.weight", what)[0],
            patch * patch,
            "clf.1 output channels / patch**2",
        ),
        c_r=body.c_r if body.c_r is not None else StageBConfig.c_r,
        patch_size=patch,
        c_cond=c_cond,
        c_hidden=c_hidden,
        nhead=body.nhead,
        blocks=body.blocks,
        block_repeat=body.block_repeat,
        level_config=body.level_config,
        c_clip=clip[1],
        c_clip_seq=_exact_div(clip[0], c_cond, "clip_mapper rows / c_cond (clip_seq)"),
        c_effnet=_shape(shapes, "effnet_mapper.0.weight", what)[1],
        c_pixels=_shape(shapes, "pixels_mapper.0.weight", what)[1],
        kernel_size=body.kernel_size if body.kernel_size is not None else StageBConfig.kernel_size,
        dropout=(0.0,) * len(c_hidden),
        self_attn=True,
        t_conds=body.t_conds,
    )
    return _match_preset(
        inferred, (StageBConfig.big(), StageBConfig.lite(), StageBConfig.tiny()), body.has_attn
    )


def infer_stage_a_config(
    shapes: Shapes, scale_factor: float = STAGE_A_OFFICIAL_SCALE
) -> StageAConfig:
    """StageAConfig from an official Stage A state dict's shapes (``stage_a.safetensors``).

    ``scale_factor`` is not stored in the file: 0.43 for the official file (spec §5.1).
    """
    what = "Stage A"
    c0 = _shape(shapes, "in_block.1.weight", what)[0]
    head = _shape(shapes, "up_blocks.0.0.weight", what)  # 1x1 conv c_latent -> c_hidden
    c_hidden, c_latent = head[0], head[1]
    ratio = _exact_div(c_hidden, c0, "Stage A deepest width / first width")
    if ratio & (ratio - 1):
        raise CheckpointError(
            f"Stage A widths {c0} -> {c_hidden}: ratio {ratio} is not a power of 2"
        )
    levels = int(math.log2(ratio)) + 1
    bottleneck = 0
    while f"up_blocks.{bottleneck + 1}.gammas" in shapes:
        bottleneck += 1
    if bottleneck == 0:
        raise CheckpointError(
            "Stage A: no ResBlock (up_blocks.1.gammas) after the decoder's input conv"
        )
    codebook = _shape(shapes, "vquantizer.codebook.weight", what)
    if codebook[1] != c_latent:
        raise CheckpointError(
            f"vquantizer.codebook.weight: width {codebook[1]} != latent channels {c_latent}"
        )
    return StageAConfig(
        levels=levels,
        bottleneck_blocks=bottleneck,
        c_hidden=c_hidden,
        c_latent=c_latent,
        codebook_size=codebook[0],
        scale_factor=scale_factor,
    )


def infer_previewer_config(shapes: Shapes) -> PreviewerConfig:
    """PreviewerConfig from an official Previewer state dict's shapes (``previewer.safetensors``)."""
    first = _shape(shapes, "blocks.0.weight", "Previewer")
    last = _shape(shapes, "blocks.24.weight", "Previewer")
    return PreviewerConfig(c_in=first[1], c_hidden=first[0], c_out=last[0])


def infer_effnet_config(shapes: Shapes) -> EfficientNetConfig:
    """EfficientNetConfig from ``effnet_encoder.safetensors`` shapes: widths, layer counts, block
    types, expand ratios and kernels are read from the tensors; the six stage strides are V2-S's
    (``V2_S_STRIDES``), which shapes cannot show."""
    what = "EfficientNet encoder"
    stem = _shape(shapes, "backbone.0.0.weight", what)[0]
    stages = []
    for index, stride in enumerate(V2_S_STRIDES, start=1):
        prefix = f"backbone.{index}."
        layers = len({k[len(prefix) :].split(".")[0] for k in shapes if k.startswith(prefix)})
        if layers == 0:
            raise ValueError(f"{what}: no tensors for stage {index} ({prefix}*)")
        first = f"{prefix}0.block."
        if f"{first}3.0.weight" in shapes:  # MBConv: expand, depthwise, SE, project
            expand_w = _shape(shapes, f"{first}0.0.weight", what)
            c_in, kernel = expand_w[1], _shape(shapes, f"{first}1.0.weight", what)[2]
            c_out = _shape(shapes, f"{first}3.0.weight", what)[0]
            kind, expand = "mb", expand_w[0] // c_in
        else:  # FusedMBConv: k x k conv (to the expanded width, or to c_out when expand is 1)
            conv = _shape(shapes, f"{first}0.0.weight", what)
            c_in, kernel = conv[1], conv[2]
            if f"{first}1.0.weight" in shapes:
                kind, expand = "fused", conv[0] // c_in
                c_out = _shape(shapes, f"{first}1.0.weight", what)[0]
            else:
                kind, expand, c_out = "fused", 1, conv[0]
        stages.append((kind, expand, kernel, stride, c_in, c_out, layers))
    head = _shape(shapes, f"backbone.{len(V2_S_STRIDES) + 1}.0.weight", what)[0]
    return EfficientNetConfig(
        c_latent=_shape(shapes, "mapper.0.weight", what)[0],
        stem=stem,
        stages=tuple(stages),
        head=head,
    )


# ------------------------------------------------------------------------------------------ identification


def _variant(inferred, presets: Mapping[str, object]) -> str:
    for name, preset in presets.items():
        if inferred == preset:
            return name
    return "custom"


# Per official kind: how describe_checkpoint names it, and (Stage B / C) how to tell its variant.
_NAMES = {
    "stage_c": "a Stage C (prior) checkpoint",
    "stage_b": "a Stage B (decoder) checkpoint",
    "stage_a": "a Stage A (VQGAN) checkpoint",
    "effnet": "an EfficientNet encoder checkpoint",
    "previewer": "a Previewer checkpoint",
}
_VARIANTS = {
    "stage_c": (
        infer_stage_c_config,
        {"big, 3.6B": StageCConfig.big, "lite, 1B": StageCConfig.lite, "tiny": StageCConfig.tiny},
    ),
    "stage_b": (
        infer_stage_b_config,
        {"big, 1.5B": StageBConfig.big, "lite, 700M": StageBConfig.lite, "tiny": StageBConfig.tiny},
    ),
}


def describe_checkpoint(shapes: Shapes) -> str:
    """What a state dict looks like, for error messages: e.g. 'a Stage B checkpoint (lite, 700M)'."""
    keys = set(shapes)
    if any(".attention.to_q." in k for k in keys):
        kind = "prior, Stage C" if "clip_txt_mapper.weight" in keys else "decoder, Stage B"
        return (
            f"a diffusers StableCascadeUNet weights file ({kind}); load its folder with config.json"
        )
    if "vquantizer.embedding.weight" in keys:
        return "a diffusers PaellaVQModel (Stage A) weights file; load its vqgan/ folder with config.json"
    kind = checkpoint_kind(shapes)
    if kind is None:
        sample = sorted(keys)[:3]
        return f"an unrecognised checkpoint ({len(keys)} tensors, e.g. {sample})"
    if kind not in _VARIANTS:
        return _NAMES[kind]
    infer, presets = _VARIANTS[kind]
    try:
        variant = _variant(infer(shapes), {name: make() for name, make in presets.items()})
    except CheckpointError:
        variant = "unreadable structure"
    return f"{_NAMES[kind]} ({variant})"


def checkpoint_kind(shapes: Shapes) -> str | None:
    """'stage_c' | 'stage_b' | 'stage_a' | 'effnet' | 'previewer' for an official-format state dict, else None."""
    keys = set(shapes)
    if any(".attention.to_q." in k for k in keys) or "vquantizer.embedding.weight" in keys:
        return None  # diffusers naming
    if "clip_txt_mapper.weight" in keys:
        return "stage_c"
    if "clip_mapper.weight" in keys or "effnet_mapper.0.weight" in keys:
        return "stage_b"
    if "vquantizer.codebook.weight" in keys:
        return "stage_a"
    if any(k.startswith("backbone.") for k in keys) and "mapper.0.weight" in keys:
        return "effnet"
    if "blocks.0.weight" in keys and all(k.startswith("blocks.") for k in keys):
        return "previewer"
    return None
