"""Auth and access log on the real service app (service.app.create_app), wired the way app.py is to wire
them: install_auth before RequestMiddleware (inside it), install_access_log last (outermost). If app.py
already wires them, that wiring is what is tested. The model is not loaded (no lifespan): a request that
passes auth reaches the app and gets its 503 not_ready, which is enough to tell it was let through."""

from __future__ import annotations

import json
import logging

import pytest
from starlette.testclient import TestClient

from service.access_log import AccessLogMiddleware, install_access_log
from service.app import create_app
from service.auth import ApiKeyMiddleware, install_auth
from service.middleware import RequestMiddleware
from service.settings import Settings
from tests.reliability.conftest import TIGHT_SETTINGS
from tests.reliability.test_access_log import Lines

KEYS = ("wiring-key-one", "wiring-key-two")


def _never_built(settings: Settings):
    raise AssertionError("the model is not loaded in these tests")


def _wired_app(monkeypatch: pytest.MonkeyPatch, lines: Lines, **env: str):
    for name, value in {"CASCADE_API_KEYS": ",".join(KEYS), **env}.items():
        monkeypatch.setenv(name, value)
    logger = logging.getLogger("tests.reliability.wiring")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    app = create_app(Settings(**TIGHT_SETTINGS), _never_built)
    classes = [m.cls for m in app.user_middleware]  # outermost first
    if ApiKeyMiddleware not in classes:
        # What app.py is to do: install_auth(app) before add_middleware(RequestMiddleware, ...).
        request_mw = classes.index(RequestMiddleware)
        install_auth(app)
        app.user_middleware.insert(request_mw + 1, app.user_middleware.pop(0))
    if AccessLogMiddleware not in classes:
        install_access_log(app, logger=logger)
    else:  # app.py installed it: send its lines here too
        logging.getLogger("service.access").addHandler(lines)
    classes = [m.cls for m in app.user_middleware]
    assert (
        classes.index(AccessLogMiddleware)
        < classes.index(RequestMiddleware)
        < classes.index(ApiKeyMiddleware)
    )
    return app


@pytest.fixture
def lines():
    handler = Lines()
    yield handler
    logging.getLogger("tests.reliability.wiring").removeHandler(handler)
    logging.getLogger("service.access").removeHandler(handler)


def _metric(client: TestClient, line_start: str, headers: dict | None = None) -> float:
    text = client.get("/metrics", headers=headers or {}).text
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_unauthorized_on_the_real_app(monkeypatch: pytest.MonkeyPatch, lines: Lines) -> None:
    client = TestClient(_wired_app(monkeypatch, lines))
    response = client.post(
        "/v1/generate", json={"prompt": "a cat"}, headers={"X-Request-ID": "wire-1"}
    )
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.headers["x-request-id"] == "wire-1"
    assert response.json()["error"] == {
        "code": "unauthorized",
        "message": "missing API key: send 'Authorization: Bearer <key>'",
        "field": "Authorization",
        "request_id": "wire-1",
    }
    assert (
        client.post(
            "/v1/generate", json={"prompt": "a"}, headers={"Authorization": "Bearer nope"}
        ).status_code
        == 401
    )
    for key in KEYS:  # let through: the app itself answers (model not loaded -> 503 not_ready)
        passed = client.post(
            "/v1/generate", json={"prompt": "a"}, headers={"Authorization": f"Bearer {key}"}
        )
        assert passed.status_code == 503 and passed.json()["error"]["code"] == "not_ready"
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").status_code == 503  # open (not 401), just not ready
    assert _metric(client, 'cascade_rejected_requests_total{reason="unauthorized"}') == 2
    assert _metric(client, 'cascade_requests_total{endpoint="/v1/generate",status="401"}') == 2
    assert (
        _metric(
            client,
            'cascade_request_duration_seconds_count{endpoint="/v1/generate",outcome="unauthorized"}',
        )
        == 2
    )
    # The access log saw every request, with the ids the responses carried.
    assert [r["status"] for r in lines.records[:4]] == [401, 401, 503, 503]
    assert lines.records[0]["request_id"] == "wire-1"
    for key in KEYS:
        assert key not in json.dumps(lines.records)


def test_metrics_gate_on_the_real_app(monkeypatch: pytest.MonkeyPatch, lines: Lines) -> None:
    client = TestClient(_wired_app(monkeypatch, lines, CASCADE_METRICS_REQUIRE_KEY="true"))
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": f"Bearer {KEYS[1]}"}).status_code == 200
    assert client.get("/health/live").status_code == 200


def test_one_request_id_through_the_stack(monkeypatch: pytest.MonkeyPatch, lines: Lines) -> None:
    """The access log chooses the id; RequestMiddleware adopts it: header, error body and log agree."""
    client = TestClient(_wired_app(monkeypatch, lines))
    for sent in ({"X-Request-ID": "abc.123"}, {"X-Request-ID": "bad id!"}, {}):
        response = client.post(
            "/v1/generate", content=b"{", headers={"content-type": "application/json", **sent}
        )
        header = response.headers["x-request-id"]
        assert response.json()["error"]["request_id"] == header
        assert lines.records[-1]["request_id"] == header
        if sent.get("X-Request-ID") == "abc.123":
            assert header == "abc.123"
        else:
            assert len(header) == 32
