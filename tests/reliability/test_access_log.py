"""Access log (service.access_log): one JSON line per request with the request id, method, path, status,
duration and client; X-Request-ID echoed when sane, generated otherwise; prompts only when enabled."""

from __future__ import annotations

import json
import logging
import re

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from service.access_log import PROMPT_LOG_CHARS, AccessLogMiddleware, install_access_log
from service.auth import AuthConfig, install_auth

HEX32 = re.compile(r"[0-9a-f]{32}")


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(json.loads(record.getMessage()))  # every line must be JSON


@pytest.fixture
def lines() -> Lines:
    logger = logging.getLogger("tests.reliability.access")
    handler = Lines()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)


async def _generate(request: Request) -> JSONResponse:
    try:
        body = await request.json()
    except ValueError:
        return JSONResponse({"error": {"code": "invalid_json"}}, status_code=400)
    return JSONResponse(
        {"seen_request_id": request.state.request_id, "n": len(body.get("prompt", ""))},
        status_code=200,
    )


async def _boom(request: Request) -> JSONResponse:
    return JSONResponse({"error": {"code": "x"}}, status_code=422)


def _client(lines: Lines, log_prompts: bool = False, with_auth: bool = False) -> TestClient:
    app = Starlette(
        routes=[Route("/v1/generate", _generate, methods=["POST"]), Route("/bad", _boom)]
    )
    if with_auth:
        install_auth(app, AuthConfig.from_keys(["secret-key-1"]))
    install_access_log(
        app, logger=logging.getLogger("tests.reliability.access"), log_prompts=log_prompts
    )
    return TestClient(app)


def test_request_id_echoed_when_valid_generated_otherwise(lines: Lines) -> None:
    client = _client(lines)
    response = client.post(
        "/v1/generate", json={"prompt": "a cat"}, headers={"X-Request-ID": "abc-123.x:y_z"}
    )
    assert response.headers["x-request-id"] == "abc-123.x:y_z"
    assert response.json()["seen_request_id"] == "abc-123.x:y_z"  # the app sees the same id
    for bad in ("", "has space", "a" * 129, "semi;colon", "new\tline", "ümlaut"):
        response = client.post(
            "/v1/generate", json={"prompt": "a"}, headers={"X-Request-ID": bad.encode("utf-8")}
        )
        generated = response.headers["x-request-id"]
        assert HEX32.fullmatch(generated), (bad, generated)
        assert response.json()["seen_request_id"] == generated
    response = client.post("/v1/generate", json={"prompt": "a"})
    assert HEX32.fullmatch(response.headers["x-request-id"])
    ids = [r["request_id"] for r in lines.records]
    assert ids[0] == "abc-123.x:y_z"
    assert len(set(ids)) == len(ids) == 8


def test_log_line_fields_and_no_prompt_by_default(lines: Lines) -> None:
    client = _client(lines)
    prompt = "a very private prompt about my neighbour"
    response = client.post(
        "/v1/generate", json={"prompt": prompt, "negative_prompt": "secret negative"}
    )
    client.get("/bad?q=1")
    first, second = lines.records
    assert set(first) >= {
        "ts",
        "request_id",
        "method",
        "path",
        "status",
        "duration_s",
        "client",
        "bytes",
    }
    assert first["request_id"] == response.headers["x-request-id"]
    assert (first["method"], first["path"], first["status"]) == ("POST", "/v1/generate", 200)
    assert 0 <= first["duration_s"] < 5
    assert first["client"].startswith("testclient")
    assert first["bytes"] == len(response.content)
    assert (second["method"], second["path"], second["status"]) == ("GET", "/bad", 422)
    assert "q=1" not in json.dumps(second)  # query strings may carry secrets too
    text = json.dumps(lines.records)
    assert "private" not in text and "secret negative" not in text and "prompt" not in text


def test_prompt_logged_truncated_only_when_enabled(lines: Lines) -> None:
    client = _client(lines, log_prompts=True)
    long_prompt = "ü" * (PROMPT_LOG_CHARS + 50)
    response = client.post(
        "/v1/generate", json={"prompt": long_prompt, "negative_prompt": "blurry"}
    )
    assert response.json()["n"] == len(long_prompt)  # the app still received the whole body
    record = lines.records[0]
    assert record["prompt"] == "ü" * PROMPT_LOG_CHARS + "…"
    assert record["negative_prompt"] == "blurry"
    client.post("/v1/generate", content=b"not json", headers={"content-type": "application/json"})
    assert lines.records[1]["status"] == 400
    assert "prompt" not in lines.records[1]  # unparsable body: logged without a prompt, no crash


def test_refused_requests_logged_with_their_id(lines: Lines) -> None:
    client = _client(lines, with_auth=True)
    response = client.post(
        "/v1/generate", json={"prompt": "x"}, headers={"X-Request-ID": "req-401"}
    )
    assert response.status_code == 401
    assert response.headers["x-request-id"] == "req-401"
    assert response.json()["error"]["request_id"] == "req-401"
    assert lines.records[-1]["status"] == 401 and lines.records[-1]["request_id"] == "req-401"


def test_reuses_an_id_an_outer_layer_assigned(lines: Lines) -> None:
    """Inside a layer that already set scope['state']['request_id'], that id is logged, not a new one."""
    logger = logging.getLogger("tests.reliability.access")

    async def inner(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = AccessLogMiddleware(inner, logger)
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    import asyncio

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/x",
        "headers": [],
        "state": {"request_id": "outer-1"},
    }
    asyncio.run(middleware(scope, receive, send))
    assert lines.records[-1]["request_id"] == "outer-1"
    assert (b"x-request-id", b"outer-1") in sent[0]["headers"]


def test_client_gone_before_any_response_logged_as_499(lines: Lines) -> None:
    import asyncio

    async def waits_for_disconnect(scope, receive, send) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass  # the client left: nothing is sent

    messages = iter(
        [{"type": "http.request", "body": b"{}", "more_body": False}, {"type": "http.disconnect"}]
    )

    async def receive() -> dict:
        return next(messages)

    async def send(message: dict) -> None:
        raise AssertionError("nothing may be sent")

    middleware = AccessLogMiddleware(
        waits_for_disconnect, logging.getLogger("tests.reliability.access")
    )
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/generate",
        "headers": [],
        "client": ("10.0.0.1", 5),
    }
    asyncio.run(middleware(scope, receive, send))
    record = lines.records[-1]
    assert (record["status"], record["client"], record["bytes"]) == (499, "10.0.0.1:5", 0)
