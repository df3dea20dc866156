"""docker-compose.yml (one GPU) and docker-compose.yml + docker-compose.two-gpus.yml (two GPUs), as
Debian's docker-compose resolves them (it validates against the Compose schema without a daemon): each
renders with no edits, one replica per GPU, weights read-only, API keys from a compose secret, the
replica lists of nginx and Prometheus agreeing with the services, monitoring on loopback only, and no
Grafana without an admin password."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.rendering import (
    COMPOSE_FILE,
    DASHBOARD,
    NGINX_CONF,
    NGINX_REPLICAS_PATH,
    PROMETHEUS_REPLICAS_PATH,
    PROMETHEUS_YML,
    TWO_GPUS_FILE,
)
from tests.deploy.tooling import REPO, find_tool

# setup -> (compose files, the GPU ids its replicas own)
SETUPS = {
    "one-gpu": ([COMPOSE_FILE], ["0"]),
    "two-gpus": ([COMPOSE_FILE, TWO_GPUS_FILE], ["0", "1"]),
}
PASSWORD = "not-admin-7f3c"
BUILD_ARGS = ("CUDA_IMAGE", "TORCH_VERSION", "TORCH_INDEX_URL")  # the Dockerfile's ARGs


def run_compose(
    files: list[Path], tmp_dir: Path, variables: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` for `files`, seeing only `variables`: the caller's CASCADE_*,
    COMPOSE_*, GRAFANA_* and MONITORING_* variables are dropped and an empty --env-file replaces a
    .env an operator may have next to the compose file."""
    tool = find_tool("docker-compose")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CASCADE_", "COMPOSE_", "GRAFANA_", "MONITORING_"))
        and k not in BUILD_ARGS
    }
    env.update(variables)
    empty_env_file = tmp_dir / "empty.env"
    empty_env_file.write_text("")
    argv = [tool, "--env-file", str(empty_env_file)]
    for path in files:
        argv += ["-f", str(path)]
    return subprocess.run(
        [*argv, "config"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )


def compose_config(
    files: list[Path], tmp_dir: Path, variables: dict[str, str] | None = None
) -> dict[str, Any]:
    """The files as docker-compose resolves them (anchors and overrides merged, variables defaulted)."""
    result = run_compose(files, tmp_dir, {"GRAFANA_ADMIN_PASSWORD": PASSWORD, **(variables or {})})
    assert result.returncode == 0, f"docker-compose config rejected {files}:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module", params=sorted(SETUPS))
