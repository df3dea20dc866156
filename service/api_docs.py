"""/docs: Swagger UI served from the package itself, so the page works on a host without Internet
access (FastAPI's own /docs loads its scripts from a CDN).

The files are in ``service/static/swagger/`` (unmodified swagger-ui-dist, see its README.md) and are
served under ``/docs/assets/``; the page links them and /openapi.json by absolute path on the same
origin (behind a proxy, under the ASGI ``root_path``). There is no /redoc: one documentation page is
enough, and vendoring ReDoc too would add another megabyte of JavaScript. The API keys middleware
leaves /docs and its assets open, as it does /openapi.json.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

SWAGGER_UI_VERSION = "5.35.0"
ASSETS_DIR = Path(__file__).parent / "static" / "swagger"
DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"
# The page's only scripts, styles and icon (the licence files are served too, for whoever asks).
ASSET_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")


def install_docs(app: FastAPI) -> None:
    """Add GET /docs and the /docs/assets/ files to an app created with ``docs_url=None`` and
    ``redoc_url=None``. Neither appears in /openapi.json."""
    missing = [name for name in ASSET_FILES if not (ASSETS_DIR / name).is_file()]
    if missing:  # a packaging mistake: fail at start-up, not with a blank page
        raise RuntimeError(f"Swagger UI files missing from {ASSETS_DIR}: {', '.join(missing)}")
    app.mount(ASSETS_PATH, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        assets = root + ASSETS_PATH
        return get_swagger_ui_html(
            openapi_url=root + (app.openapi_url or "/openapi.json"),
            title=f"{app.title} - API docs",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon-32x32.png",
            # No "valid" badge: it would fetch an image from validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )
