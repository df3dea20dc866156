"""API keys (service.auth): 401 envelope without / with a wrong key, a message saying what is wrong with
a malformed Authorization header (never repeating it), every configured key accepted (env and file), probes
open, /metrics gated only on request, every key compared with hmac.compare_digest."""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from service import auth
from service.auth import AuthConfig, AuthConfigError, install_auth

KEYS = ("k-alpha-0123456789", "k-beta-abcdefghij", "k-gamma-ZYXWVU")


async def _ok(request: Request) -> JSONResponse:
    return JSONResponse({"path": request.url.path})


async def _metrics(request: Request) -> PlainTextResponse:
    return PlainTextResponse("cascade_ready 1\n")


def _app(environ: dict[str, str], rejected: list[int] | None = None) -> TestClient:
    app = Starlette(
        routes=[
            Route("/v1/generate", _ok, methods=["POST"]),
            Route("/health/live", _ok),
            Route("/health/ready", _ok),
            Route("/metrics", _metrics),
            Route("/openapi.json", _ok),
            Route("/v1/other", _ok),
        ]
    )
    on_reject = (lambda: rejected.append(1)) if rejected is not None else None
    install_auth(app, AuthConfig.from_env(environ), on_reject=on_reject)
    return TestClient(app)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _assert_401(response, message_part: str) -> None:
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "unauthorized"
    assert message_part in error["message"]
    for key in KEYS:
        assert key not in response.text


def test_no_keys_configured_everything_open() -> None:
    client = _app({})
    assert client.post("/v1/generate", json={}).status_code == 200
    assert client.get("/metrics").status_code == 200


def test_generate_needs_a_valid_key() -> None:
    rejected: list[int] = []
    client = _app({"CASCADE_API_KEYS": ",".join(KEYS)}, rejected)
    _assert_401(client.post("/v1/generate", json={"prompt": "x"}), "missing API key")
    _assert_401(
        client.post("/v1/generate", headers=_bearer("k-alpha-012345678"), json={}),
        "invalid API key",
    )
    _assert_401(
        client.post("/v1/generate", headers=_bearer(KEYS[0] + "x"), json={}), "invalid API key"
    )
    _assert_401(
        client.post("/v1/generate", headers={"Authorization": f"Basic {KEYS[0]}"}, json={}),
        "got the Basic scheme",
    )
    _assert_401(
        client.post("/v1/generate", headers={"Authorization": "Bearer "}, json={}), "no key"
    )
    # Default-deny: routes not on the open list need a key too.
    _assert_401(client.get("/v1/other"), "missing API key")
    assert len(rejected) == 6
    for key in KEYS:
        response = client.post("/v1/generate", headers=_bearer(key), json={})
        assert response.status_code == 200, key
    # The scheme is case-insensitive (RFC 7235) and surrounding blanks are ignored.
    assert (
        client.post("/v1/generate", headers={"Authorization": f"bearer  {KEYS[1]} "}).status_code
        == 200
    )
    assert len(rejected) == 6


@pytest.mark.parametrize(
    ("value", "says"),
    [
        # The key alone, as people paste it: the commonest mistake.
        (KEYS[0], "must be 'Bearer <key>'; got a value without the Bearer scheme"),
        (f"  {KEYS[0]}  ", "got a value without the Bearer scheme"),
        ("", "the Authorization header is empty"),
        ("   ", "the Authorization header is empty"),
        ("Bearer", "has the Bearer scheme but no key"),
        ("bearer   ", "has the Bearer scheme but no key"),
        (f"Basic {KEYS[0]}", "must be 'Bearer <key>'; got the Basic scheme"),
        (f"token {KEYS[0]}", "got the Token scheme"),
        (f"Bearer: {KEYS[0]}", "got a scheme other than Bearer"),  # the name is not repeated
        (f"{KEYS[0]} {KEYS[1]}", "got a scheme other than Bearer"),
        (f"Bearer {KEYS[0]} {KEYS[1]}", "with one key; got several words after Bearer"),
    ],
)
def test_a_malformed_header_is_named_without_repeating_it(value: str, says: str) -> None:
    rejected: list[int] = []
    client = _app({"CASCADE_API_KEYS": ",".join(KEYS)}, rejected)
    response = client.post("/v1/generate", headers={"Authorization": value}, json={})
    _assert_401(response, says)  # also: no configured key in the response
    assert "missing" not in response.json()["error"]["message"]
    assert response.json()["error"]["field"] == "Authorization"
    for word in value.split():
        if word.lower() not in ("bearer", "basic", "token"):
            assert word not in response.text, word
    assert rejected == [1]


