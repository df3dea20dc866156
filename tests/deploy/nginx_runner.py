"""Run the shipped docker/nginx.conf with Debian's nginx on loopback, and read its JSON access log."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.deploy.processes import ManagedProcess, free_port, wait_until
from tests.deploy.rendering import render_nginx_conf
from tests.deploy.tooling import find_tool


@dataclass(frozen=True)
class LogEntry:
    """One line of the `cascade` log format: a client request and every upstream attempt for it."""

    end: float  # epoch seconds when the response was finished
    request_time: float
    method: str
    uri: str
    status: int  # what the client got
    attempts: list[tuple[str, str]]  # (upstream address, upstream status) in the order tried

    @property
    def start(self) -> float:
        return self.end - self.request_time

    @classmethod
    def parse(cls, line: str) -> LogEntry:
        raw = json.loads(line)
        # nginx separates attempts with ", " (and " : " across internal redirects such as error_page).
        addrs = [
            a.strip() for a in raw["upstream_addr"].replace(" : ", ", ").split(",") if a.strip()
        ]
        codes = [
            c.strip() for c in raw["upstream_status"].replace(" : ", ", ").split(",") if c.strip()
        ]
        codes += ["-"] * (len(addrs) - len(codes))
        return cls(
            float(raw["time"]),
            float(raw["request_time"]),
            raw["method"],
            raw["uri"],
            int(raw["status"]),
            list(zip(addrs, codes)),
        )


@dataclass
class Nginx:
    proc: ManagedProcess
    port: int
    dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> list[LogEntry]:
        path = self.dir / "access.log"
        if not path.exists():
            return []
        return [LogEntry.parse(line) for line in path.read_text().splitlines() if line.strip()]

    def error_log(self) -> str:
        path = self.dir / "error.log"
        return path.read_text()[-4000:] if path.exists() else ""


@contextmanager
def running_nginx(work_dir: Path, upstreams: list[str]) -> Iterator[Nginx]:
    """docker/nginx.conf with the replicas at `upstreams`, on a free port, stopped (whole group) on exit."""
    nginx_bin = find_tool("nginx")
    port = free_port()
    work_dir.mkdir(parents=True, exist_ok=True)
    conf = render_nginx_conf(work_dir, upstreams, port)
    # -e: the error log nginx uses before it has read the config (Debian's default is under /var/log).
    startup_log = str(work_dir / "startup-error.log")
    check = subprocess.run(
        [nginx_bin, "-t", "-e", startup_log, "-p", str(work_dir), "-c", str(conf)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, (
        f"nginx -t rejected the rendered docker/nginx.conf:\n{check.stderr}"
    )
    proc = ManagedProcess(
        "nginx",
        [nginx_bin, "-e", startup_log, "-p", str(work_dir), "-c", str(conf), "-g", "daemon off;"],
        work_dir / "nginx.out",
    )
    server = Nginx(proc, port, work_dir)
    try:
        wait_until(
            lambda: httpx.get(f"{server.url}/health/live", timeout=5).status_code == 200,
            60,
            "nginx to listen",
            proc=proc,
        )
        yield server
    finally:
        proc.stop(grace_s=5)
