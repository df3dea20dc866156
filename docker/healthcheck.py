"""Container health check: exit 0 when GET http://127.0.0.1:$CASCADE_PORT<path> answers 200, else 1.

Usage: python healthcheck.py [/health/ready]. Standard library only, because the runtime image carries
no curl or wget. The server listens on 0.0.0.0 in the container, so loopback always reaches it.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def check(path: str, port: int, timeout_s: float = 4.0) -> tuple[bool, str]:
    """Return (healthy, one line describing why)."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200, f"{url} -> {response.status}"
    except urllib.error.HTTPError as exc:  # 503 while loading or draining
        return False, f"{url} -> {exc.code}"
    except (OSError, ValueError) as exc:  # refused, timed out, bad port
        return False, f"{url} -> {exc}"


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/health/ready"
    try:
        port = int(os.environ.get("CASCADE_PORT", "8000"))
    except ValueError:
        print(f"CASCADE_PORT={os.environ['CASCADE_PORT']!r} is not a port number", file=sys.stderr)
        return 1
    healthy, detail = check(path, port)
    print(detail)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
