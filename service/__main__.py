"""``python -m service``: read CASCADE_* settings, then serve with uvicorn until SIGTERM/SIGINT.

On the first SIGTERM (or Ctrl+C) the server drains before uvicorn closes its listener: readiness
turns 503 and new requests get 503 while queued and running jobs finish (up to
CASCADE_DRAIN_TIMEOUT_S); then uvicorn shuts down and the process exits 0. A second signal stops
waiting for the drain.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from types import FrameType

import uvicorn

from service.app import create_app
from service.engine import Pipeline
from service.runtime import Runtime
from service.settings import Settings, SettingsError

logger = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose exit signals start a drain instead of closing the listener at once."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.runtime, self.drain_timeout_s = runtime, drain_timeout_s
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = False
        self._drain: asyncio.Task[None] | None = None  # kept referenced so it is not collected

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it after shutdown and the exit
        # status would be 128+15 instead of 0.
        if not self._drain_requested and self._loop is not None and not self.should_exit:
            self._drain_requested = True
            logger.info("received %s: draining", signal.Signals(sig).name)
            self._loop.call_soon_threadsafe(self._start_drain)
        elif not self.should_exit:
            self.should_exit = True
        else:
            self.force_exit = True

    def _start_drain(self) -> None:
        async def drain_then_exit() -> None:
            await self.runtime.drain(self.drain_timeout_s)
            self.should_exit = True

        self._drain = asyncio.create_task(drain_then_exit())

    def fail(self) -> None:
        """Model loading failed: stop with a non-zero exit status."""
        self.exit_code = 1
        self.should_exit = True


def serve(
    settings: Settings, pipeline_factory: Callable[[Settings], Pipeline] | None = None
) -> int:
    """Run one server process until it is told to stop; return its exit status."""
    app = create_app(settings, pipeline_factory)
    runtime: Runtime = app.state.runtime
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        lifespan="on",
        access_log=False,  # service/access_log.py writes one structured line per request
        # After the drain, responses still being written get this long before uvicorn cancels them.
        timeout_graceful_shutdown=5,
    )
    server = DrainingServer(config, runtime, settings.drain_timeout_s)
    runtime.on_fatal = server.fail
    server.run()
    if server.started is False and server.exit_code == 0:
        return 1  # could not bind, or the lifespan failed
    return server.exit_code


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"cascade-serve: {exc}", file=sys.stderr)
        sys.exit(2)
    logging.getLogger().setLevel(settings.log_level.upper())
    sys.exit(serve(settings))


if __name__ == "__main__":
    main()
