"""Loopback copies of the shipped configs: the very files in docker/, with only addresses, ports and paths
replaced. Every replacement must match exactly as often as expected, so an edit to a shipped file that
the tests no longer understand fails loudly instead of testing something else.
"""

from __future__ import annotations

from pathlib import Path

from tests.deploy.tooling import REPO

NGINX_CONF = REPO / "docker" / "nginx.conf"
PROMETHEUS_YML = REPO / "docker" / "prometheus.yml"
COMPOSE_FILE = REPO / "docker-compose.yml"
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "cascade.json"

# The in-compose addresses of the replicas, as written in docker/nginx.conf and docker/prometheus.yml.
REPLICA_HOSTS = ("cascade-0:8000", "cascade-1:8000")
NGINX_LISTEN = "listen 8080;"
PROMETHEUS_SELF = "localhost:9090"


def substitute(text: str, replacements: dict[str, str], source: Path) -> str:
    """Replace each key once per occurrence; every key must occur at least once."""
    for old, new in replacements.items():
        if old not in text:
            raise AssertionError(
                f"{source}: expected to find {old!r} to replace for the loopback test"
            )
        text = text.replace(old, new)
    return text


def render_nginx_conf(dest_dir: Path, upstreams: list[str], listen_port: int) -> Path:
    """Write docker/nginx.conf into `dest_dir` with the replicas at `upstreams` ("127.0.0.1:port", in
    the order cascade-0, cascade-1), listening on 127.0.0.1:`listen_port`, and pid/temp/log files under
    `dest_dir` (access log: dest_dir/access.log, error log: dest_dir/error.log)."""
    assert len(upstreams) == len(REPLICA_HOSTS)
    text = NGINX_CONF.read_text()
    cache = dest_dir / "cache"
    for sub in ("client_temp", "proxy_temp", "fastcgi_temp", "uwsgi_temp", "scgi_temp"):
        (cache / sub).mkdir(parents=True, exist_ok=True)
    replacements = {
        **{f"server {host} ": f"server {addr} " for host, addr in zip(REPLICA_HOSTS, upstreams)},
        NGINX_LISTEN: f"listen 127.0.0.1:{listen_port};",
        "pid /run/nginx.pid;": f"pid {dest_dir / 'nginx.pid'};",
        "/var/cache/nginx/": f"{cache}/",
        "access_log /dev/stdout": f"access_log {dest_dir / 'access.log'}",
        "error_log /dev/stderr": f"error_log {dest_dir / 'error.log'}",
    }
    out = dest_dir / "nginx.conf"
    out.write_text(substitute(text, replacements, NGINX_CONF))
    return out


def render_prometheus_yml(dest_dir: Path, targets: list[str], self_port: int) -> Path:
    """Write docker/prometheus.yml into `dest_dir` with the replica targets (cascade-0, cascade-1 order)
    and Prometheus' own target replaced by loopback addresses."""
    assert len(targets) == len(REPLICA_HOSTS)
    text = PROMETHEUS_YML.read_text()
    replacements = {f"- {host}\n": f"- {addr}\n" for host, addr in zip(REPLICA_HOSTS, targets)}
    replacements[f"- {PROMETHEUS_SELF}\n"] = f"- 127.0.0.1:{self_port}\n"
    out = dest_dir / "prometheus.yml"
    out.write_text(substitute(text, replacements, PROMETHEUS_YML))
    return out
