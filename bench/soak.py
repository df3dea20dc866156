"""Soak: thousands of requests against one server process (built-in model, loopback), sampling the server's
RSS (VmRSS from /proc/<pid>/status) every ``--every`` requests after a warm-up. Passes if RSS grows by
less than ``--max-growth`` (default 10%) from the first post-warm-up sample to the last, every request got
a 200, and the queue gauges end at 0.

The mix varies what could leak per request: both response formats (b64 JSON and raw PNG), 1-2 images,
three sizes (so three batch keys), random prompts and seeds, and one client in eight hanging up early.

Run: ``python bench/soak.py [--requests 3000] [--clients 8] [--max-seconds 900]``; writes ``--out``
(default docs/reliability-soak.md).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_process import ROOT, ServerProcess, machine, percentile

SIZES = (64, 96, 128)


def request_for(i: int, rng: random.Random) -> tuple[dict, dict[str, str], float]:
    """(body, headers, client timeout) of request ``i``."""
    size = SIZES[i % len(SIZES)]
    words = rng.choices(
        ["red", "fox", "castle", "rain", "neon", "forest", "晴れ", "🚀", "glass", "old"], k=8
    )
    body: dict = {
        "prompt": " ".join(words),
        "seed": rng.randrange(2**31),
        "width": size,
        "height": size,
    }
    headers: dict[str, str] = {}
    if i % 2:
        body["response_format"] = "png"
        headers["accept"] = "image/png"
    else:
        body["num_images"] = 1 + (i % 4 == 0)
    timeout = 0.02 if i % 8 == 5 else 60.0  # a client that gives up almost at once
    return body, headers, timeout


async def run(
    server: ServerProcess, total: int, clients: int, every: int, warmup: int, max_seconds: float
):
    rng = random.Random(0)
    counter = iter(range(total))
    kinds: Counter[str] = Counter()
    latencies: list[float] = []
    samples: list[tuple[int, float, int]] = []  # (requests done, seconds, rss bytes)
    done = 0
    started = time.monotonic()
    until = started + max_seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=server.url, limits=limits) as client:

        async def worker() -> None:
            nonlocal done
            for i in counter:
                if time.monotonic() > until:
                    return
                body, headers, timeout = request_for(i, rng)
                t0 = time.perf_counter()
                try:
                    r = await client.post(
                        "/v1/generate", json=body, headers=headers, timeout=timeout
                    )
                    kinds["ok" if r.status_code == 200 else f"{r.status_code}"] += 1
                    latencies.append(time.perf_counter() - t0)
                except httpx.TimeoutException:
                    kinds["abandoned" if timeout < 1 else "timeout"] += 1
                except httpx.TransportError as exc:
                    kinds[f"transport:{type(exc).__name__}"] += 1
                done += 1
                if done >= warmup and (done - warmup) % every == 0:
                    samples.append((done, time.monotonic() - started, server.rss_bytes()))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return kinds, latencies, samples, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--every", type=int, default=200, help="sample RSS every N requests after warm-up"
    )
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--max-growth", type=float, default=0.10)
    parser.add_argument("--max-seconds", type=float, default=900)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability-soak.md")
    parser.add_argument(
        "--omp-threads", type=int, default=None, help="OMP_NUM_THREADS for the server"
    )
    args = parser.parse_args()
    settings = {
        "CASCADE_MAX_QUEUE_SIZE": "64",
        "CASCADE_MAX_BATCH_IMAGES": "4",
        "CASCADE_MAX_BATCH_WAIT_MS": "10",
    }
    if args.omp_threads is not None:
        settings["OMP_NUM_THREADS"] = str(args.omp_threads)
    with ServerProcess(settings) as server:
        rss_start = server.rss_bytes()
        kinds, latencies, samples, elapsed = asyncio.run(
            run(server, args.requests, args.clients, args.every, args.warmup, args.max_seconds)
        )
        depth, inflight = server.wait_idle()
        rss_end = server.rss_bytes()
    lines = [
        "## Soak",
        "",
        f"Machine: {machine()}",
        "",
        f"Command: `python bench/soak.py {' '.join(sys.argv[1:])}`",
        "",
        (
            f"{sum(kinds.values())} requests in {elapsed:.0f} s by {args.clients} clients ({dict(kinds)}); "
            f"latency of answered requests p50 {percentile(latencies, 50):.3f} s, p99 {percentile(latencies, 99):.3f} s; "
            f"RSS after start-up {rss_start / 2**20:.1f} MiB, at the end {rss_end / 2**20:.1f} MiB; "
            f"queue depth / in-flight after: {depth:.0f} / {inflight:.0f}."
        ),
        "",
        "| requests done | seconds | RSS (MiB) | vs first sample |",
        "|---|---|---|---|",
    ]
    base = samples[0][2] if samples else 0
    for n, t, rss in samples:
        lines.append(f"| {n} | {t:.0f} | {rss / 2**20:.1f} | {(rss - base) / base:+.1%} |")
    growth = (samples[-1][2] - base) / base if len(samples) > 1 else float("nan")
    failures = []
    if not len(samples) > 1:
        failures.append("fewer than two RSS samples (raise --requests or --max-seconds)")
    elif not growth < args.max_growth:
        failures.append(f"RSS grew {growth:.1%} (limit {args.max_growth:.0%})")
    unexpected = {k: v for k, v in kinds.items() if k not in ("ok", "abandoned")}
    if unexpected:
        failures.append(f"unexpected outcomes {unexpected}")
    if depth != 0 or inflight != 0:
        failures.append(f"gauges not back to 0: depth {depth}, in-flight {inflight}")
    verdict = "PASS" if not failures else "FAIL: " + "; ".join(failures)
    lines += [
        "",
        f"RSS growth first -> last sample: {growth:+.1%} (limit {args.max_growth:.0%}). {verdict}",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
