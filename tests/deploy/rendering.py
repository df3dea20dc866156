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
TWO_GPUS_FILE = REPO / "docker-compose.two-gpus.yml"
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "cascade.json"
REPLICA_LISTS = REPO / "docker" / "replicas"

# Where the compose files mount the replica lists (docker/replicas/<setup>.nginx.conf and
# <setup>.prometheus.yml), as docker/nginx.conf and docker/prometheus.yml refer to them.
NGINX_REPLICAS_PATH = "/etc/nginx/cascade-replicas.conf"
PROMETHEUS_REPLICAS_PATH = "/etc/prometheus/cascade-replicas.yml"
# The in-compose addresses of the replicas in the two-GPU lists, in order.
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


def nginx_replica_list(setup: str) -> Path:
    return REPLICA_LISTS / f"{setup}.nginx.conf"


def prometheus_replica_list(setup: str) -> Path:
    return REPLICA_LISTS / f"{setup}.prometheus.yml"


def render_nginx_conf(dest_dir: Path, upstreams: list[str], listen_port: int) -> Path:
    """Write docker/nginx.conf into `dest_dir` with the two-GPU replica list included from
    `dest_dir` and its replicas at `upstreams` ("127.0.0.1:port", in the order cascade-0,
    cascade-1), listening on 127.0.0.1:`listen_port`, and pid/temp/log files under `dest_dir`
    (access log: dest_dir/access.log, error log: dest_dir/error.log)."""
    assert len(upstreams) == len(REPLICA_HOSTS)
    source = nginx_replica_list("two-gpus")
    replicas = dest_dir / "cascade-replicas.conf"
    replicas.write_text(
        substitute(
            source.read_text(),
            {f"server {host} ": f"server {addr} " for host, addr in zip(REPLICA_HOSTS, upstreams)},
            source,
        )
    )
    return render_nginx_main(dest_dir, replicas, listen_port)


def render_nginx_main(dest_dir: Path, replicas: Path, listen_port: int) -> Path:
    """docker/nginx.conf in `dest_dir`, including `replicas` as its replica list."""
    text = NGINX_CONF.read_text()
    cache = dest_dir / "cache"
    for sub in ("client_temp", "proxy_temp", "fastcgi_temp", "uwsgi_temp", "scgi_temp"):
        (cache / sub).mkdir(parents=True, exist_ok=True)
    replacements = {
        f"include {NGINX_REPLICAS_PATH};": f"include {replicas};",
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
    """Write docker/prometheus.yml into `dest_dir` with the two-GPU replica list's targets
    (cascade-0, cascade-1 order) and Prometheus' own target replaced by loopback addresses."""
    assert len(targets) == len(REPLICA_HOSTS)
    source = prometheus_replica_list("two-gpus")
    replicas = dest_dir / "cascade-replicas.yml"
    replicas.write_text(
        substitute(
            source.read_text(),
            {f"- {host}\n": f"- {addr}\n" for host, addr in zip(REPLICA_HOSTS, targets)},
            source,
        )
    )
    return render_prometheus_main(dest_dir, replicas, self_port)


def render_prometheus_main(dest_dir: Path, replicas: Path, self_port: int) -> Path:
    """docker/prometheus.yml in `dest_dir`, reading `replicas` as its replica list."""
    replacements = {
        f"- {PROMETHEUS_REPLICAS_PATH}\n": f"- {replicas}\n",
        f"- {PROMETHEUS_SELF}\n": f"- 127.0.0.1:{self_port}\n",
    }
    out = dest_dir / "prometheus.yml"
    out.write_text(substitute(PROMETHEUS_YML.read_text(), replacements, PROMETHEUS_YML))
    return out
