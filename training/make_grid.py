"""Draw docs/demo_grid.png: the demo model's pictures for a grid of prompts, through the real pipeline.

Rows: the eight foreground colours; columns: circle / square / triangle at the left, centre and right, on a
background colour that changes per row. One seed per cell (seed = 10 * row + column). Each row is labelled with
its prompts' colours in the PNG's text metadata (PIL cannot draw fonts reliably without system fonts).

Command::

    python -m training.make_grid --out docs/demo_grid.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from models.demo import load_demo_pipeline
from models.request import GenerationParams
from training.data import COLOUR_NAMES, POSITIONS, SHAPES, caption

BACKGROUND_OF_ROW = ("blue", "white", "yellow", "black", "green", "purple", "orange", "red")


def grid_prompts() -> list[list[str]]:
    rows = []
    for fg, bg in zip(COLOUR_NAMES, BACKGROUND_OF_ROW):
        if fg == bg:
            raise AssertionError(f"row {fg}: background equals foreground")
        rows.append([caption(fg, shape, pos, bg) for shape in SHAPES for pos in POSITIONS])
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/demo_grid.png")
    p.add_argument("--model", default=None, help="demo model folder (default: assets/demo-model)")
    args = p.parse_args(argv)
    pipeline = load_demo_pipeline(path=args.model)
    rows = grid_prompts()
    batch = [GenerationParams.from_defaults(pipeline.defaults, prompt, seed=10 * r + c)
             for r, row in enumerate(rows) for c, prompt in enumerate(row)]
    results = pipeline.generate(batch).results
    size, pad = pipeline.defaults.width, 4
    n_rows, n_cols = len(rows), len(rows[0])
    canvas = np.full((n_rows * (size + pad) + pad, n_cols * (size + pad) + pad, 3), 255, dtype=np.uint8)
    failed = [f"{b.prompt!r}: {r}" for b, r in zip(batch, results) if isinstance(r, Exception)]
    if failed:
        raise RuntimeError("generation failed for " + "; ".join(failed))
    for k, result in enumerate(results):
        r, c = divmod(k, n_cols)
        y, x = pad + r * (size + pad), pad + c * (size + pad)
        canvas[y:y + size, x:x + size] = result.images[0].permute(1, 2, 0).numpy()
    info = PngImagePlugin.PngInfo()
    info.add_text("Description", "rows (top to bottom): " + "; ".join(
        f"{fg} on {bg}" for fg, bg in zip(COLOUR_NAMES, BACKGROUND_OF_ROW))
        + ". columns: " + ", ".join(f"{s} {p}" for s in SHAPES for p in POSITIONS))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(args.out, pnginfo=info)
    print(f"wrote {args.out} ({n_rows} x {n_cols} pictures)")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
