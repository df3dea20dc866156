"""The provisioned Grafana dashboard: valid JSON wired to the provisioned datasource, covering what operators
need, and reading only metrics the service really exports (compared with a running server's /metrics; the
CUDA-only GPU gauges with service.metrics, which registers them once a GPU reports)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy import dashboard
from tests.deploy.processes import Replica
from tests.deploy.tooling import REPO

PROVISIONING = REPO / "docker" / "grafana" / "provisioning"
GPU_ONLY = {"cascade_gpu_memory_allocated_bytes", "cascade_gpu_memory_reserved_bytes"}


@pytest.fixture(scope="module")
def dash() -> dict[str, Any]:
    return dashboard.load()


def exposition_names(text: str) -> set[str]:
    """Sample names (with _total/_bucket/_sum/_count suffixes) in a Prometheus text exposition."""
    return {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


def module_names_with_gpu() -> set[str]:
    """Names service.metrics exports on a CUDA device: every family, as its samples are named."""
    from service.metrics import Metrics

    metrics = Metrics(max_batch_images=4)
    metrics.set_gpu_memory((1, 2))  # what the worker reports after a batch on CUDA
    names: set[str] = set()
    for family in metrics.registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(
            family.type, [""]
        )
        names |= {family.name + suffix for suffix in suffixes}
    return names


def test_dashboard_uses_the_provisioned_datasource(dash: dict[str, Any]) -> None:
    (datasource,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    uids = {p["datasource"]["uid"] for p in dashboard.panels(dash)}
    uids |= {t["datasource"]["uid"] for p in dashboard.panels(dash) for t in p.get("targets", [])}
    assert uids == {datasource["uid"]}
    assert dash["uid"] and dash["title"]
    assert len({p["id"] for p in dashboard.panels(dash)}) == len(list(dashboard.panels(dash)))


def test_dashboard_covers_the_operational_questions(dash: dict[str, Any]) -> None:
    queries = dashboard.exprs(dash)
    assert all(expr.strip() for _, expr in queries)
    used = set().union(*(dashboard.metric_names(expr) for _, expr in queries))
    required = {
        "cascade_requests_total",  # request rate
        "cascade_request_duration_seconds_bucket",  # latency quantiles
        "cascade_queue_wait_seconds_bucket",  # queue wait ...
        "cascade_stage_duration_seconds_sum",  # ... vs compute
        "cascade_batch_size_images_sum",  # batch size
        "cascade_queue_depth",
        "cascade_rejected_requests_total",
        "cascade_gpu_memory_allocated_bytes",
        "cascade_gpu_memory_reserved_bytes",
        "cascade_active_images",  # the step-level engine: images in flight per stage,
        "cascade_step_batch_images_sum",  # how full each forward is,
        "cascade_steps_total",
        "cascade_time_to_first_step_seconds_bucket",  # time to first step,
        "cascade_cancelled_total",  # cancellations
    }
    assert required <= used, f"dashboard lacks {sorted(required - used)}"
    latency = [e for _, e in queries if "cascade_request_duration_seconds_bucket" in e]
    for quantile in ("0.50", "0.95", "0.99"):
        assert any(f"histogram_quantile({quantile}," in e for e in latency), (
            f"no p{quantile[2:]} latency"
        )


def test_dashboard_reads_only_metrics_defined_by_service_metrics(dash: dict[str, Any]) -> None:
    defined = module_names_with_gpu()
    for title, expr in dashboard.exprs(dash):
        unknown = dashboard.metric_names(expr) - defined
        assert not unknown, (
            f"panel {title!r} reads {sorted(unknown)}, which service.metrics never exports"
        )


def test_dashboard_reads_only_metrics_a_running_server_exposes(
    dash: dict[str, Any], replica: Replica
) -> None:
    # One generation and one refusal, so that every labelled series (request duration, batches,
    # rejections, ...) has samples.
    r = httpx.post(
        f"{replica.url}/v1/generate", json={"prompt": "a green square", "seed": 3}, timeout=120
    )
    assert r.status_code == 200, r.text
    r = httpx.post(f"{replica.url}/v1/generate", json={"prompt": ""}, timeout=60)
    assert r.status_code == 422, r.text
    exposed = exposition_names(httpx.get(f"{replica.url}/metrics", timeout=10).text)
    cpu_server_lacks = GPU_ONLY  # registered only once a CUDA device reports memory
    assert not (exposed & GPU_ONLY), "a CPU server should not export GPU gauges"
    for title, expr in dashboard.exprs(dash):
        unknown = dashboard.metric_names(expr) - exposed - cpu_server_lacks
        assert not unknown, (
            f"panel {title!r} reads {sorted(unknown)}, absent from a running server's /metrics"
        )
