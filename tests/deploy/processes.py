"""Child processes for the live deploy tests: servers on loopback, always cleaned up.

Every process starts in its own session (process group), so stopping it also stops anything it forked
(nginx workers); `stop` escalates SIGTERM -> SIGKILL and never leaves a process behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.deploy.tooling import REPO, missing


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ManagedProcess:
    """A child process whose stdout+stderr go to a log file (read back for failure messages)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path = REPO,
    ) -> None:
        self.name, self.log_path = name, log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        self._log.flush()
        text = self.log_path.read_bytes().decode("utf-8", "replace")
        return text[-chars:]

    def signal(self, sig: int) -> None:
        """Send `sig` to the main process only (what docker/kubernetes do to PID 1's child)."""
        if self.alive():
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM the whole group, SIGKILL it after `grace_s`; return the exit code."""
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            self.wait(wait_s)
        # The leader may be gone while group members linger (e.g. nginx workers): kill the group anyway.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()
        return self.proc.poll()


@dataclass(frozen=True)
class Replica:
    """A running server process and its loopback port."""

    proc: ManagedProcess
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"


def wait_until(
    check: Callable[[], bool],
    timeout_s: float,
    what: str,
    proc: ManagedProcess | None = None,
    interval_s: float = 0.1,
) -> None:
    """Poll `check` until true; on timeout (or if `proc` dies) raise with the process log attached."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise AssertionError(
                f"{proc.name} exited ({proc.proc.returncode}) before {what}:\n{proc.log_tail()}"
            )
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(interval_s)
    tail = f"\n{proc.name} log:\n{proc.log_tail()}" if proc is not None else ""
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}{tail}")


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    return httpx.get(url, timeout=timeout_s).status_code == 200


def service_available() -> None:
    """The server package must exist to run a replica; in CI its absence is a failure."""
    if not (REPO / "service" / "__main__.py").exists():
        missing("`python -m service` (service/__main__.py)")


def service_env(port: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of a test replica: the built-in tiny model on the CPU, loopback only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    env.update(
        {
            "CASCADE_HOST": "127.0.0.1",
            "CASCADE_PORT": str(port),
            "CASCADE_DEVICE": "cpu",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            # Two cores are shared by both replicas and the test: one torch thread each.
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


def start_replica(
    name: str, tmp_dir: Path, extra_env: Mapping[str, str] | None = None
) -> tuple[ManagedProcess, int]:
    """Start `python -m service` (tiny model) on a free loopback port; returns before it is ready."""
    service_available()
    port = free_port()
    proc = ManagedProcess(
        name,
        [sys.executable, "-m", "service"],
        tmp_dir / f"{name}.log",
        env=service_env(port, extra_env),
    )
    return proc, port


# Loading and warming up the demo model takes ~5 s on an idle 2-core machine and has taken ~40 s with
# the cores shared; the bound is for a hang, not for a slow start.
READY_TIMEOUT_S = 300.0


def wait_ready(proc: ManagedProcess, port: int, timeout_s: float = READY_TIMEOUT_S) -> None:
    wait_until(
        lambda: http_ok(f"http://127.0.0.1:{port}/health/ready"),
        timeout_s,
        f"{proc.name} /health/ready",
        proc=proc,
        interval_s=0.25,
    )
