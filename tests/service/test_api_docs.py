"""/docs works offline (every script, style and icon it links is served by the app itself, and
the package ships them), stays open with API keys on, and /openapi.json declares the bearer scheme
exactly when keys are configured, with the open routes marked ``security: []``."""

from __future__ import annotations

import fnmatch
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from starlette.testclient import TestClient

from service.api_docs import ASSET_FILES, ASSETS_DIR
from service.app import create_app
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
KEY = "docs-test-key"
CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


def _never_built(settings: Settings):
    raise AssertionError("the model is not loaded in these tests")


def _client(monkeypatch: pytest.MonkeyPatch, keys: str = "", **env: str) -> TestClient:
    """The real app, model not loaded (no lifespan); API keys from the environment."""
    monkeypatch.setenv("CASCADE_API_KEYS", keys)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return TestClient(create_app(Settings(), _never_built))


class _Links(HTMLParser):
    """Every URL the page would fetch: src and href of its tags, and the inline script's text."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value or "" for name, value in attrs if name in ("src", "href")]

    def handle_data(self, data: str) -> None:
        self.scripts.append(data)


def _page_links(client: TestClient) -> _Links:
    response = client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    links = _Links()
    links.feed(response.text)
    return links


@pytest.mark.parametrize("keys", ["", KEY])
def test_docs_fetches_nothing_from_another_host(monkeypatch: pytest.MonkeyPatch, keys: str) -> None:
    client = _client(monkeypatch, keys)
    links = _page_links(client)
    assert len(links.urls) == 3, links.urls  # the stylesheet, the icon and the bundle
    for url in links.urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc and url.startswith("/"), url
        asset = client.get(url)  # no key: the page and its files are open
        assert asset.status_code == 200, url
        expected = CONTENT_TYPES[Path(parts.path).suffix]
        assert expected in asset.headers["content-type"], (url, asset.headers["content-type"])
        assert asset.content == (ASSETS_DIR / Path(parts.path).name).read_bytes()
    inline = "".join(links.scripts)
    assert "http://" not in inline and "https://" not in inline
    assert "'/openapi.json'" in inline and "validatorUrl" in inline


def test_the_links_follow_the_root_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Behind a proxy that mounts the app under a prefix, the page links under that prefix."""
    monkeypatch.setenv("CASCADE_API_KEYS", "")
    client = TestClient(create_app(Settings(), _never_built), root_path="/cascade")
    links = _page_links(client)
    assert all(url.startswith("/cascade/docs/assets/") for url in links.urls), links.urls
    assert "'/cascade/openapi.json'" in "".join(links.scripts)


def test_only_the_docs_files_are_open(monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(monkeypatch, KEY)
    assert client.get("/redoc").status_code == 401  # no /redoc; unknown paths stay protected
    assert client.get("/redoc", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    assert client.get("/docs/assets/no-such-file.js").status_code == 404
    escape = client.get("/docs/assets/%2e%2e/%2e%2e/app.py")
    assert escape.status_code == 404 and b"create_app" not in escape.content
    assert client.post("/docs", json={}).status_code in (401, 405)


def test_the_package_ships_the_docs_files() -> None:
    """The Docker image installs the package (pip install .): its package-data must take the
    files along."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["service"]
    for name in ASSET_FILES:
        relative = (ASSETS_DIR / name).relative_to(ROOT / "service").as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), name
    assert (ASSETS_DIR / "LICENSE").is_file() and "5.35.0" in (ASSETS_DIR / "README.md").read_text()


def _operations(doc: dict) -> dict[str, dict]:
    return {
        f"{method.upper()} {path}": operation
        for path, item in doc["paths"].items()
        for method, operation in item.items()
    }


def test_openapi_declares_bearer_security_when_keys_are_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    doc = _client(monkeypatch, KEY).get("/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert schemes == {"bearer": {**schemes["bearer"], "type": "http", "scheme": "bearer"}}
    assert doc["security"] == [{"bearer": []}]
    operations = _operations(doc)
    for label in ("POST /v1/generate", "GET /v1/requests/{request_id}"):
        assert operations[label]["security"] == [{"bearer": []}], label
    for label in ("GET /health/live", "GET /health/ready", "GET /metrics"):
        assert operations[label]["security"] == [], label
    assert not any("/docs" in label for label in operations)


def test_metrics_requires_the_key_in_the_document_when_it_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = _client(monkeypatch, KEY, CASCADE_METRICS_REQUIRE_KEY="true")
    operations = _operations(client.get("/openapi.json").json())
    assert operations["GET /metrics"]["security"] == [{"bearer": []}]
    assert operations["GET /health/ready"]["security"] == []


def test_openapi_declares_no_security_when_keys_are_off(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = _client(monkeypatch).get("/openapi.json").json()
    assert "securitySchemes" not in doc["components"] and "security" not in doc
    assert all("security" not in op for op in _operations(doc).values())
