"""docker/nginx.conf, run by Debian's nginx on loopback in front of real servers (`python -m service`, tiny
model): load is spread over both replicas; SIGTERM to one mid-run loses no request (each is answered by
the drain, retried on the other replica, or refused with 503 + Retry-After); the draining replica stops
getting traffic; and 503 + Retry-After reaches clients both from replicas and from nginx itself."""

from __future__ import annotations

import http.server
import json
import math
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.deploy.nginx_runner import LogEntry, running_nginx
from tests.deploy.processes import Replica, free_port, start_replica, wait_ready, wait_until
from tests.deploy.rendering import (
    NGINX_CONF,
    REPLICA_HOSTS,
    nginx_replica_list,
    render_nginx_conf,
    render_nginx_main,
)
from tests.deploy.tooling import find_tool

SETUPS = ("one-gpu", "two-gpus")  # docker/replicas/<setup>.nginx.conf

CLIENTS = 8  # concurrent clients: enough that each replica always has work in flight
# The drain test waits for conditions, never for a time or a throughput: BEFORE_TERM answered
# requests, then admitted jobs on the replica, then its drain seen on /health/ready, then its exit,
# then AFTER_EXIT requests answered (and nginx's probe of the dead replica). WAIT_S only bounds each
# wait before it counts as a failure: generous, as a busy 2-core machine can be many times slower.
BEFORE_TERM = 12
INFLIGHT_AT_TERM = 3  # a running job and queued ones: work the drain must still finish
AFTER_EXIT = 10
WAIT_S = 240.0


def fail_timeout_s() -> float:
    """fail_timeout of the replica servers in the shipped replica lists (how long a failed replica
    stays out)."""
    values = {
        value
        for setup in SETUPS
        for value in re.findall(
            r"^\s*server\s+\S+.*\bfail_timeout=(\d+)s",
            nginx_replica_list(setup).read_text(),
            re.MULTILINE,
        )
    }
    assert len(values) == 1, f"expected one fail_timeout for all replicas, found {values}"
    return float(values.pop())


# --- nginx in front of stub upstreams: what exactly reaches the client ------------------------------


class _Always503(http.server.BaseHTTPRequestHandler):
    """An upstream that refuses everything the way a full/draining replica does."""

    hits: list[str]

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.hits.append(self.path)
        body = json.dumps({"error": {"code": "queue_full", "message": "stub is full"}}).encode()
        self.send_response(503)
        self.send_header("Retry-After", "7")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def stub_upstream(hits: list[str]) -> Iterator[str]:
    handler = type("Handler", (_Always503,), {"hits": hits})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_upstream_503_retry_after_passes_through_and_the_refusing_replica_is_skipped(
    tmp_path: Path,
) -> None:
    first_hits: list[str] = []
    second_hits: list[str] = []
    with (
        stub_upstream(first_hits) as first,
        stub_upstream(second_hits) as second,
        running_nginx(tmp_path / "nginx", [first, second]) as nginx,
    ):
        t_first = time.monotonic()
        r = httpx.post(f"{nginx.url}/v1/generate", json={"prompt": "x"}, timeout=10)
        # Tried on both replicas (a POST retried on 503), then the last replica's answer as is.
        assert (len(first_hits), len(second_hits)) == (1, 1), (
            "expected one retry on the other replica"
        )
        assert r.status_code == 503 and r.headers["retry-after"] == "7"
        assert r.json()["error"]["code"] == "queue_full"

        # The replica whose 503 was retried is out for fail_timeout: later requests skip it. Whatever
        # answers (the other replica, or nginx once no replica is left), the client gets 503 + Retry-After.
        for _ in range(3):
            r = httpx.post(f"{nginx.url}/v1/generate", json={"prompt": "x"}, timeout=10)
            assert r.status_code == 503 and r.headers["retry-after"].isdigit(), r.text
            assert r.json()["error"]["code"] in ("queue_full", "unavailable")
        # Within fail_timeout of its failure the replica gets nothing; after that, one probe per
        # fail_timeout (only possible if this loop ran slowly, on a busy machine).
        windows = math.floor((time.monotonic() - t_first) / fail_timeout_s())
        assert len(first_hits) <= 1 + windows, (
            f"a replica marked failed got {len(first_hits) - 1} requests within {windows + 1} "
            "fail_timeout window(s)"
        )
        assert len(second_hits) >= 2


