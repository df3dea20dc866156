"""CORS (service/cors.py): no headers unless CASCADE_CORS_ORIGINS is set; then preflights from an
allowed origin are answered before the API key check, other origins get nothing, and the refusals
of the inner layers (401, 413, 503) carry the headers a browser needs to read them."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from service.app import create_app
from service.settings import Settings

KEY = "cors-test-key"
ALLOWED = "https://app.example.com"
OTHER = "https://evil.example.net"


def _never_built(settings: Settings):
    raise AssertionError("the model is not loaded in these tests")


def _client(monkeypatch: pytest.MonkeyPatch, keys: str = KEY, **settings) -> TestClient:
    """The real app, model not loaded (no lifespan): a request that gets through is a 503."""
    monkeypatch.setenv("CASCADE_API_KEYS", keys)
    return TestClient(create_app(Settings(**settings), _never_built))


def _preflight(client: TestClient, origin: str, headers: str = "authorization,content-type"):
    return client.options(
        "/v1/generate",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": headers,
        },
    )


def _cors_headers(response) -> set[str]:
    return {name for name in response.headers if name.startswith("access-control-")}


@pytest.mark.parametrize("keys", ["", KEY])
def test_no_cors_headers_by_default(monkeypatch: pytest.MonkeyPatch, keys: str) -> None:
    client = _client(monkeypatch, keys)
    assert _cors_headers(_preflight(client, ALLOWED)) == set()
    assert _cors_headers(client.get("/health/live", headers={"Origin": ALLOWED})) == set()


def test_a_preflight_from_an_allowed_origin_needs_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(monkeypatch, cors_origins=(ALLOWED, "http://localhost:3000"))
    response = _preflight(client, ALLOWED, "authorization,content-type,accept,x-request-id")
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == ALLOWED
    methods = {m.strip() for m in response.headers["access-control-allow-methods"].split(",")}
    assert {"GET", "POST", "DELETE"} <= methods
    allowed = response.headers["access-control-allow-headers"].lower()
    assert all(h in allowed for h in ("authorization", "content-type", "accept", "x-request-id"))
    assert "access-control-allow-credentials" not in response.headers
    assert int(response.headers["access-control-max-age"]) > 0


def test_a_disallowed_origin_gets_no_cors_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(monkeypatch, cors_origins=(ALLOWED,))
    response = _preflight(client, OTHER)
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers
    refused = client.post("/v1/generate", json={"prompt": "x"}, headers={"Origin": OTHER})
    assert refused.status_code == 401 and "access-control-allow-origin" not in refused.headers


def test_refusals_carry_the_cors_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(monkeypatch, cors_origins=(ALLOWED,), max_body_bytes=1024)
    origin = {"Origin": ALLOWED}
    unauthorized = client.post("/v1/generate", json={"prompt": "x"}, headers=origin)
    assert unauthorized.status_code == 401
    assert unauthorized.headers["access-control-allow-origin"] == ALLOWED
    exposed = unauthorized.headers["access-control-expose-headers"].lower()
    for name in ("x-request-id", "x-seed", "retry-after", "x-cascade-warning", "server-timing"):
        assert name in exposed, name
    keyed = {**origin, "Authorization": f"Bearer {KEY}"}
    not_ready = client.post("/v1/generate", json={"prompt": "x"}, headers=keyed)
    assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "not_ready"
    assert not_ready.headers["access-control-allow-origin"] == ALLOWED
    too_large = client.post("/v1/generate", content=b"x" * 2048, headers=keyed)
    assert too_large.status_code == 413
    assert too_large.headers["access-control-allow-origin"] == ALLOWED


def test_any_origin(monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(monkeypatch, cors_origins=("*",))
    response = _preflight(client, OTHER)
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "*"
    live = client.get("/health/live", headers={"Origin": OTHER})
    assert live.headers["access-control-allow-origin"] == "*"


def test_the_image_routes_get_the_same_cors_handling(monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(
        monkeypatch, cors_origins=(ALLOWED,), max_body_bytes=1024, max_image_bytes=2048
    )
    origin = {"Origin": ALLOWED}
    keyed = {**origin, "Authorization": f"Bearer {KEY}"}
    form = {"files": {"image": ("in.png", b"\x89PNG\r\n\x1a\n", "image/png")}}
    for path, fields in (("/v1/images/edits", {"prompt": "x"}), ("/v1/images/variations", {})):
        preflight = client.options(
            path, headers={**origin, "Access-Control-Request-Method": "POST"}
        )
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"]
        for response, status in (
            (client.post(path, headers=origin, **form), 401),
            (client.post(path, headers=keyed, content=b"x" * 4096), 413),
            (client.post(path, headers=keyed, data=fields, **form), 503),
        ):
            assert response.status_code == status, (path, response.text)
            assert response.headers["access-control-allow-origin"] == ALLOWED
            assert "x-strength" in response.headers["access-control-expose-headers"].lower()
