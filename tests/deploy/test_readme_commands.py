"""The README's two commands work on a fresh clone with a fresh virtual environment.

The clone is of the committed HEAD (what a newcomer gets). Its own `.venv` is created from nothing by
`./scripts/test` (run on one small test file here, since the full suite is what is running this test), then
`./scripts/serve` reuses it, starts the server on the built-in model and answers a real generation. The
outer virtual environment is removed from PATH so nothing leaks in from it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.deploy.processes import free_port
from tests.deploy.tooling import REPO

pytestmark = pytest.mark.slow

SETUP_TIMEOUT_S = (
    900  # torch wheel + dependencies into a new venv: ~1 min here, more on a cold pip cache
)


def clean_env(tmp_path: Path) -> dict[str, str]:
    """The calling environment without the outer venv, so the clone must set up its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "VENV")}
    outer = os.environ.get("VIRTUAL_ENV") or str(Path(sys.executable).parent.parent)
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if p and not p.startswith(outer)
    )
    env["HOME"] = env.get("HOME", str(tmp_path))
    return env


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], check=False, capture_output=True
    ).returncode:
        pytest.skip("not a git checkout")
    dest = tmp_path_factory.mktemp("fresh") / "repo"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(dest)], check=True)
    return dest


def test_readme_names_both_commands() -> None:
    readme = (REPO / "README.md").read_text()
    assert "./scripts/serve" in readme and "./scripts/test" in readme
    assert (REPO / ".ci/run").read_text().strip().endswith("exec ./scripts/test")


def test_test_command_sets_up_a_fresh_clone_and_runs(clone: Path, tmp_path: Path) -> None:
    assert not (clone / ".venv").exists()
    run = subprocess.run(
        ["./scripts/test", "tests/models/test_schedule.py", "-q", "-p", "no:cacheprovider"],
        check=False,
        cwd=clone,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=SETUP_TIMEOUT_S,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout
    assert (clone / ".venv/bin/python").exists()


def test_serve_command_starts_the_built_in_model_and_generates(clone: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {**clean_env(tmp_path), "CASCADE_PORT": str(port), "CASCADE_TORCH_THREADS": "1"}
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        ["./scripts/serve"],
        cwd=clone,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.5)
        r = httpx.post(
            f"{base}/v1/generate", json={"prompt": "a red circle", "seed": 1}, timeout=120
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["data"]) == 1 and body["data"][0]["seed"] == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
