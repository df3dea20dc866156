"""Loading Stable Cascade weights: official flat .safetensors files or diffusers model folders.

Sources
- Official files (``stage_c[_lite][_bf16].safetensors``, ``stage_b...``, ``stage_a``, ``effnet_encoder``,
  ``previewer``): flat state dicts with the official keys. The architecture is inferred from the tensor shapes
  (``models.infer_config``), so a path is all a caller gives.
- diffusers folders (``prior/``, ``prior_lite/``, ``decoder/``, ``decoder_lite/``, ``vqgan/``): ``config.json`` plus
  ``diffusion_pytorch_model[.bf16].safetensors``, or shards listed in ``diffusion_pytorch_model.safetensors.index
  [.bf16].json``. Config and keys are converted to the official ones by ``models.convert``.
- Pickle checkpoints (.ckpt/.pt/.pth/.bin) are refused without being opened: unpickling runs arbitrary code.

How (lean and fast)
- The network is constructed on the ``meta`` device (no allocation, no random init); after loading, nothing may be
  left on meta (every parameter and buffer of these networks is in its checkpoint).
- Every header is read and every key, shape and dtype kind is checked against the network BEFORE any tensor data
  is touched, so a bad file raises one ``CheckpointError`` and nothing is half-loaded.
- Tensors are zero-copy views of the memory-mapped file (``models.mapped_file``; safetensors' own views where
  each is converted). When no conversion is
  needed (same dtype, CPU) the parameters ARE those views: pages are read on first use and no second copy ever
  exists (the mapping is private: writing to a parameter never touches the file; the file must not be truncated
  while the network lives, Hugging Face snapshots never rewrite a blob in place). Otherwise each tensor is
  converted once (dtype and/or device), and the file is re-mapped every ``_REMAP_BYTES`` so the pages already
  converted leave the process's resident set. The whole file is read ahead in the background (WILLNEED advice);
  a file loaded as it is has all its pages mapped in file order before ``load`` returns.
- ``load_state_dict(..., assign=True)`` installs the tensors as they are.

dtype: None -> bfloat16 on CUDA, float32 on the CPU; float16 is refused (activations overflow in this model).
Returned networks are in eval mode with ``requires_grad`` off.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from models import convert
from models.config import (
    EfficientNetConfig,
    PreviewerConfig,
    StageAConfig,
    StageBConfig,
    StageCConfig,
)
from models.effnet import EfficientNetEncoder
from models.infer_config import (
    CheckpointError,
    checkpoint_kind,
    describe_checkpoint,
    infer_effnet_config,
    infer_previewer_config,
    infer_stage_a_config,
    infer_stage_b_config,
    infer_stage_c_config,
)
from models.mapped_file import MappedFile
from models.previewer import Previewer
from models.stage_a import StageA
from models.stage_b import StageB
from models.stage_c import StageC

__all__ = [
    "CheckpointError",
    "StageFiles",
    "find_stage_files",
    "infer_effnet_config",
    "infer_previewer_config",
    "infer_stage_a_config",
    "infer_stage_b_config",
    "infer_stage_c_config",
    "load_effnet",
    "load_previewer",
    "load_stage_a",
    "load_stage_b",
    "load_stage_c",
    "read_safetensors_header",
]

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_MAX_HEADER_BYTES = (
    100 << 20
)  # real headers are < 1 MB; a larger length means a corrupt or foreign file
_REMAP_BYTES = (
    256 << 20
)  # converted bytes between re-maps of the source file (bounds its resident pages)
_FIRST = 5  # offending keys quoted per category in error messages

_ST_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}

M = TypeVar("M", bound=nn.Module)


# ------------------------------------------------------------------------------------------ file headers


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: dtype, shape, the byte offset of its data in the file, and
    the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    file: Path


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: '{path.suffix}' is a pickle checkpoint format; it is never unpickled (loading one can run "
            "arbitrary code). Use the .safetensors release of these weights, or convert the file to safetensors "
            "in a trusted environment."
        )


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header without reading tensor data: key -> TensorInfo.

    Checks the header length, the JSON, every dtype and shape against its byte range, and that every range lies
    inside the file (a truncated download fails here, not halfway through loading).
    """
    path = Path(path)
    _refuse_pickle(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no such file"
            + (" (broken symlink: incomplete download?)" if path.is_symlink() else "")
        )
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(
                f"{path}: {size} bytes, too short to be a safetensors file (empty or truncated)"
            )
        (n,) = struct.unpack("<Q", prefix)
        raw = f.read(n) if 0 < n <= min(size - 8, _MAX_HEADER_BYTES) else None
    if raw is None or not raw.startswith(b"{"):
        # Only now look for a pickle signature: a valid header length may start with any byte.
        if prefix.startswith(b"PK\x03\x04") or (prefix[0] == 0x80 and 2 <= prefix[1] <= 5):
            raise CheckpointError(
                f"{path}: this is a pickle / torch.save file, not safetensors; it is never "
                "unpickled. Use a .safetensors file."
            )
        if raw is None:
            raise CheckpointError(
                f"{path}: not a valid safetensors file (header length {n} with a file of "
                f"{size} bytes): truncated or corrupt"
            )
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + n
    out: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            dtype, itemsize = _ST_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: corrupt safetensors header entry for {key!r}: {entry!r}"
            ) from None
        numel = 1
        for d in shape:
            numel *= d
        if min(shape, default=0) < 0 or end - begin != numel * itemsize or begin < 0:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: {key!r} has shape {list(shape)} "
                f"({entry['dtype']}) but a byte range of {end - begin}"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: file is truncated: tensor {key!r} ends at byte {data_start + end} but "
                f"the file has {size} bytes (incomplete download?)"
            )
        out[key] = TensorInfo(dtype, shape, data_start + begin, path)
    return out


