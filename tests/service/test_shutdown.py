"""SIGTERM on a real server process: readiness and new requests turn 503 at once, queued and
running jobs still finish, then the process exits 0. Also: a bad CASCADE_ setting stops start-up
with a message."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import wait_until

ROOT = Path(__file__).resolve().parents[2]
START_S = 180.0  # importing torch and warming up on 2 shared cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.update({f"CASCADE_{k.upper()}": v for k, v in settings.items()})
    return env


@pytest.fixture
def slow_server() -> Iterator[tuple[subprocess.Popen[str], str]]:
    port = free_port()
    env = server_env(
        port=str(port), max_batch_images="1", drain_timeout_s="60", max_batch_wait_ms="1"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.service.slow_server", "0.15"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(url) or proc.poll() is not None, "server ready", timeout=START_S)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/health/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_sigterm_drains_queued_and_running_jobs_then_exits_0(
    slow_server: tuple[subprocess.Popen[str], str],
) -> None:
    proc, url = slow_server
    with ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(
                httpx.post,
                url + "/v1/generate",
                json={"prompt": f"job {i}", "seed": i},
                timeout=120,
            )
            for i in range(3)
        ]
        wait_until(
            lambda: httpx.get(url + "/health/ready").json()["inflight_jobs"] == 3,
            "3 jobs in flight",
        )
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(url + "/health/ready").status_code == 503, "readiness 503")
        ready = httpx.get(url + "/health/ready")
        assert ready.json()["status"] == "draining" and "retry-after" in ready.headers
        refused = httpx.post(url + "/v1/generate", json={"prompt": "too late"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        assert "retry-after" in refused.headers
        # Worded for a load-balanced deployment and for a single server alike.
        message = refused.json()["error"]["message"]
        assert "another replica" in message and "once restarted" in message
        alive = httpx.get(url + "/health/live")  # still alive, and saying the same as readiness
        assert alive.status_code == 200 and alive.json()["status"] == "draining"
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert sorted(r.json()["seed"] for r in responses) == [0, 1, 2]
    assert proc.wait(timeout=60) == 0
    output = proc.stdout.read() if proc.stdout else ""
    assert "draining" in output and "drained" in output


def test_bad_setting_stops_start_up_with_a_clear_message() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=ROOT, env=server_env(max_queue_size="lots", device="tpu"),
        capture_output=True, text=True, timeout=START_S, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert (
        "CASCADE_MAX_QUEUE_SIZE='lots'" in result.stderr and "CASCADE_DEVICE='tpu'" in result.stderr
    )
    assert time.monotonic() - started < START_S
