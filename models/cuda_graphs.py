"""Sampler forwards replayed as CUDA graphs.

Why: at serving batch sizes a Stage B / Stage C forward on a large GPU is bound by launching its
thousands of small kernels from Python, not by arithmetic (measured on an H200, docs/bench_cuda.md:
Stage C lite at a 1024 px image does ~2.6 TFLOP per forward in 25 ms, a few percent of the card's
bf16 rate). A sampler calls the same network with the same shapes at every step, so the forward is
recorded once as a CUDA graph and replayed for the other steps: one launch instead of thousands.

How: one graph per input signature (shapes, dtypes, devices of ``x``, ``r`` and the condition
tensors). The first call at a signature runs eagerly (a real sampler step, which also initialises
cuDNN / cuBLAS for those shapes); the second records the graph and replays it; later calls copy
their inputs into the graph's static input tensors and replay. The output is returned as a copy,
because the next replay overwrites the graph's own. A replay runs the kernels eager execution runs
at the same shapes, so results equal eager mode's.

Each graph keeps the activation memory of its forward in a private pool, so a ``GraphCache`` holds
at most ``max_graphs`` of them (least recently used first out) and ``clear()`` releases them all,
as the service does after running out of device memory.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

Forward = Callable[..., Tensor]  # forward(x, r, **conditions) -> eps


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: Tensor
    r: Tensor
    conditions: dict[str, Tensor]
    out: Tensor


def _signature(x: Tensor, r: Tensor, conditions: Mapping[str, Tensor]) -> tuple:
    tensors = [("x", x), ("r", r), *sorted(conditions.items())]
    return (
        torch.is_inference_mode_enabled(),
        tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in tensors),
    )


class GraphCache:
    """``cache.run(forward, x, r, conditions)`` = ``forward(x, r, **conditions)``, through graphs.

    ``forward`` must compute the same function every time it is given for one network (the graph
    recorded from the first one is replayed for the others). One thread runs a cache; ``clear``
    may come from another (after running out of memory while another stage's thread steps): the
    bookkeeping is locked, and a replay already under way keeps its graph alive.
    """

    def __init__(self, max_graphs: int = 4) -> None:
        self.max_graphs = max_graphs
        self.enabled = True
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._seen: OrderedDict[tuple, None] = OrderedDict()  # signatures run eagerly once
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every graph and its memory pool (the allocator frees them on ``empty_cache``)."""
        with self._lock:
            self._graphs.clear()
            self._seen.clear()

    def wrap(self, forward: Forward) -> Forward:
        """``forward`` with the same call signature, run through this cache."""

        def graphed(x: Tensor, r: Tensor, **conditions: Tensor) -> Tensor:
            return self.run(forward, x, r, conditions)

        return graphed

    def run(
        self, forward: Forward, x: Tensor, r: Tensor, conditions: Mapping[str, Tensor]
    ) -> Tensor:
        if not self.enabled or x.device.type != "cuda" or torch.is_grad_enabled():
            return forward(x, r, **conditions)
        key = _signature(x, r, conditions)
        with self._lock:
            entry = self._graphs.get(key)
            if entry is not None:
                self._graphs.move_to_end(key)
            seen = key in self._seen
            if entry is None and not seen:
                self._remember(key)
        if entry is None:
            if not seen:
                return forward(x, r, **conditions)
            entry = self._capture(key, forward, x, r, conditions)
            if entry is None:
                return forward(x, r, **conditions)
        entry.x.copy_(x)
        entry.r.copy_(r)
        for name, value in conditions.items():
            entry.conditions[name].copy_(value)
        entry.graph.replay()
        return entry.out.clone()

    def _remember(self, key: tuple) -> None:
        self._seen[key] = None
        while len(self._seen) > 4 * self.max_graphs:
            self._seen.popitem(last=False)

    def _capture(
        self, key: tuple, forward: Forward, x: Tensor, r: Tensor, conditions: Mapping[str, Tensor]
    ) -> _Graph | None:
        with self._lock:
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
        static_x, static_r = x.clone(), r.clone()
        static_c = {name: value.clone() for name, value in conditions.items()}
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: another stage's thread may be running kernels while this one records
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = forward(static_x, static_r, **static_c)
        except torch.OutOfMemoryError:
            self.clear()
            raise
        except RuntimeError as exc:
            # Something in the forward cannot be recorded: keep serving, eagerly.
            logger.warning("CUDA graph capture failed, running eagerly from now on: %s", exc)
            self.enabled = False
            self.clear()
            return None
        entry = _Graph(graph, static_x, static_r, static_c, out)
        with self._lock:
            self._graphs[key] = entry
        return entry
