"""The browser playground: ``GET /`` serves a static page that drives ``POST /v1/generate``.

Plain HTML, CSS and one vanilla JS file in ``service/static/playground/`` (no build step, nothing
fetched from outside the server). The page reads the model's identity from ``/health/ready`` and
its limits and defaults from ``/openapi.json``, then streams each generation (``"stream": true``)
to draw progress, previews and the images. Every asset is under ``/playground/``, the one prefix
``service/auth.py`` leaves open with the page itself, so the page loads without an API key and
asks for one when the API answers 401.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static" / "playground"
PAGE_PATH = "/"
ASSET_PREFIX = "/playground"

# The page may talk only to this server: scripts, styles and requests from here, images also as
# the data: URLs the API returns.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}


def install_playground(app: FastAPI) -> None:
    """Add ``GET /`` (the page) and ``/playground/*`` (its assets) to ``app``, outside the API
    schema. Call it before the app collects its route paths for the request metrics."""
    app.mount(ASSET_PREFIX, StaticFiles(directory=STATIC_DIR), name="playground")

    @app.get(PAGE_PATH, include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)
