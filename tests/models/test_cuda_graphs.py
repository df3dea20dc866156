"""models.cuda_graphs: graph replays give the eager results, follow new inputs, stay bounded, and
fall back to eager execution where graphs cannot run (CPU, autograd). The CUDA tests run on a GPU
machine (bench/bench_cuda.py's machine runs them too); on the CPU they are skipped."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from models.cuda_graphs import GraphCache
from models.request import GenerationParams

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Counting:
    """forward(x, r, a=...) with a few kernels, counting how often Python really runs it."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: Tensor, r: Tensor, a: Tensor) -> Tensor:
        self.calls += 1
        return torch.tanh(x @ a.transpose(-1, -2)) * r[:, None, None] + x.sum()


def _inputs(device: str, n: int = 3, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x, r, a = torch.randn(n, 4, 8, generator=g), torch.rand(n, generator=g), torch.randn(n, 5, 8, generator=g)
    return x.to(device), r.to(device), a.to(device)


def test_cpu_runs_eagerly_every_time() -> None:
    forward, cache = Counting(), GraphCache()
    x, r, a = _inputs("cpu")
    with torch.inference_mode():
        outs = [cache.wrap(forward)(x, r, a=a) for _ in range(3)]
    assert forward.calls == 3 and len(cache) == 0
    torch.testing.assert_close(outs[-1], Counting()(x, r, a))


@cuda
def test_replays_equal_eager_and_follow_new_inputs() -> None:
    forward, cache = Counting(), GraphCache()
    graphed = cache.wrap(forward)
    with torch.inference_mode():
        for seed in range(4):  # call 1 eager, call 2 records, calls 3-4 only replay
            x, r, a = _inputs("cuda", seed=seed)
            got = graphed(x, r, a=a)
            assert torch.equal(got, Counting()(x, r, a)), seed
    assert forward.calls == 2 and len(cache) == 1


@cuda
def test_autograd_runs_eagerly() -> None:
    forward, cache = Counting(), GraphCache()
    x, r, a = _inputs("cuda")
    for _ in range(3):
        cache.run(forward, x, r, {"a": a})
    assert forward.calls == 3 and len(cache) == 0


@cuda
def test_at_most_max_graphs_are_kept_and_clear_drops_them() -> None:
    forward, cache = Counting(), GraphCache(max_graphs=2)
    with torch.inference_mode():
        for n in (1, 2, 3):  # three signatures, each recorded on its second call
            for _ in range(2):
                cache.run(forward, *_inputs("cuda", n)[:2], {"a": _inputs("cuda", n)[2]})
        assert len(cache) == 2
        x, r, a = _inputs("cuda", 1, seed=9)  # evicted first: eager again, then re-recorded
        assert torch.equal(cache.run(forward, x, r, {"a": a}), Counting()(x, r, a))
    cache.clear()
    assert len(cache) == 0


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_pipeline_images_are_the_eager_ones(dtype: torch.dtype) -> None:
    from models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(0, "cuda")
    pipe.dtype = dtype
    reqs = [GenerationParams(prompt="a red circle", seed=3, width=128, height=128, prior_steps=5,
                             decoder_steps=3, num_images=2),
            GenerationParams(prompt="a blue square", seed=8, width=128, height=128, prior_steps=5,
                             decoder_steps=3, prior_guidance_scale=6.0)]
    with torch.inference_mode():
        eager = [r.images for r in pipe.generate(reqs).results]
        pipe.graphs = {"prior": GraphCache(), "decoder": GraphCache()}
        for _ in range(2):  # the first batch records, the second only replays
            graphed = [r.images for r in pipe.generate(reqs).results]
            assert all(torch.equal(e, g) for e, g in zip(eager, graphed, strict=True))
        alone = pipe.generate(reqs[1:]).results[0].images  # another batch shape, same image
    assert torch.equal(alone, eager[1])
    assert len(pipe.graphs["prior"]) == 2 and len(pipe.graphs["decoder"]) == 2  # two batch shapes


def _step_in_inference_mode(pipe, states):
    with torch.inference_mode():  # thread-local: the helper thread needs its own
        return pipe.step(states)


@cuda
@pytest.mark.parametrize("graphs", [False, True])
def test_stages_stepped_at_once_on_two_streams_give_the_sequential_images(graphs: bool) -> None:
    """Stage overlap as service/engine.py runs it: Stage C steps on this thread, Stage B steps on
    another at the same time, each thread on a CUDA stream of its own; the images equal those of
    the same steps run one after the other on the default stream."""
    from concurrent.futures import ThreadPoolExecutor

    from models.job_state import Stage
    from models.tiny import build_tiny_pipeline
    from service.engine import own_stream

    pipe = build_tiny_pipeline(0, "cuda")
    if graphs:
        pipe.graphs = {"prior": GraphCache(), "decoder": GraphCache()}
    reqs = [GenerationParams(prompt="ahead", seed=1, width=128, height=128, prior_steps=2,
                             decoder_steps=6, num_images=2),
            GenerationParams(prompt="behind", seed=2, width=128, height=128, prior_steps=8,
                             decoder_steps=3)]  # fmt: skip

    def images(beside: ThreadPoolExecutor | None) -> tuple[list[Tensor], int]:
        overlapped = 0
        with torch.inference_mode():
            states = pipe.start(reqs)
            while True:
                prior = [s for s in states if s.stage is Stage.PRIOR]
                decoder = [s for s in states if s.stage is Stage.DECODER]
                if not prior and not decoder:
                    break
                if beside is not None and prior and decoder:
                    other = beside.submit(_step_in_inference_mode, pipe, decoder)
                    pipe.step(prior)
                    other.result()
                    overlapped += 1
                else:
                    for group in (g for g in (prior, decoder) if g):
                        pipe.step(group)
            return [r.images for r in pipe.decode(states)], overlapped

    sequential, _ = images(None)
    own_stream(torch.device("cuda"))()
    try:
        with ThreadPoolExecutor(1, initializer=own_stream(torch.device("cuda"))) as beside:
            for _ in range(2):  # with graphs: the first run records, the second only replays
                overlapped_images, overlapped = images(beside)
                assert overlapped > 0
                assert all(torch.equal(a, b) for a, b in zip(sequential, overlapped_images, strict=True))
    finally:
        torch.cuda.set_stream(torch.cuda.default_stream())
