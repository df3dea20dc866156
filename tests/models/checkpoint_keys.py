"""The released checkpoints' key lists (``tests/data/checkpoint_keys/<name>.keys.txt``)."""

from __future__ import annotations

from pathlib import Path

KEYS_DIR = Path(__file__).resolve().parents[1] / "data" / "checkpoint_keys"


def read_key_list(name: str) -> list[tuple[str, list[int]]]:
    """``key<TAB>[d0, d1, ...]`` lines -> [(key, shape)] in file order."""
    rows = []
    for line in (KEYS_DIR / f"{name}.keys.txt").read_text().splitlines():
        key, shape = line.split("\t")
        rows.append((key, [int(s) for s in shape.strip("[]").split(",") if s.strip()]))
    return rows