def test_all_replicas_down_is_503_with_retry_after(tmp_path: Path) -> None:
    closed = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    with running_nginx(tmp_path / "nginx", closed) as nginx:
        for _ in range(2):
            r = httpx.post(f"{nginx.url}/v1/generate", json={"prompt": "x"}, timeout=10)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"].isdigit() and r.json()["error"]["code"] == "unavailable"
        assert httpx.get(f"{nginx.url}/metrics", timeout=5).status_code == 404


# --- nginx in front of two real replicas, one of which is stopped mid-run ----------------------------


@dataclass(frozen=True)
class ClientResult:
    start: float
    end: float
    status: int | None  # None: transport error (connection reset, timeout): a lost request
    retry_after: str | None
    error: str | None


def client_loop(url: str, stop: threading.Event, results: list[ClientResult], worker: int) -> None:
    # The timeout only catches a hang: a request queued behind others on a busy machine is slow, not lost.
    with httpx.Client(timeout=WAIT_S / 2) as client:
        n = 0
        while not stop.is_set():
            n += 1
            start = time.time()
            try:
                r = client.post(
                    f"{url}/v1/generate",
                    json={
                        "prompt": "a red circle on a blue background",
                        "seed": worker * 10_000 + n,
                    },
                )
                results.append(
                    ClientResult(
                        start, time.time(), r.status_code, r.headers.get("retry-after"), None
                    )
                )
            except httpx.HTTPError as exc:
                results.append(ClientResult(start, time.time(), None, None, repr(exc)))


def inflight_jobs(replica_url: str) -> float:
    """cascade_inflight_jobs of one replica: admitted jobs it has not answered yet."""
    text = httpx.get(f"{replica_url}/metrics", timeout=10).text
    match = re.search(r"^cascade_inflight_jobs (\S+)$", text, re.MULTILINE)
    assert match, "cascade_inflight_jobs missing from /metrics"
    return float(match.group(1))


def stopped_accepting(replica_url: str) -> bool:
    """True once the replica refuses new work: /health/ready says draining, or nothing listens."""
    try:
        r = httpx.get(f"{replica_url}/health/ready", timeout=10)
    except httpx.ConnectError:
        return True
    return r.status_code == 503 and r.json().get("status") == "draining"


