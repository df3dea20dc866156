"""Optional API keys: a pure ASGI middleware in front of every route.

Off unless keys are configured. Configuration (read once, when ``install_auth`` runs):

- ``CASCADE_API_KEYS``: comma-separated keys.
- ``CASCADE_API_KEYS_FILE``: a file with one key per line; blank lines and ``#`` comments are ignored.
- ``CASCADE_METRICS_REQUIRE_KEY`` (bool, default false): also require a key for ``GET /metrics``.

With keys, every request except the open paths (health probes, the API docs with their files, the
playground page ``/`` with its files and, unless ``CASCADE_METRICS_REQUIRE_KEY``, ``/metrics``) needs
``Authorization: Bearer <key>``; anything else gets a 401 in the service's error envelope with
``WWW-Authenticate: Bearer``, whose message says what is wrong: no header, a malformed one (empty, no
scheme, another scheme, no key) or a key that is not configured. Default-deny: a route added later is
protected without anyone remembering to list it.

Keys are held only as SHA-256 digests and a presented key is compared with ``hmac.compare_digest`` against
every configured key without stopping at a match, so neither which key matched, nor how much of a key
matched, nor a key's length shows in the response time. Keys never appear in logs or error messages.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.openai_errors import error_body

logger = logging.getLogger("service.auth")

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]
ASGIApp = Callable[[Scope, Receive, Send], Any]

# Probes must work without credentials (kubelet and load balancers carry none); the schema and its
# documentation page are public (the page asks for a key through its Authorize button), and so is the
# playground page (service/playground.py), which asks for a key when the API answers 401.
ALWAYS_OPEN_PATHS = frozenset({"/health/live", "/health/ready", "/docs", "/openapi.json", "/"})
# The static files of /docs (service/api_docs.py) and of the playground: nothing else is served under
# these prefixes.
ALWAYS_OPEN_PREFIXES = ("/docs/assets/", "/playground/")
METRICS_PATH = "/metrics"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class AuthConfigError(ValueError):
    """An auth variable has a value the service cannot start with (names the variable, never a key)."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class AuthConfig:
    """The accepted keys (as SHA-256 digests) and whether /metrics needs one."""

    key_digests: tuple[bytes, ...] = ()
    metrics_require_key: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.key_digests)

    @classmethod
    def from_keys(cls, keys: Iterable[str], *, metrics_require_key: bool = False) -> AuthConfig:
        unique = sorted({k for k in keys if k})
        for key in unique:
            if any(c.isspace() or ord(c) < 0x21 or ord(c) == 0x7F for c in key):
                # A header value cannot carry these, so such a key could never be presented.
                raise AuthConfigError("an API key contains whitespace or control characters")
        if metrics_require_key and not unique:
            raise AuthConfigError(
                "CASCADE_METRICS_REQUIRE_KEY is true but no API keys are configured "
                "(set CASCADE_API_KEYS or CASCADE_API_KEYS_FILE)"
            )
        return cls(tuple(_digest(k) for k in unique), metrics_require_key)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AuthConfig:
        """Read CASCADE_API_KEYS, CASCADE_API_KEYS_FILE and CASCADE_METRICS_REQUIRE_KEY."""
        env = os.environ if environ is None else environ
        keys = [k.strip() for k in env.get("CASCADE_API_KEYS", "").split(",")]
        path = env.get("CASCADE_API_KEYS_FILE", "").strip()
        if path:
            keys += read_keys_file(Path(path))
        raw = env.get("CASCADE_METRICS_REQUIRE_KEY", "").strip().lower()
        if raw not in _TRUE | _FALSE:
            raise AuthConfigError(f"CASCADE_METRICS_REQUIRE_KEY={raw!r}: must be true or false")
        return cls.from_keys(keys, metrics_require_key=raw in _TRUE)

    @classmethod
    def from_settings(cls, settings: Any) -> AuthConfig:
        """From Settings fields ``api_keys`` (str or pydantic SecretStr, comma-separated),
        ``api_keys_file`` (path or None) and ``metrics_require_key`` (bool), if Settings has them."""
        raw = getattr(settings, "api_keys", "") or ""
        raw = raw.get_secret_value() if hasattr(raw, "get_secret_value") else str(raw)
        keys = [k.strip() for k in raw.split(",")]
        path = getattr(settings, "api_keys_file", None)
        if path:
            keys += read_keys_file(Path(path))
        return cls.from_keys(
            keys, metrics_require_key=bool(getattr(settings, "metrics_require_key", False))
        )

    def is_valid(self, presented: str) -> bool:
        """True if ``presented`` is one of the keys. Compares against every key: no early exit."""
        candidate = _digest(presented)
        matched = False
        for digest in self.key_digests:
            # Evaluate compare_digest first so `matched` short-circuiting can never skip a comparison.
            matched = hmac.compare_digest(candidate, digest) | matched
        return matched

    def requires_key(self, path: str) -> bool:
        if not self.enabled or path in ALWAYS_OPEN_PATHS or path.startswith(ALWAYS_OPEN_PREFIXES):
            return False
        if path == METRICS_PATH:
            return self.metrics_require_key
        return True


