"""docker/healthcheck.py (the image's HEALTHCHECK): exit 0 only when the server answers 200."""

from __future__ import annotations

import subprocess
import sys

from tests.deploy.processes import Replica, free_port
from tests.deploy.tooling import REPO

SCRIPT = REPO / "docker" / "healthcheck.py"


def run_check(port: int | str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(SCRIPT)] + ([path] if path else [])
    return subprocess.run(
        argv,
        check=False,
        env={"CASCADE_PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_healthy_when_ready(replica: Replica) -> None:
    result = run_check(replica.port)  # default path: /health/ready
    assert result.returncode == 0, result.stdout + result.stderr
    assert "/health/ready -> 200" in result.stdout


def test_unhealthy_on_error_status_refused_connection_or_bad_port(replica: Replica) -> None:
    assert run_check(replica.port, "/no-such-route").returncode == 1
    refused = run_check(free_port())
    assert refused.returncode == 1 and "/health/ready" in refused.stdout
    assert run_check("eighty").returncode == 1
