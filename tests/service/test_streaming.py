"""POST /v1/generate as Server-Sent Events through uvicorn on the tiny pipeline: the events and
their order, previews, the queue position, the same image as the JSON answer, cancelling by
closing the stream or by DELETE, and bad combinations of fields.

The FaultyPipeline gate holds the compute thread inside a step, so a test acts at the step it
means, without sleeps."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service.streaming import every_k_steps, spread_over_steps
from tests.service.conftest import WAIT_S, FaultyPipeline, LiveServer, serve, wait_until

BODY = {"prompt": "a red circle", "seed": 7}  # tiny defaults: 128 px, 6 + 4 steps


@pytest.fixture
def pool():
    with ThreadPoolExecutor(4) as executor:
        yield executor


def read_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Parse an SSE stream as a browser does: fields until a blank line; ``:`` lines are
    comments. Yields each event's data (JSON) with its ``event:`` name checked against it."""
    name, data = None, []
    for line in lines:
        if line == "":
            if data:
                event = json.loads("\n".join(data))
                assert event["type"] == name, (name, event)
                yield event
            name, data = None, []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)


def stream(live: LiveServer, body: dict[str, Any], **headers: str) -> list[dict[str, Any]]:
    with httpx.stream(
        "POST", live.url + "/v1/generate", json={**body, "stream": True}, headers=headers,
        timeout=WAIT_S,
    ) as response:  # fmt: skip
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(read_events(response.iter_lines()))


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))).astype(int)


