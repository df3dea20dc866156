"""Other group-choice policies against the service's, in simulation, with measured step costs.

    python bench/simulate_policies.py [--jobs 3000] [--seeds 7,8,9] [--loads 0.6,0.9]

bench/simulate_scheduling.py models a forward as ``fixed + per_image x images``. This one takes a table
of measured step costs instead (the demo model, one torch thread, ``StepEngine.step`` on an Intel Xeon
with AMX; ms at 1/2/3/4 images: Stage C 20/21/34/36, Stage B 19/26/35/43; 192 px costs 1.5x), plus the
servers' per-step overheads (static 3.5 ms, continuous 1.5 ms: their alone latencies minus the engine's
step times), text 6 ms, Stage A 8 ms an image and 30 ms of HTTP. With these it reproduces the measured
60% run of docs/bench_scheduling.md (continuous/static 0.81x mean, 0.83x p99; measured 0.80x / 0.84x),
so the policies below are compared on the machine the benchmark ran on. Same request mix and arrivals
as bench/simulate_scheduling.py. Prints mean and p99 latency relative to static.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.simulate_scheduling import Costs, Job, arrivals, continuous, static, summary
from service import scheduling_policy as policy

STAGE_C = {1: 0.0200, 2: 0.0214, 3: 0.0342, 4: 0.0360}
STAGE_B = {1: 0.0186, 2: 0.0263, 3: 0.0349, 4: 0.0430}

Choose = Callable[[list[Job], int, float], list[Job]]  # (active, max_batch, now) -> one group


class MeasuredCosts(Costs):
    """The Xeon's step table, the servers' per-step overheads, text, Stage A and HTTP time."""

    text, http = 0.006, 0.03
    step_overhead: ClassVar[dict[str, float]] = {"static": 0.0035, "continuous": 0.0015}

    def __init__(self) -> None:
        super().__init__(0.0, 0.0)

    def forward(self, images: int, stage: str = "prior", size: int = 128) -> float:
        table = STAGE_C if stage == "prior" else STAGE_B
        cost = table[min(images, 4)] + 0.008 * max(0, images - 4)
        return cost * (1.5 if size == 192 else 1.0)

    def decode(self, images: int) -> float:
        return 0.008 * images


COSTS = MeasuredCosts()


def _groups(active: list[Job], max_batch: int) -> list[list[Job]]:
    """Each group's jobs, oldest first, within ``max_batch`` images."""
    by_key: dict[tuple, list[Job]] = {}
    for job in sorted(active, key=lambda j: j.order):
        if job.group is not None and len(by_key.setdefault(job.group, [])) < max_batch:
            by_key[job.group].append(job)
    return list(by_key.values())


def _left(job: Job) -> int:
    return job.prior + job.decoder - job.done_steps


def shortest_remaining(power: float, age: float = 0.0) -> Choose:
    """The group with the most (sum of 1 / steps left ** power + age x seconds waited) per second of
    its forward: weighted shortest remaining work first, optionally aged."""

    def choose(active: list[Job], max_batch: int, now: float) -> list[Job]:
        def score(group: list[Job]) -> float:
            value = sum(1 / _left(j) ** power + age * (now - j.arrived) for j in group)
            return value / COSTS.forward(len(group), group[0].stage, group[0].size)

        return max(_groups(active, max_batch), key=score, default=[])

    return choose


def least_delay(active: list[Job], max_batch: int, now: float) -> list[Job]:
    """The group whose forward delays the fewest other jobs per image it advances."""
    waiting = sum(1 for j in active if j.group is not None)

    def delay(group: list[Job]) -> float:
        cost = COSTS.forward(len(group), group[0].stage, group[0].size)
        return (waiting - len(group)) * cost / len(group)

    return min(_groups(active, max_batch), key=delay, default=[])


def one(choose: Choose) -> Callable[[list[Job], int, float], list[list[Job]]]:
    """A one-group choice as simulate_scheduling.continuous takes choices (a list of groups)."""
    return lambda active, max_batch, now: [g] if (g := choose(active, max_batch, now)) else []


POLICIES: dict[str, Choose] = {
    **{
        f"service: oldest first, catch-up {c}": (
            lambda a, mb, now, c=c: policy.choose_group(a, mb, c)
        )
        for c in (0, 10, 20, policy.CATCH_UP, 60)
    },
    **{f"shortest remaining, power {p:g}": shortest_remaining(p) for p in (0.5, 1, 2)},
    **{f"shortest remaining, power 1, age {a:g}": shortest_remaining(1, a) for a in (0.01, 0.2)},
    "least delay to the others": least_delay,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--seeds", default="7,8,9")
    parser.add_argument("--loads", default="0.6,0.9")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    saturated = arrivals(400, 1e6, 1)
    static(saturated, COSTS)
    capacity = len(saturated) / max(j.end for j in saturated)
    print(f"static capacity {capacity:.2f} requests/s\n")
    print("| load | policy | mean / static | p99 / static |")
    print("|---|---|---|---|")
    for load in (float(x) for x in args.loads.split(",")):

        def mean_p99(run: Callable[[list[Job]], None], load: float = load) -> tuple[float, float]:
            results = []
            for seed in seeds:
                jobs = arrivals(args.jobs, load * capacity, seed)
                run(jobs)
                results.append(summary(jobs))
            return statistics.fmean(r[0] for r in results), statistics.fmean(r[1] for r in results)

        base = mean_p99(lambda jobs: static(jobs, COSTS))
        for name, choose in POLICIES.items():
            mean, p99 = mean_p99(lambda jobs, c=choose: continuous(jobs, COSTS, 0, choose=one(c)))
            print(
                f"| {load:.0%} | {name} | {mean / base[0]:.2f} | {p99 / base[1]:.2f} |", flush=True
            )


if __name__ == "__main__":
    main()
