"""Run ``python -m service`` as a subprocess with chosen flags and CASCADE_* settings (nothing
inherited from the calling environment's CASCADE_* variables)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECK_S = 120.0  # importing torch for the weights and device checks, on 2 shared cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_env(**settings: str) -> dict[str, str]:
    """This environment without CASCADE_*, plus ``settings`` (``port="1"`` -> CASCADE_PORT=1)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.update({f"CASCADE_{k.upper()}": v for k, v in settings.items()})
    return env


def run_service(*args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    """``python -m service ARGS`` to completion (a configuration mistake, --help or --check)."""
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT, env=service_env(**settings), capture_output=True, text=True, timeout=CHECK_S,
        check=False,
    )  # fmt: skip


def one_message(result: subprocess.CompletedProcess[str]) -> str:
    """The single line a configuration mistake prints; asserts exit status 2, no traceback and
    nothing else on either stream."""
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 2, output
    assert "Traceback" not in result.stderr and result.stdout == "", output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cascade-serve: "), output
    return lines[0]