def read_keys_file(path: Path) -> list[str]:
    """One key per line; blank lines and lines starting with ``#`` are skipped (trailing `` # x`` too)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AuthConfigError(
            f"CASCADE_API_KEYS_FILE={str(path)!r}: cannot read: {exc.strerror}"
        ) from None
    except UnicodeDecodeError:
        raise AuthConfigError(f"CASCADE_API_KEYS_FILE={str(path)!r}: not UTF-8 text") from None
    keys = []
    for line in text.splitlines():
        key = line.split(" #", 1)[0].strip()
        if key and not key.startswith("#"):
            keys.append(key)
    return keys


# Schemes a client may send by mistake; only these names are ever repeated back (anything else in
# the header could be the key itself).
_KNOWN_SCHEMES = {
    s.lower(): s
    for s in ("Basic", "Digest", "Negotiate", "NTLM", "Token", "ApiKey", "Api-Key", "OAuth")
}
_SEND = "send 'Authorization: Bearer <key>'"


@dataclass(frozen=True)
class Presented:
    """What a request's Authorization header holds: the bearer ``token``, or ``problem`` (what is
    wrong with the header; it never repeats the header's value, only a known scheme's name)."""

    token: str | None = None
    problem: str | None = None


def read_authorization(headers: Iterable[tuple[bytes, bytes]]) -> Presented:
    """The first ``Authorization`` header, read as ``Bearer <token>`` (scheme case-insensitive)."""
    for name, value in headers:
        if name.lower() != b"authorization":
            continue
        text = value.decode("latin-1").strip()  # latin-1 decodes any bytes
        if not text:
            return Presented(problem=f"the Authorization header is empty; {_SEND}")
        scheme, _, token = text.replace("\t", " ").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer":
            named = _KNOWN_SCHEMES.get(scheme.lower())
            if named is not None:
                which = f"the {named} scheme"
            elif not token:  # one word: most likely the key itself, sent without "Bearer "
                which = "a value without the Bearer scheme (put 'Bearer ' before the key)"
            else:
                which = "a scheme other than Bearer"
            return Presented(
                problem=f"the Authorization header must be 'Bearer <key>'; got {which}"
            )
        if not token:
            return Presented(
                problem=f"the Authorization header has the Bearer scheme but no key; {_SEND}"
            )
        if any(c.isspace() for c in token):
            return Presented(
                problem="the Authorization header must be 'Bearer <key>' with one key; got "
                "several words after Bearer"
            )
        return Presented(token=token)
    return Presented(problem=f"missing API key: {_SEND}")


def request_owner(request: Any) -> str | None:
    """Who submitted a request (a Starlette request), as a digest of its API key; None while keys
    are off: the only one who may see or cancel it (GET / DELETE /v1/requests/{id})."""
    if not getattr(request.app.state, "auth_enabled", False):
        return None
    token = read_authorization(request.headers.raw).token or ""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


class ApiKeyMiddleware:
    """ASGI middleware: 401 for protected paths without a valid bearer key; everything else passes.

    ``on_reject`` is called once per refused request (e.g. to count
    ``cascade_rejected_requests_total{reason="unauthorized"}``).
    """

    def __init__(
        self, app: ASGIApp, config: AuthConfig, on_reject: Callable[[], None] | None = None
    ) -> None:
        self.app = app
        self.config = config
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.config.requires_key(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        presented = read_authorization(scope.get("headers", ()))
        if presented.token is not None and self.config.is_valid(presented.token):
            await self.app(scope, receive, send)
            return
        if self.on_reject is not None:
            try:
                self.on_reject()
            except Exception:  # a metrics hiccup must not turn a 401 into a 500
                logger.exception("on_reject callback failed")
        await _send_401(scope, send, presented.problem or "invalid API key")


async def _send_401(scope: Scope, send: Send, message: str) -> None:
    state = scope.get("state")
    request_id = None
    if isinstance(state, dict):
        request_id = state.get("request_id")
        state["outcome"] = (
            "unauthorized"  # the outcome label RequestMiddleware records the request under
        )
    # OpenAI's error shape on the OpenAI-compatible routes (its client raises AuthenticationError)
    path = str(scope.get("path", ""))
    _, error = error_body(path, 401, "unauthorized", message, "Authorization", request_id)
    body = json.dumps(error).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b'Bearer realm="cascade"'),
    ]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def install_auth(
    app: Any,
    config: AuthConfig | None = None,
    *,
    on_reject: Callable[[], None] | None = None,
) -> AuthConfig:
    """Add ApiKeyMiddleware to a Starlette/FastAPI ``app`` (before it starts). ``config`` defaults to the
    environment; ``on_reject`` defaults to counting ``app.state.metrics.rejected{reason="unauthorized"}``
    when the app has one. Returns the config in effect; logs whether auth is on and how many keys (never
    which). Call it before the app adds RequestMiddleware, so that refusals carry the request id and are
    counted in cascade_requests_total like every other response."""
    config = AuthConfig.from_env() if config is None else config
    if on_reject is None:
        # create_app keeps its Metrics on app.state: count refusals as
        # cascade_rejected_requests_total{reason="unauthorized"} without extra wiring.
        rejected = getattr(getattr(getattr(app, "state", None), "metrics", None), "rejected", None)
        if rejected is not None:
            on_reject = rejected.labels("unauthorized").inc
    if config.enabled:
        app.add_middleware(ApiKeyMiddleware, config=config, on_reject=on_reject)
        logger.info(
            "API keys required (%d key(s)); /metrics %s",
            len(config.key_digests),
            "requires a key" if config.metrics_require_key else "is open",
        )
    else:
        logger.info("API keys not configured: every route is open")
    return config
