"""Service test helpers: the real tiny pipeline (built once per session), a thin fault-injecting
wrapper around it, and uvicorn serving an app on a loopback port in a background thread."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import torch
import uvicorn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from models.request import GenerationParams, GenerationResult, NonFiniteOutput
from models.tiny import build_tiny_pipeline
from service.app import create_app
from service.settings import Settings

WAIT_S = 60.0  # generous: the 2 CPU cores are shared, a tiny generation can take seconds under load


@pytest.fixture(scope="session")
def tiny_pipeline() -> Any:
    return build_tiny_pipeline()


class FaultyPipeline:
    """The real pipeline, plus faults chosen per test. Records what it was asked to compute.

    - ``gate``: when cleared, step() blocks until it is set (``entered`` is set on each entry);
      the warm-up passes unless ``gate_warmup``.
    - ``raise_for``: a prompt substring; a step whose group contains it raises RuntimeError.
    - ``oom_above``: a step with more images than this raises torch.OutOfMemoryError.
    - ``nan_for``: a prompt substring; that request's decode result becomes NonFiniteOutput (as
      the pipeline reports NaN images), its neighbours are unaffected.
    - ``batches``: the prompts of every admission (one text-encoder call), warm-up excluded;
      ``steps``: the prompts of every step asked for (also those that failed).
    """

    def __init__(self, pipeline: Any, gate_warmup: bool = False) -> None:
        self.inner = pipeline
        self.defaults, self.limits, self.model_info, self.device = (
            pipeline.defaults, pipeline.limits, pipeline.model_info, pipeline.device,
        )  # fmt: skip
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.gate_warmup = gate_warmup
        self.raise_for: str | None = None
        self.oom_above: int | None = None
        self.nan_for: str | None = None
        self.batches: list[list[str]] = []
        self.steps: list[list[str]] = []
        self._warm = False

    def validate(self, params: GenerationParams) -> None:
        self.inner.validate(params)

    def start(self, batch: Sequence[GenerationParams]) -> list[Any]:
        if self._warm:
            self.batches.append([p.prompt for p in batch])
        return self.inner.start(batch)

    def step(self, states: Sequence[Any], *, previews: bool = False) -> list[Any]:
        if self._warm or self.gate_warmup:
            self.entered.set()
            assert self.gate.wait(WAIT_S), "test gate never opened"
        prompts = [s.params.prompt for s in states]
        if self._warm:
            self.steps.append(prompts)
        images = sum(s.images for s in states)
        if self.oom_above is not None and images > self.oom_above:
            raise torch.OutOfMemoryError(f"injected: {images} images do not fit")
        if self.raise_for is not None and any(self.raise_for in p for p in prompts):
            raise RuntimeError("injected failure")
        return self.inner.step(states, previews=previews)

    def preview(self, latents: Sequence[Any]) -> list[Any]:
        return self.inner.preview(latents)

    def decode(self, states: Sequence[Any]) -> list[GenerationResult | NonFiniteOutput]:
        warm, self._warm = self._warm, True
        results = self.inner.decode(states)
        if warm and self.nan_for is not None:
            results = [
                NonFiniteOutput("injected NaN") if self.nan_for in s.params.prompt else r
                for s, r in zip(states, results, strict=True)
            ]
        return results


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1:<free port> in a thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.client = httpx.Client(base_url=self.url, timeout=WAIT_S)

    def wait_ready(self) -> None:
        wait_until(lambda: self.client.get("/health/ready").status_code == 200, "server ready")

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
        return metric_value(self.client.get("/metrics").text, name, **labels)


@contextmanager
def serve(pipeline: Any, *, ready: bool = True, **overrides: Any) -> Iterator[LiveServer]:
    """Serve create_app(Settings(**overrides)) on ``pipeline``; always shut down (gate opened
    first)."""
    settings = Settings(**{"max_batch_wait_ms": 2.0, **overrides})
    with serve_app(create_app(settings, lambda _: pipeline)) as live:
        try:
            if ready:
                live.wait_ready()
            yield live
        finally:  # a failed test may leave the compute thread held: release it before shutting down
            if isinstance(pipeline, FaultyPipeline):
                pipeline.gate.set()


@contextmanager
def serve_app(app: Any) -> Iterator[LiveServer]:
    """Run ``app`` under uvicorn in a thread until the block ends."""
    live = LiveServer(app)
    live.thread.start()
    try:
        wait_until(lambda: live.server.started, "uvicorn started")
        yield live
    finally:
        live.server.should_exit = True
        live.thread.join(timeout=WAIT_S)
        live.client.close()
        live.sock.close()
        assert not live.thread.is_alive(), "server thread did not stop"


def wait_until(condition: Any, what: str, timeout: float = WAIT_S) -> None:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for: {what}")


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format -> [(name, labels, value)]."""
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            labels = dict(_LABEL.findall(match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def metric_value(text: str, name: str, **labels: str) -> float:
    return sum(
        value
        for sample, have, value in parse_metrics(text)
        if sample == name and all(have.get(k) == v for k, v in labels.items())
    )
