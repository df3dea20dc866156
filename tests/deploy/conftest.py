"""The fixture shared by the live deploy tests: one real replica (`python -m service`, tiny model, CPU)
kept for the whole session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.deploy.processes import Replica, start_replica, wait_ready


@pytest.fixture(scope="session")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    """A ready server on a free loopback port, shared by the live tests (they only send it traffic)."""
    proc, port = start_replica("replica-shared", tmp_path_factory.mktemp("replica"))
    try:
        wait_ready(proc, port)
        yield Replica(proc, port)
    finally:
        proc.stop()
