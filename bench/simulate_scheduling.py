"""Static vs continuous batching in simulation: the service's own policy code on a fake clock.

    python bench/simulate_scheduling.py [--jobs 2000] [--fixed 0.033] [--per-image 0.0037]
        [--overlap-cost 1.2]

Each denoising forward costs ``fixed + per_image x images`` seconds (defaults: the demo model's Stage C
step on one CPU thread, measured with ``StepEngine.step`` at 1, 2, 4 and 8 images: 37, 41, 64, 64 ms),
Stage A ``0.02 + 0.015 x images``, text 7 ms. Requests arrive as a Poisson stream (80% at 128 px with
20 + 10 steps, 10% at 192 px, 10% with 10 Stage C steps; up to 4 images per forward, 16 in flight) at
30/60/90% of the static mode's capacity. Static forms batches as service/batching.py does; continuous
runs service/scheduling_policy.py with and without the Stage B catch-up, and with stage overlap
(CASCADE_STAGE_OVERLAP: a Stage C and a Stage B forward at once, costing ``--overlap-cost`` x the
longer of the two; an assumption about a GPU running two streams, 2 = no gain). No torch, seconds to
run: for choosing a policy, not for claims about a machine (bench/bench_scheduling.py measures those).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service import scheduling_policy as policy


class Job:
    def __init__(self, arrived: float, size: int, prior: int, decoder: int = 10) -> None:
        self.arrived, self.size, self.prior, self.decoder = arrived, size, prior, decoder
        self.done_steps, self.order, self.images, self.end = 0, 0, 1, 0.0

    @property
    def group(self) -> tuple[str, int] | None:
        if self.done_steps < self.prior + self.decoder:
            return (self.stage, self.size)
        return None

    @property
    def stage(self) -> str:
        return "prior" if self.done_steps < self.prior else "decoder"

    @property
    def step(self) -> int:
        return self.done_steps if self.stage == "prior" else self.done_steps - self.prior

    @property
    def total(self) -> int:
        return self.prior if self.stage == "prior" else self.decoder

    @property
    def key(self) -> tuple[int, int]:
        return (self.size, self.prior)


def arrivals(n: int, rate: float, seed: int) -> list[Job]:
    rng, t, jobs = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        roll = rng.random()
        jobs.append(Job(t, 192 if roll < 0.1 else 128, 10 if 0.1 <= roll < 0.2 else 20))
    return jobs


class Costs:
    """What the simulated server spends: a forward ``fixed + per_image x images`` whatever its stage
    and size, Stage A, text; subclasses (bench/simulate_policies.py) add per-step overheads and HTTP."""

    text = 0.007
    http = 0.0  # added to every answer
    step_overhead: ClassVar[dict[str, float]] = {"static": 0.0, "continuous": 0.0}  # per step

    def __init__(self, fixed: float, per_image: float) -> None:
        self.fixed, self.per_image = fixed, per_image

    def forward(self, images: int, stage: str = "prior", size: int = 128) -> float:
        return self.fixed + self.per_image * images

    def decode(self, images: int) -> float:
        return 0.02 + 0.015 * images


Choose = Callable[[list[Job], int, float], list[list[Job]]]  # (active, max_batch, now) -> groups


def static(jobs: list[Job], costs: Costs, max_batch: int = 4) -> None:
    t, queue, i, done = 0.0, [], 0, 0
    while done < len(jobs):
        while i < len(jobs) and jobs[i].arrived <= t:
            queue.append(jobs[i])
            i += 1
        if not queue:
            t = jobs[i].arrived
            continue
        batch = [queue.pop(0)]
        for job in list(queue):
            if len(batch) < max_batch and job.key == batch[0].key:
                batch.append(job)
                queue.remove(job)
        n, size, step = len(batch), batch[0].size, costs.step_overhead["static"]
        t += costs.text + costs.decode(n)
        t += batch[0].prior * (costs.forward(n, "prior", size) + step)
        t += batch[0].decoder * (costs.forward(n, "decoder", size) + step)
        for job in batch:
            job.end = t + costs.http
        done += n


def continuous(
    jobs: list[Job],
    costs: Costs,
    catch_up: int,
    max_batch: int = 4,
    overlap_cost: float | None = None,
    choose: Choose | None = None,
) -> None:
    """``overlap_cost``: stage overlap on, two forwards at once cost that x the longer one.
    ``choose``: another group choice than service/scheduling_policy.py's (``catch_up`` unused)."""
    if choose is None:

        def choose(active: list[Job], max_batch: int, now: float) -> list[list[Job]]:
            return policy.choose_groups(active, max_batch, catch_up, overlap_cost is not None)

    t, queue, active, i, done, order = 0.0, [], [], 0, 0, 0
    while done < len(jobs):
        while i < len(jobs) and jobs[i].arrived <= t:
            queue.append(jobs[i])
            i += 1
        finished = [j for j in active if j.group is None]
        if finished:
            t += costs.decode(len(finished))
            for job in finished:
                job.end = t + costs.http
                active.remove(job)
            done += len(finished)
        admitted = policy.admit(queue, len(active), 16)
        for job in admitted:
            queue.remove(job)
            job.order, order = order, order + 1
            active.append(job)
        if admitted:
            t += costs.text
        groups = choose(active, max_batch, t)
        if groups:
            longest = max(costs.forward(len(g), g[0].stage, g[0].size) for g in groups)
            t += longest * (overlap_cost if len(groups) == 2 and overlap_cost else 1.0)
            t += costs.step_overhead["continuous"]
            for job in (job for group in groups for job in group):
                job.done_steps += 1
        elif not active and i < len(jobs):
            t = max(t, jobs[i].arrived)


def summary(jobs: list[Job]) -> tuple[float, float, float]:
    latency = sorted(j.end - j.arrived for j in jobs)
    wall = max(j.end for j in jobs) - min(j.arrived for j in jobs)
    return statistics.fmean(latency), latency[int(0.99 * len(latency)) - 1], len(jobs) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--fixed", type=float, default=0.033)
    parser.add_argument("--per-image", type=float, default=0.0037)
    parser.add_argument("--overlap-cost", type=float, default=1.2)
    args = parser.parse_args()
    costs = Costs(args.fixed, args.per_image)
    saturated = arrivals(400, 1e6, 1)
    static(saturated, costs)
    capacity = len(saturated) / max(j.end for j in saturated)
    print(f"static capacity {capacity:.2f} requests/s; forward = {args.fixed * 1000:.0f} ms + "
          f"{args.per_image * 1000:.1f} ms x images\n")  # fmt: skip
    print(
        "| load | mode | mean (s) | p99 (s) | throughput (req/s) | mean / static | p99 / static |"
    )
    print("|---|---|---|---|---|---|---|")
    for load in (0.3, 0.6, 0.9):
        runs = {"static": lambda jobs: static(jobs, costs)}
        for catch_up in (0, policy.CATCH_UP):
            runs[f"continuous, catch_up={catch_up}"] = lambda jobs, c=catch_up: continuous(
                jobs, costs, c
            )
        runs[f"continuous, stage overlap (x{args.overlap_cost:g})"] = lambda jobs: continuous(
            jobs, costs, policy.OVERLAP_CATCH_UP, overlap_cost=args.overlap_cost
        )
        base = None
        for name, run in runs.items():
            jobs = arrivals(args.jobs, load * capacity, 7)
            run(jobs)
            mean, p99, throughput = summary(jobs)
            base = base or (mean, p99)
            print(f"| {load:.0%} | {name} | {mean:.2f} | {p99:.2f} | {throughput:.2f} | "
                  f"{mean / base[0]:.2f} | {p99 / base[1]:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
