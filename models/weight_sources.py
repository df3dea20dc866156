"""Where a network's weights are: an official file, a diffusers folder, or a Hugging Face snapshot.

- ``resolve_source``: one path given to a loader -> an official .safetensors file, or a diffusers model folder
  (``config.json`` plus ``diffusion_pytorch_model[.bf16].safetensors``, or the shards its
  ``.safetensors.index[.bf16].json`` lists), with the weight variant chosen from the dtype.
- ``find_stage_files``: a snapshot directory (or several) -> the file or folder of each network.

Nothing here reads tensor data; pickle checkpoints are refused by name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.infer_config import CheckpointError
from models.safetensors_header import PICKLE_SUFFIXES, refuse_pickle

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_FIRST_MISSING = 5  # missing shards quoted in an error message
STAGE_NAMES = {
    "stage_c": "Stage C (prior)",
    "stage_b": "Stage B (decoder)",
    "stage_a": "Stage A (VQGAN)",
    "effnet": "EfficientNet encoder",
    "previewer": "Previewer",
}


# ------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """A resolved checkpoint: official file, or diffusers folder with its config and weight files."""

    path: Path
    layout: str  # "official" | "diffusers"
    files: tuple[Path, ...]
    diffusers_config: dict[str, Any] | None = None


def _add_variant(name: str, variant: str | None) -> str:
    """diffusers naming: 'a.safetensors' + 'bf16' -> 'a.bf16.safetensors' (the variant goes before the suffix)."""
    if not variant:
        return name
    head, _, tail = name.rpartition(".")
    return f"{head}.{variant}.{tail}"


def _diffusers_weight_files(folder: Path, variant: str | None) -> tuple[Path, ...] | None:
    """The weight files of one variant of a diffusers folder (sharded via the index, or single), else None."""
    index = folder / _add_variant(DIFFUSERS_INDEX, variant)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: unreadable shard index ({e})") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists shard(s) that are missing: {missing[:_FIRST_MISSING]}")
        return tuple(folder / n for n in names)
    single = folder / _add_variant(DIFFUSERS_WEIGHTS, variant)
    return (single,) if single.is_file() else None


def resolve_source(source: str | Path, variant: str | None, dtype: torch.dtype) -> Source:
    """The checkpoint at ``source``: an official file, or a diffusers folder and the weight files of
    ``variant`` (None: the bf16 files when loading in ``dtype`` bfloat16, else the full-precision ones,
    each falling back to the other)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such file or folder"
            + (" (broken symlink: incomplete download?)" if path.is_symlink() else "")
        )
    if not path.is_dir():
        refuse_pickle(path)
        return Source(path, "official", (path,))

    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"{path}: a folder without config.json, so not a diffusers model folder; pass an "
            "official .safetensors file or a diffusers folder (or use find_stage_files on a "
            "snapshot directory)"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_file}: unreadable config.json ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: config.json is not a JSON object")
    # Auto: the bf16 variant when loading in bf16 (half the bytes to read), else the full-precision files.
    order = (
        [variant] if variant else (["bf16", None] if dtype == torch.bfloat16 else [None, "bf16"])
    )
    for v in order:
        files = _diffusers_weight_files(path, v)
        if files:
            return Source(path, "diffusers", files, config)
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    wanted = " or ".join(
        _add_variant(DIFFUSERS_WEIGHTS, v) + " (or its .index.json shards)" for v in order
    )
    raise CheckpointError(
        f"{path}: no weights found: looked for {wanted}"
        + (f"; found only pickle files {pickles}, which are never unpickled" if pickles else "")
    )



# ------------------------------------------------------------------------------------ snapshot layout


@dataclass(frozen=True)
class StageFiles:
    """Where each network's weights are: an official .safetensors file or a diffusers folder."""

    stage_c: Path
    stage_b: Path
    stage_a: Path
    effnet: Path | None = None
    previewer: Path | None = None


