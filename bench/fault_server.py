"""The real server (service.__main__.serve: uvicorn, draining, settings from CASCADE_*) around the real tiny
pipeline wrapped with prompt-triggered faults, for bench/load_test.py's fault scenario.

A request whose prompt contains one of these markers makes every step it takes part in fail as a GPU would:
- ``inject:error`` -> the pipeline raises RuntimeError for the whole step;
- ``inject:oom``   -> torch.OutOfMemoryError for any step that contains it (so the scheduler's split-in-halves
                      retry must let its group-mates through, and only the marked request fails);
- ``inject:nan``   -> Stage A returns NaN pixels for that request's images only (the pipeline's own
                      finiteness check must catch them).
Everything else is the unmodified tiny pipeline. Run: ``python bench/fault_server.py`` (CASCADE_* env).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from models.request import GenerationParams
from service.settings import Settings

MARKERS = ("inject:error", "inject:oom", "inject:nan")


class FaultyPipeline:
    """Delegates to a real CascadePipeline; raises or poisons only when a batch carries a marker."""

    def __init__(self, pipeline: Any) -> None:
        self.inner = pipeline
        self.defaults, self.limits, self.device = (
            pipeline.defaults,
            pipeline.limits,
            pipeline.device,
        )
        self.model_info = {**pipeline.model_info, "name": "tiny-random-faulty"}
        self._nan_rows: list[int] = []
        decode = pipeline.stage_a.decode

        def poisoned_decode(latent: torch.Tensor) -> torch.Tensor:
            images = decode(latent)  # [N_images, 3, H, W], in request order
            if self._nan_rows:
                images = images.clone()
                images[self._nan_rows] = float("nan")
            return images

        pipeline.stage_a.decode = poisoned_decode

    def validate(self, params: GenerationParams) -> None:
        self.inner.validate(params)

    def start(self, batch: Sequence[GenerationParams]) -> list[Any]:
        return self.inner.start(batch)

    def step(self, states: Sequence[Any], *, previews: bool = False) -> list[Any]:
        prompts = [s.params.prompt for s in states]
        if any("inject:error" in p for p in prompts):
            raise RuntimeError("injected pipeline failure")
        if any("inject:oom" in p for p in prompts):
            raise torch.OutOfMemoryError("injected: CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner.step(states, previews=previews)

    def preview(self, latents: Sequence[Any]) -> list[Any]:
        return self.inner.preview(latents)

    def decode(self, states: Sequence[Any]) -> list[Any]:
        rows, row = [], 0
        for state in states:
            if "inject:nan" in state.params.prompt:
                rows += range(row, row + state.images)
            row += state.images
        self._nan_rows = rows
        try:
            return self.inner.decode(states)
        finally:
            self._nan_rows = []


def faulty_factory(settings: Settings) -> FaultyPipeline:
    from service.engine import load_pipeline

    return FaultyPipeline(load_pipeline(settings))


def main() -> None:
    import logging

    from service.__main__ import serve

    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.exit(serve(Settings.from_env(), faulty_factory))


if __name__ == "__main__":
    main()
