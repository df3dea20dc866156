"""Prompt adherence of a demo pipeline: fixed prompts and seeds, sampled at the pipeline's defaults, scored by the
pixel classifier (``training.classify``).

The prompt set covers every (shape, position) pair six times with colour pairs drawn from a fixed seed: 54 prompts,
one image each (seed 1000 + i).

Command (prints the scores of the shipped model)::

    python -m training.evaluate
"""

from __future__ import annotations


import torch

from models.pipeline import CascadePipeline
from models.request import GenerationParams
from training.classify import accuracies, classify
from training.data import COLOUR_NAMES, POSITIONS, SHAPES, Attributes, captions_of

PROMPT_SEED = 20240
REPEATS = 6  # per (shape, position) pair


def prompt_set(seed: int = PROMPT_SEED) -> tuple[list[str], list[int], Attributes]:
    """The fixed prompts, their seeds and their true attributes (54 of each). Another ``seed`` gives another set
    (used to choose sampling settings without looking at the test set)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for shape in range(len(SHAPES)):
        for position in range(len(POSITIONS)):
            for _ in range(REPEATS):
                fg, bg = torch.randperm(len(COLOUR_NAMES), generator=g)[:2].tolist()
                rows.append((fg, bg, shape, position))
    attrs = Attributes.from_stacked(torch.tensor(rows))
    first_seed = 1000 if seed == PROMPT_SEED else 1000 + 100 * (seed % 1000)
    return captions_of(attrs), [first_seed + i for i in range(len(rows))], attrs


def generate_prompt_set(
    pipeline: CascadePipeline, seed: int = PROMPT_SEED, **overrides: float
) -> tuple[torch.Tensor, Attributes, list[str]]:
    """Images [54, 3, H, W] uint8 of the prompt set at the pipeline's defaults (or ``overrides`` of them), with the
    truth and prompts."""
    prompts, seeds, truth = prompt_set(seed)
    batch = [GenerationParams.from_defaults(pipeline.defaults, p, seed=s, **overrides)
             for p, s in zip(prompts, seeds, strict=True)]
    out = pipeline.generate(batch)
    failed = [f"{p!r}: {r}" for p, r in zip(prompts, out.results) if isinstance(r, Exception)]
    if failed:
        raise RuntimeError("generation failed for " + "; ".join(failed))
    return torch.stack([r.images[0] for r in out.results]), truth, prompts


def evaluate_pipeline(pipeline: CascadePipeline, seed: int = PROMPT_SEED, **overrides: float) -> dict[str, float]:
    """Classifier accuracies (fg colour, bg colour, both colours, position, shape) on the prompt set."""
    images, truth, _ = generate_prompt_set(pipeline, seed, **overrides)
    return accuracies(classify(images), truth)


def main() -> None:
    import time

    from models.demo import load_demo_pipeline

    torch.set_num_threads(1)
    pipeline = load_demo_pipeline()
    start = time.perf_counter()
    scores = evaluate_pipeline(pipeline)
    seconds = time.perf_counter() - start
    print(f"{len(prompt_set()[0])} prompts at {pipeline.defaults.width} px, sampled in {seconds:.1f} s")
    for name, value in scores.items():
        print(f"{name:>13}: {value:.1%}")


if __name__ == "__main__":
    main()
