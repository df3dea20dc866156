"""Zero-copy tensors over a memory-mapped safetensors file.

Each tensor is ``torch.frombuffer`` over one private (copy-on-write) mapping of the file: creating it
touches none of its pages, and writing to it never changes the file. ``madvise(WILLNEED)`` starts
reading the whole file ahead in the background. When the tensors will BE the weights (no conversion),
``populate=True`` also maps every page in, in file order (``MADV_POPULATE_READ``, Linux 5.14+): one
sequential read, after which the model is resident. Without it the first forward would fault the pages
in in parameter order, which is not the file's order (measured: Stage C lite bf16, 2 GB, 1.9-2.2 s to a
resident model against 0.6-1.1 s to read the file).

For tensors that are converted (dtype or device), ``models.weight_reading`` keeps safetensors' own views:
there the conversion itself reads each tensor once in file order, measured ~25% faster than from
these views, and the source pages must not all stay mapped next to the converted copy.

Why not ``safetensors.safe_open(...).get_tensor``: it slices one storage spanning the file for every
tensor, and on a cold page cache that slicing waited for the pages, one fault at a time (measured on
the 2-core dev VM, Stage B lite bf16, 1.4 GB: 0.7 s of a 1.1 s load, while reading the file takes
0.4 s; these mapped views plus a touch of every page took 0.36-0.44 s).
"""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import torch
from torch import Tensor


_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux value; not in every Python's mmap


class MappedFile:
    """``MappedFile(path).tensor(dtype, shape, offset)`` -> a view of the file's bytes at ``offset``.

    The mapping stays alive as long as any tensor made from it does.
    """

    def __init__(self, path: Path, populate: bool = False) -> None:
        self.path = path
        with path.open("rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if hasattr(self._map, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
            self._map.madvise(mmap.MADV_WILLNEED)  # background read-ahead; returns at once
        if populate and sys.platform.startswith("linux"):
            try:
                self._map.madvise(_MADV_POPULATE_READ)
            except OSError:  # kernel older than 5.14: the pages come in on first use instead
                pass

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...], offset: int) -> Tensor:
        numel = 1
        for d in shape:
            numel *= d
        if numel == 0:  # frombuffer refuses an empty count
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._map, dtype=dtype, count=numel, offset=offset).view(shape)
