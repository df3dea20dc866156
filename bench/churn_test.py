"""Continuous batching under churn: many clients, a share hanging up mid-run, some cancelled by id.

    python bench/churn_test.py [--clients 64] [--requests 10000] [--batching continuous]

64 closed-loop clients against a small queue (as bench/load_test.py's load scenario). Of the requests,
10% hang up after 0.05-1.0 s (while queued or while their job steps) and 5% are cancelled with
``DELETE /v1/requests/{id}`` after 0.05-0.8 s. Every request must be accounted for: 200 with its PNG,
503 queue_full (with Retry-After; the client then waits 1 s), 504 deadline_exceeded, 409 cancelled
(cancelled ones only) or the deliberate hang-up; no 5xx, no transport error, no hang. At the end the
server's images in flight, queue and in-flight gauges are back to 0 and its resident memory has not
grown by 10% (sampled after the first 10% of the requests and at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import (
    Outcome,
    Report,
    body_for,
    classify,
    counts,
    latency_rows,
    post,
    retry_delay,
)
from server_process import ROOT, ServerProcess, machine

SETTINGS = {
    "CASCADE_MAX_QUEUE_SIZE": "16",
    "CASCADE_MAX_BATCH_IMAGES": "4",
    "CASCADE_REQUEST_TIMEOUT_S": "20",
    "CASCADE_RETRY_AFTER_S": "1",
}
ALLOWED = {
    "normal": {"ok", "503:queue_full", "504:deadline_exceeded"},
    "hangup": {"ok", "503:queue_full", "504:deadline_exceeded", "timeout"},
    "cancel": {"ok", "503:queue_full", "504:deadline_exceeded", "409:cancelled"},
}


async def run(
    url: str, clients: int, total: int, first: int = 0
) -> tuple[list[Outcome], Counter[int]]:
    """Requests ``first`` .. ``first + total - 1`` from ``clients`` closed-loop clients."""
    rng = random.Random(first)
    counter = itertools.count(first)
    outcomes: list[Outcome] = []
    deletes: Counter[int] = Counter()
    limits = httpx.Limits(max_connections=2 * clients, max_keepalive_connections=2 * clients)
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:

        async def cancel_later(request_id: str, after: float) -> None:
            await asyncio.sleep(after)
            r = await client.delete(f"/v1/requests/{request_id}", timeout=30)
            deletes[r.status_code] += 1

        async def worker() -> None:
            while (i := next(counter)) < first + total:
                roll = rng.random()
                if roll < 0.10:
                    outcome = await post(client, body_for(i), "hangup", rng.uniform(0.05, 1.0))
                elif roll < 0.15:
                    request_id = f"churn-{i}"
                    canceller = asyncio.create_task(
                        cancel_later(request_id, rng.uniform(0.05, 0.8))
                    )
                    started = time.perf_counter()
                    try:
                        response = await client.post(
                            "/v1/generate",
                            json=body_for(i),
                            headers={"X-Request-ID": request_id},
                            timeout=60,
                        )
                        outcome = classify(response, 1, time.perf_counter() - started, "cancel")
                    except httpx.TransportError as exc:
                        outcome = Outcome("transport_error", 0.0, "cancel", repr(exc))
                    await canceller
                else:
                    outcome = await post(client, body_for(i), "normal")
                outcomes.append(outcome)
                await asyncio.sleep(retry_delay(outcome))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return outcomes, deletes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--batching", default="continuous")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability-churn.md")
    args = parser.parse_args()
    settings = {**SETTINGS, "CASCADE_BATCHING": args.batching}
    report = Report(f"churn: {args.clients} clients, {args.requests} requests, {args.batching}")
    warm = args.requests // 10  # the baseline for memory is taken after these
    with ServerProcess(settings) as server:
        started = time.perf_counter()
        outcomes, deletes = asyncio.run(run(server.url, args.clients, warm))
        rss_before = server.rss_bytes()
        more, more_deletes = asyncio.run(run(server.url, args.clients, args.requests - warm, warm))
        outcomes, deletes = outcomes + more, deletes + more_deletes
        elapsed = time.perf_counter() - started
        depth, inflight = server.wait_idle(60)
        rss_after = server.rss_bytes()
        active = sum(
            server.metric("cascade_active_images", stage=s) for s in ("prior", "decoder", "vqgan")
        )
        cancelled = {
            c: server.metric("cascade_cancelled_total", cause=c)
            for c in ("disconnect", "request", "deadline")
        }
        five_xx = sum(
            v
            for (name, labels), v in server.metrics().items()
            if name == "cascade_requests_total"
            and dict(labels).get("status", "").startswith("5")
            and dict(labels).get("status") not in ("503", "504")
        )
        ready = httpx.get(server.url + "/health/ready", timeout=5).status_code
    wrong = [o for o in outcomes if o.kind not in ALLOWED[o.tag]]
    report.add(
        "server settings",
        ", ".join(f"{k.removeprefix('CASCADE_')}={v}" for k, v in settings.items()),
    )
    report.add("requests sent (each accounted for below)", len(outcomes))
    for tag in ("normal", "hangup", "cancel"):
        report.add(f"{tag} outcomes", counts([o for o in outcomes if o.tag == tag]))
    report.add("DELETE answers", ", ".join(f"{k} {v}" for k, v in sorted(deletes.items())))
    report.add(
        "server: cancelled by cause", ", ".join(f"{k} {v:.0f}" for k, v in cancelled.items())
    )
    report.add("server: 5xx other than 503/504", f"{five_xx:.0f}")
    report.add("elapsed (s)", f"{elapsed:.1f}")
    latency_rows(report, [o for o in outcomes if o.tag == "normal"])
    report.add(
        "resident memory after the first 10% / at the end (MB)",
        f"{rss_before / 1e6:.0f} / {rss_after / 1e6:.0f} ({rss_after / rss_before - 1:+.1%})",
    )
    report.add(
        "images in flight / queue depth / in-flight jobs after; /health/ready",
        f"{active:.0f} / {depth:.0f} / {inflight:.0f}; {ready}",
    )
    report.require(
        len(outcomes) == args.requests, f"{len(outcomes)} of {args.requests} accounted for"
    )
    report.require(
        not wrong,
        f"disallowed outcomes: {counts(wrong)}; e.g. {[(o.tag, o.kind, o.detail) for o in wrong[:3]]}",
    )
    report.require(five_xx == 0, f"{five_xx} 5xx responses")
    report.require(set(deletes) <= {200, 404}, f"DELETE answers {dict(deletes)}")
    report.require(
        cancelled["request"] > 0 and cancelled["disconnect"] > 0, "cancellations not exercised"
    )
    report.require(active == 0 and depth == 0 and inflight == 0, "server not idle afterwards")
    report.require(rss_after < rss_before * 1.10, "resident memory grew by 10% or more")
    report.require(ready == 200, "server not ready afterwards")
    text = f"## Churn\n\nMachine: {machine()}\n\nCommand: `python bench/churn_test.py {' '.join(sys.argv[1:])}`\n\n{report.markdown()}"
    print(text)
    args.out.write_text(text)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