# ------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Source:
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
            raise CheckpointError(f"{index}: lists shard(s) that are missing: {missing[:_FIRST]}")
        return tuple(folder / n for n in names)
    single = folder / _add_variant(DIFFUSERS_WEIGHTS, variant)
    return (single,) if single.is_file() else None


def _resolve_source(source: str | Path, variant: str | None, dtype: torch.dtype) -> _Source:
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such file or folder"
            + (" (broken symlink: incomplete download?)" if path.is_symlink() else "")
        )
    if not path.is_dir():
        _refuse_pickle(path)
        return _Source(path, "official", (path,))

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
            return _Source(path, "diffusers", files, config)
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    wanted = " or ".join(
        _add_variant(DIFFUSERS_WEIGHTS, v) + " (or its .index.json shards)" for v in order
    )
    raise CheckpointError(
        f"{path}: no weights found: looked for {wanted}"
        + (f"; found only pickle files {pickles}, which are never unpickled" if pickles else "")
    )


def _read_headers(files: Sequence[Path]) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for f in files:
        for key, info in read_safetensors_header(f).items():
            if key in infos:
                raise CheckpointError(
                    f"tensor {key!r} appears in both {infos[key].file.name} and {f.name}"
                )
            infos[key] = info
    return infos


# ---------------------------------------------------------------------------------------- validation


def _summary(config: Any) -> str:
    fields = (
        "c_hidden",
        "blocks",
        "c_cond",
        "levels",
        "bottleneck_blocks",
        "codebook_size",
        "c_latent",
    )
    parts = [f"{f}={getattr(config, f)}" for f in fields if hasattr(config, f)]
    return f"{type(config).__name__}({', '.join(parts)})"


def _check_against_model(
    model: nn.Module,
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, torch.dtype],
    config: Any,
) -> None:
    """Strict: the same key set, every shape equal, integer tensors where the model has integer tensors."""
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong_shape = [
        f"{k} (file {list(shapes[k])}, model {list(expected[k].shape)})"
        for k in expected
        if k in shapes and tuple(shapes[k]) != tuple(expected[k].shape)
    ]
    wrong_kind = [
        f"{k} (file {dtypes[k]}, model {expected[k].dtype})"
        for k in expected
        if k in dtypes and dtypes[k].is_floating_point != expected[k].dtype.is_floating_point
    ]
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", wrong_shape),
        ("dtype mismatches", wrong_kind),
    ):
        if items:
            more = f" (+{len(items) - _FIRST} more)" if len(items) > _FIRST else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:_FIRST])}{more}")
    if problems:
        raise CheckpointError(
            f"does not match the network {_summary(config)}: " + "; ".join(problems)
        )


# ------------------------------------------------------------------------------------------- reading


def _target_dtype(model_tensor: Tensor, float_dtype: torch.dtype) -> torch.dtype:
    return float_dtype if model_tensor.dtype.is_floating_point else model_tensor.dtype


