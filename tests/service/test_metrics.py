"""/metrics after real traffic: every metric of the fixed set is exported with values that match
what was sent; gauges move while a batch computes; each app has its own registry."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import (
    WAIT_S,
    FaultyPipeline,
    metric_value,
    parse_metrics,
    serve,
    wait_until,
)

FIXED_NAMES = [
    "cascade_requests_total",
    "cascade_request_duration_seconds",
    "cascade_queue_wait_seconds",
    "cascade_stage_duration_seconds",
    "cascade_encode_duration_seconds",
    "cascade_batch_size_images",
    "cascade_batches_total",
    "cascade_images_generated_total",
    "cascade_rejected_requests_total",
    "cascade_queue_depth",
    "cascade_inflight_jobs",
    "cascade_ready",
    "cascade_draining",
    "cascade_model_info",
    "cascade_active_images",
    "cascade_step_batch_images",
    "cascade_steps_total",
    "cascade_time_to_first_step_seconds",
    "cascade_cancelled_total",
]


def test_every_metric_is_exported_with_plausible_values(tiny_pipeline: Any) -> None:
    pipeline = FaultyPipeline(tiny_pipeline)
    with serve(pipeline, max_batch_images=4) as live, ThreadPoolExecutor(2) as pool:
        # while a batch computes: one job running, one queued -> inflight 2, queue depth 1
        pipeline.gate.clear()
        running = pool.submit(
            httpx.post,
            live.url + "/v1/generate",
            json={"prompt": "a", "num_images": 2},
            timeout=WAIT_S,
        )
        assert pipeline.entered.wait(WAIT_S)
        queued = pool.submit(
            httpx.post, live.url + "/v1/generate", timeout=WAIT_S,
            json={"prompt": "b", "width": 192},
            headers={"Accept": "image/png"},
        )  # fmt: skip
        wait_until(lambda: live.metric("cascade_queue_depth") == 1, "one job queued")
        assert live.metric("cascade_inflight_jobs") == 2
        assert live.metric("cascade_active_images", stage="prior") == 2
        pipeline.gate.set()
        assert running.result().status_code == 200 and queued.result().status_code == 200
        assert live.client.post("/v1/generate", json={"prompt": ""}).status_code == 422
        text = live.client.get("/metrics").text

    def value(name: str, **labels: str) -> float:
        return metric_value(text, name, **labels)

    for name in FIXED_NAMES:
        assert f"# TYPE {name} " in text, name
    assert "cascade_gpu_memory" not in text  # CUDA only
    assert value("cascade_requests_total", endpoint="/v1/generate", status="200") == 2
    assert value("cascade_requests_total", endpoint="/v1/generate", status="422") == 1
    assert value("cascade_requests_total", endpoint="/health/ready", status="200") >= 1
    assert (
        value("cascade_request_duration_seconds_count", endpoint="/v1/generate", outcome="ok") == 2
    )
    assert (
        value("cascade_request_duration_seconds_count", endpoint="/v1/generate", outcome="invalid")
        == 1
    )
    assert value("cascade_request_duration_seconds_sum", endpoint="/v1/generate", outcome="ok") > 0
    assert value("cascade_queue_wait_seconds_count") == 2
    # the queued job waited for the whole first batch
    assert value("cascade_queue_wait_seconds_sum") > 0
    for stage in ("text", "prior", "decoder", "vqgan"):
        assert value("cascade_stage_duration_seconds_count", stage=stage) == 2, stage
        assert value("cascade_stage_duration_seconds_sum", stage=stage) > 0, stage
    assert value("cascade_encode_duration_seconds_count", format="b64_json") == 1
    assert value("cascade_encode_duration_seconds_count", format="png") == 1
    assert (
        value("cascade_batch_size_images_count") == 2
        and value("cascade_batch_size_images_sum") == 3
    )
    assert value("cascade_batch_size_images_bucket", le="1.0") == 1
    # one call per admission (2), per step (6 + 4 steps, for each of the 2 sizes), per decode (2)
    assert value("cascade_steps_total", stage="prior") == 12
    assert value("cascade_steps_total", stage="decoder") == 8
    assert value("cascade_batches_total", outcome="ok") == 2 + 20 + 2
    assert value("cascade_step_batch_images_count", stage="prior") == 12
    assert value("cascade_step_batch_images_sum", stage="prior") == 6 * 2 + 6 * 1
    assert value("cascade_time_to_first_step_seconds_count") == 2
    assert value("cascade_time_to_first_step_seconds_sum") > 0
    for stage in ("prior", "decoder", "vqgan"):
        assert value("cascade_active_images", stage=stage) == 0
    for cause in ("disconnect", "request", "deadline"):
        assert f'cascade_cancelled_total{{cause="{cause}"}} 0.0' in text
    assert value("cascade_images_generated_total") == 3
    assert value("cascade_rejected_requests_total", reason="invalid") == 1
    assert value("cascade_queue_depth") == 0 and value("cascade_inflight_jobs") == 0
    assert value("cascade_ready") == 1 and value("cascade_draining") == 0
    info = [
        labels for name, labels, v in parse_metrics(text) if name == "cascade_model_info" and v == 1
    ]
    assert info == [
        {
            "name": "tiny-random",
            "demo": "true",
            "prior": "tiny",
            "decoder": "tiny",
            "device": "cpu",
            "dtype": "float32",
        }
    ]
    # latency buckets reach minutes, so slow requests and timeouts land in a finite bucket
    assert (
        value(
            "cascade_request_duration_seconds_bucket",
            endpoint="/v1/generate",
            outcome="ok",
            le="300.0",
        )
        == 2
    )


def test_each_app_has_its_own_registry() -> None:
    first, second = create_app(Settings()), create_app(Settings())
    assert first.state.metrics.registry is not second.state.metrics.registry
    first.state.metrics.images.inc(5)
    assert b"cascade_images_generated_total 0.0" in second.state.metrics.render()


def test_gpu_memory_gauges_appear_once_a_cuda_device_reports() -> None:
    metrics = create_app(Settings()).state.metrics
    metrics.set_gpu_memory(None)  # CPU: nothing exported
    assert b"cascade_gpu_memory" not in metrics.render()
    metrics.set_gpu_memory((3 * 2**30, 4 * 2**30))
    text = metrics.render().decode()
    assert metric_value(text, "cascade_gpu_memory_allocated_bytes") == 3 * 2**30
    assert metric_value(text, "cascade_gpu_memory_reserved_bytes") == 4 * 2**30
