"""Reading safetensors headers: every tensor's dtype, shape and place in the file, checked against the file.

A header is read and validated without touching tensor data, so a truncated download or a foreign file
fails with one ``CheckpointError`` before anything is loaded. Pickle checkpoints (.ckpt/.pt/.pth/.bin) are
refused without being opened: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from models.infer_config import CheckpointError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_MAX_HEADER_BYTES = 100 << 20  # real headers are < 1 MB; a larger length means a corrupt or foreign file

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


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: dtype, shape, the byte offset of its data in the file, and
    the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    file: Path


def refuse_pickle(path: Path) -> None:
    """Raise ``CheckpointError`` for a file whose suffix names a pickle format (it is never opened)."""
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
    refuse_pickle(path)
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



def read_headers(files: Sequence[Path]) -> dict[str, TensorInfo]:
    """The headers of all ``files`` of one checkpoint (shards) as one mapping; a key in two files is an
    error."""
    infos: dict[str, TensorInfo] = {}
    for f in files:
        for key, info in read_safetensors_header(f).items():
            if key in infos:
                raise CheckpointError(
                    f"tensor {key!r} appears in both {infos[key].file.name} and {f.name}"
                )
            infos[key] = info
    return infos
