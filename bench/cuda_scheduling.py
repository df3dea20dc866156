"""bench_cuda.py's "scheduling" section: static vs continuous batching of the released networks on one
device, in process (no HTTP), so the comparison measures the scheduling and nothing else.

A stream of 16 requests at 1024x1024 (Stage C 20 steps CFG 4, Stage B 10 steps, Stage A) arrives one every
``gap`` seconds, ``gap`` = a quarter of one request's solo time, up to 8 images per forward:
- static: when idle, every request that has arrived (up to 8) forms a batch that runs to its end;
- continuous: each iteration admits what has arrived, advances the group of the oldest job one step
  (service/scheduling_policy.py's choice, the service's own policy code) and decodes finished jobs;
- continuous + stage overlap (CASCADE_STAGE_OVERLAP): the same, and beside the oldest job's group a
  group of the other stage, on a second thread with its own CUDA stream, as service/engine.py runs
  them.
Reported: throughput, mean and max latency (arrival to image), and whether every image is finite.
``--device cpu --tiny`` runs it with tiny networks (a check of the script).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from models.job_state import Stage
from models.request import GenerationParams, NonFiniteOutput
from service import scheduling_policy as policy
from service.engine import own_stream

REQUESTS, MAX_BATCH = 16, 8


class _Active:
    """A job as the policy sees it."""

    def __init__(self, state: Any, order: int, arrived: float) -> None:
        self.state, self.order, self.arrived = state, order, arrived

    @property
    def images(self) -> int:
        return self.state.images

    @property
    def group(self) -> Any:
        return self.state.group_key if self.state.stage in (Stage.PRIOR, Stage.DECODER) else None

    @property
    def stage(self) -> str:
        return self.state.stage.value

    @property
    def step(self) -> int:
        return self.state.position.step

    @property
    def total(self) -> int:
        return self.state.position.total

    @property
    def size(self) -> Any:
        return (self.state.params.width, self.state.params.height)


def _requests(px: int, prior_steps: int, decoder_steps: int) -> list[GenerationParams]:
    return [
        GenerationParams(
            prompt=f"a photograph of object number {i} on a table", seed=i, width=px, height=px,
            prior_steps=prior_steps, decoder_steps=decoder_steps, prior_guidance_scale=4.0,
            decoder_guidance_scale=1.0,
        )
        for i in range(REQUESTS)
    ]  # fmt: skip


def _static(pipe: Any, reqs: list[GenerationParams], gap: float, sync: Any) -> tuple[list, list]:
    start, done, latencies, results, i = time.perf_counter(), 0, [], [], 0
    while done < len(reqs):
        now = time.perf_counter() - start
        arrived = [j for j in range(i, len(reqs)) if j * gap <= now][:MAX_BATCH]
        if not arrived:
            time.sleep(max(0.0, i * gap - now))
            continue
        out = pipe.generate([reqs[j] for j in arrived])
        sync()
        finished = time.perf_counter() - start
        latencies += [finished - j * gap for j in arrived]
        results += out.results
        i, done = arrived[-1] + 1, done + len(arrived)
    return latencies, results


def _continuous(
    pipe: Any, reqs: list[GenerationParams], gap: float, sync: Any, beside: Any = None
) -> tuple[list, list]:
    """``beside``: an executor whose thread steps the second group of an overlapped iteration."""
    start, next_req, active, latencies, results = time.perf_counter(), 0, [], [], []
    while len(results) < len(reqs):
        now = time.perf_counter() - start
        arriving = []
        while next_req < len(reqs) and next_req * gap <= now:
            arriving.append(next_req)
            next_req += 1
        if arriving:
            states = pipe.start([reqs[j] for j in arriving])
            active += [_Active(s, j, j * gap) for s, j in zip(states, arriving, strict=True)]
        finished = [a for a in active if a.state.stage is Stage.VQGAN]
        if finished:
            results += pipe.decode([a.state for a in finished])
            sync()
            end = time.perf_counter() - start
            latencies += [end - a.arrived for a in finished]
            active = [a for a in active if a not in finished]
        groups = policy.choose_groups(active, MAX_BATCH, overlap=beside is not None)
        if len(groups) == 2:
            other = beside.submit(_step_in_inference_mode, pipe, [a.state for a in groups[1]])
            pipe.step([a.state for a in groups[0]])
            other.result()
        elif groups:
            pipe.step([a.state for a in groups[0]])
        elif not active:
            time.sleep(max(0.0, next_req * gap - (time.perf_counter() - start)))
    return latencies, results


def _step_in_inference_mode(pipe: Any, states: list[Any]) -> Any:
    with torch.inference_mode():  # thread-local: the helper thread's own
        return pipe.step(states)


def _overlapped(
    device: torch.device, pipe: Any, reqs: list[GenerationParams], gap: float, sync: Any
) -> tuple[list, list]:
    """_continuous with stage overlap: this thread and the helper each on a stream of their own."""
    sync()
    own_stream(device)()
    try:
        with ThreadPoolExecutor(1, initializer=own_stream(device)) as beside:
            return _continuous(pipe, reqs, gap, sync, beside)
    finally:
        if device.type == "cuda":
            torch.cuda.set_stream(torch.cuda.default_stream(device))


def bench_scheduling(
    rep: Any, device: torch.device, sizes: list[str], tiny: bool, build: Any
) -> None:
    """``build(size)`` -> a CascadePipeline of the released networks (random weights, bfloat16)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    px, steps = (128, (4, 3)) if tiny else (1024, (20, 10))
    rows = []
    for size in sizes:
        pipe = build(size)
        reqs = _requests(px, *steps)
        with torch.inference_mode():
            pipe.generate(reqs[:MAX_BATCH])  # warm-up: kernels and CUDA graphs of the full batch
            t0 = time.perf_counter()
            pipe.generate(reqs[:1])
            sync()
            solo = time.perf_counter() - t0
            gap = solo / 4
            modes = {
                "static": _static,
                "continuous": _continuous,
                "continuous + stage overlap": lambda *a: _overlapped(device, *a),
            }
            for mode, run in modes.items():
                t0 = time.perf_counter()
                latencies, results = run(pipe, reqs, gap, sync)
                wall = time.perf_counter() - t0
                finite = sum(not isinstance(r, NonFiniteOutput) for r in results)
                rows.append(
                    f"| {size} C + {size} B | {mode} | {solo:.2f} | {gap:.3f} | {len(reqs) / wall:.2f} | "
                    f"{sum(latencies) / len(latencies):.2f} | {max(latencies):.2f} | {finite}/{len(reqs)} |"
                )
                print(rows[-1], flush=True)
        del pipe
    rep.add(
        "",
        f"### Static vs continuous batching, {REQUESTS} requests at {px}x{px} arriving every solo/4 s, "
        f"up to {MAX_BATCH} images per forward, bfloat16",
        "",
        "| models | mode | solo request (s) | arrival gap (s) | throughput (req/s) | mean latency (s) "
        "| max latency (s) | finite images |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    )