def setup(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def config(setup: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return compose_config(SETUPS[setup][0], tmp_path_factory.mktemp("compose"))


def replicas(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in config["services"].items()
        if str(svc.get("image", "")).startswith("cascade-serve")
    }


def seconds(duration: str) -> float:
    """Compose durations as docker-compose prints them (e.g. 45s, 1m30s, 10m)."""
    total = 0.0
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(value) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    assert total > 0, f"unparsed duration {duration!r}"
    return total


def volume(entry: str | dict[str, Any]) -> dict[str, Any]:
    """A volume entry in long form; docker-compose v1 prints short "source:target[:mode]" strings."""
    if isinstance(entry, dict):
        return {"read_only": False, **entry}
    source, target, *mode = entry.split(":")
    return {"source": source, "target": target, "read_only": mode == ["ro"]}


def mounts(config: dict[str, Any], service: str) -> dict[str, dict[str, Any]]:
    return {v["target"]: v for v in map(volume, config["services"][service]["volumes"])}


def host_ips(config: dict[str, Any], service: str) -> list[str]:
    """The host address of every published port ("" = every interface)."""
    ips = []
    for port in config["services"][service].get("ports", []):
        if isinstance(port, dict):
            ips.append(port.get("host_ip", ""))
        else:  # short form: [host_ip:]published:target[/proto]
            parts = str(port).split("/")[0].split(":")
            ips.append(parts[0] if len(parts) == 3 else "")
    return ips


def test_each_replica_gets_its_own_gpu(setup: str, config: dict[str, Any]) -> None:
    reps = replicas(config)
    gpu_ids: list[str] = []
    for name, svc in reps.items():
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert len(device["device_ids"]) == 1, f"{name} must own exactly one GPU"
        assert "count" not in device, f"{name}: count and device_ids exclude each other"
        gpu_ids += device["device_ids"]
        assert "replicas" not in svc.get("deploy", {}), f"{name}: replicas would share the GPU"
    assert sorted(gpu_ids) == SETUPS[setup][1], (
        f"{setup}: replicas {sorted(reps)} own GPUs {gpu_ids}, expected {SETUPS[setup][1]}"
    )


def test_the_two_gpu_replicas_differ_only_in_their_gpu(tmp_path: Path) -> None:
    reps = replicas(compose_config(SETUPS["two-gpus"][0], tmp_path))
    assert sorted(reps) == ["cascade-0", "cascade-1"]
    first, second = ({k: v for k, v in svc.items() if k != "deploy"} for svc in reps.values())
    assert first == second, "docker-compose.two-gpus.yml's cascade-1 drifted from cascade-0"


def test_replicas_mount_weights_read_only_and_drain_before_kill(config: dict[str, Any]) -> None:
    for name, svc in replicas(config).items():
        env = svc["environment"]
        weights = [
            v for v in map(volume, svc["volumes"]) if v["target"] == env["CASCADE_WEIGHTS_DIR"]
        ]
        assert len(weights) == 1 and weights[0]["read_only"] is True, (
            f"{name}: weights must be mounted read-only"
        )
        assert "build" in svc, f"{name}: built from this repository's Dockerfile"
        drain = float(env["CASCADE_DRAIN_TIMEOUT_S"])
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"
        assert seconds(svc["stop_grace_period"]) > drain, (
            f"{name}: stop_grace_period {svc['stop_grace_period']} leaves no time for a {drain:.0f} s drain"
        )
        assert "/health/ready" in svc["healthcheck"]["test"]
        assert "ports" not in svc, f"{name}: replicas are reached through nginx only"


def test_build_arguments_default_to_the_dockerfiles_and_follow_variables(
    setup: str, config: dict[str, Any], tmp_path: Path
) -> None:
    """Compose passes the Dockerfile's build arguments, with the same defaults, so an older driver's
    build (docs/deploy.md) needs only variables in .env."""
    dockerfile = dict(
        re.findall(r"^ARG (\w+)=(\S+)$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    )
    for name, svc in replicas(config).items():
        assert svc["build"]["args"] == {arg: dockerfile[arg] for arg in BUILD_ARGS}, name
    cu126 = {
        "CUDA_IMAGE": "nvidia/cuda:12.6.3-runtime-ubuntu24.04",
        "TORCH_INDEX_URL": "https://download.pytorch.org/whl/cu126",
    }
    older = compose_config(SETUPS[setup][0], tmp_path, cu126)
    for name, svc in replicas(older).items():
        assert svc["build"]["args"] == {**cu126, "TORCH_VERSION": dockerfile["TORCH_VERSION"]}


def test_api_keys_come_from_a_compose_secret(config: dict[str, Any]) -> None:
    for name, svc in replicas(config).items():
        (secret,) = svc["secrets"]
        source = secret["source"] if isinstance(secret, dict) else secret
        target = secret.get("target", source) if isinstance(secret, dict) else source
        # Without an absolute target, compose mounts a secret at /run/secrets/<target>.
        mounted_at = target if target.startswith("/") else f"/run/secrets/{target}"
        assert svc["environment"]["CASCADE_API_KEYS_FILE"] == mounted_at, name
        assert "CASCADE_API_KEYS" not in svc["environment"], f"{name}: keys belong in the file"
        assert config["secrets"][source]["file"] == str(REPO / "secrets" / "api_keys")
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert "/secrets/" in ignored and ".env" in ignored, "keys and .env must never be committed"


def test_nginx_prometheus_and_compose_list_the_same_replicas(config: dict[str, Any]) -> None:
    names = set(replicas(config))
    assert f"include {NGINX_REPLICAS_PATH};" in NGINX_CONF.read_text()
    nginx_list = Path(mounts(config, "nginx")[NGINX_REPLICAS_PATH]["source"])
    upstreams = re.findall(r"^\s*server\s+([\w.-]+):8000\b", nginx_list.read_text(), re.MULTILINE)
    assert sorted(upstreams) == sorted(names), (
        f"{nginx_list.name}: nginx upstream {upstreams} != compose replicas {sorted(names)}"
    )

    prom = yaml.safe_load(PROMETHEUS_YML.read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "cascade"]
    assert "static_configs" not in job, "the replicas are listed in docker/replicas/ only"
    assert [f for sd in job["file_sd_configs"] for f in sd["files"]] == [PROMETHEUS_REPLICAS_PATH]
    prom_list = Path(mounts(config, "prometheus")[PROMETHEUS_REPLICAS_PATH]["source"])
    targets = [t.split(":")[0] for group in yaml.safe_load(prom_list.read_text())
               for t in group["targets"]]  # fmt: skip
    assert sorted(targets) == sorted(names), (
        f"{prom_list.name}: prometheus targets {targets} != compose replicas {sorted(names)}"
    )


def test_nginx_prometheus_grafana_mount_the_shipped_configs(config: dict[str, Any]) -> None:
    services = config["services"]
    nginx = mounts(config, "nginx")["/etc/nginx/nginx.conf"]
    assert nginx["source"] == str(NGINX_CONF) and nginx["read_only"] is True
    assert mounts(config, "prometheus")["/etc/prometheus/prometheus.yml"]["source"] == str(
        PROMETHEUS_YML
    )
    for service, path in (("nginx", NGINX_REPLICAS_PATH), ("prometheus", PROMETHEUS_REPLICAS_PATH)):
        assert mounts(config, service)[path]["read_only"] is True

    grafana = mounts(config, "grafana")
    assert grafana["/etc/grafana/provisioning"]["source"] == str(
        REPO / "docker" / "grafana" / "provisioning"
    )
    provider = yaml.safe_load(
        (REPO / "docker/grafana/provisioning/dashboards/cascade.yml").read_text()
    )
    dashboards_dir = provider["providers"][0]["options"]["path"]
    assert grafana[dashboards_dir]["source"] == str(DASHBOARD.parent), (
        "dashboard provider path is not mounted"
    )

    datasource = yaml.safe_load(
        (REPO / "docker/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    (ds,) = datasource["datasources"]
    assert ds["url"] == "http://prometheus:9090" and "prometheus" in services


def test_monitoring_listens_on_loopback_unless_widened(
    setup: str, config: dict[str, Any], tmp_path: Path
) -> None:
    for service in ("prometheus", "grafana"):
        ips = host_ips(config, service)
        assert ips and set(ips) == {"127.0.0.1"}, f"{service} is published on {ips}"
    widened = compose_config(SETUPS[setup][0], tmp_path, {"MONITORING_BIND_ADDRESS": "0.0.0.0"})
    for service in ("prometheus", "grafana"):
        assert set(host_ips(widened, service)) == {"0.0.0.0"}, service


def test_grafana_needs_its_admin_password_and_has_no_anonymous_access(
    setup: str, config: dict[str, Any], tmp_path: Path
) -> None:
    env = config["services"]["grafana"]["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == PASSWORD
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env.get("GF_USERS_ALLOW_SIGN_UP", "false") == "false"

    for variables in ({}, {"GRAFANA_ADMIN_PASSWORD": ""}):
        refused = run_compose(SETUPS[setup][0], tmp_path, variables)
        assert refused.returncode != 0, f"rendered without a Grafana password ({variables})"
        assert "set GRAFANA_ADMIN_PASSWORD" in refused.stderr, refused.stderr
