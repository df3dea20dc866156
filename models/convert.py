"""Conversion between the official Stable Cascade formats and the diffusers formats. Pure functions.

State dicts
- UNets (Stage B / C), official -> diffusers: each ``<p>.attention.attn.in_proj_{weight,bias}`` ([3c, c] /
  [3c], rows q, k, v) is split into ``<p>.attention.to_{q,k,v}.{weight,bias}``;
  ``<p>.attention.attn.out_proj.*`` becomes ``<p>.attention.to_out.0.*``; Stage B's ``clip_mapper.*`` becomes
  ``clip_txt_pooled_mapper.*`` (Stage C already uses that name). Every other key is unchanged.
  diffusers -> official is the exact inverse.
- Stage A (diffusers ``PaellaVQModel``): ``vquantizer.codebook.weight`` <-> ``vquantizer.embedding.weight``.
Tensors are never copied unless they must be (split gives views, join concatenates); key order follows the
input, with a joined in_proj placed where its ``to_q`` was.

Configs
- diffusers ``StableCascadeUNet`` config.json dict <-> ``StageCConfig`` / ``StageBConfig``.
- diffusers ``PaellaVQModel`` config dict <-> ``StageAConfig``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from models.config import StageAConfig, StageBConfig, StageCConfig
from models.levels import per_level

_IN_PROJ = "attention.attn.in_proj_"
_OUT_PROJ = "attention.attn.out_proj."
_TO_OUT = "attention.to_out.0."
_QKV = ("to_q", "to_k", "to_v")
_BLOCK_NAMES = {"C": "SDCascadeResBlock", "T": "SDCascadeTimestepBlock", "A": "SDCascadeAttnBlock"}
_BLOCK_CODES = {v: k for k, v in _BLOCK_NAMES.items()}


# ------------------------------------------------------------------------------------------ state dicts


def is_stage_b_state_dict(sd: Mapping[str, Tensor]) -> bool:
    """True for a Stage B (decoder) state dict in either format: it has an effnet mapper, Stage C has not."""
    return "effnet_mapper.0.weight" in sd


def unet_official_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official Stage B/C state dict -> diffusers ``StableCascadeUNet`` state dict (see module docstring)."""
    stage_b = is_stage_b_state_dict(sd)
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if _IN_PROJ in key:
            prefix, kind = key.split(_IN_PROJ)  # kind: "weight" | "bias"
            if value.shape[0] % 3:
                raise ValueError(
                    f"{key}: first dim {value.shape[0]} is not divisible by 3 (packed q, k, v)"
                )
            for name, part in zip(_QKV, value.chunk(3, dim=0)):
                out[f"{prefix}attention.{name}.{kind}"] = part
        elif _OUT_PROJ in key:
            out[key.replace(_OUT_PROJ, _TO_OUT)] = value
        elif stage_b and key.startswith("clip_mapper."):
            out["clip_txt_pooled_mapper." + key[len("clip_mapper.") :]] = value
        else:
            out[key] = value
    return out


