"""Load and fault scenarios against a real server process (built-in model, loopback only, bounded in time and
request count). Every request is accounted for; a scenario fails on any outcome it does not allow.

Scenarios (``--scenario``, default all):
- load:       N concurrent clients (default 64) in closed loop against a small queue. Allowed: 200 with
              the right number of PNGs, 503 queue_full with Retry-After (the client then waits that long,
              capped at 1 s), 504 deadline_exceeded. Zero connection errors, 5xx, client timeouts.
- disconnect: steady clients plus waves of clients that hang up after 0.05-1.5 s, i.e. while their job
              is queued or while its batch runs. Steady clients must all get 200; the server must count
              the disconnects, compute fewer images than were asked for, and return queue depth and
              in-flight gauges to 0.
- sigterm:    SIGTERM under load. Every request the server accepted gets 200 or 503 draining (with
              Retry-After); after the listener closes, new connections are refused (not an accepted
              request). Readiness turns 503; the process exits 0 within the drain timeout (+ uvicorn's 5 s).
- faults:     bench/fault_server.py (the real server, pipeline with prompt-triggered faults) under load:
              injected exceptions fail only their own batch (generation_failed), injected OOM fails only
              the marked request (its batch-mates succeed after the split retry), injected NaN fails only
              the marked request (non_finite_output). No connection errors; server ready afterwards.

Run: ``python bench/load_test.py [--scenario load] [--clients 64] [--requests 1500] [--duration 60]``.
Writes a markdown table to ``--out`` (default docs/reliability-load.md).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_process import ROOT, ServerProcess, machine, percentile

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLIENT_TIMEOUT_S = 60.0  # per request; a response slower than this counts as a hang
EXTRA_ENV: dict[str, str] = {}  # e.g. OMP_NUM_THREADS for the server, from --omp-threads


@dataclass
class Outcome:
    kind: str  # ok | 503:<code> | 504:<code> | <status>:<code> | connect_error | transport_error | timeout
    latency: float
    tag: str = ""  # what the client asked for (fault marker, steady/abandon)
    detail: str = ""


@dataclass
class Report:
    name: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def add(self, key: str, value: object) -> None:
        self.rows.append((key, str(value)))

    def require(self, ok: bool, message: str) -> None:
        if not ok:
            self.failures.append(message)

    @property
    def passed(self) -> bool:
        return not self.failures

    def markdown(self) -> str:
        lines = [
            f"### {self.name}: {'PASS' if self.passed else 'FAIL'}",
            "",
            "| measure | value |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v} |" for k, v in self.rows]
        lines += [f"- FAILED: {f}" for f in self.failures]
        return "\n".join(lines) + "\n"


def classify(response: httpx.Response, images: int, latency: float, tag: str) -> Outcome:
    if response.status_code == 200:
        try:
            data = response.json()["data"]
            pngs = [base64.b64decode(item["b64_json"]) for item in data]
            good = len(pngs) == images and all(p.startswith(PNG_SIGNATURE) for p in pngs)
        except (ValueError, KeyError, TypeError):
            good = False
        return Outcome("ok" if good else "bad_200", latency, tag)
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = "no_envelope"
    if response.status_code == 503 and "retry-after" not in response.headers:
        code += "_without_retry_after"
    return Outcome(f"{response.status_code}:{code}", latency, tag, response.text[:200])


async def post(
    client: httpx.AsyncClient, body: dict, tag: str = "", timeout_s: float = CLIENT_TIMEOUT_S
) -> Outcome:
    started = time.perf_counter()
    try:
        response = await client.post(
            "/v1/generate", json=body, timeout=httpx.Timeout(timeout_s, connect=5.0)
        )
    except httpx.ConnectError as exc:
        return Outcome("connect_error", time.perf_counter() - started, tag, repr(exc))
    except httpx.TimeoutException as exc:
        return Outcome("timeout", time.perf_counter() - started, tag, repr(exc))
    except httpx.TransportError as exc:
        return Outcome("transport_error", time.perf_counter() - started, tag, repr(exc))
    return classify(response, body.get("num_images", 1), time.perf_counter() - started, tag)


def retry_delay(outcome: Outcome, cap_s: float = 1.0) -> float:
    return cap_s if outcome.kind.startswith("503") else 0.0


def body_for(i: int, prompt: str | None = None, **extra: object) -> dict:
    return {"prompt": prompt or f"a lighthouse at dusk, variation {i}", "seed": i, **extra}


async def closed_loop(
    url: str,
    clients: int,
    total: int,
    duration_s: float,
    make: callable,
    stop: asyncio.Event | None = None,
) -> tuple[list[Outcome], float]:
    """``clients`` workers each send one request at a time until ``total`` requests, ``duration_s`` or
    ``stop``. Returns every outcome and the elapsed seconds."""
    counter = itertools.count()
    outcomes: list[Outcome] = []
    sent = 0
    until = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:

        async def worker() -> None:
            nonlocal sent
            while time.monotonic() < until and not (stop and stop.is_set()):
                i = next(counter)
                if i >= total:
                    return
                body, tag = make(i)
                sent += 1
                outcome = await post(client, body, tag)
                outcomes.append(outcome)
                if outcome.kind == "connect_error" and stop is not None:
                    return  # the listener is closed (shutdown scenario)
                await asyncio.sleep(retry_delay(outcome))

        await asyncio.gather(*(worker() for _ in range(clients)))
    if sent != len(outcomes):
        raise AssertionError(f"{sent} requests sent but {len(outcomes)} outcomes recorded")
    return outcomes, time.perf_counter() - started


def latency_rows(report: Report, outcomes: list[Outcome], label: str = "200") -> None:
    ok = [o.latency for o in outcomes if o.kind == "ok"]
    report.add(
        f"latency of {label} p50 / p95 / p99 / max (s)",
        " / ".join(f"{percentile(ok, q):.3f}" for q in (50, 95, 99, 100)),
    )


def server_latency(server: ServerProcess) -> str:
    """Server-side view of the 200s (arrival to response): how many, and how many took over 2 s / 10 s;
    tells a slow server from a client that was slow to read."""
    samples = server.metrics()

    def bucket(le: str) -> float:
        labels = (("endpoint", "/v1/generate"), ("le", le), ("outcome", "ok"))
        return samples.get(("cascade_request_duration_seconds_bucket", labels), 0.0)

    total = bucket("+Inf")
    return f"{total:.0f} answered, {total - bucket('2.0'):.0f} over 2 s, {total - bucket('10.0'):.0f} over 10 s"


def counts(outcomes: list[Outcome]) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(Counter(o.kind for o in outcomes).items()))


# ---------------------------------------------------------------------------------------------------------
def scenario_load(args: argparse.Namespace) -> Report:
    report = Report(f"load: {args.clients} concurrent clients")
    settings = {
        "CASCADE_MAX_QUEUE_SIZE": "16",
        "CASCADE_MAX_BATCH_IMAGES": "4",
        "CASCADE_MAX_BATCH_WAIT_MS": "10",
        "CASCADE_REQUEST_TIMEOUT_S": "20",
        "CASCADE_RETRY_AFTER_S": "1",
    }
    with ServerProcess({**settings, **EXTRA_ENV}) as server:
        outcomes, elapsed = asyncio.run(
            closed_loop(
                server.url, args.clients, args.requests, args.duration, lambda i: (body_for(i), "")
            )
        )
        depth, inflight = server.wait_idle()
        server_side = server_latency(server)
        batches = server.metric("cascade_batches_total", outcome="ok")
        images = server.metric("cascade_images_generated_total")
    kinds = Counter(o.kind for o in outcomes)
    allowed = {"ok", "503:queue_full", "504:deadline_exceeded"}
    ok = kinds["ok"]
    report.add(
        "server settings",
        ", ".join(f"{k.removeprefix('CASCADE_')}={v}" for k, v in settings.items()),
    )
    report.add("requests sent (each accounted for below)", len(outcomes))
    report.add("outcomes", counts(outcomes))
    report.add("elapsed (s)", f"{elapsed:.1f}")
    report.add("throughput (200 responses/s)", f"{ok / elapsed:.2f}")
    report.add("rejection rate (503)", f"{kinds['503:queue_full'] / max(1, len(outcomes)):.1%}")
    latency_rows(report, outcomes)
    report.add("server-side durations of 200s", server_side)
    report.add("mean batch size (images)", f"{images / batches:.2f}" if batches else "-")
    report.add("queue depth / in-flight after", f"{depth:.0f} / {inflight:.0f}")
    report.require(ok > 0, "no request succeeded")
    report.require(
        set(kinds) <= allowed,
        f"disallowed outcomes: {counts([o for o in outcomes if o.kind not in allowed])}",
    )
    report.require(
        depth == 0 and inflight == 0, f"gauges not back to 0: depth {depth}, in-flight {inflight}"
    )
    return report


# ---------------------------------------------------------------------------------------------------------
async def _disconnect_run(
    url: str, duration_s: float, waves: int, per_wave: int
) -> tuple[list[Outcome], list[Outcome]]:
    rng = random.Random(0)
    steady_task = asyncio.create_task(
        closed_loop(url, 8, 10**9, duration_s, lambda i: (body_for(i), "steady"))
    )
    abandoned: list[Outcome] = []
    # One connection per request in flight; a request that times out has its connection closed by httpx
    # (a half-read response cannot be reused), so the server sees the disconnect. (One client for all:
    # building a client per request costs an SSL context each and stalls this event loop.)
    limits = httpx.Limits(max_connections=per_wave, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:

        async def abandon(i: int) -> None:
            body = body_for(
                10**6 + i, width=256, height=256
            )  # slower batches: more hang-ups mid-batch
            abandoned.append(await post(client, body, "abandon", timeout_s=rng.uniform(0.05, 1.5)))

        for wave in range(waves):
            await asyncio.gather(*(abandon(wave * per_wave + j) for j in range(per_wave)))
            await asyncio.sleep(0.5)
    steady, _ = await steady_task  # the steady clients keep going for the whole duration
    return steady, abandoned


def scenario_disconnect(args: argparse.Namespace) -> Report:
    report = Report("client disconnects mid-queue and mid-batch")
    settings = {
        "CASCADE_MAX_QUEUE_SIZE": "256",
        "CASCADE_MAX_BATCH_IMAGES": "4",
        "CASCADE_MAX_BATCH_WAIT_MS": "20",
    }
    waves, per_wave = 4, 40
    with ServerProcess({**settings, **EXTRA_ENV}) as server:
        images_before = server.metric("cascade_images_generated_total")
        steady, abandoned = asyncio.run(_disconnect_run(server.url, args.duration, waves, per_wave))
        depth, inflight = server.wait_idle()
        server_side = server_latency(server)
        disconnected = server.metric("cascade_rejected_requests_total", reason="disconnected")
        images = server.metric("cascade_images_generated_total") - images_before
        ready = httpx.get(server.url + "/health/ready", timeout=5).status_code
    steady_ok = sum(o.kind == "ok" for o in steady)
    report.add(
        "steady clients: latency of 200 p50 / max (s)",
        " / ".join(
            f"{percentile([o.latency for o in steady if o.kind == 'ok'], q):.2f}" for q in (50, 100)
        ),
    )
    gone = sum(o.kind == "timeout" for o in abandoned)
    answered = sum(o.kind == "ok" for o in abandoned)
    asked = len(steady) + len(abandoned)
    report.add("server-side durations of 200s", server_side)
    report.add(
        "abandoning clients (waves x size, client timeout 0.05-1.5 s, 256 px)",
        f"{waves} x {per_wave}",
    )
    report.add("abandoning clients: hung up / answered before hanging up", f"{gone} / {answered}")
    report.add("steady clients (8, 128 px) outcomes", counts(steady))
    report.add(
        "server: cascade_rejected_requests_total{reason=disconnected}", f"{disconnected:.0f}"
    )
    report.add("images asked for / computed", f"{asked} / {images:.0f}")
    report.add(
        "computed but discarded (hung up mid-batch), at most",
        f"{max(0.0, images - steady_ok - answered):.0f}",
    )
    report.add(
        "queue depth / in-flight after; /health/ready", f"{depth:.0f} / {inflight:.0f}; {ready}"
    )
    report.require(
        steady_ok == len(steady) and steady_ok > 0, f"steady clients affected: {counts(steady)}"
    )
    report.require(
        {o.kind for o in abandoned} <= {"ok", "timeout"}, f"abandoners: {counts(abandoned)}"
    )
    report.require(gone > 0 and disconnected > 0, "no disconnect was exercised or counted")
    report.require(images < asked, "every abandoned job was computed anyway (none skipped)")
    report.require(
        depth == 0 and inflight == 0, f"gauges not back to 0: depth {depth}, in-flight {inflight}"
    )
    report.require(ready == 200, "server not ready after the disconnects")
    return report


# ---------------------------------------------------------------------------------------------------------
async def _sigterm_run(
    server: ServerProcess, clients: int, after_s: float
) -> tuple[list[Outcome], float | None, float]:
    stop = asyncio.Event()
    load = asyncio.create_task(
        closed_loop(server.url, clients, 10**9, 120, lambda i: (body_for(i), ""), stop)
    )
    await asyncio.sleep(after_s)
    sent_at = time.monotonic()
    server.proc.send_signal(15)  # SIGTERM
    not_ready_after: float | None = None
    async with httpx.AsyncClient(base_url=server.url) as probe:
        while server.proc.poll() is None and time.monotonic() - sent_at < 60:
            try:
                r = await probe.get("/health/ready", timeout=2)
                if r.status_code == 503 and not_ready_after is None:
                    not_ready_after = time.monotonic() - sent_at
            except httpx.TransportError:
                break
            await asyncio.sleep(0.05)
    outcomes, _ = await load
    stop.set()
    return outcomes, not_ready_after, sent_at


def scenario_sigterm(args: argparse.Namespace) -> Report:
    drain = 15.0
    report = Report("SIGTERM under load")
    settings = {
        "CASCADE_MAX_QUEUE_SIZE": "32",
        "CASCADE_MAX_BATCH_IMAGES": "4",
        "CASCADE_DRAIN_TIMEOUT_S": str(drain),
        "CASCADE_RETRY_AFTER_S": "1",
    }
    with ServerProcess({**settings, **EXTRA_ENV}) as server:
        outcomes, not_ready_after, sent_at = asyncio.run(_sigterm_run(server, 32, 3.0))
        try:
            code = server.proc.wait(drain + 10)
        except subprocess.TimeoutExpired:
            code = None
        exit_s = time.monotonic() - sent_at
        log = server.log_tail(200)
    kinds = Counter(o.kind for o in outcomes)
    allowed = {"ok", "503:draining", "503:queue_full", "connect_error"}
    report.add("clients / drain timeout (s)", f"32 / {drain:.0f}")
    report.add("outcomes", counts(outcomes))
    report.add(
        "readiness 503 after SIGTERM (s)",
        f"{not_ready_after:.2f}" if not_ready_after is not None else "never seen",
    )
    report.add("exit status / seconds from SIGTERM to exit", f"{code} / {exit_s:.1f}")
    report.require(
        set(kinds) <= allowed,
        f"disallowed outcomes: {counts([o for o in outcomes if o.kind not in allowed])}",
    )
    report.require(
        kinds["ok"] > 0 and kinds["503:draining"] + kinds["connect_error"] > 0,
        "shutdown not exercised",
    )
    report.require(code == 0, f"exit status {code}")
    report.require(
        exit_s <= drain + 6, f"exit took {exit_s:.1f}s (drain timeout {drain}s + 5s grace)"
    )
    report.require(not_ready_after is not None, "readiness never turned 503 during the drain")
    report.require("Traceback" not in log, "traceback in the server log:\n" + log[-2000:])
    return report


# ---------------------------------------------------------------------------------------------------------
FAULT_EVERY = 20  # of every 20 requests: one error, one OOM, one NaN


def _fault_body(i: int) -> tuple[dict, str]:
    marker = {0: "inject:error", 7: "inject:oom", 13: "inject:nan"}.get(i % FAULT_EVERY, "")
    return body_for(i, prompt=f"fault test {i} {marker}".strip()), marker


def scenario_faults(args: argparse.Namespace) -> Report:
    report = Report("injected pipeline failures under concurrent load")
    max_batch = 4
    settings = {
        "CASCADE_MAX_QUEUE_SIZE": "64",
        "CASCADE_MAX_BATCH_IMAGES": str(max_batch),
        "CASCADE_MAX_BATCH_WAIT_MS": "20",
    }
    total = min(args.requests, 400)
    with ServerProcess({**settings, **EXTRA_ENV}, module="bench/fault_server.py") as server:
        outcomes, elapsed = asyncio.run(
            closed_loop(server.url, 32, total, args.duration, _fault_body)
        )
        depth, inflight = server.wait_idle()
        batches = {
            k: server.metric("cascade_batches_total", outcome=k) for k in ("ok", "error", "oom")
        }
        ready = httpx.get(server.url + "/health/ready", timeout=5).status_code
    # generation_failed is also the answer for any request that shared a batch with an injected error
    # (a failing batch fails its own jobs); the count of those is bounded below.
    expected = {
        "inject:error": {"500:generation_failed"},
        "inject:oom": {"500:gpu_out_of_memory", "500:generation_failed"},
        "inject:nan": {"500:non_finite_output", "500:generation_failed"},
        "": {"ok", "500:generation_failed"},
    }
    wrong = [o for o in outcomes if o.kind not in expected[o.tag]]
    collateral = sum(
        o.tag != "inject:error" and o.kind == "500:generation_failed" for o in outcomes
    )
    errors = sum(o.tag == "inject:error" for o in outcomes)
    for tag in ("", "inject:error", "inject:oom", "inject:nan"):
        mine = [o for o in outcomes if o.tag == tag]
        report.add(f"requests marked '{tag or 'none'}'", counts(mine))
    report.add(
        "batch-mates of an injected error that failed with it (bound: errors x 3)",
        f"{collateral} (bound {errors * (max_batch - 1)})",
    )
    report.add("elapsed (s)", f"{elapsed:.1f}")
    report.add(
        "batches ok / error / oom (server)",
        " / ".join(f"{batches[k]:.0f}" for k in ("ok", "error", "oom")),
    )
    report.add(
        "queue depth / in-flight after; /health/ready", f"{depth:.0f} / {inflight:.0f}; {ready}"
    )
    report.require(len(outcomes) == total, f"{len(outcomes)} of {total} requests answered")
    report.require(
        not wrong,
        f"unexpected outcomes: {counts(wrong)}; e.g. {[(o.tag, o.kind, o.detail) for o in wrong[:3]]}",
    )
    report.require(
        collateral <= errors * (max_batch - 1),
        f"{collateral} unmarked failures for {errors} injected errors",
    )
    report.require(batches["oom"] > 0 and batches["error"] > 0, "faults not exercised")
    report.require(
        depth == 0 and inflight == 0 and ready == 200, "server not idle and ready afterwards"
    )
    return report


SCENARIOS = {
    "load": scenario_load,
    "disconnect": scenario_disconnect,
    "sigterm": scenario_sigterm,
    "faults": scenario_faults,
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=1500, help="upper bound per scenario")
    parser.add_argument(
        "--duration", type=float, default=60.0, help="seconds, upper bound per scenario"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability-load.md")
    parser.add_argument(
        "--batching", default=None, help="CASCADE_BATCHING for the server (default: the server's)"
    )
    parser.add_argument(
        "--omp-threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS for the server (torch intra-op threads); unset: torch's default (all cores)",
    )
    args = parser.parse_args()
    if args.omp_threads is not None:
        EXTRA_ENV["OMP_NUM_THREADS"] = str(args.omp_threads)
    if args.batching is not None:
        EXTRA_ENV["CASCADE_BATCHING"] = args.batching
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    header = (
        f"## Load and fault scenarios\n\nMachine: {machine()}\n\nCommand: `python bench/load_test.py "
        + " ".join(sys.argv[1:])
        + "`\n"
    )
    print(header)
    reports = []
    for name in names:
        started = time.perf_counter()
        report = SCENARIOS[name](args)
        report.add("scenario wall time (s)", f"{time.perf_counter() - started:.1f}")
        print(report.markdown(), flush=True)
        reports.append(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + "\n" + "\n".join(r.markdown() for r in reports))
    print(f"wrote {args.out}")
    return 0 if all(r.passed for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
