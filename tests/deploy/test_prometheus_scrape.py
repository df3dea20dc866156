"""docker/prometheus.yml, run by Debian's prometheus on loopback: it really scrapes a running server (a
cascade_ query through the HTTP API returns its data), and Prometheus itself accepts every PromQL query
of the Grafana dashboard and of the HPA's Prometheus-adapter rule."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy import dashboard
from tests.deploy.processes import ManagedProcess, Replica, free_port, http_ok, wait_until
from tests.deploy.rendering import (
    PROMETHEUS_YML,
    prometheus_replica_list,
    render_prometheus_main,
    render_prometheus_yml,
)
from tests.deploy.tooling import REPO, find_tool

# The shipped scrape interval is 5 s; this only bounds the wait, generously for a loaded 2-core machine.
SCRAPE_WAIT_S = 90.0
ADAPTER_CONFIG = REPO / "deploy" / "k8s" / "prometheus-adapter" / "prometheus-adapter-config.yaml"


def promtool_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_tool("promtool"), "check", "config", str(config)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_promtool_accepts_the_shipped_config_with_each_replica_list(tmp_path: Path) -> None:
    result = promtool_check(PROMETHEUS_YML)
    assert result.returncode == 0, result.stdout + result.stderr
    # promtool reads a file_sd list only where it exists: point the config at each shipped list.
    for setup in ("one-gpu", "two-gpus"):
        work = tmp_path / setup
        work.mkdir()
        config = render_prometheus_main(work, prometheus_replica_list(setup), free_port())
        result = promtool_check(config)
        assert result.returncode == 0 and "WARNING" not in result.stdout + result.stderr, (
            f"{setup}: {result.stdout}{result.stderr}"
        )
    # The check can fail: a list with a misspelt key is refused.
    bad = tmp_path / "bad.yml"
    bad.write_text("- targetz: [cascade-0:8000]\n")
    assert promtool_check(render_prometheus_main(tmp_path, bad, free_port())).returncode != 0


@dataclass(frozen=True)
class PrometheusApi:
    url: str
    replica: str  # the scraped server's address (target cascade-0)
    closed: str  # a closed port (target cascade-1)

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; a query Prometheus cannot parse fails the test with Prometheus' own message."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (
            f"{promql!r}: {body.get('error', r.text)}"
        )
        return body["data"]["result"]


@pytest.fixture(scope="module")
def prometheus(
    replica: Replica, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusApi]:
    """The shipped config with cascade-0 -> the running replica, cascade-1 -> a closed port."""
    work = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    closed = f"127.0.0.1:{free_port()}"
    config = render_prometheus_yml(work, [replica.address, closed], port)
    proc = ManagedProcess(
        "prometheus",
        [
            find_tool("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        work / "prometheus.log",
    )
    try:
        wait_until(
            lambda: http_ok(f"http://127.0.0.1:{port}/-/ready"),
            SCRAPE_WAIT_S,
            "prometheus /-/ready",
            proc=proc,
        )
        yield PrometheusApi(f"http://127.0.0.1:{port}", replica.address, closed)
    finally:
        proc.stop()


def test_prometheus_scrapes_the_replica(prometheus: PrometheusApi) -> None:
    replica = prometheus.replica
    found: list[dict[str, Any]] = []

    def scraped() -> bool:
        found[:] = prometheus.query('cascade_ready{job="cascade"}')
        return bool(found)

    wait_until(scraped, SCRAPE_WAIT_S, "a cascade_ready sample scraped from the replica")
    (series,) = found
    assert series["metric"]["instance"] == replica
    assert series["metric"]["service"] == "cascade"  # the static label of the shipped target group
    assert series["value"][1] == "1", "the replica is ready, so cascade_ready must be 1"

    up = {s["metric"]["instance"]: s["value"][1] for s in prometheus.query('up{job="cascade"}')}
    assert up.get(replica) == "1"
    closed = prometheus.closed
    wait_until(
        lambda: prometheus.query(f'up{{instance="{closed}"}}') != [],
        SCRAPE_WAIT_S,
        "the second (stopped) target to be scraped",
    )
    assert prometheus.query(f'up{{instance="{closed}"}}')[0]["value"][1] == "0"


def test_prometheus_accepts_every_dashboard_query(prometheus: PrometheusApi) -> None:
    # The check can fail: Prometheus refuses a query it cannot parse.
    bad = httpx.get(
        f"{prometheus.url}/api/v1/query",
        params={"query": "sum(rate(cascade_queue_depth[1m]"},
        timeout=10,
    )
    assert bad.status_code == 400 and bad.json()["errorType"] == "bad_data"
    for title, expr in dashboard.exprs(dashboard.load()):
        prometheus.query(dashboard.as_plain_promql(expr))  # asserts Prometheus parsed and ran it
    # and the template variable's own query, without Grafana's label_values() wrapper
    variable = dashboard.load()["templating"]["list"][0]["query"]["query"]
    assert variable.startswith("label_values(") and variable.endswith(", instance)")
    prometheus.query(variable[len("label_values(") : -len(", instance)")])


def test_prometheus_accepts_the_adapter_rule_query(prometheus: PrometheusApi) -> None:
    configmap = yaml.safe_load(ADAPTER_CONFIG.read_text())
    for rule in yaml.safe_load(configmap["data"]["config.yaml"])["rules"]:
        prometheus.query(rule["seriesQuery"])
        # As prometheus-adapter expands it for one pod of the HPA's namespace.
        query = (
            rule["metricsQuery"]
            .replace("<<.Series>>", rule["name"]["as"])
            .replace("<<.LabelMatchers>>", 'namespace="cascade",pod=~"cascade-serve-.*"')
            .replace("<<.GroupBy>>", "pod")
        )
        assert "<<" not in query, f"unexpanded template in {query}"
        prometheus.query(query)


def test_prometheus_runs_dashboard_queries_on_real_data(prometheus: PrometheusApi) -> None:
    """Beyond parsing: the queue-depth panel shows the scraped replica."""
    replica = prometheus.replica
    ((title, expr),) = [
        (t, e) for t, e in dashboard.exprs(dashboard.load()) if e.startswith("cascade_queue_depth{")
    ]
    wait_until(
        lambda: bool(prometheus.query(dashboard.as_plain_promql(expr))), SCRAPE_WAIT_S, title
    )
    instances = {s["metric"]["instance"] for s in prometheus.query(dashboard.as_plain_promql(expr))}
    assert instances == {replica}


def test_the_loopback_copy_differs_from_the_shipped_file_only_in_targets(tmp_path: Path) -> None:
    config = render_prometheus_yml(tmp_path, ["127.0.0.1:1", "127.0.0.1:2"], 3)
    shipped, rendered = PROMETHEUS_YML.read_text().splitlines(), config.read_text().splitlines()
    changed = [(old, new) for old, new in zip(shipped, rendered) if old != new]
    assert len(shipped) == len(rendered) and len(changed) == 2, changed
    assert re.fullmatch(r"\s*- 127\.0\.0\.1:3", changed[-1][1]), changed  # Prometheus itself
    assert changed[0][1].strip() == f"- {tmp_path / 'cascade-replicas.yml'}", changed

    shipped = prometheus_replica_list("two-gpus").read_text().splitlines()
    rendered = (tmp_path / "cascade-replicas.yml").read_text().splitlines()
    changed = [(old, new) for old, new in zip(shipped, rendered) if old != new]
    assert len(shipped) == len(rendered) and len(changed) == 2, changed
    assert all(re.fullmatch(r"\s*- 127\.0\.0\.1:[12]", new) for _, new in changed), changed
