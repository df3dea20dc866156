"""Static vs continuous batching under open-loop Poisson arrivals, against the served demo model.

    python bench/bench_scheduling.py [--requests 500] [--loads 0.3,0.6,0.9] [--out docs/bench_scheduling.md]
        [--overlap]

1. Capacity: the static mode's saturated throughput with 8 closed-loop clients (same request mix),
   measured while the continuous server is saturated the same way (so under the same sharing).
2. For each load (a fraction of that capacity), the same Poisson arrival schedule and the same
   requests are sent to a static server and to a continuous one at the same time, each server pinned
   to its own CPU core (``--cores``; so both see the same machine, neighbours included):
   throughput, latency p50/p95/p99 and mean (client side, from the scheduled send time), queue wait
   and time to first step (the server's per-request ``timings``).
3. Step-count mixing: at the middle load, every request with its own step counts.

Request mix: 80% at the demo's default 128x128 and 20+10 steps, 10% at 192x128, 10% with 10 Stage C
steps. Arrivals are open loop: a request is sent at its scheduled time whether or not earlier ones
have been answered, as independent users do. Results: a Markdown table (stdout and ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.server_process import ServerProcess, machine, percentile  # noqa: E402

# One torch thread: the load generator runs on the same 2 cores, and two spinning OpenMP threads
# beside it stall for seconds (docs/bench_threads.md).
SETTINGS = {
    "CASCADE_MAX_QUEUE_SIZE": "1024",
    "CASCADE_REQUEST_TIMEOUT_S": "600",
    "CASCADE_TORCH_THREADS": "1",
}


@dataclass
class Sample:
    status: int
    latency: float
    queue_wait: float = float("nan")
    first_step: float = float("nan")


def request_mix(rng: random.Random, n: int, mixed_steps: bool = False) -> list[dict]:
    bodies = []
    for i in range(n):
        body: dict = {"prompt": "a red circle on a blue background", "seed": i}
        roll = rng.random()
        if mixed_steps:
            body.update(prior_steps=rng.randint(10, 30), decoder_steps=rng.randint(5, 12))
        elif roll < 0.1:
            body["width"] = 192
        elif roll < 0.2:
            body["prior_steps"] = 10
        bodies.append(body)
    return bodies


async def send(client: httpx.AsyncClient, body: dict, scheduled: float) -> Sample:
    try:
        r = await client.post("/v1/generate", json=body)
    except httpx.HTTPError:
        return Sample(0, time.perf_counter() - scheduled)
    latency = time.perf_counter() - scheduled
    if r.status_code != 200:
        return Sample(r.status_code, latency)
    t = r.json()["timings"]
    return Sample(200, latency, t["queue_wait"], t["first_step"])


def client(url: str) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    return httpx.AsyncClient(base_url=url, timeout=900, limits=limits)


async def open_loop(url: str, bodies: list[dict], rate: float, seed: int) -> tuple[list, float]:
    """Send ``bodies`` at Poisson arrival times of ``rate`` per second; (samples, wall seconds)."""
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in bodies:
        t += rng.expovariate(rate)
        offsets.append(t)
    async with client(url) as http:
        start = time.perf_counter()

        async def one(body: dict, offset: float) -> Sample:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            return await send(http, body, start + offset)

        samples = await asyncio.gather(*(one(b, o) for b, o in zip(bodies, offsets, strict=True)))
        return list(samples), time.perf_counter() - start


async def closed_loop(url: str, bodies: list[dict], clients: int) -> float:
    """Requests per second with ``clients`` clients each sending its next request on an answer."""
    pending = list(bodies)
    async with client(url) as http:
        start = time.perf_counter()

        async def worker() -> None:
            while pending:
                await send(http, pending.pop(), time.perf_counter())

        await asyncio.gather(*(worker() for _ in range(clients)))
        return len(bodies) / (time.perf_counter() - start)


def summary(samples: list[Sample], wall: float) -> dict[str, float]:
    ok = [s for s in samples if s.status == 200]
    lat = [s.latency for s in ok]
    return {
        "ok": len(ok),
        "errors": len(samples) - len(ok),
        "throughput": len(ok) / wall,
        "mean": statistics.fmean(lat) if lat else float("nan"),
        "p50": percentile(lat, 50),
        "p95": percentile(lat, 95),
        "p99": percentile(lat, 99),
        "queue_wait_p50": percentile([s.queue_wait for s in ok], 50),
        "first_step_p50": percentile([s.first_step for s in ok], 50),
        "first_step_p99": percentile([s.first_step for s in ok], 99),
    }


def row(label: str, mode: str, s: dict[str, float]) -> str:
    return (
        f"| {label} | {mode} | {s['ok']:.0f} / {s['errors']:.0f} | {s['throughput']:.2f} | "
        f"{s['mean']:.2f} | {s['p50']:.2f} | {s['p95']:.2f} | {s['p99']:.2f} | "
        f"{s['queue_wait_p50']:.2f} | {s['first_step_p50']:.2f} / {s['first_step_p99']:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=500, help="per mode and load")
    parser.add_argument("--loads", default="0.3,0.6,0.9")
    parser.add_argument("--mixed-requests", type=int, default=300, help="for the steps-differ run")
    parser.add_argument("--capacity-requests", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--cores", default="0,1", help="CPU cores of the static and the continuous server"
    )
    parser.add_argument(
        "--overlap", action="store_true", help="the continuous server with CASCADE_STAGE_OVERLAP"
    )
    args = parser.parse_args()
    continuous_settings = {**SETTINGS, "CASCADE_BATCHING": "continuous"}
    if args.overlap:
        continuous_settings["CASCADE_STAGE_OVERLAP"] = "true"
    loads = [float(x) for x in args.loads.split(",")]
    rng = random.Random(args.seed)
    header = (
        "| load | mode | 200 / other | throughput (req/s) | mean (s) | p50 (s) | p95 (s) | "
        "p99 (s) | queue wait p50 (s) | first step p50 / p99 (s) |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [f"Machine: {machine()}", ""]
    results: dict[tuple[str, str], dict[str, float]] = {}
    core_static, core_continuous = (int(c) for c in args.cores.split(","))
    with (
        ServerProcess({**SETTINGS, "CASCADE_BATCHING": "static"}, cpus={core_static}) as static,
        ServerProcess(continuous_settings, cpus={core_continuous}) as continuous,
    ):
        servers = {"static": static, "continuous": continuous}
        # Both servers saturated at once, as they will both be busy in the runs below: the
        # capacity is then measured under the same sharing of the machine.
        capacity_bodies = request_mix(rng, args.capacity_requests)

        async def saturated() -> list[float]:
            return await asyncio.gather(
                *(closed_loop(s.url, capacity_bodies, clients=8) for s in servers.values())
            )

        capacity, continuous_capacity = asyncio.run(saturated())
        lines += [
            f"Capacity (8 closed-loop clients each, {args.capacity_requests} requests, both servers "
            f"at once): static {capacity:.2f}, continuous {continuous_capacity:.2f} requests/s; "
            f"loads below are fractions of the static one. Settings {SETTINGS}"
            f"{', continuous with CASCADE_STAGE_OVERLAP=true' if args.overlap else ''}; static "
            f"server on core {core_static}, continuous on core {core_continuous}, run side by side",
            "",
        ]
        print(lines[-2], flush=True)
        lines.append(header)
        runs = [(f"{load:.0%}", load, False) for load in loads]
        middle = loads[len(loads) // 2]
        runs.append((f"{middle:.0%}, steps differ", middle, True))
        for label, load, mixed in runs:
            bodies = request_mix(rng, args.mixed_requests if mixed else args.requests, mixed)
            seed = args.seed + len(lines)

            async def both(bodies: list[dict] = bodies, seed: int = seed, load: float = load):
                return await asyncio.gather(
                    *(open_loop(s.url, bodies, load * capacity, seed) for s in servers.values())
                )

            for mode, (samples, wall) in zip(servers, asyncio.run(both()), strict=True):
                results[(label, mode)] = summary(samples, wall)
                lines.append(row(label, mode, results[(label, mode)]))
                print(lines[-1], flush=True)
            for server in servers.values():
                server.wait_idle(60)
    lines += ["", "Continuous / static, same arrivals:", ""]
    lines += ["| load | mean | p99 | throughput |", "|---|---|---|---|"]
    for label, _, _ in runs:
        s, c = results[(label, "static")], results[(label, "continuous")]
        lines.append(
            f"| {label} | {c['mean'] / s['mean']:.2f} | {c['p99'] / s['p99']:.2f} | "
            f"{c['throughput'] / s['throughput']:.2f} |"
        )
    text = "\n".join(lines)
    print("\n".join(lines[-(len(runs) + 2) :]))
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
