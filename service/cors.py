"""CORS for browser clients on other origins: off unless CASCADE_CORS_ORIGINS lists some.

Starlette's CORSMiddleware, installed outside RequestMiddleware and the API keys middleware: a
preflight (OPTIONS with Origin and Access-Control-Request-Method) is answered before any key is
asked for (browsers never send credentials with one), and every answer the inner layers give,
401, 413 and 503 included, carries the CORS headers, so a page can read why it was refused.
Preflights are answered here, so they are logged by the access log but not counted in the
request metrics.

No cookies are involved (keys travel in the Authorization header), so credentials are not
allowed and ``*`` really means any origin.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from service.settings import Settings

ALLOW_METHODS = ("GET", "POST", "DELETE")
ALLOW_HEADERS = ("Authorization", "Content-Type", "Accept", "X-Request-ID")
# Response headers a page may read besides the CORS-safelisted ones (Content-Type, ...).
EXPOSE_HEADERS = (
    "X-Request-ID",
    "X-Seed",
    "X-Prompt-Truncated",
    "X-Negative-Prompt-Truncated",
    "X-Batch-Images",
    "X-Model",
    "X-Demo-Weights",
    "X-Cascade-Warning",
    "X-Strength",
    "X-Image-Variation",
    "Server-Timing",
    "Retry-After",
    "WWW-Authenticate",
)
MAX_AGE_S = 600  # how long a browser may cache a preflight's answer
logger = logging.getLogger("service.cors")


def install_cors(app: FastAPI, settings: Settings) -> bool:
    """Add CORSMiddleware when origins are configured; returns whether it did. Call it after
    RequestMiddleware is added (so it sits outside it) and before the access log."""
    if not settings.cors_origins:
        logger.info("CORS off: browsers refuse cross-origin calls (CASCADE_CORS_ORIGINS unset)")
        return False
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(settings.cors_origins),
        allow_methods=list(ALLOW_METHODS),
        allow_headers=list(ALLOW_HEADERS),
        expose_headers=list(EXPOSE_HEADERS),
        allow_credentials=False,
        max_age=MAX_AGE_S,
    )
    logger.info("CORS on for %s", ", ".join(settings.cors_origins))
    return True