def test_spreads_load_and_a_draining_replica_loses_nothing(
    tmp_path: Path, replica: Replica
) -> None:
    draining, port = start_replica(
        "replica-drained",
        tmp_path,
        # One image per batch: the jobs admitted before SIGTERM finish one after another, so the drain
        # lasts long enough for nginx to send it new requests (which it must refuse). The drain ends
        # when the queue is empty; the long timeout only keeps a slow machine from cutting it short.
        {"CASCADE_DRAIN_TIMEOUT_S": str(WAIT_S / 2), "CASCADE_MAX_BATCH_IMAGES": "1"},
    )
    a, b = f"127.0.0.1:{port}", replica.address
    results: list[ClientResult] = []
    stop = threading.Event()
    try:
        wait_ready(draining, port)
        with running_nginx(tmp_path / "nginx", [a, b]) as nginx:

            def generate_log() -> list[LogEntry]:
                return [e for e in nginx.log() if e.uri == "/v1/generate"]

            threads = [
                threading.Thread(
                    target=client_loop, args=(nginx.url, stop, results, i), daemon=True
                )
                for i in range(CLIENTS)
            ]
            for t in threads:
                t.start()
            try:
                wait_until(
                    lambda: len(generate_log()) >= BEFORE_TERM,
                    WAIT_S,
                    f"{BEFORE_TERM} requests answered through nginx",
                    proc=draining,
                )
                wait_until(
                    lambda: inflight_jobs(f"http://{a}") >= INFLIGHT_AT_TERM,
                    WAIT_S,
                    f"{INFLIGHT_AT_TERM} jobs in flight on the replica to be drained",
                    proc=draining,
                )
                t_term = time.time()
                draining.signal(signal.SIGTERM)
                # From here on the replica admits nothing new: every request that reaches nginx
                # later must be refused there (503 or connection refused) and retried.
                wait_until(lambda: stopped_accepting(f"http://{a}"), WAIT_S, "the replica to drain")
                t_draining = time.time()
                exit_code = draining.wait(timeout=WAIT_S)
                t_exit = time.time()

                def after_exit() -> list[LogEntry]:
                    return [e for e in generate_log() if e.start > t_exit]

                # Traffic after the exit, including nginx's next probe of the dead replica (once its
                # fail_timeout has passed): a refused connection, retried on the other replica.
                wait_until(
                    lambda: (
                        len(after_exit()) >= AFTER_EXIT
                        and any(addr == a for e in after_exit() for addr, _ in e.attempts)
                    ),
                    WAIT_S,
                    f"{AFTER_EXIT} requests after the exit and a probe of the exited replica",
                )
            finally:
                stop.set()
                for t in threads:
                    t.join(WAIT_S)
            # nginx writes a request's log line as it finishes it, possibly after the client has read
            # the response.
            wait_until(
                lambda: len(generate_log()) >= len(results), 30, "nginx to log every request"
            )
            log = generate_log()
            drained_log = draining.log_tail(20_000)
    finally:
        stop.set()
        draining.stop()

    statuses = Counter(r.status for r in results)
    summary = (
        f"{len(results)} requests: statuses {dict(statuses)}; SIGTERM at "
        f"+{t_term - min(r.start for r in results):.1f}s, draining seen {t_draining - t_term:.2f}s "
        f"later, exited {t_exit - t_term:.1f}s after SIGTERM with {exit_code}"
    )
    print(summary)

    # The replica drained and exited cleanly.
    assert exit_code == 0, f"{summary}\nreplica log:\n{drained_log[-3000:]}"

    # Every request is accounted for: answered 200, or refused with 503 + Retry-After; none lost.
    lost = [r for r in results if r.status is None]
    assert not lost, f"{summary}\nlost requests: {lost[:5]}"
    unexpected = [r for r in results if r.status not in (200, 503)]
    assert not unexpected, f"{summary}\nunexpected statuses: {unexpected[:5]}"
    assert all(r.retry_after and r.retry_after.isdigit() for r in results if r.status == 503), (
        summary
    )
    # A 503 is a clear answer, but none is due here: the surviving replica's queue (32) is never full
    # with 8 clients, so every 503 of the draining replica must have been retried there.
    assert statuses[503] == 0, f"{summary}: refusals of the draining replica reached clients"
    assert len(log) == len(results), (
        f"nginx logged {len(log)} generate requests, clients sent {len(results)}"
    )
    assert Counter(e.status for e in log) == statuses

    # Before the SIGTERM, least_conn spread the load over both replicas.
    before = Counter(e.attempts[-1][0] for e in log if e.end < t_term)
    total_before = sum(before.values())
    assert total_before >= BEFORE_TERM, f"{before}"
    for addr in (a, b):
        assert before[addr] >= 0.2 * total_before, (
            f"load not spread: {dict(before)} of {total_before}"
        )

    # The drain answered the work it had admitted: responses from the draining replica after SIGTERM.
    finished_by_drain = [e for e in log if e.attempts[-1] == (a, "200") and e.end > t_term]
    assert finished_by_drain, (
        f"{summary}\nno in-flight request was completed by the draining replica"
    )

    # Requests that arrived once the replica was draining were never served by it: each attempt there
    # was refused (503 while draining, 502 = connection refused once it exited) and retried.
    late_attempts = [
        (e, status) for e in log if e.start > t_draining for addr, status in e.attempts if addr == a
    ]
    assert all(status in ("503", "502") for _, status in late_attempts), late_attempts
    # nginx takes a failed replica out for fail_timeout and then probes it with one request: besides
    # the requests already on their way when the drain began (at most one per client), one attempt
    # per fail_timeout window.
    window = max(e.end for e in log) - t_draining
    allowed = CLIENTS + math.ceil(window / fail_timeout_s()) + 1
    after = [e for e in log if e.start > t_draining]
    assert len(late_attempts) <= allowed, (
        f"the draining replica kept getting traffic: {len(late_attempts)} attempts among {len(after)} "
        f"requests after the drain began (at most {allowed} expected with "
        f"fail_timeout={fail_timeout_s():.0f}s over {window:.0f}s)"
    )
    tried_after_term = Counter(st for e in after for addr, st in e.attempts if addr == a)
    print(
        f"completed by the drain after SIGTERM: {len(finished_by_drain)}; requests after the drain "
        f"began: {len(after)}, attempts at the draining replica: {dict(tried_after_term)} "
        "(503 = refused while draining, 502 = connection refused after exit; each retried)"
    )
    served_late = Counter(e.attempts[-1][0] for e in after if e.status == 200)
    assert set(served_late) == {b} and served_late[b] >= AFTER_EXIT, (
        f"requests after the drain began served by {served_late}"
    )
    probes_after_exit = [
        st for e in log if e.start > t_exit for addr, st in e.attempts if addr == a
    ]
    assert probes_after_exit and set(probes_after_exit) == {"502"}, probes_after_exit


