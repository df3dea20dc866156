"""Continuous batching through uvicorn on the tiny pipeline: joining a running group, cancelling
queued and running jobs (DELETE, disconnect), request ids, and the same image in both modes.

The FaultyPipeline gate holds the compute thread inside one step, so each test acts at exactly
the step boundary it means, without sleeps."""

from __future__ import annotations

import base64
import io
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import WAIT_S, FaultyPipeline, LiveServer, serve, wait_until


@pytest.fixture
def pool():
    with ThreadPoolExecutor(16) as executor:
        yield executor


def post(live: LiveServer, pool: ThreadPoolExecutor, body: dict[str, Any], **headers: str):
    return pool.submit(
        lambda: httpx.post(live.url + "/v1/generate", json=body, headers=headers, timeout=WAIT_S)
    )


def image(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    data = response.json()["data"][0]["b64_json"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data)))).astype(int)


def held_in_first_step(live, pipeline, pool, body, request_id):
    """Send ``body`` and return once its first step is running (held by the closed gate)."""
    pipeline.gate.clear()
    pipeline.entered.clear()
    future = post(live, pool, body, **{"X-Request-ID": request_id})
    assert pipeline.entered.wait(WAIT_S)
    return future


def idle(live: LiveServer) -> bool:
    return (
        all(
            live.metric("cascade_active_images", stage=s) == 0
            for s in ("prior", "decoder", "vqgan")
        )
        and live.metric("cascade_inflight_jobs") == 0
    )


def test_a_request_joins_the_running_group_and_gets_its_solo_image(tiny_pipeline, pool):
    pipeline = FaultyPipeline(tiny_pipeline)
    with serve(pipeline, max_batch_images=4) as live:
        first = held_in_first_step(live, pipeline, pool, {"prompt": "first", "seed": 1}, "r1")
        late = post(live, pool, {"prompt": "late", "seed": 2, "prior_guidance_scale": 1.0})
        wait_until(lambda: live.client.get("/health/ready").json()["queue_depth"] == 1, "queued")
        assert live.client.get("/v1/requests/r1").json()["stage"] == "prior"
        pipeline.gate.set()
        joined, alone_first = late.result(), first.result()
        # the late job shared Stage C forwards with the first one, which was a step ahead
        assert ["first", "late"] in pipeline.steps
        assert pipeline.steps.index(["first", "late"]) == 1
        assert joined.json()["batch_images"] == 2
        assert live.metric("cascade_time_to_first_step_seconds_count") == 2
        solo = live.client.post(
            "/v1/generate", json={"prompt": "late", "seed": 2, "prior_guidance_scale": 1.0}
        )
        assert np.abs(image(joined) - image(solo)).max() <= 1
        assert alone_first.status_code == 200