def test_keys_from_file_and_env_together(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(
        f"# production keys\n\n{KEYS[1]}\n  {KEYS[2]}   # rotated 2026-11\n#{KEYS[0]}\n"
    )
    client = _app({"CASCADE_API_KEYS": "env-only-key", "CASCADE_API_KEYS_FILE": str(keys_file)})
    for key in ("env-only-key", KEYS[1], KEYS[2]):
        assert client.post("/v1/generate", headers=_bearer(key)).status_code == 200, key
    # A commented-out key is not a key.
    _assert_401(client.post("/v1/generate", headers=_bearer(KEYS[0])), "invalid API key")
    _assert_401(client.post("/v1/generate", headers=_bearer(f"#{KEYS[0]}")), "invalid API key")


def test_health_always_open_metrics_gated_only_when_asked() -> None:
    client = _app({"CASCADE_API_KEYS": KEYS[0]})
    for path in ("/health/live", "/health/ready", "/metrics", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    gated = _app({"CASCADE_API_KEYS": KEYS[0], "CASCADE_METRICS_REQUIRE_KEY": "true"})
    for path in ("/health/live", "/health/ready"):
        assert gated.get(path).status_code == 200, path
    _assert_401(gated.get("/metrics"), "missing API key")
    _assert_401(gated.get("/metrics", headers=_bearer("nope")), "invalid API key")
    assert gated.get("/metrics", headers=_bearer(KEYS[0])).status_code == 200


def test_bad_configuration_is_refused_with_the_variable_named(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError, match="CASCADE_API_KEYS_FILE"):
        AuthConfig.from_env({"CASCADE_API_KEYS_FILE": str(tmp_path / "missing.txt")})
    with pytest.raises(AuthConfigError, match="CASCADE_METRICS_REQUIRE_KEY"):
        AuthConfig.from_env(
            {"CASCADE_METRICS_REQUIRE_KEY": "true"}
        )  # gate with no keys: would lock out
    with pytest.raises(AuthConfigError, match="CASCADE_METRICS_REQUIRE_KEY"):
        AuthConfig.from_env({"CASCADE_API_KEYS": "a", "CASCADE_METRICS_REQUIRE_KEY": "maybe"})
    with pytest.raises(AuthConfigError, match="whitespace"):
        AuthConfig.from_keys(["has\x00nul"])
    assert not AuthConfig.from_env({"CASCADE_API_KEYS": " , ,"}).enabled


def test_every_key_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first key matching must not stop the loop: compare_digest runs once per key, on equal-length
    digests (so a key's length does not leak either)."""
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    config = AuthConfig.from_keys(KEYS)
    for presented, expected in (
        (KEYS[0], True),
        (KEYS[2], True),
        ("short", False),
        ("x" * 500, False),
    ):
        calls.clear()
        assert config.is_valid(presented) is expected
        assert len(calls) == len(KEYS)
        assert all(a == b == 32 for a, b in calls)


def test_keys_never_logged(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(KEYS[2] + "\n")
    with caplog.at_level(logging.DEBUG):
        client = _app(
            {"CASCADE_API_KEYS": f"{KEYS[0]},{KEYS[1]}", "CASCADE_API_KEYS_FILE": str(keys_file)}
        )
        client.post("/v1/generate", headers=_bearer(KEYS[0]))
        client.post("/v1/generate", headers=_bearer("wrong-" + KEYS[1]))
    assert "3 key(s)" in caplog.text  # install_auth did log, just never a key
    for key in KEYS:
        assert key not in caplog.text


def test_config_from_settings_fields(tmp_path: Path) -> None:
    """The same configuration when Settings carries it (api_keys as a pydantic SecretStr)."""
    from types import SimpleNamespace

    from pydantic import SecretStr

    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# ops\n{KEYS[2]}\n")
    settings = SimpleNamespace(
        api_keys=SecretStr(f"{KEYS[0]}, {KEYS[1]}"),
        api_keys_file=keys_file,
        metrics_require_key=True,
    )
    config = AuthConfig.from_settings(settings)
    assert config.metrics_require_key and len(config.key_digests) == 3
    assert all(config.is_valid(k) for k in KEYS) and not config.is_valid("other")
    assert not AuthConfig.from_settings(SimpleNamespace()).enabled
