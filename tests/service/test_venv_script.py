"""scripts/_venv.sh and scripts/serve: install only when needed, never hand the server's arguments
to pip, and split TORCH_SPEC into pip arguments.

Offline and fast: the scripts run in a scratch copy of the project with a fake interpreter that
records every call instead of creating environments or installing anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CPU_TORCH = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"

# Stands in for python3 and for the environment's python: `-m venv DIR` makes DIR/bin/python (a
# copy of itself); everything else is appended to $FAKE_LOG, one call per line, arguments joined by
# '|'. `import torch` fails until that environment has had a `pip install torch...`.
FAKE_PYTHON = r"""#!/usr/bin/env bash
if [ "$1" = "--version" ]; then echo "Python 3.99.0"; exit 0; fi
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && exit 0
fi
torch_marker="$(dirname "$0")/../fake-torch"
if [ "$1" = "-c" ]; then
    if [ "$2" = "import torch" ]; then [ -e "$torch_marker" ]; exit; fi
    echo "torch 0.0.0+fake, CPU-only build"; exit 0
fi
case "$*" in "-m pip install --quiet torch"*) touch "$torch_marker" ;; esac
(IFS='|'; echo "$*") >>"$FAKE_LOG"
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A scratch checkout: the two scripts, pyproject.toml and the fake interpreter."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    for name in ("_venv.sh", "serve"):
        shutil.copy2(REPO / "scripts" / name, root / "scripts" / name)
    shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
    fake = tmp_path / "fake-python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    return root


def run(project: Path, command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    log = project.parent / "calls.log"
    log.touch()
    environ = {
        "PATH": os.environ["PATH"],
        "HOME": str(project.parent),
        "VENV_PYTHON": str(project.parent / "fake-python3"),
        "FAKE_LOG": str(log),
        **env,
    }
    return subprocess.run(
        command, cwd=project, env=environ, capture_output=True, text=True, timeout=60, check=False
    )


def calls(project: Path) -> list[list[str]]:
    """Every recorded call since the last one, as argument lists (the log is emptied)."""
    log = project.parent / "calls.log"
    lines = log.read_text().splitlines()
    log.write_text("")
    return [line.split("|") for line in lines]


def source_venv(project: Path, extras: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Source _venv.sh as scripts/test does, with these extras."""
    script = f'set -euo pipefail; VENV_EXTRAS="{extras}"; source scripts/_venv.sh'
    return run(project, ["bash", "-c", script, "_", "--stray-argument"], **env)


def test_first_start_installs_and_says_so_then_serves_with_the_arguments(project: Path) -> None:
    result = run(project, ["./scripts/serve", "--port", "8001"], TORCH_SPEC=CPU_TORCH)
    assert result.returncode == 0, result.stderr
    assert calls(project) == [
        ["-m", "pip", "install", "--quiet", "--upgrade", "pip"],
        ["-m", "pip", "install", "--quiet", *CPU_TORCH.split()],
        ["-m", "pip", "install", "--quiet", "-e", "."],
        ["-m", "service", "--port", "8001"],
    ]
    steps = [line for line in result.stderr.splitlines() if line.startswith("setup: ")]
    assert len(steps) == 5, result.stderr  # create, torch, torch installed, project, ready
    assert "creating the virtual environment" in steps[0] and CPU_TORCH in steps[1]
    assert "CPU-only build" in steps[2] and "pip install -e" in steps[3]
    stamp = (project / ".venv/.cascade-install-stamp").read_text()
    assert f"project {project}\n" in stamp and "\nextras \n" in stamp


def test_a_restart_with_nothing_changed_installs_nothing(project: Path) -> None:
    assert run(project, ["./scripts/serve"]).returncode == 0
    calls(project)
    result = run(project, ["./scripts/serve", "--port", "8001"])
    assert result.returncode == 0, result.stderr
    assert calls(project) == [["-m", "service", "--port", "8001"]]
    assert "setup:" not in result.stderr


def test_a_changed_pyproject_reinstalls_the_project_but_not_torch(project: Path) -> None:
    assert run(project, ["./scripts/serve"]).returncode == 0
    calls(project)
    with open(project / "pyproject.toml", "a") as f:
        f.write("\n# a new dependency would go here\n")
    result = run(project, ["./scripts/serve"])
    assert result.returncode == 0, result.stderr
    assert calls(project) == [
        ["-m", "pip", "install", "--quiet", "-e", "."],
        ["-m", "service"],
    ]
    assert "pyproject.toml (or the checkout) changed" in result.stderr
    assert run(project, ["./scripts/serve"]).returncode == 0
    assert calls(project) == [["-m", "service"]]


def test_extras_are_added_once_and_cover_a_plain_start(project: Path) -> None:
    assert run(project, ["./scripts/serve"]).returncode == 0
    calls(project)
    result = source_venv(project, "dev")
    assert result.returncode == 0, result.stderr
    assert calls(project) == [["-m", "pip", "install", "--quiet", "-e", ".[dev]"]]
    assert source_venv(project, "dev").returncode == 0
    assert run(project, ["./scripts/serve"]).returncode == 0
    assert calls(project) == [["-m", "service"]]  # the dev install has everything serve needs


def test_an_interrupted_install_is_redone(project: Path) -> None:
    assert run(project, ["./scripts/serve"]).returncode == 0
    (project / ".venv/.cascade-install-stamp").unlink()  # as after a failed or killed pip
    calls(project)
    assert run(project, ["./scripts/serve"]).returncode == 0
    assert ["-m", "pip", "install", "--quiet", "-e", "."] in calls(project)


def test_an_environment_made_for_another_checkout_is_reinstalled(
    project: Path, tmp_path: Path
) -> None:
    venv = str(tmp_path / "shared-venv")
    assert run(project, ["./scripts/serve"], VENV=venv).returncode == 0
    other = tmp_path / "other-checkout"
    shutil.copytree(project, other, ignore=shutil.ignore_patterns(".venv"))
    calls(project)
    result = run(other, ["./scripts/serve"], VENV=venv)
    assert result.returncode == 0, result.stderr
    assert calls(project) == [["-m", "pip", "install", "--quiet", "-e", "."], ["-m", "service"]]
