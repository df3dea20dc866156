"""Structured access log: one JSON line per HTTP request, as a pure ASGI middleware.

Each line carries ``request_id``, ``method``, ``path``, ``status``, ``duration_s``, ``client``, the
response ``bytes`` and ``ts`` (Unix time at the response). Prompts are personal data: they are logged only
with ``CASCADE_LOG_PROMPTS=true``, and then truncated to ``PROMPT_LOG_CHARS`` characters.

Request id: a valid incoming ``X-Request-ID`` (1-128 of ``A-Z a-z 0-9 . _ : -``, so it cannot inject
into logs or headers) is kept, anything else is replaced by a fresh uuid4 hex. The middleware rewrites
the request's ``X-Request-ID`` header to that value and puts it in ``scope["state"]["request_id"]``
(``request.state.request_id`` in a route), so the app and this log agree on one id. If the app still
answers with its own ``X-Request-ID``, that one is logged; otherwise the header is added to the response.

A request whose client went away before any response started is logged with status 499 (as nginx does).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]
ASGIApp = Callable[[Scope, Receive, Send], Any]

ACCESS_LOGGER = "service.access"
REQUEST_ID_HEADER = b"x-request-id"
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
PROMPT_LOG_CHARS = 200
# Only bodies up to this size are kept for prompt logging; larger ones are refused by the app anyway.
_MAX_BODY_FOR_PROMPT = 1 << 20
CLIENT_CLOSED_STATUS = 499
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def valid_request_id(value: object) -> bool:
    return isinstance(value, str) and _REQUEST_ID_RE.fullmatch(value) is not None


def new_request_id() -> str:
    return uuid.uuid4().hex


def log_prompts_from_env(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    raw = env.get("CASCADE_LOG_PROMPTS", "").strip().lower()
    if raw not in _TRUE | _FALSE:
        raise ValueError(f"CASCADE_LOG_PROMPTS={raw!r}: must be true or false")
    return raw in _TRUE


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _prompt_fields(body: bytes) -> dict[str, str]:
    """prompt / negative_prompt of a JSON body, truncated; {} if the body is not such JSON."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict):
        return {}
    fields = {}
    for name in ("prompt", "negative_prompt"):
        value = data.get(name)
        if isinstance(value, str) and value:
            fields[name] = _truncate(value, PROMPT_LOG_CHARS)
    return fields


class AccessLogMiddleware:
    """ASGI middleware writing one JSON line per HTTP request to ``logger`` at INFO."""

    def __init__(self, app: ASGIApp, logger: logging.Logger, log_prompts: bool = False) -> None:
        self.app = app
        self.logger = logger
        self.log_prompts = log_prompts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = scope.get("state")
        assigned = state.get("request_id") if isinstance(state, dict) else None
        if valid_request_id(assigned):
            request_id = assigned  # an outer layer already chose the id: log that one
        else:
            headers = list(scope.get("headers", ()))
            incoming = next((v for k, v in headers if k.lower() == REQUEST_ID_HEADER), None)
            incoming_text = incoming.decode("latin-1") if incoming is not None else None
            request_id = incoming_text if valid_request_id(incoming_text) else new_request_id()
            # Inner layers (service.middleware.RequestMiddleware) adopt a valid X-Request-ID, so rewriting
            # the header makes the whole stack use this one id.
            headers = [(k, v) for k, v in headers if k.lower() != REQUEST_ID_HEADER]
            headers.append((REQUEST_ID_HEADER, request_id.encode()))
            scope = dict(scope, headers=headers)
            scope["state"] = state if isinstance(state, dict) else {}
            scope["state"]["request_id"] = request_id

        status = CLIENT_CLOSED_STATUS
        sent_bytes = 0
        logged_id = request_id
        body = bytearray()
        keep_body = self.log_prompts and scope.get("method") == "POST"

        async def receive_wrapper() -> dict[str, Any]:
            message = await receive()
            if keep_body and message["type"] == "http.request" and len(body) < _MAX_BODY_FOR_PROMPT:
                body.extend(message.get("body", b"")[: _MAX_BODY_FOR_PROMPT - len(body)])
            return message

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status, sent_bytes, logged_id
            if message["type"] == "http.response.start":
                status = message["status"]
                out = list(message.get("headers", ()))
                app_id = next((v for k, v in out if k.lower() == REQUEST_ID_HEADER), None)
                if app_id is None:
                    out.append((REQUEST_ID_HEADER, request_id.encode()))
                    message = dict(message, headers=out)
                else:
                    logged_id = app_id.decode("latin-1")
            elif message["type"] == "http.response.body":
                sent_bytes += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive_wrapper if keep_body else receive, send_wrapper)
        except asyncio.CancelledError:
            raise  # the server cancelled the request (client gone): logged as 499 unless it was answered
        except BaseException:
            if status == CLIENT_CLOSED_STATUS:
                status = 500  # the app raised before answering; the server will send a 500
            raise
        finally:
            record: dict[str, Any] = {
                "ts": round(time.time(), 3),
                "request_id": logged_id,
                "method": scope.get("method"),
                "path": scope.get("path"),
                "status": status,
                "duration_s": round(time.perf_counter() - start, 6),
                "bytes": sent_bytes,
                "client": _client(scope),
            }
            if keep_body:
                record.update(_prompt_fields(bytes(body)))
            self.logger.info(json.dumps(record, ensure_ascii=False))


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    if not client:
        return None
    host, port = client[0], client[1] if len(client) > 1 else None
    return f"{host}:{port}" if port is not None else str(host)


def access_logger(stream: Any = None) -> logging.Logger:
    """The ``service.access`` logger, given a bare-message stream handler once (JSON lines must not get a
    second prefix from the root formatter), not propagating to the root logger."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(getattr(h, "_cascade_access", False) for h in logger.handlers):
        handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._cascade_access = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def install_access_log(
    app: Any, *, logger: logging.Logger | None = None, log_prompts: bool | None = None
) -> None:
    """Add AccessLogMiddleware to a Starlette/FastAPI ``app`` (before it starts). Call it after
    ``install_auth`` so that refused requests are logged too (the last middleware added is outermost).
    ``log_prompts`` defaults to CASCADE_LOG_PROMPTS."""
    app.add_middleware(
        AccessLogMiddleware,
        logger=logger if logger is not None else access_logger(),
        log_prompts=log_prompts_from_env() if log_prompts is None else log_prompts,
    )
