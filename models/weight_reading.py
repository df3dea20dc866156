"""Reading tensor data of validated safetensors files into the tensors a network is loaded with.

- Tensors are zero-copy views of the memory-mapped file (``models.mapped_file``; safetensors' own views where
  each is converted). When no conversion is needed (same dtype, CPU) the parameters ARE those views: pages
  are read on first use and no second copy ever exists (the mapping is private: writing to a parameter never
  touches the file; the file must not be truncated while the network lives, Hugging Face snapshots never
  rewrite a blob in place). A file loaded as it is has all its pages mapped in file order before the loader
  returns.
- Otherwise each tensor is converted once (dtype and/or device), in file order, and the file is re-mapped
  every ``_REMAP_BYTES`` so the pages already converted leave the process's resident set. The whole file is
  read ahead in the background (WILLNEED advice).

Callers pass headers that ``models.safetensors_header`` has read and checked; errors while reading data are
raised as ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from models.infer_config import CheckpointError
from models.mapped_file import MappedFile
from models.safetensors_header import TensorInfo

_REMAP_BYTES = 256 << 20  # converted bytes between re-maps of the source file (bounds its resident pages)


def target_dtype(model_tensor: Tensor, float_dtype: torch.dtype) -> torch.dtype:
    """The dtype a checkpoint tensor is loaded in: ``float_dtype`` for floats, integers as the model has
    them."""
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


def read_official(
    infos: Mapping[str, TensorInfo],
    expected: Mapping[str, Tensor],
    device: torch.device,
    float_dtype: torch.dtype,
) -> dict[str, Tensor]:
    """Tensors of official files, file by file in on-disk order (sequential reads)."""
    out: dict[str, Tensor] = {}
    for file, keys in _keys_by_file(infos).items():
        zero_copy = device.type == "cpu" and all(
            infos[k].dtype == target_dtype(expected[k], float_dtype) for k in keys
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
        out[key] = view.to(device=device, dtype=target_dtype(expected[key], float_dtype), copy=True)
        converted += view.nbytes
        del view
        if converted >= _REMAP_BYTES:  # drop the mapping: its resident pages leave our RSS
            handle, converted = None, 0
    return out


def read_views(infos: Mapping[str, TensorInfo], populate: bool) -> dict[str, Tensor]:
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


def finalize(
    state: dict[str, Tensor],
    expected: Mapping[str, Tensor],
    device: torch.device,
    float_dtype: torch.dtype,
) -> dict[str, Tensor]:
    """Convert tensors that are not yet on ``device`` in the target dtype (diffusers path), once each."""
    for key in list(state):
        want = target_dtype(expected[key], float_dtype)
        t = state[key]
        if t.dtype != want or t.device != device:
            state[key] = t.to(device=device, dtype=want)
    return state
