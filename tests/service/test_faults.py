"""Batching, overload and faults through uvicorn, on the real tiny pipeline wrapped by
FaultyPipeline.

A gate in the wrapper holds the compute thread inside one batch, so the tests can fill the queue,
let deadlines pass or disconnect clients at exactly the moment they mean, without long sleeps.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import WAIT_S, FaultyPipeline, LiveServer, serve, serve_app, wait_until


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(16) as executor:
        yield executor


def post(
    live: LiveServer, pool: ThreadPoolExecutor, body: dict[str, Any]
) -> Future[httpx.Response]:
    return pool.submit(lambda: httpx.post(live.url + "/v1/generate", json=body, timeout=WAIT_S))


def hold_compute(
    live: LiveServer, pipeline: FaultyPipeline, pool: ThreadPoolExecutor
) -> Future[httpx.Response]:
    """Close the gate and send a request that will sit inside generate() until the gate opens."""
    pipeline.gate.clear()
    pipeline.entered.clear()
    blocker = post(live, pool, {"prompt": "blocker", "seed": 1})
    assert pipeline.entered.wait(WAIT_S)
    return blocker


def queue_depth(live: LiveServer) -> int:
    return int(live.client.get("/health/ready").json()["queue_depth"])


def image(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(
        Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
    )


def test_concurrent_compatible_requests_share_a_batch_and_match_solo_runs(
    tiny_pipeline: Any, pool: ThreadPoolExecutor
) -> None:
    pipeline = FaultyPipeline(tiny_pipeline)
    bodies = [
        {"prompt": f"a shape number {i}", "seed": 100 + i, "prior_guidance_scale": 2.0 + i}
        for i in range(4)
    ]
    with serve(pipeline, max_batch_images=4, batching="static") as live:
        blocker = hold_compute(live, pipeline, pool)
        futures = [post(live, pool, body) for body in bodies]
        wait_until(lambda: queue_depth(live) == 4, "4 jobs queued")
        pipeline.gate.set()
        batched = [f.result() for f in futures]
        assert blocker.result().status_code == 200
        assert pipeline.batches[0] == ["blocker"]  # admitted alone, then one batch of 4
        assert sorted(pipeline.batches[1]) == sorted(b["prompt"] for b in bodies)
        assert all(r.json()["batch_images"] == 4 for r in batched)
        solo = [live.client.post("/v1/generate", json=body) for body in bodies]  # one at a time
        assert all(r.json()["batch_images"] == 1 for r in solo)
    for together, alone in zip(batched, solo, strict=True):
        # per-image generators: a batch neighbour changes nothing beyond CPU kernel rounding
        assert np.abs(image(together).astype(int) - image(alone).astype(int)).max() <= 2


def test_full_queue_is_rejected_at_once_with_retry_after(
    tiny_pipeline: Any, pool: ThreadPoolExecutor
) -> None:
    pipeline = FaultyPipeline(tiny_pipeline)
    with serve(pipeline, max_queue_size=1, retry_after_s=7) as live:
        blocker = hold_compute(live, pipeline, pool)
        queued = post(live, pool, {"prompt": "queued"})
        wait_until(lambda: queue_depth(live) == 1, "queue full")
        started = time.monotonic()
        r = live.client.post("/v1/generate", json={"prompt": "one too many"})
        assert time.monotonic() - started < 5
        assert r.status_code == 503 and r.headers["retry-after"] == "7"
        assert r.json()["error"]["code"] == "queue_full"
        pipeline.gate.set()
        assert blocker.result().status_code == 200 and queued.result().status_code == 200
        assert live.metric("cascade_rejected_requests_total", reason="queue_full") == 1


def test_deadline_passing_in_the_queue_gives_504_and_no_compute(
    tiny_pipeline: Any, pool: ThreadPoolExecutor
) -> None:
    pipeline = FaultyPipeline(tiny_pipeline)
    with serve(pipeline) as live:
        blocker = hold_compute(live, pipeline, pool)
        r = live.client.post("/v1/generate", json={"prompt": "impatient", "timeout_s": 0.3})
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        assert queue_depth(live) == 0
        pipeline.gate.set()
        assert blocker.result().status_code == 200
        assert live.client.post("/v1/generate", json={"prompt": "after"}).status_code == 200
        assert all("impatient" not in batch for batch in pipeline.batches)
        assert live.metric("cascade_rejected_requests_total", reason="deadline") == 1
        assert live.metric("cascade_request_duration_seconds_count", outcome="deadline") == 1
        # queue wait is observed for every job that left the queue: blocker, expired, after
        assert live.metric("cascade_queue_wait_seconds_count") == 3


def test_server_deadline_setting_applies(tiny_pipeline: Any, pool: ThreadPoolExecutor) -> None:
    pipeline = FaultyPipeline(tiny_pipeline)
    with serve(pipeline, request_timeout_s=0.3) as live:
        blocker = hold_compute(live, pipeline, pool)
        r = live.client.post("/v1/generate", json={"prompt": "impatient", "timeout_s": 100})
        assert r.status_code == 504  # a request may shorten the deadline, never extend it
        pipeline.gate.set()
        blocker.result()


def test_client_disconnect_while_queued_drops_the_job(
    tiny_pipeline: Any, pool: ThreadPoolExecutor
) -> None:
    pipeline = FaultyPipeline(tiny_pipeline)
    with serve(pipeline) as live:
        blocker = hold_compute(live, pipeline, pool)
        body = b'{"prompt": "walked away"}'
        with socket.create_connection(("127.0.0.1", live.port)) as sock:
            sock.sendall(
                b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            wait_until(lambda: queue_depth(live) == 1, "job queued")
        wait_until(lambda: queue_depth(live) == 0, "job dropped after the disconnect")
        assert live.metric("cascade_rejected_requests_total", reason="disconnected") == 1
        assert live.metric("cascade_request_duration_seconds_count", outcome="disconnected") == 1
        pipeline.gate.set()
        assert blocker.result().status_code == 200
        assert live.client.post("/v1/generate", json={"prompt": "next"}).status_code == 200
        assert all("walked away" not in batch for batch in pipeline.batches)
        assert pipeline.batches == [["blocker"], ["next"]]


def mode(batching: str) -> dict[str, Any]:
    """Settings of a batching mode; "overlap": continuous with stage overlap."""
    if batching == "overlap":
        return {"batching": "continuous", "stage_overlap": True}
    return {"batching": batching}


@pytest.mark.parametrize("batching", ["continuous", "static", "overlap"])
def test_a_failing_job_fails_only_itself_and_the_scheduler_goes_on(
    tiny_pipeline: Any, pool: ThreadPoolExecutor, batching: str
) -> None:
    """A step that raises is retried on each half of its group until the failing job is alone:
    only that job fails, whoever shared its forwards."""
    pipeline = FaultyPipeline(tiny_pipeline)
    pipeline.raise_for = "explode"
    with serve(pipeline, max_batch_images=2, **mode(batching)) as live:
        blocker = hold_compute(live, pipeline, pool)
        doomed = post(live, pool, {"prompt": "explode", "seed": 1})
        neighbour = post(live, pool, {"prompt": "neighbour"})
        other_size = post(live, pool, {"prompt": "different batch", "width": 192})
        wait_until(lambda: queue_depth(live) == 3, "3 jobs queued")
        pipeline.gate.set()
        r = doomed.result()
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["code"] == "generation_failed" and "injected failure" in err["message"]
        for future in (neighbour, other_size, blocker):
            assert future.result().status_code == 200
        assert any("explode" in step and len(step) > 1 for step in pipeline.steps)  # it shared
        assert live.client.post("/v1/generate", json={"prompt": "later"}).status_code == 200
        assert live.metric("cascade_batches_total", outcome="error") >= 1
        assert live.client.get("/health/ready").status_code == 200


def test_non_finite_output_fails_only_that_request(
    tiny_pipeline: Any, pool: ThreadPoolExecutor
) -> None:
    pipeline = FaultyPipeline(tiny_pipeline)
    pipeline.nan_for = "poisoned"
    with serve(pipeline, max_batch_images=2, batching="static") as live:
        blocker = hold_compute(live, pipeline, pool)
        bad, good = post(live, pool, {"prompt": "poisoned"}), post(live, pool, {"prompt": "fine"})
        wait_until(lambda: queue_depth(live) == 2, "2 jobs queued")
        pipeline.gate.set()
        blocker.result()
        assert (
            bad.result().status_code == 500
            and bad.result().json()["error"]["code"] == "non_finite_output"
        )
        assert good.result().status_code == 200 and good.result().json()["batch_images"] == 2


@pytest.mark.parametrize("batching", ["continuous", "static", "overlap"])
def test_out_of_memory_shrinks_the_group_and_succeeds(
    tiny_pipeline: Any, pool: ThreadPoolExecutor, batching: str
) -> None:
    pipeline = FaultyPipeline(tiny_pipeline)
    with serve(pipeline, max_batch_images=4, **mode(batching)) as live:
        blocker = hold_compute(live, pipeline, pool)
        pipeline.oom_above = 1
        futures = [post(live, pool, {"prompt": f"p{i}", "seed": i}) for i in range(3)]
        wait_until(lambda: queue_depth(live) == 3, "3 jobs queued")
        pipeline.gate.set()
        assert blocker.result().status_code == 200
        assert [f.result().status_code for f in futures] == [200, 200, 200]
        assert live.metric("cascade_batches_total", outcome="oom") >= 1
        # after a group's out-of-memory splits it stays small: a few attempts per group key fail
        # (Stage C and Stage B groups), not one per step
        assert live.metric("cascade_batches_total", outcome="oom") <= 8
        assert all(len(step) == 1 for step in pipeline.steps[-5:])
        # a single request that cannot fit fails with a clear 500, and the server keeps serving
        r = live.client.post("/v1/generate", json={"prompt": "big", "num_images": 2})
        assert r.status_code == 500 and r.json()["error"]["code"] == "gpu_out_of_memory"
        pipeline.oom_above = None
        assert live.client.post("/v1/generate", json={"prompt": "ok again"}).status_code == 200


def test_not_ready_until_warm_up_has_run(tiny_pipeline: Any) -> None:
    pipeline = FaultyPipeline(tiny_pipeline, gate_warmup=True)
    pipeline.gate.clear()
    with serve(pipeline, ready=False, retry_after_s=3) as live:
        assert pipeline.entered.wait(WAIT_S)  # warm-up generation is running (held)
        alive = live.client.get("/health/live")
        assert alive.status_code == 200
        r = live.client.get("/health/ready")
        assert (
            r.status_code == 503
            and r.json()["status"] == "starting"
            and r.headers["retry-after"] == "3"
        )
        # Both probes report the same state: not ready, no model yet.
        assert alive.json() == r.json()
        assert r.json()["ready"] is False and r.json()["model"] is None
        r = live.client.post("/v1/generate", json={"prompt": "too early"})
        assert (
            r.status_code == 503
            and r.json()["error"]["code"] == "not_ready"
            and r.headers["retry-after"] == "3"
        )
        assert live.metric("cascade_ready") == 0
        pipeline.gate.set()
        live.wait_ready()
        assert live.metric("cascade_ready") == 1
        assert live.client.post("/v1/generate", json={"prompt": "now"}).status_code == 200


def test_failed_model_load_turns_liveness_503_and_asks_to_stop(tiny_pipeline: Any) -> None:
    def broken(_: Any) -> Any:
        raise FileNotFoundError("no weights under /nowhere")

    app = create_app(Settings(), broken)
    stopped = threading.Event()
    app.state.runtime.on_fatal = stopped.set
    with serve_app(app) as live:
        assert stopped.wait(WAIT_S)
        alive = live.client.get("/health/live")
        assert alive.status_code == 503 and "no weights under /nowhere" in alive.json()["message"]
        r = live.client.get("/health/ready")
        assert r.status_code == 503 and r.json()["status"] == "failed"
        assert alive.json() == r.json() and r.json()["model"] is None
        r = live.client.post("/v1/generate", json={"prompt": "a"})
        assert r.status_code == 503 and "FileNotFoundError" in r.json()["error"]["message"]