def test_delete_cancels_a_running_job_at_the_next_step(tiny_pipeline, pool):
    pipeline = FaultyPipeline(tiny_pipeline)
    with serve(pipeline) as live:
        running = held_in_first_step(live, pipeline, pool, {"prompt": "doomed"}, "job-1")
        r = live.client.delete("/v1/requests/job-1")
        assert r.status_code == 200
        assert r.json() == {
            "id": "job-1", "status": "cancelled", "stage": "prior", "step": 0, "total": 6,
            "cancelled": True,
        }  # fmt: skip
        answer = running.result()  # answered at once, while its step is still held
        assert answer.status_code == 409 and answer.json()["error"]["code"] == "cancelled"
        assert answer.headers["x-request-id"] == "job-1"
        pipeline.gate.set()
        wait_until(lambda: idle(live), "its rows freed")
        assert [s for s in pipeline.steps if "doomed" in s] == [["doomed"]]  # no step after
        assert live.metric("cascade_cancelled_total", cause="request") == 1
        again = live.client.delete("/v1/requests/job-1").json()
        assert again["status"] == "cancelled" and again["cancelled"] is False
        assert live.client.get("/v1/requests/job-1").json()["status"] == "cancelled"
        missing = live.client.delete("/v1/requests/nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert live.client.post("/v1/generate", json={"prompt": "next"}).status_code == 200


def test_delete_cancels_a_queued_job_which_is_never_computed(tiny_pipeline, pool):
    pipeline = FaultyPipeline(tiny_pipeline)
    with serve(pipeline) as live:
        blocker = held_in_first_step(live, pipeline, pool, {"prompt": "blocker"}, "b")
        queued = post(live, pool, {"prompt": "never"}, **{"X-Request-ID": "q"})
        wait_until(lambda: live.client.get("/v1/requests/q").status_code == 200, "queued")
        state = live.client.get("/v1/requests/q").json()
        assert state["status"] == "queued" and state["queue_position"] == 0
        assert live.client.delete("/v1/requests/q").json()["cancelled"] is True
        assert queued.result().status_code == 409
        pipeline.gate.set()
        assert blocker.result().status_code == 200
        assert all("never" not in batch for batch in pipeline.batches)
        assert live.client.get("/v1/requests/b").json()["status"] == "done"


def test_a_request_id_in_flight_cannot_be_reused(tiny_pipeline, pool):
    pipeline = FaultyPipeline(tiny_pipeline)
    with serve(pipeline) as live:
        first = held_in_first_step(live, pipeline, pool, {"prompt": "a"}, "same")
        r = live.client.post("/v1/generate", json={"prompt": "b"}, headers={"X-Request-ID": "same"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "request_id_in_use"
        pipeline.gate.set()
        assert first.result().status_code == 200
        reuse = live.client.post(
            "/v1/generate", json={"prompt": "b"}, headers={"X-Request-ID": "same"}
        )
        assert reuse.status_code == 200  # once answered, the id is free again


def test_only_the_submitting_key_may_cancel(tiny_pipeline, pool, monkeypatch):
    monkeypatch.setenv("CASCADE_API_KEYS", "key-one,key-two")
    pipeline = FaultyPipeline(tiny_pipeline)
    one, two = {"Authorization": "Bearer key-one"}, {"Authorization": "Bearer key-two"}
    with serve(pipeline) as live:
        pipeline.gate.clear()
        pipeline.entered.clear()
        job = post(live, pool, {"prompt": "mine"}, **{"X-Request-ID": "k1", **one})
        assert pipeline.entered.wait(WAIT_S)
        assert live.client.delete("/v1/requests/k1", headers=two).status_code == 404
        assert live.client.get("/v1/requests/k1", headers=two).status_code == 404
        assert live.client.delete("/v1/requests/k1").status_code == 401
        assert live.client.delete("/v1/requests/k1", headers=one).json()["cancelled"] is True
        pipeline.gate.set()
        assert job.result().status_code == 409


def test_a_client_that_disconnects_mid_run_frees_its_rows(tiny_pipeline, pool):
    pipeline = FaultyPipeline(tiny_pipeline)
    with serve(pipeline) as live:
        pipeline.gate.clear()
        pipeline.entered.clear()
        body = b'{"prompt": "walked away"}'
        with socket.create_connection(("127.0.0.1", live.port)) as sock:
            sock.sendall(
                b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"X-Request-ID: gone\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            assert pipeline.entered.wait(WAIT_S)
        wait_until(
            lambda: live.metric("cascade_cancelled_total", cause="disconnect") == 1, "noticed"
        )
        pipeline.gate.set()
        wait_until(lambda: idle(live), "its rows freed")
        assert [s for s in pipeline.steps if "walked away" in s] == [["walked away"]]
        assert live.client.get("/v1/requests/gone").json()["status"] == "cancelled"


MIXED = [
    {"prompt": "one", "seed": 1},
    {"prompt": "two", "seed": 2, "num_images": 2, "prior_guidance_scale": 1.0},
    {"prompt": "three", "seed": 3, "width": 192, "prior_steps": 4},
    {"prompt": "four", "seed": 4, "decoder_steps": 3, "decoder_guidance_scale": 2.0},
    {"prompt": "five", "seed": 5, "negative_prompt": "dark"},
    {"prompt": "six", "seed": 6, "width": 192, "prior_steps": 4},
]


def pixels(response: httpx.Response) -> list[np.ndarray]:
    assert response.status_code == 200, response.text
    return [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))).astype(int)
        for d in response.json()["data"]
    ]


def test_the_same_request_gives_the_same_image_in_both_modes_under_mixed_load(tiny_pipeline, pool):
    """Six mixed requests at once (sizes, step counts, guidance) in each mode (continuous also
    with stage overlap), and each alone: every image within one level of 255 of the others."""
    runs = {}
    modes = {
        "continuous": {"batching": "continuous"},
        "overlap": {"batching": "continuous", "stage_overlap": True},
        "static": {"batching": "static"},
    }
    for mode, settings in modes.items():
        with serve(FaultyPipeline(tiny_pipeline), max_batch_images=4, **settings) as live:
            runs[mode] = [f.result() for f in [post(live, pool, b) for b in MIXED]]
            if mode == "overlap":  # the short jobs' Stage B ran beside the others' Stage C
                assert live.metric("cascade_overlapped_steps_total") > 0
            if mode == "static":
                runs["alone"] = [live.client.post("/v1/generate", json=b) for b in MIXED]
    for i in range(len(MIXED)):
        images = {name: pixels(responses[i]) for name, responses in runs.items()}
        for n, alone in enumerate(images["alone"]):
            for mode in modes:
                assert np.abs(images[mode][n] - alone).max() <= 1, (MIXED[i], mode)