_VARIANTS = ("lite", "big")


def _official_names(stem: str, prefer_bf16: bool) -> list[str]:
    names = [f"{stem}.safetensors", f"{stem}_bf16.safetensors"]
    return names[::-1] if prefer_bf16 else names


def _is_diffusers_folder(path: Path) -> bool:
    if not (path / "config.json").is_file():
        return False
    return any(
        (path / _add_variant(name, v)).is_file()
        for name in (DIFFUSERS_WEIGHTS, DIFFUSERS_INDEX)
        for v in (None, "bf16")
    )


def find_stage_files(
    root: str | Path | Sequence[str | Path],
    prior_variant: str = "lite",
    decoder_variant: str = "lite",
    prefer_bf16: bool = False,
) -> StageFiles:
    """Locate each network's weights in a Hugging Face snapshot of ``stabilityai/stable-cascade`` (official files at
    the root; ``decoder[_lite]/`` and ``vqgan/`` folders) and/or ``stabilityai/stable-cascade-prior``
    (``prior[_lite]/`` folders). ``root`` may be a list of directories, searched in order (e.g. both snapshots).

    Per network: the official file in the preferred precision, then the other precision, then the diffusers
    folder (whose precision the loader picks from the dtype). ``effnet`` and ``previewer`` are optional (None when
    absent). Raises CheckpointError listing everything that is missing and where it was looked for.
    """
    for name, value in (("prior_variant", prior_variant), ("decoder_variant", decoder_variant)):
        if value not in _VARIANTS:
            raise ValueError(f"{name} must be 'lite' or 'big', got {value!r}")
    roots = (
        [Path(root).expanduser()]
        if isinstance(root, (str, Path))
        else [Path(r).expanduser() for r in root]
    )
    bad = [str(r) for r in roots if not r.is_dir()]
    if bad:
        raise CheckpointError(f"weights directory not found: {', '.join(bad)}")
    lite_c, lite_b = prior_variant == "lite", decoder_variant == "lite"
    wanted: dict[str, tuple[list[str], str | None]] = {
        "stage_c": (
            _official_names("stage_c_lite" if lite_c else "stage_c", prefer_bf16),
            "prior_lite" if lite_c else "prior",
        ),
        "stage_b": (
            _official_names("stage_b_lite" if lite_b else "stage_b", prefer_bf16),
            "decoder_lite" if lite_b else "decoder",
        ),
        "stage_a": (["stage_a.safetensors"], "vqgan"),
        "effnet": (["effnet_encoder.safetensors"], None),
        "previewer": (["previewer.safetensors"], None),
    }
    found: dict[str, Path | None] = {}
    missing: list[str] = []
    for stage, (files, folder) in wanted.items():
        hit: Path | None = None
        for r in roots:
            hit = next((r / f for f in files if (r / f).is_file()), None)
            if hit is None and folder and _is_diffusers_folder(r / folder):
                hit = r / folder
            if hit is not None:
                break
        found[stage] = hit
        if hit is None and stage in ("stage_c", "stage_b", "stage_a"):
            looked = " or ".join(
                files + ([f"{folder}/ (config.json + {DIFFUSERS_WEIGHTS})"] if folder else [])
            )
            broken = [
                str(r / f)
                for r in roots
                for f in files
                if (r / f).is_symlink() and not (r / f).exists()
            ]
            missing.append(
                f"{STAGE_NAMES[stage]}: {looked}"
                + (f" (broken symlinks, incomplete download?: {broken})" if broken else "")
            )
    if missing:
        where = ", ".join(str(r) for r in roots)
        raise CheckpointError(
            f"missing weights under {where}: "
            + "; ".join(missing)
            + ". Stage B/A and the official files are in stabilityai/stable-cascade, the prior "
            "folders in stabilityai/stable-cascade-prior."
        )
    return StageFiles(**found)  # type: ignore[arg-type]
