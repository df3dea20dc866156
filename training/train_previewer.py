"""Train the demo model's Previewer: Stage C latent [B, 16, h, w] -> RGB preview [B, 3, 8h, 8w].

Command (from the repository root; about 15 minutes on one shared core, most of it generating the
training pairs through the demo pipeline)::

    nice -n 19 python -m training.train_previewer --out assets/demo-model

writes ``<out>/previewer.safetensors``: the official Previewer architecture
(``models/previewer.py``) at ``--c-hidden`` 64, a flat state dict with the official keys
``blocks.0`` .. ``blocks.24`` (float32; BatchNorm's ``num_batches_tracked`` int64 as in the
official file), loadable by ``models.weights.load_previewer``, which infers the config from the
shapes.

Why pairs from the demo model itself rather than renders of the synthetic data: the service applies
the Previewer to the Stage C x0 predictions of a real sampling run, and a preview is right when it
looks like the picture that run ends with. So the pairs come from the real pipeline
(``models.demo.load_demo_pipeline``, the step engine at the demo's defaults, prompts of the demo
grammar drawn by ``training.data.sample_attributes``, fresh seeds from 100,000):

- input: the Stage C x0 prediction after steps 4, 8, 12, 16 and 20 of 20 (the last one is the
  latent Stage B is conditioned on), so mid-run previews are trained too;
- target: the image the run finally decodes (Stages B and A), area-downsampled to 8h x 8w, for each
  of them: an early x0 is asked for its best guess of the final picture, which degrades to a blur
  rather than to garbage.

Sizes: 896 images at 128 x 128 (the demo's size), 96 each at 192 x 128 and 128 x 192, 48 at
256 x 256 (the net is convolutional, so one set of weights serves every size; the demo model itself
was trained at 128 px only). 10% of the images (all their steps) are held out and scored at the end.

Training: AdamW (lr 2e-3, cosine to 5%, weight decay 1e-4), batches of 64 from one size at a time
(sizes drawn in proportion to their data), half of each batch final latents and half intermediate
ones, MSE loss, 2,000 steps. BatchNorm uses batch statistics while training; before export its
running statistics are recomputed exactly (cumulative average, ``momentum=None``) over the whole
training set, so the eval-mode network normalises as it was trained to. Seeded (``--seed``); CPU,
one thread. The pairs are cached in ``--work`` (``pairs-seed<seed>.pt``), so a rerun with other
training settings skips the generation.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from models.config import PreviewerConfig
from models.job_state import Stage
from models.pipeline import CascadePipeline
from models.previewer import Previewer
from models.request import GenerationParams
from training.data import captions_of, sample_attributes

# Stage C steps (1-based, of the demo's 20) whose x0 becomes a training input.
KEPT_STEPS = (4, 8, 12, 16, 20)
# (width, height, images): the demo's 128 px first, then other sizes in smaller numbers.
SIZES = ((128, 128, 896), (192, 128, 96), (128, 192, 96), (256, 256, 48))
FIRST_SEED = 100_000  # far from the seeds of training/evaluate.py and the tests
HELD_OUT = 0.1
GENERATION_BATCH = 64
SCALE = 8  # preview pixels per latent cell


# ---------------------------------------------------------------------------------------- data


def area_target(images: Tensor, latent_hw: tuple[int, int]) -> Tensor:
    """images [B, 3, H, W] in [0, 1] -> [B, 3, 8h, 8w] by area averaging: what a preview shows."""
    h, w = latent_hw
    return F.interpolate(images, size=(SCALE * h, SCALE * w), mode="area")


def sample_run(
    pipeline: CascadePipeline, params: list[GenerationParams], kept: tuple[int, ...] = KEPT_STEPS
) -> tuple[Tensor, Tensor]:
    """Sample ``params`` (one image each, one shared size) through the step engine.

    Returns (x0 [B, len(kept), 16, h, w]: the Stage C x0 after each kept step; images
    [B, 3, H, W] float in [0, 1]: what the run decodes). RuntimeError if an image is not finite.
    """
    states = pipeline.start(params)
    x0s: dict[int, Tensor] = {}
    while states[0].stage is Stage.PRIOR:
        events = pipeline.step(states, previews=True)
        if events[0].step in kept:
            x0s[events[0].step] = torch.cat([e.x0 for e in events])
    while states[0].stage is Stage.DECODER:
        pipeline.step(states)
    results = pipeline.decode(states, output_type="float")
    bad = [r for r in results if isinstance(r, Exception)]
    if bad:
        raise RuntimeError(f"generation failed: {bad[0]}")
    images = torch.cat([r.images for r in results])
    return torch.stack([x0s[s] for s in kept], dim=1), images


def generate_pairs(
    pipeline: CascadePipeline, generator: torch.Generator, log=print
) -> list[dict[str, Tensor]]:
    """One dict per size: x0 [N, S, 16, h, w], target [N, 3, 8h, 8w], bg [N] (prompt background)."""
    out = []
    seed = FIRST_SEED
    for width, height, count in SIZES:
        started = time.perf_counter()
        x0s, targets, bgs = [], [], []
        for first in range(0, count, GENERATION_BATCH):
            n = min(GENERATION_BATCH, count - first)
            attrs = sample_attributes(n, generator)
            params = [
                GenerationParams.from_defaults(
                    pipeline.defaults, prompt, seed=seed + i, width=width, height=height
                )
                for i, prompt in enumerate(captions_of(attrs))
            ]
            seed += n
            x0, images = sample_run(pipeline, params)
            x0s.append(x0)
            targets.append(area_target(images, x0.shape[-2:]))
            bgs.append(attrs.bg)
        out.append({"x0": torch.cat(x0s), "target": torch.cat(targets), "bg": torch.cat(bgs)})
        log(f"{count} images at {width} x {height} in {time.perf_counter() - started:.0f} s")
    return out


def split(pairs: list[dict[str, Tensor]], generator: torch.Generator):
    """(train, held_out): the same dict layout, HELD_OUT of each size's images held out."""
    train, held = [], []
    for part in pairs:
        n = len(part["bg"])
        order = torch.randperm(n, generator=generator)
        k = max(1, round(HELD_OUT * n))
        held.append({key: v[order[:k]] for key, v in part.items()})
        train.append({key: v[order[k:]] for key, v in part.items()})
    return train, held