def _prefetch(file: Path) -> None:
    """Ask the kernel to read the whole file ahead, in large sequential requests (returns at once).

    Without it, pages of the mapping arrive one fault at a time: thousands of small synchronous reads
    instead of one streaming read.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def _keys_by_file(infos: Mapping[str, TensorInfo]) -> dict[Path, list[str]]:
    """The keys of each file, in on-disk order."""
    by_file: dict[Path, list[str]] = {}
    for key, info in infos.items():
        by_file.setdefault(info.file, []).append(key)
    for keys in by_file.values():
        keys.sort(key=lambda k: infos[k].start)
    return by_file


def _mapped_tensors(
    file: Path, keys: Sequence[str], infos: Mapping[str, TensorInfo], populate: bool
) -> dict[str, Tensor]:
    """Zero-copy views of ``keys`` over one mapping of ``file`` (see ``models.mapped_file``)."""
    mapped = MappedFile(file, populate=populate)
    return {key: mapped.tensor(infos[key].dtype, infos[key].shape, infos[key].start) for key in keys}


def _read_official(
    infos: Mapping[str, TensorInfo],
    expected: Mapping[str, Tensor],
    device: torch.device,
    float_dtype: torch.dtype,
) -> dict[str, Tensor]:
    """Tensors of official files, file by file in on-disk order (sequential reads)."""
    out: dict[str, Tensor] = {}
    for file, keys in _keys_by_file(infos).items():
        zero_copy = device.type == "cpu" and all(
            infos[k].dtype == _target_dtype(expected[k], float_dtype) for k in keys
        )
        try:
            if zero_copy:  # the parameters ARE the file's pages: map them all in, in file order
                out.update(_mapped_tensors(file, keys, infos, populate=True))
            else:
                out.update(_read_converted(file, keys, expected, device, float_dtype))
        except CheckpointError:
            raise
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:  # unreadable data
            raise CheckpointError(
                f"{file}: cannot read tensor data ({type(e).__name__}: {e})"
            ) from None
    return out


def _read_converted(
    file: Path,
    keys: Sequence[str],
    expected: Mapping[str, Tensor],
    device: torch.device,
    float_dtype: torch.dtype,
) -> dict[str, Tensor]:
    """Each tensor of ``keys`` (in file order) converted once into new memory on ``device``."""
    out: dict[str, Tensor] = {}
    _prefetch(file)
    converted = 0
    handle = None
    for key in keys:
        if handle is None:
            handle = safe_open(str(file), framework="pt")
        view = handle.get_tensor(key)  # zero-copy view of the mapped file
        # One new tensor per key (a copy even when the dtype matches, so no view keeps the mapping).
        out[key] = view.to(device=device, dtype=_target_dtype(expected[key], float_dtype), copy=True)
        converted += view.nbytes
        del view
        if converted >= _REMAP_BYTES:  # drop the mapping: its resident pages leave our RSS
            handle, converted = None, 0
    return out


def _read_views(infos: Mapping[str, TensorInfo], populate: bool) -> dict[str, Tensor]:
    """Zero-copy views of every tensor (for the diffusers path, whose key conversion needs them together).

    ``populate``: the views will be the parameters as they are (no conversion follows): map every page
    in now, in file order (see ``models.mapped_file``)."""
    out: dict[str, Tensor] = {}
    for file, keys in _keys_by_file(infos).items():
        try:
            out.update(_mapped_tensors(file, keys, infos, populate))
        except (OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"{file}: cannot read tensor data ({type(e).__name__}: {e})"
            ) from None
    return out


def _finalize(
    state: dict[str, Tensor],
    expected: Mapping[str, Tensor],
    device: torch.device,
    float_dtype: torch.dtype,
) -> dict[str, Tensor]:
    """Convert tensors that are not yet on ``device`` in the target dtype (diffusers path), once each."""
    for key in list(state):
        want = _target_dtype(expected[key], float_dtype)
        t = state[key]
        if t.dtype != want or t.device != device:
            state[key] = t.to(device=device, dtype=want)
    return state


# -------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Spec:
    name: str  # e.g. "Stage C (prior)"
    kind: str  # checkpoint_kind() value
    loader: str  # the function to use for this kind
    network: Callable[[Any], nn.Module]
    infer: Callable[[Mapping[str, tuple[int, ...]]], Any]
    from_diffusers: Callable[[Mapping[str, Any]], Any] | None = None
    keys_from_diffusers: Callable[[Mapping[str, Tensor]], dict[str, Tensor]] | None = None
    diffusers_class: str | None = None


_SPECS = {
    "stage_c": _Spec(
        "Stage C (prior)",
        "stage_c",
        "load_stage_c",
        StageC,
        infer_stage_c_config,
        convert.stage_c_config_from_diffusers,
        convert.unet_diffusers_to_official,
        "StableCascadeUNet",
    ),
    "stage_b": _Spec(
        "Stage B (decoder)",
        "stage_b",
        "load_stage_b",
        StageB,
        infer_stage_b_config,
        convert.stage_b_config_from_diffusers,
        convert.unet_diffusers_to_official,
        "StableCascadeUNet",
    ),
    "stage_a": _Spec(
        "Stage A (VQGAN)",
        "stage_a",
        "load_stage_a",
        StageA,
        infer_stage_a_config,
        convert.stage_a_config_from_diffusers,
        convert.vq_diffusers_to_official,
        "PaellaVQModel",
    ),
    "effnet": _Spec(
        "EfficientNet encoder", "effnet", "load_effnet", EfficientNetEncoder, infer_effnet_config
    ),
    "previewer": _Spec(
        "Previewer", "previewer", "load_previewer", Previewer, infer_previewer_config
    ),
}
_LOADER_OF_KIND = {s.kind: s.loader for s in _SPECS.values()}


def _resolve_dtype(dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == torch.float16:
        raise ValueError(
            "dtype torch.float16 is not supported: Stable Cascade activations overflow in fp16; "
            "use torch.bfloat16 or torch.float32"
        )
    if dtype not in (torch.float32, torch.bfloat16, torch.float64):
        raise ValueError(f"dtype {dtype} is not supported; use torch.bfloat16 or torch.float32")
    return dtype


def _config_from_diffusers(spec: _Spec, source: _Source) -> Any:
    cfg = source.diffusers_config or {}
    cls_name = cfg.get("_class_name")
    if cls_name == "StableCascadeUnet" or "c_hidden" in cfg:
        raise CheckpointError(
            "config.json uses the pre-release diffusers format (StableCascadeUnet, c_in/c_hidden "
            "fields); download a current revision of the repository"
        )
    if spec.from_diffusers is None:
        raise CheckpointError(
            f"{spec.name} has no diffusers layout; pass its official .safetensors file"
        )
    if cls_name is not None and cls_name != spec.diffusers_class:
        raise CheckpointError(
            f"config.json describes a {cls_name}, not the {spec.diffusers_class} of a {spec.name}"
        )
    if spec.kind == "stage_c" and convert.is_stage_b_config(cfg):
        raise CheckpointError(
            "config.json describes a Stage B (decoder: effnet_in_channels is set), not a Stage C "
            "(prior) model; use load_stage_b"
        )
    if (
        spec.kind == "stage_b"
        and cls_name == "StableCascadeUNet"
        and not convert.is_stage_b_config(cfg)
    ):
        raise CheckpointError(
            "config.json describes a Stage C (prior: no effnet_in_channels), not a Stage B "
            "(decoder) model; use load_stage_c"
        )
    try:
        return spec.from_diffusers(cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"config.json: {e}") from None


def _load(
    kind: str,
    source: str | Path,
    device: torch.device | str,
    dtype: torch.dtype | None,
    variant: str | None,
    config: Any,
) -> nn.Module:
    spec = _SPECS[kind]
    device = torch.device(device)
    float_dtype = _resolve_dtype(dtype, device)
    src = _resolve_source(source, variant, float_dtype)
    try:
        infos = _read_headers(src.files)
        if src.layout == "official":
            shapes = {k: i.shape for k, i in infos.items()}
            found = checkpoint_kind(shapes)
            if found != spec.kind:
                hint = f"; use {_LOADER_OF_KIND[found]}()" if found in _LOADER_OF_KIND else ""
                raise CheckpointError(
                    f"this looks like {describe_checkpoint(shapes)}, not a {spec.name} "
                    f"checkpoint{hint}"
                )
            cfg = config if config is not None else spec.infer(shapes)
            official = shapes
            dtypes = {k: i.dtype for k, i in infos.items()}
        else:
            cfg = config if config is not None else _config_from_diffusers(spec, src)
            assert spec.keys_from_diffusers is not None
            # Run the key conversion on meta tensors first: keys and shapes are validated before any data is read.
            try:
                meta = spec.keys_from_diffusers(
                    {
                        k: torch.empty(i.shape, dtype=i.dtype, device="meta")
                        for k, i in infos.items()
                    }
                )
            except ValueError as e:
                raise CheckpointError(f"diffusers keys cannot be converted: {e}") from None
            official = {k: tuple(t.shape) for k, t in meta.items()}
            dtypes = {k: t.dtype for k, t in meta.items()}
        # Parameters and buffers start on meta: no allocation, no random init. Every tensor of these
        # networks is in their checkpoints (BatchNorm statistics included); _place_remaining checks it.
        with torch.device("meta"):
            try:
                model = spec.network(cfg)
            except ValueError as e:
                raise CheckpointError(
                    f"the network cannot be built from {_summary(cfg)}: {e}"
                ) from None
        _check_against_model(model, official, dtypes, cfg)

        expected = model.state_dict(keep_vars=True)
        if src.layout == "official":
            state = _read_official(infos, expected, device, float_dtype)
        else:
            assert spec.keys_from_diffusers is not None
            kept_as_is = device.type == "cpu" and all(
                i.dtype == float_dtype or not i.dtype.is_floating_point for i in infos.values()
            )
            state = _finalize(
                spec.keys_from_diffusers(_read_views(infos, populate=kept_as_is)),
                expected,
                device,
                float_dtype,
            )
    except CheckpointError as e:
        message = str(e)
        raise CheckpointError(
            message if message.startswith(str(src.path)) else f"{src.path}: {message}"
        ) from None

    model.load_state_dict(state, strict=True, assign=True)
    del state
    _place_remaining(model, device, float_dtype)
    model.requires_grad_(False)
    return model.eval()


def _place_remaining(model: nn.Module, device: torch.device, float_dtype: torch.dtype) -> None:
    """Move what the checkpoint did not provide (non-persistent buffers) like ``model.to(device, dtype)`` would."""
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is None:
                continue
            if buf.is_meta:
                raise RuntimeError(
                    f"buffer {name} of {type(module).__name__} was left on the meta device"
                )
            want = float_dtype if buf.dtype.is_floating_point else buf.dtype
            if buf.device != device or buf.dtype != want:
                module._buffers[name] = buf.to(device=device, dtype=want)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"parameters left on the meta device: {leftover[:_FIRST]}")


def load_stage_c(
    source: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    variant: str | None = None,
    config: StageCConfig | None = None,
) -> StageC:
    """Stage C from ``stage_c[_lite][_bf16].safetensors`` or a diffusers ``prior[_lite]/`` folder.

    ``variant``: diffusers weight variant ("bf16"); None picks bf16 files when loading in bf16, else fp32 files.
    ``config``: skip inference and use this architecture (the file must still match it exactly).
    """
    return _load("stage_c", source, device, dtype, variant, config)  # type: ignore[return-value]


def load_stage_b(
    source: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    variant: str | None = None,
    config: StageBConfig | None = None,
) -> StageB:
    """Stage B from ``stage_b[_lite][_bf16].safetensors`` or a diffusers ``decoder[_lite]/`` folder."""
    return _load("stage_b", source, device, dtype, variant, config)  # type: ignore[return-value]


def load_stage_a(
    source: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    variant: str | None = None,
    config: StageAConfig | None = None,
) -> StageA:
    """Stage A from ``stage_a.safetensors`` (scale_factor 0.43) or a diffusers ``vqgan/`` folder (its config's
    scale_factor, 0.3764 in the Hugging Face repository)."""
    return _load("stage_a", source, device, dtype, variant, config)  # type: ignore[return-value]


def load_effnet(
    source: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    config: EfficientNetConfig | None = None,
) -> EfficientNetEncoder:
    """The EfficientNet encoder from ``effnet_encoder.safetensors`` (there is no diffusers layout)."""
    return _load("effnet", source, device, dtype, None, config)  # type: ignore[return-value]


def load_previewer(
    source: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    config: PreviewerConfig | None = None,
) -> Previewer:
    """The Previewer from ``previewer.safetensors`` (there is no diffusers layout)."""
    return _load("previewer", source, device, dtype, None, config)  # type: ignore[return-value]


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
                f"{_SPECS[stage].name}: {looked}"
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