def unet_diffusers_to_official(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``StableCascadeUNet`` state dict -> official Stage B/C state dict (inverse of the above)."""
    stage_b = is_stage_b_state_dict(sd)
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if ".attention.to_q." in key:
            prefix, kind = key.split(".attention.to_q.")
            parts = []
            for name in _QKV:
                k = f"{prefix}.attention.{name}.{kind}"
                if k not in sd:
                    raise ValueError(
                        f"{k}: missing (needed with {key} to build the packed in_proj)"
                    )
                parts.append(sd[k])
            out[f"{prefix}.{_IN_PROJ}{kind}"] = torch.cat(parts, dim=0)
        elif ".attention.to_k." in key or ".attention.to_v." in key:
            if key.replace(".to_k.", ".to_q.").replace(".to_v.", ".to_q.") not in sd:
                raise ValueError(f"{key}: has no matching to_q entry")
            continue  # consumed with its to_q
        elif _TO_OUT in key:
            out[key.replace(_TO_OUT, _OUT_PROJ)] = value
        elif stage_b and key.startswith("clip_txt_pooled_mapper."):
            out["clip_mapper." + key[len("clip_txt_pooled_mapper.") :]] = value
        else:
            out[key] = value
    return out


_VQ_OFFICIAL = "vquantizer.codebook.weight"
_VQ_DIFFUSERS = "vquantizer.embedding.weight"


def vq_official_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official Stage A state dict -> diffusers ``PaellaVQModel`` state dict (codebook rename only)."""
    return {(_VQ_DIFFUSERS if k == _VQ_OFFICIAL else k): v for k, v in sd.items()}


def vq_diffusers_to_official(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``PaellaVQModel`` state dict -> official Stage A state dict (codebook rename only)."""
    return {(_VQ_OFFICIAL if k == _VQ_DIFFUSERS else k): v for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------ configs


def _heads_to_diffusers(nhead: tuple[int, ...]) -> list[int]:
    # Levels without attention carry -1 in the official configs and 0 in the diffusers config.json files.
    return [h if h > 0 else 0 for h in nhead]


def _heads_from_diffusers(heads: Any) -> tuple[int, ...]:
    return tuple(int(h) if int(h) > 0 else -1 for h in heads)


def _block_types_to_diffusers(level_config: tuple[str, ...]) -> list[list[str]]:
    try:
        return [[_BLOCK_NAMES[c] for c in level] for level in level_config]
    except KeyError as e:
        raise ValueError(
            f"level_config: block code {e.args[0]!r} has no diffusers equivalent"
        ) from None


def _block_types_from_diffusers(types: Any) -> tuple[str, ...]:
    try:
        return tuple("".join(_BLOCK_CODES[t] for t in level) for level in types)
    except KeyError as e:
        raise ValueError(f"block_types_per_layer: unknown block type {e.args[0]!r}") from None


def _get(d: Mapping[str, Any], key: str, default: Any = ...) -> Any:
    if key in d:
        return d[key]
    if default is ...:
        raise ValueError(f"diffusers config: missing field {key!r}")
    return default


def _common_unet_to_diffusers(cfg: StageCConfig | StageBConfig) -> dict[str, Any]:
    return {
        "_class_name": "StableCascadeUNet",
        "in_channels": cfg.c_in,
        "out_channels": cfg.c_out,
        "timestep_ratio_embedding_dim": cfg.c_r,
        "patch_size": cfg.patch_size,
        "conditioning_dim": cfg.c_cond,
        "block_out_channels": list(cfg.c_hidden),
        "num_attention_heads": _heads_to_diffusers(cfg.nhead),
        "down_num_layers_per_block": list(cfg.blocks[0]),
        "up_num_layers_per_block": list(cfg.blocks[1]),  # deepest level first, as officially
        "down_blocks_repeat_mappers": list(cfg.block_repeat[0]),
        "up_blocks_repeat_mappers": list(cfg.block_repeat[1]),  # deepest level first, as officially
        "block_types_per_layer": _block_types_to_diffusers(cfg.level_config),
        "clip_seq": cfg.c_clip_seq,
        "kernel_size": cfg.kernel_size,
        "dropout": list(cfg.dropout),
        "self_attn": cfg.self_attn,
        "timestep_conditioning_type": list(cfg.t_conds),
    }


def _common_unet_from_diffusers(d: Mapping[str, Any]) -> dict[str, Any]:
    c_hidden = tuple(int(c) for c in _get(d, "block_out_channels"))
    n = len(c_hidden)
    self_attn = _get(d, "self_attn", True)
    if not isinstance(self_attn, bool):
        values = set(per_level(self_attn, n, "self_attn"))
        if len(values) != 1:
            raise ValueError("self_attn: per-level values that differ are not supported")
        self_attn = bool(values.pop())
    down_rep = _get(d, "down_blocks_repeat_mappers", None) or (1,) * n
    up_rep = _get(d, "up_blocks_repeat_mappers", None) or (1,) * n
    return dict(
        c_in=int(_get(d, "in_channels")),
        c_out=int(_get(d, "out_channels")),
        c_r=int(_get(d, "timestep_ratio_embedding_dim", 64)),
        patch_size=int(_get(d, "patch_size", 1)),
        c_cond=int(_get(d, "conditioning_dim")),
        c_hidden=c_hidden,
        nhead=_heads_from_diffusers(
            per_level(_get(d, "num_attention_heads"), n, "num_attention_heads")
        ),
        blocks=(
            tuple(_get(d, "down_num_layers_per_block")),
            tuple(_get(d, "up_num_layers_per_block")),
        ),
        block_repeat=(tuple(down_rep), tuple(up_rep)),
        level_config=_block_types_from_diffusers(_get(d, "block_types_per_layer")),
        c_clip_seq=int(_get(d, "clip_seq", 4)),
        kernel_size=int(_get(d, "kernel_size", 3)),
        dropout=tuple(float(x) for x in per_level(_get(d, "dropout", 0.0), n, "dropout")),
        self_attn=self_attn,
        t_conds=tuple(_get(d, "timestep_conditioning_type", ("sca", "crp"))),
    )


def stage_c_config_to_diffusers(cfg: StageCConfig) -> dict[str, Any]:
    """``StageCConfig`` -> diffusers ``StableCascadeUNet`` config dict (prior / prior_lite layout)."""
    d = _common_unet_to_diffusers(cfg)
    d.update(
        clip_text_in_channels=cfg.c_clip_text,
        clip_text_pooled_in_channels=cfg.c_clip_text_pooled,
        clip_image_in_channels=cfg.c_clip_img,
        effnet_in_channels=None,
        pixel_mapper_in_channels=None,
        switch_level=list(cfg.switch_level),
    )
    return d


def stage_b_config_to_diffusers(cfg: StageBConfig) -> dict[str, Any]:
    """``StageBConfig`` -> diffusers ``StableCascadeUNet`` config dict (decoder / decoder_lite layout)."""
    d = _common_unet_to_diffusers(cfg)
    d.update(
        clip_text_in_channels=None,
        clip_text_pooled_in_channels=cfg.c_clip,
        clip_image_in_channels=None,
        effnet_in_channels=cfg.c_effnet,
        pixel_mapper_in_channels=cfg.c_pixels,
        switch_level=None,  # None = stride-2 conv down / transposed conv up
    )
    return d


def is_stage_b_config(d: Mapping[str, Any]) -> bool:
    """True for a decoder (Stage B) diffusers config: it has an effnet input, the prior has not."""
    return d.get("effnet_in_channels") is not None


def stage_c_config_from_diffusers(d: Mapping[str, Any]) -> StageCConfig:
    """diffusers ``StableCascadeUNet`` prior config dict -> ``StageCConfig``."""
    if is_stage_b_config(d):
        raise ValueError(
            "diffusers config: effnet_in_channels is set, this is a Stage B (decoder) config"
        )
    for key in ("clip_text_in_channels", "clip_image_in_channels"):
        if d.get(key) is None:
            raise ValueError(f"diffusers config: {key} must be set for a Stage C (prior) config")
    common = _common_unet_from_diffusers(d)
    switch = d.get("switch_level")
    if switch is None:
        raise ValueError(
            "diffusers config: switch_level=None (strided-conv levels) is not a Stage C layout"
        )
    return StageCConfig(
        **common,
        c_clip_text=int(d["clip_text_in_channels"]),
        c_clip_text_pooled=int(_get(d, "clip_text_pooled_in_channels")),
        c_clip_img=int(d["clip_image_in_channels"]),
        switch_level=tuple(bool(s) for s in switch),
    )


def stage_b_config_from_diffusers(d: Mapping[str, Any]) -> StageBConfig:
    """diffusers ``StableCascadeUNet`` decoder config dict -> ``StageBConfig``."""
    if not is_stage_b_config(d):
        raise ValueError(
            "diffusers config: effnet_in_channels is not set, this is not a Stage B config"
        )
    if d.get("switch_level") is not None:
        raise ValueError(
            "diffusers config: Stage B must have switch_level None (strided-conv levels)"
        )
    if d.get("clip_text_in_channels") is not None or d.get("clip_image_in_channels") is not None:
        raise ValueError(
            "diffusers config: Stage B takes only the pooled text embedding "
            "(clip_text_in_channels / clip_image_in_channels must be None)"
        )
    if d.get("pixel_mapper_in_channels") is None:
        raise ValueError("diffusers config: pixel_mapper_in_channels must be set for Stage B")
    return StageBConfig(
        **_common_unet_from_diffusers(d),
        c_clip=int(_get(d, "clip_text_pooled_in_channels")),
        c_effnet=int(d["effnet_in_channels"]),
        c_pixels=int(d["pixel_mapper_in_channels"]),
    )


def stage_a_config_to_diffusers(cfg: StageAConfig) -> dict[str, Any]:
    """``StageAConfig`` -> diffusers ``PaellaVQModel`` config dict."""
    return {
        "_class_name": "PaellaVQModel",
        "in_channels": 3,
        "out_channels": 3,
        "up_down_scale_factor": 2,
        "levels": cfg.levels,
        "bottleneck_blocks": cfg.bottleneck_blocks,
        "embed_dim": cfg.c_hidden,
        "latent_channels": cfg.c_latent,
        "num_vq_embeddings": cfg.codebook_size,
        "scale_factor": cfg.scale_factor,
    }


def stage_a_config_from_diffusers(d: Mapping[str, Any]) -> StageAConfig:
    """diffusers ``PaellaVQModel`` config dict -> ``StageAConfig`` (scale_factor taken as given)."""
    for key, want in (("in_channels", 3), ("out_channels", 3), ("up_down_scale_factor", 2)):
        if int(d.get(key, want)) != want:
            raise ValueError(
                f"diffusers VQ config: {key}={d[key]} is not supported (must be {want})"
            )
    default = StageAConfig()
    return StageAConfig(
        levels=int(d.get("levels", default.levels)),
        bottleneck_blocks=int(d.get("bottleneck_blocks", default.bottleneck_blocks)),
        c_hidden=int(d.get("embed_dim", default.c_hidden)),
        c_latent=int(d.get("latent_channels", default.c_latent)),
        codebook_size=int(d.get("num_vq_embeddings", default.codebook_size)),
        scale_factor=float(
            d.get("scale_factor", 0.3764)
        ),  # diffusers' own default when the field is absent
    )
