"""A real server for the reliability tests: create_app on the real tiny pipeline (random weights, CPU),
with tight size/step limits so that every valid request is cheap, served by uvicorn on a loopback port
in a background thread. Shared by the whole session (loading and warming up costs seconds)."""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from service.app import create_app
from service.settings import Settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Tiny defaults are 128 px, 6 prior / 4 decoder steps; the limits keep the worst valid request near that.
TIGHT_MAX_SIZE = 128
TIGHT_MAX_STEPS = 6
TIGHT_SETTINGS = {
    "max_queue_size": 64,
    "max_batch_images": 2,
    "max_batch_wait_ms": 2.0,
    "request_timeout_s": 60.0,
    "max_body_bytes": 16_384,
    "max_prompt_chars": 500,
    "drain_timeout_s": 5.0,
}


def tight_tiny_pipeline(settings: Settings):
    """The built-in tiny pipeline (real random weights, never mocked) with tighter request limits."""
    from models.tiny import build_tiny_pipeline

    pipeline = build_tiny_pipeline()
    pipeline.limits = dataclasses.replace(
        pipeline.limits, max_size=TIGHT_MAX_SIZE, max_steps=TIGHT_MAX_STEPS, max_num_images=2
    )
    return pipeline


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1:<free port> in a thread; ``stop`` shuts it down."""

    def __init__(self, app) -> None:
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self, ready_timeout_s: float = 120.0) -> LiveServer:
        self.thread.start()
        until = time.monotonic() + ready_timeout_s
        while time.monotonic() < until:
            try:
                if httpx.get(self.url + "/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server on {self.url} not ready within {ready_timeout_s}s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def start_server(**overrides) -> LiveServer:
    settings = Settings(**{**TIGHT_SETTINGS, **overrides})
    return LiveServer(create_app(settings, tight_tiny_pipeline)).start()


@pytest.fixture(scope="session")
def live_server() -> Iterator[LiveServer]:
    server = start_server()
    yield server
    server.stop()


@pytest.fixture
def client(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.url, timeout=30) as c:
        yield c