# ------------------------------------------------------------------------------------ training


def _batch(part: dict[str, Tensor], size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Half final latents, half intermediate ones (a random kept step each), with their targets."""
    n, steps = part["x0"].shape[:2]
    rows = torch.randint(0, n, (size,), generator=generator)
    which = torch.randint(0, steps - 1, (size,), generator=generator)
    which[: size // 2] = steps - 1
    return part["x0"][rows, which], part["target"][rows]


def train(
    train_set: list[dict[str, Tensor]],
    config: PreviewerConfig,
    *,
    steps: int,
    batch: int,
    lr: float,
    generator: torch.Generator,
    log=print,
) -> Previewer:
    model = Previewer(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    weights = torch.tensor([float(len(p["bg"])) for p in train_set])
    running = None
    started = time.perf_counter()
    for step in range(steps):
        # Cosine from lr to 5% of it.
        for group in opt.param_groups:
            group["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        part = train_set[int(torch.multinomial(weights, 1, generator=generator))]
        x, target = _batch(part, batch, generator)
        loss = F.mse_loss(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 500 == 0:
            log(
                f"step {step + 1}/{steps}: running MSE {running:.4f} "
                f"({time.perf_counter() - started:.0f} s)"
            )
    return model


@torch.no_grad()
def recompute_batchnorm(
    model: nn.Module, train_set: list[dict[str, Tensor]], batch: int = 256
) -> None:
    """Exact BatchNorm running statistics over every training input (all sizes and kept steps)."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for part in train_set:
        x = part["x0"].flatten(0, 1)
        for first in range(0, len(x), batch):
            model(x[first : first + batch])
    for m in norms:
        m.momentum = 0.1
    model.eval()


@torch.no_grad()
def psnr(preview: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR in dB of preview (clamped to [0, 1]) vs target: [B, 3, H, W] -> [B]."""
    mse = (preview.clamp(0, 1) - target).pow(2).mean(dim=(1, 2, 3))
    return -10 * torch.log10(mse.clamp_min(1e-10))


@torch.no_grad()
def report(model: nn.Module, held: list[dict[str, Tensor]], log=print) -> None:
    """Held-out mean PSNR per size and per kept step."""
    model.eval()
    for part in held:
        x0, target = part["x0"], part["target"]
        h, w = x0.shape[-2:]
        scores = [psnr(model(x0[:, i]), target).mean().item() for i in range(x0.shape[1])]
        text = ", ".join(f"step {s}: {v:.1f}" for s, v in zip(KEPT_STEPS, scores, strict=True))
        log(f"held out, latent {h} x {w} ({len(target)} images), PSNR dB: {text}")


def export(model: Previewer, path: Path) -> None:
    """Flat state dict with the official keys: float32 tensors, and BatchNorm's int64
    num_batches_tracked as in the official file."""
    state = {
        k: (v.float() if v.is_floating_point() else v).detach().contiguous()
        for k, v in model.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="assets/demo-model", help="where previewer.safetensors goes")
    p.add_argument("--work", default="/tmp/previewer-train", help="cache of the generated pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--c-hidden", type=int, default=64)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args(argv)

    from models.demo import load_demo_pipeline

    torch.set_num_threads(1)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {message}", flush=True)

    cache = Path(args.work) / f"pairs-seed{args.seed}.pt"
    if cache.is_file():
        pairs = torch.load(cache)
        log(f"pairs from {cache}")
    else:
        pipeline = load_demo_pipeline()
        pairs = generate_pairs(pipeline, torch.Generator().manual_seed(args.seed), log)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(pairs, cache)
    # Split and training draw from fresh seeded generators, so a run from cached pairs and one that
    # generates them train the same network.
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train_set, held = split(pairs, generator)

    config = PreviewerConfig(c_in=train_set[0]["x0"].shape[2], c_hidden=args.c_hidden, c_out=3)
    model = train(
        train_set,
        config,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        generator=generator,
        log=log,
    )
    recompute_batchnorm(model, train_set)
    report(model, held, log)
    out = Path(args.out) / "previewer.safetensors"
    export(model, out)
    log(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
