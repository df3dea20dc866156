"""``python -m tests.service.slow_server DELAY_S``: the real server entry point
(service.__main__.serve, CASCADE_* settings) on the tiny pipeline, with every batch after warm-up
held for DELAY_S seconds (each step: a generation takes DELAY_S x its steps) so that a test can send SIGTERM while jobs are queued and running."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from models.request import GenerationParams
from models.tiny import build_tiny_pipeline
from service.__main__ import serve
from service.settings import Settings


class SlowPipeline:
    def __init__(self, inner: Any, delay_s: float) -> None:
        self.inner, self.delay_s, self.warm = inner, delay_s, False
        self.defaults, self.limits, self.model_info, self.device = (
            inner.defaults, inner.limits, inner.model_info, inner.device,
        )  # fmt: skip

    def validate(self, params: GenerationParams) -> None:
        self.inner.validate(params)

    def start(self, batch: Sequence[GenerationParams]) -> list[Any]:
        return self.inner.start(batch)

    def step(self, states: Sequence[Any], *, previews: bool = False) -> list[Any]:
        if self.warm:
            time.sleep(self.delay_s)
        return self.inner.step(states, previews=previews)

    def preview(self, latents: Sequence[Any]) -> list[Any]:
        return self.inner.preview(latents)

    def decode(self, states: Sequence[Any]) -> list[Any]:
        self.warm = True
        return self.inner.decode(states)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    delay_s = float(sys.argv[1])
    sys.exit(serve(Settings.from_env(), lambda _: SlowPipeline(build_tiny_pipeline(), delay_s)))


if __name__ == "__main__":
    main()