def test_the_loopback_copy_differs_from_the_shipped_file_only_in_addresses_ports_paths(
    tmp_path: Path,
) -> None:
    conf = render_nginx_conf(tmp_path, ["127.0.0.1:1", "127.0.0.1:2"], 3)
    shipped, rendered = NGINX_CONF.read_text().splitlines(), conf.read_text().splitlines()
    assert len(shipped) == len(rendered)
    changed = [(old, new) for old, new in zip(shipped, rendered) if old != new]
    allowed = re.compile(r"\s*(include |listen |pid |access_log |error_log |\w+_temp_path )")
    assert changed and all(allowed.match(old) for old, _ in changed), changed

    shipped = nginx_replica_list("two-gpus").read_text().splitlines()
    rendered = (tmp_path / "cascade-replicas.conf").read_text().splitlines()
    changed = [(old, new) for old, new in zip(shipped, rendered) if old != new]
    assert len(shipped) == len(rendered) and len(changed) == len(REPLICA_HOSTS), changed


def test_nginx_accepts_the_config_with_each_replica_list(tmp_path: Path) -> None:
    """`nginx -t` on docker/nginx.conf with each setup's list, names mapped to loopback: the
    one-GPU list alone is a complete upstream too."""
    nginx_bin = find_tool("nginx")
    for setup in SETUPS:
        work = tmp_path / setup
        work.mkdir()
        listed = nginx_replica_list(setup)
        replicas = work / "cascade-replicas.conf"
        text = listed.read_text()
        names = re.findall(r"^server (cascade-\d+):8000 ", text, re.MULTILINE)
        assert names, f"{listed.name} lists no replica"
        for i, name in enumerate(names):
            text = text.replace(f"server {name}:8000 ", f"server 127.0.0.{i + 1}:8000 ")
        replicas.write_text(text)
        conf = render_nginx_main(work, replicas, free_port())
        check = subprocess.run(
            [nginx_bin, "-t", "-e", str(work / "startup.log"), "-p", str(work), "-c", str(conf)],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert check.returncode == 0, f"{setup}: nginx -t failed:\n{check.stderr}"
