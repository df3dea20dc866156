"""The outermost ASGI layer: request id, body size limit, and per-request metrics for every route.

Pure ASGI (no BaseHTTPMiddleware) so the ``receive`` channel reaches the route untouched after the
body: the generate route watches it for ``http.disconnect``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from starlette.datastructures import MutableHeaders

from service.metrics import Metrics
from service.openai_errors import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DISCARD_BODY_S = 0.5  # longest wait for the rest of an oversized body before answering 413
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestMiddleware:
    """Assigns the request id (a client's X-Request-ID if sane), refuses bodies over
    ``max_body_bytes`` (or their route's own limit, ``route_limits``) with 413 before anything
    parses them (by Content-Length, or by counting chunked bodies), and records cascade_requests_total / cascade_request_duration_seconds for
    every response, errors included."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_body_bytes: int,
        endpoints: frozenset[str],
        route_limits: Mapping[str, tuple[int, str]] | None = None,
    ) -> None:
        self.app, self.metrics, self.max_body_bytes, self.endpoints = (
            app,
            metrics,
            max_body_bytes,
            endpoints,
        )
        # path -> (largest body, the 413 message): the routes that take an image allow more
        # (service/upload_limits.py)
        self.route_limits = dict(route_limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        state = scope.setdefault("state", {})
        client_id = _header(scope, b"x-request-id")
        if state.get("request_id"):  # an outer layer (e.g. an access log) already chose one
            request_id = str(state["request_id"])
        elif client_id and _REQUEST_ID.fullmatch(client_id):
            request_id = client_id
        else:
            request_id = uuid.uuid4().hex
        state["request_id"], state["received_at"] = request_id, started
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        try:
            limit, message = self._limit(scope["path"])
            body_receive = await self._read_body(scope, receive, limit, state)
            if body_receive is None:
                state["outcome"] = "too_large"
                self.metrics.rejected.labels("too_large").inc()
                await self._send_too_large(scope["path"], request_id, message, send_with_id)
            else:
                await self.app(scope, body_receive, send_with_id)
        except Exception:
            state.setdefault("outcome", "internal_error")
            raise
        finally:
            outcome = state.get("outcome") or ("ok" if status < 400 else "error")
            endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
            self.metrics.observe_request(endpoint, status, outcome, time.monotonic() - started)

    def _limit(self, path: str) -> tuple[int, str]:
        if path in self.route_limits:
            return self.route_limits[path]
        return self.max_body_bytes, (
            f"the request body is larger than {self.max_body_bytes} bytes "
            "(CASCADE_MAX_BODY_BYTES); send a smaller body"
        )

    async def _read_body(
        self, scope: Scope, receive: Receive, limit: int, state: MutableMapping[str, Any]
    ) -> Receive | None:
        """Read the whole body (at most ``limit`` bytes); return a receive that replays it, or
        None if too big. Its size goes in ``state["body_bytes"]`` for the routes' own checks."""
        length = _header(scope, b"content-length")
        too_big = length is not None and length.isdigit() and int(length) > limit
        chunks: list[bytes] = []
        size, more, first = 0, True, None
        while more and not too_big:
            message = await receive()
            if message["type"] != "http.request":  # disconnected: let the app see it
                first = message
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            too_big = size > limit
        if too_big:
            await self._discard_rest(receive, more, size, limit)
            return None
        state["body_bytes"] = size
        replay: Message = first or {
            "type": "http.request",
            "body": b"".join(chunks),
            "more_body": False,
        }
        replayed = False

        async def replay_receive() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return replay
            return await receive()

        return replay_receive

    async def _discard_rest(self, receive: Receive, more: bool, size: int, limit: int) -> None:
        """Read (and drop) the rest of an oversized body, bounded in bytes and in time: a socket
        closed with unread data resets the connection and the client may lose the 413 answer, but
        a client that declares a big body and stalls must not hold the connection open."""
        limit = 4 * limit + 1_048_576
        until = time.monotonic() + DISCARD_BODY_S
        while more and size < limit:
            try:
                message = await asyncio.wait_for(receive(), until - time.monotonic())
            except TimeoutError:
                return
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)

    async def _send_too_large(self, path: str, request_id: str, message: str, send: Send) -> None:
        status, error = error_body(path, 413, "body_too_large", message, None, request_id)
        body = json.dumps(error).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
