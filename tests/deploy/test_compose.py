"""docker-compose.yml: valid against the Compose schema (Debian's docker-compose validates without a
daemon), one replica per GPU, weights read-only, and the replica list agreeing with nginx and Prometheus."""

from __future__ import annotations

import os
import re
import subprocess
from typing import Any

import pytest
import yaml

from tests.deploy.rendering import COMPOSE_FILE, DASHBOARD, NGINX_CONF, PROMETHEUS_YML
from tests.deploy.tooling import REPO, find_tool


def compose_config() -> dict[str, Any]:
    """The file as docker-compose resolves it (anchors merged, variables defaulted), after schema checks."""
    tool = find_tool("docker-compose")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CASCADE_", "COMPOSE_", "GRAFANA_"))
    }
    result = subprocess.run(
        [tool, "-f", str(COMPOSE_FILE), "config"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, f"docker-compose config rejected the file:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return compose_config()


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


def test_each_replica_gets_its_own_gpu(config: dict[str, Any]) -> None:
    reps = replicas(config)
    assert len(reps) >= 2, f"expected several GPU replicas, found {sorted(reps)}"
    gpu_ids: list[str] = []
    for name, svc in reps.items():
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert len(device["device_ids"]) == 1, f"{name} must own exactly one GPU"
        assert "count" not in device, f"{name}: count and device_ids exclude each other"
        gpu_ids += device["device_ids"]
        assert "replicas" not in svc.get("deploy", {}), f"{name}: replicas would share the GPU"
    assert len(set(gpu_ids)) == len(gpu_ids), f"two replicas share a GPU: {gpu_ids}"


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


def test_nginx_prometheus_and_compose_list_the_same_replicas(config: dict[str, Any]) -> None:
    names = set(replicas(config))
    upstreams = set(
        re.findall(r"^\s*server\s+([\w.-]+):8000\b", NGINX_CONF.read_text(), re.MULTILINE)
    )
    assert upstreams == names, (
        f"nginx upstream {sorted(upstreams)} != compose replicas {sorted(names)}"
    )

    prom = yaml.safe_load(PROMETHEUS_YML.read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "cascade"]
    targets = {t.split(":")[0] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == names, (
        f"prometheus targets {sorted(targets)} != compose replicas {sorted(names)}"
    )


def test_nginx_prometheus_grafana_mount_the_shipped_configs(config: dict[str, Any]) -> None:
    services = config["services"]

    def mounts(name: str) -> dict[str, dict[str, Any]]:
        return {v["target"]: v for v in map(volume, services[name]["volumes"])}

    nginx = mounts("nginx")["/etc/nginx/nginx.conf"]
    assert nginx["source"] == str(NGINX_CONF) and nginx["read_only"] is True
    assert mounts("prometheus")["/etc/prometheus/prometheus.yml"]["source"] == str(PROMETHEUS_YML)

    grafana = mounts("grafana")
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
