"""The torch thread count a server starts with (CASCADE_TORCH_THREADS, service.engine.set_torch_threads)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import cpu_features
from service.engine import set_torch_threads
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_unset_leaves_one_cpu_for_the_rest(restore_threads, monkeypatch, caplog) -> None:
    assert Settings().torch_threads is None
    monkeypatch.setattr(cpu_features, "available_cpus", lambda: 3)
    with caplog.at_level(logging.INFO, logger="service.engine"):
        set_torch_threads(None)
    assert torch.get_num_threads() == 2
    assert "2 CPU thread(s) of 3 available" in caplog.text
    monkeypatch.setattr(cpu_features, "available_cpus", lambda: 1)
    set_torch_threads(None)
    assert torch.get_num_threads() == 1


def test_a_set_value_wins(restore_threads, monkeypatch) -> None:
    monkeypatch.setattr(cpu_features, "available_cpus", lambda: 2)
    set_torch_threads(2)
    assert torch.get_num_threads() == 2


def spin_count(env: dict[str, str]) -> str:
    """The GOMP_SPINCOUNT libgomp runs with after ``import service.engine`` (which imports torch)."""
    code = "import service.engine, torch; torch.ones(64, 64) @ torch.ones(64, 64)"
    result = subprocess.run(
        [sys.executable, "-c", code], env={**env, "OMP_DISPLAY_ENV": "VERBOSE"},
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    counts = [line.split("=")[1].strip(" '") for line in result.stderr.splitlines() if "GOMP_SPINCOUNT" in line]
    assert len(counts) == 1, result.stderr
    return counts[0]


@pytest.mark.skipif(
    not (Path(torch.__file__).parent / "lib" / "libgomp.so.1").exists(), reason="torch without GNU libgomp"
)
def test_the_service_runs_openmp_with_passive_waits() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT)
    assert spin_count(env) == "0"  # PASSIVE: a waiting thread sleeps at once
    assert spin_count({**env, "OMP_WAIT_POLICY": "ACTIVE"}) != "0"  # an operator's choice is kept