def test_events_come_in_order_and_the_result_is_the_json_answer(tiny_pipeline):
    with serve(tiny_pipeline) as live:
        events = stream(live, {**BODY, "preview_every": 2}, **{"X-Request-ID": "s1"})
        plain = live.client.post("/v1/generate", json=BODY).json()
    kinds = [e["type"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "result" and "error" not in kinds
    assert all(e["id"] == "s1" for e in events)
    steps = [(e["stage"], e["step"], e["total"]) for e in events if e["type"] == "step"]
    assert steps == [("prior", k, 6) for k in range(1, 7)] + [
        ("decoder", k, 4) for k in (1, 2, 3, 4)
    ]
    previews = [e for e in events if e["type"] == "preview"]
    assert [p["step"] for p in previews] == [2, 4, 6]
    for preview in previews:  # each right after the step it shows
        assert kinds[events.index(preview) - 1] == "step"
        (picture,) = preview["images"]
        assert picture["seed"] == 7 and (picture["width"], picture["height"]) == (24, 24)
        assert decode(picture["b64_json"]).shape == (24, 24, 3)  # Stage C 3x3 latent, x8
    result = events[-1]
    assert result["id"] == "s1" and result["seed"] == 7 and result["warnings"] == []
    assert set(result) - {"type"} == set(plain)
    np.testing.assert_array_equal(
        decode(result["data"][0]["b64_json"]), decode(plain["data"][0]["b64_json"])
    )


def test_accept_event_stream_asks_for_a_stream_too(tiny_pipeline):
    with serve(tiny_pipeline) as live, httpx.stream(
        "POST", live.url + "/v1/generate", json=BODY,
        headers={"Accept": "text/event-stream"}, timeout=WAIT_S,
    ) as response:  # fmt: skip
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        kinds = [e["type"] for e in read_events(response.iter_lines())]
    assert kinds[0] == "started" and kinds[-1] == "result" and "preview" not in kinds


def test_a_waiting_stream_reports_its_queue_position(tiny_pipeline, pool):
    pipeline = FaultyPipeline(tiny_pipeline)
    with serve(pipeline, max_active_images=4, max_batch_images=4) as live:
        pipeline.gate.clear()
        pipeline.entered.clear()
        first = pool.submit(stream, live, {"prompt": "first", "num_images": 4})
        assert pipeline.entered.wait(WAIT_S)  # "first" fills max_active_images
        second = pool.submit(stream, live, {"prompt": "second"})
        wait_until(lambda: live.client.get("/health/ready").json()["queue_depth"] == 1, "queued")
        pipeline.gate.set()
        events, first_events = second.result(WAIT_S), first.result(WAIT_S)
    assert events[0] == {"type": "queued", "id": events[0]["id"], "queue_position": 0}
    assert events[1]["type"] == "started" and events[-1]["type"] == "result"
    assert first_events[0]["type"] == "started" and first_events[-1]["type"] == "result"


def test_closing_the_stream_cancels_the_job_at_the_next_step(tiny_pipeline):
    pipeline = FaultyPipeline(tiny_pipeline)
    with serve(pipeline) as live:
        with httpx.stream(
            "POST", live.url + "/v1/generate", json={"prompt": "walked away", "stream": True},
            timeout=WAIT_S,
        ) as response:  # fmt: skip
            for event in read_events(response.iter_lines()):
                if event["type"] == "step":
                    pipeline.gate.clear()  # hold the next step until the close is noticed
                    break
        wait_until(
            lambda: live.metric("cascade_cancelled_total", cause="disconnect") == 1, "noticed"
        )
        pipeline.gate.set()
        wait_until(lambda: live.metric("cascade_inflight_jobs") == 0, "its rows freed")
        ran = [s for s in pipeline.steps if "walked away" in s]
        assert 1 <= len(ran) <= 2  # the step it saw, at most the one already held (of 10)


def test_delete_ends_the_stream_with_a_cancelled_error_event(tiny_pipeline, pool):
    pipeline = FaultyPipeline(tiny_pipeline)
    with serve(pipeline) as live:
        pipeline.gate.clear()
        pipeline.entered.clear()
        future = pool.submit(stream, live, {"prompt": "unwanted"}, **{"X-Request-ID": "del"})
        assert pipeline.entered.wait(WAIT_S)
        assert live.client.delete("/v1/requests/del").json()["cancelled"] is True
        pipeline.gate.set()
        events = future.result(WAIT_S)
    error = events[-1]
    assert error["type"] == "error" and error["status"] == 409
    assert error["error"]["code"] == "cancelled" and error["error"]["request_id"] == "del"
    assert "result" not in [e["type"] for e in events]


def test_without_a_previewer_the_stream_warns_and_has_no_previews(tiny_pipeline):
    pipeline = FaultyPipeline(tiny_pipeline)
    pipeline.model_info = {**tiny_pipeline.model_info, "previews": False}
    with serve(pipeline) as live:
        events = stream(live, {**BODY, "preview_every": 1})
    assert "preview" not in [e["type"] for e in events]
    (warning,) = events[-1]["warnings"]
    assert "previews are off" in warning and "previewer.safetensors" in warning


BAD = [
    ({"preview_every": 2}, "preview_every"),  # previews need a stream
    ({"stream": True, "response_format": "png"}, "response_format"),
    ({"stream": "yes"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"stream": True, "preview_every": 0}, "preview_every"),
    ({"stream": True, "width": 7}, "width"),  # found before queueing: plain JSON, not a stream
]


def test_bad_stream_fields_get_a_422_naming_the_field(tiny_pipeline):
    with serve(tiny_pipeline) as live:
        for body, field in BAD:
            response = live.client.post("/v1/generate", json={"prompt": "x", **body})
            assert response.status_code == 422, (body, response.text)
            assert response.headers["content-type"] == "application/json"
            assert response.json()["error"]["field"] == field, body


def test_preview_step_choices():
    assert every_k_steps(5, 20) == {5, 10, 15, 20}
    assert every_k_steps(7, 20) == {7, 14}
    assert every_k_steps(30, 20) == frozenset()
    assert spread_over_steps(3, 20) == {5, 10, 15}
    assert spread_over_steps(1, 20) == {10}
    assert spread_over_steps(3, 3) == {1, 2, 3}
    assert spread_over_steps(3, 2) == {1, 2}  # fewer only when Stage C has fewer steps
    assert spread_over_steps(0, 20) == frozenset()
    for total in range(1, 40):
        for count in range(4):
            assert len(spread_over_steps(count, total)) == min(count, total)
