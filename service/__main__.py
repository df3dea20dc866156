"""``python -m service`` / ``cascade-serve``: read the command line and the CASCADE_* settings, check
them (service/preflight.py), then serve with uvicorn until SIGTERM/SIGINT.

A configuration mistake stops start-up before anything listens: one line per problem naming the
setting, exit status 2. ``--help`` imports nothing heavy (torch, the app) and exits 0.

On the first SIGTERM (or Ctrl+C) the server drains before uvicorn closes its listener: readiness
turns 503 and new requests get 503 while queued and running jobs finish (up to
CASCADE_DRAIN_TIMEOUT_S); then uvicorn shuts down and the process exits 0. A second signal stops
waiting for the drain.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import typing
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from service.settings import FLAGS, Settings, SettingsError, env_names

if TYPE_CHECKING:
    from service.engine import Pipeline
    from service.runtime import Runtime

logger = logging.getLogger("service")
PROG = "cascade-serve"
EXIT_CONFIG = 2  # a configuration mistake (argparse uses 2 for usage errors too)
METAVARS = {"weights_dir": "DIR", "torch_threads": "N"}
# Read by service/auth.py and service/access_log.py rather than Settings; no flag either.
OTHER_SERVER_VARIABLES = (
    "CASCADE_API_KEYS",
    "CASCADE_API_KEYS_FILE",
    "CASCADE_METRICS_REQUIRE_KEY",
    "CASCADE_LOG_PROMPTS",
)


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
    from service.app import create_app  # imports torch: not needed for --help

    app = create_app(settings, pipeline_factory)
    runtime: Runtime = app.state.runtime
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        lifespan="on",
        access_log=False,  # service/access_log.py writes one structured line per request
        # Idle keep-alive connections are closed after this long. It must outlast the idle timeout
        # of every client pool and proxy in front (httpx 5 s, nginx upstream 60 s): when both sides
        # time out together, a client can send on a connection the server is closing and get no
        # answer (bench/keepalive_race.py).
        timeout_keep_alive=settings.keep_alive_s,
        # After the drain, responses still being written get this long before uvicorn cancels them.
        timeout_graceful_shutdown=5,
    )
    server = DrainingServer(config, runtime, settings.drain_timeout_s)
    runtime.on_fatal = server.fail
    try:
        server.run()
    except SystemExit:  # uvicorn exits this way when it cannot bind (it logged why)
        if server.started:
            raise
    if not server.started and server.exit_code == 0:
        # Pre-flight found the port free, so another process took it since, or the lifespan failed.
        print(
            f"{PROG}: could not listen on {settings.host}:{settings.port} (see the error above); "
            "if the port is in use, choose another with --port or CASCADE_PORT",
            file=sys.stderr,
        )
        return 1
    return server.exit_code


# ---------------------------------------------------------------------------------- command line


def _choices(field: str) -> list[str] | None:
    """The allowed values of a Literal field (shown in --help; Settings validates them)."""
    annotation = Settings.model_fields[field].annotation
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return None


def build_parser() -> argparse.ArgumentParser:
    """One flag per entry of settings.FLAGS, each documented with its variable and default."""
    flagless = [v for v in env_names() if v.removeprefix("CASCADE_").lower() not in FLAGS]
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve Stable Cascade over HTTP (POST /v1/generate, /health/live, "
        "/health/ready, /metrics). With no weights it serves the built-in demo model.",
        epilog="Each flag has an equivalent CASCADE_* environment variable; given both, the flag "
        "wins. Variables without a flag: "
        + ", ".join([*flagless, *OTHER_SERVER_VARIABLES])
        + ". See README.md, Settings.",
    )
    for field, flag in FLAGS.items():
        info = Settings.model_fields[field]
        choices = _choices(field)
        default = "unset" if info.default is None else info.default
        parser.add_argument(
            flag,
            dest=field,
            default=None,  # absent: the variable, else the Settings default
            metavar="{" + ",".join(choices) + "}" if choices else METAVARS.get(field),
            help=f"{info.description} [CASCADE_{field.upper()}; default: {default}]",
        )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the configuration (settings, weights files, API keys, device, port) and "
        "exit: 0 when the server would start, 2 otherwise; loads no model",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)  # exits 0 on --help, 2 on a usage error
    flags = {f: getattr(args, f) for f in FLAGS if getattr(args, f) is not None}
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = Settings.from_env(flags=flags)
    except SettingsError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    from service.preflight import check

    problems = check(settings)
    for problem in problems:
        print(f"{PROG}: {problem}", file=sys.stderr)
    if problems:
        sys.exit(EXIT_CONFIG)
    if args.check:
        model = settings.weights_dir or "the built-in demo model"
        print(f"{PROG}: configuration OK ({model}, {settings.host}:{settings.port})")
        sys.exit(0)
    logging.getLogger().setLevel(settings.log_level.upper())
    sys.exit(serve(settings))


if __name__ == "__main__":
    main()
