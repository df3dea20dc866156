"""models.mapped_file: views of the file's bytes, private to the process, empty tensors allowed."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from models.mapped_file import MappedFile
from models.safetensors_header import read_safetensors_header


def test_views_equal_the_saved_tensors_and_writes_stay_private(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(4, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    before = path.read_bytes()
    mapped = MappedFile(path)
    infos = read_safetensors_header(path)
    views = {k: mapped.tensor(i.dtype, i.shape, i.start) for k, i in infos.items()}
    for key, ref in tensors.items():
        assert views[key].dtype == ref.dtype and torch.equal(views[key], ref), key
    views["a"].add_(1.0)  # copy-on-write: the process sees it, the file does not
    assert torch.equal(views["a"], tensors["a"] + 1.0)
    assert path.read_bytes() == before
