"""A real server process for the benchmarks: ``python -m service`` (or another module) on a free loopback
port, with CASCADE_* settings from the caller, its output in a log file, and guaranteed clean-up.

Also reads what the benchmarks watch from outside: RSS from /proc/<pid>/status and /metrics samples."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from typing_extensions import Self

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``with ServerProcess({"CASCADE_MAX_QUEUE_SIZE": "16"}) as server: ...`` starts the server, waits
    until /health/ready is 200, and on exit kills it if it is still running."""

    def __init__(
        self,
        settings: dict[str, str] | None = None,
        module: str = "service",
        ready_timeout_s: float = 180,
        cpus: set[int] | None = None,
    ) -> None:
        """``cpus``: pin the server (all its threads) to these CPU cores."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.module = module
        self.ready_timeout_s = ready_timeout_s
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "CASCADE_HOST": "127.0.0.1",  # loopback only
            "CASCADE_PORT": str(self.port),
            "CASCADE_LOG_LEVEL": "warning",
            **(settings or {}),
        }
        self.env.pop("CASCADE_WEIGHTS_DIR", None)  # always the built-in model (no real weights)
        # Lives as long as the server process (its stdout/stderr); removed in __exit__.
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            "w+", prefix="cascade-bench-", suffix=".log", delete=False
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.cpus = cpus

    def __enter__(self) -> Self:
        self.proc = subprocess.Popen(
            # A module name (python -m service) or a script path (bench/fault_server.py).
            [sys.executable, self.module]
            if self.module.endswith(".py")
            else [sys.executable, "-m", self.module],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            # before exec, so that every thread the server starts inherits the affinity
            preexec_fn=(lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None,
        )
        until = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < until:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode} before ready:\n{self.log_tail()}"
                )
            try:
                if httpx.get(self.url + "/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"server not ready within {self.ready_timeout_s}s:\n{self.log_tail()}")

    def __exit__(self, exc_type: object, *exc: object) -> None:
        died = self.proc is not None and self.proc.poll() is not None
        self.kill()
        self.log.close()
        if exc_type is not None:  # keep the server's output for the post-mortem
            status = self.proc.returncode if died and self.proc is not None else "running"
            print(
                f"server (exit status {status}) log kept at {self.log.name}:\n{self.log_tail(40)}",
                file=sys.stderr,
            )
        else:
            Path(self.log.name).unlink(missing_ok=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_bytes(self) -> int:
        """Resident set size of the server process (VmRSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics, keyed by (sample name, sorted labels)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_idle(self, timeout_s: float = 15) -> tuple[float, float]:
        """Poll until cascade_queue_depth and cascade_inflight_jobs are both 0; return the last values."""
        until = time.monotonic() + timeout_s
        while True:
            samples = self.metrics()
            depth = samples.get(("cascade_queue_depth", ()), -1.0)
            inflight = samples.get(("cascade_inflight_jobs", ()), -1.0)
            if (depth == 0 and inflight == 0) or time.monotonic() > until:
                return depth, inflight
            time.sleep(0.2)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        if not self.log.closed:
            self.log.flush()
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-lines:])


def machine() -> str:
    """CPU model, core count and torch version, for the results tables."""
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    import torch

    load = os.getloadavg()
    return (
        f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
        f"load average at start {load[0]:.1f}"
    )


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]
