"""POST /v1/generate with an input image, through uvicorn on the tiny pipeline, in both batching
modes: image-to-image and variation defaults, the size taken from the image, the effective values
echoed (body, raw PNG headers, PNG metadata), streams, the same image alone or in a batch, the
body limits (413), and the queue, cancellation and metrics as for any other request.

The FaultyPipeline gate holds the compute thread inside a step, so a test acts when it means to,
without sleeps."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import WAIT_S, FaultyPipeline, LiveServer, serve, wait_until
from tests.service.test_streaming import read_events

MAX_BODY = 4096
MAX_IMAGE = 60_000


def png(size: tuple[int, int] = (100, 60), colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    picture = Image.new("RGB", size, colour)
    picture.paste((20, 20, 220), (0, 0, size[0] // 2, size[1] // 2))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


RED, GREEN = b64(png()), b64(png(colour=(30, 200, 30)))


def pixels(b64_png: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64_png))) as picture:
        return np.asarray(picture.convert("RGB"))


class RecordingPipeline(FaultyPipeline):
    """FaultyPipeline that also keeps the GenerationParams it was asked to start."""

    def __init__(self, pipeline: Any) -> None:
        super().__init__(pipeline)
        self.admitted: list[Any] = []

    def start(self, batch: Any) -> list[Any]:
        self.admitted.extend(batch)
        return super().start(batch)


@pytest.fixture(scope="module", params=["continuous", "static"])
def live(request: pytest.FixtureRequest, tiny_pipeline: Any) -> Iterator[LiveServer]:
    pipeline = RecordingPipeline(tiny_pipeline)
    with serve(
        pipeline,
        batching=request.param,
        max_body_bytes=MAX_BODY,
        max_image_bytes=MAX_IMAGE,
        max_queue_size=2,
        max_batch_images=4,
    ) as server:
        server.pipeline = pipeline  # type: ignore[attr-defined]
        yield server


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as executor:
        yield executor


def generate(live: LiveServer, body: dict[str, Any], **headers: str) -> httpx.Response:
    with httpx.Client(base_url=live.url, timeout=WAIT_S) as client:  # one per thread
        return client.post("/v1/generate", json=body, headers=headers)


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()


def test_image_to_image_defaults_size_and_echo(live: LiveServer) -> None:
    out = ok(generate(live, {"image": RED, "prompt": "a red circle", "seed": 3}))
    # 100 x 60 snapped to the model's size step of 8; the official img2img strength
    assert (out["width"], out["height"]) == (104, 64)
    assert (out["strength"], out["image_variation"]) == (0.8, False)
    (entry,) = out["data"]
    assert pixels(entry["b64_json"]).shape == (64, 104, 3)
    with Image.open(io.BytesIO(base64.b64decode(entry["b64_json"]))) as picture:
        text = picture.text["parameters"]
    assert text.startswith("a red circle\n")
    assert text.endswith("Size: 104x64, Model: tiny-random, Strength: 0.8, Image variation: false")
    assert RED[:40] not in text and len(text) < 300  # the parameters, never the input image


def test_variation_without_a_prompt(live: LiveServer) -> None:
    for body in ({"image": RED}, {"image": RED, "prompt": ""}, {"image": RED, "prompt": "  "}):
        out = ok(generate(live, {**body, "seed": 5}))
        assert (out["strength"], out["image_variation"]) == (1.0, True), body
        with Image.open(io.BytesIO(base64.b64decode(out["data"][0]["b64_json"]))) as picture:
            assert picture.text["parameters"].startswith("\nPrior steps: 6,")
    both = ok(generate(live, {"image": RED, "prompt": "a cat", "image_variation": True}))
    assert (both["strength"], both["image_variation"]) == (0.8, True)
    plain = ok(generate(live, {"prompt": "a cat", "seed": 5}))
    assert (plain["strength"], plain["image_variation"]) == (None, None)


def test_the_pipeline_gets_the_decoded_picture(live: LiveServer) -> None:
    """What the HTTP side owes the pipeline: the picture upright (EXIF), opaque (alpha on white)
    and RGB, at its own size, with the effective strength and variation."""
    stored = Image.new("RGBA", (40, 20), (0, 0, 255, 255))
    stored.paste((255, 0, 0, 255), (0, 0, 6, 6))  # red top-left corner as stored
    stored.paste((0, 0, 0, 0), (34, 14, 40, 20))  # transparent bottom-right corner
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    buffer = io.BytesIO()
    stored.save(buffer, "PNG", exif=exif)
    pipeline: FaultyPipeline = live.pipeline  # type: ignore[attr-defined]
    pipeline.admitted.clear()
    ok(generate(live, {"image": b64(buffer.getvalue()), "prompt": "x", "strength": 0.5}))
    (params,) = [p for p in pipeline.admitted if p.prompt == "x"]
    picture = params.image
    assert picture.mode == "RGB" and picture.size == (20, 40)
    assert picture.getpixel((19, 0)) == (255, 0, 0)  # the red corner, now top-right
    assert picture.getpixel((0, 39)) == (255, 255, 255)  # the transparent one, on white
    assert (params.strength, params.image_variation) == (0.5, False)
    assert (params.width, params.height) == (64, 128)  # 20 x 40 scaled into 64..512


def test_image_requests_are_deterministic_and_differ_from_text_to_image(live: LiveServer) -> None:
    body = {"prompt": "a red circle", "seed": 11, "strength": 0.6, "image": RED}
    first = pixels(ok(generate(live, body))["data"][0]["b64_json"])
    again = pixels(ok(generate(live, body))["data"][0]["b64_json"])
    np.testing.assert_array_equal(first, again)
    text_only = {"prompt": "a red circle", "seed": 11, "width": 104, "height": 64}
    assert not np.array_equal(first, pixels(ok(generate(live, text_only))["data"][0]["b64_json"]))
    # the CLIP image embedding conditions a variation: another picture, another image
    red = pixels(ok(generate(live, {"image": RED, "seed": 11}))["data"][0]["b64_json"])
    green = pixels(ok(generate(live, {"image": GREEN, "seed": 11}))["data"][0]["b64_json"])
    assert not np.array_equal(red, green)


@pytest.mark.parametrize(
    ("size", "given", "expected"),
    [
        ((100, 60), {"width": 64, "height": 128}, (64, 128)),
        ((100, 60), {"width": 200}, (200, 120)),  # the other side follows the image
        ((1200, 600), {}, (512, 256)),  # over the model's 512: scaled down, aspect ratio kept
        ((30, 20), {}, (96, 64)),  # under its 64: scaled up
    ],
)
def test_sizes_from_the_image(live: LiveServer, size, given, expected) -> None:
    data = b64(png(size))
    out = ok(generate(live, {"image": data, "prior_steps": 2, "decoder_steps": 1, **given}))
    assert (out["width"], out["height"]) == expected
    assert pixels(out["data"][0]["b64_json"]).shape == (expected[1], expected[0], 3)


def test_a_raw_png_carries_the_effective_values_in_headers(live: LiveServer) -> None:
    r = generate(live, {"image": RED, "prompt": "x", "strength": 0.5}, Accept="image/png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert (r.headers["x-strength"], r.headers["x-image-variation"]) == ("0.5", "false")
    plain = generate(live, {"prompt": "x"}, Accept="image/png")
    assert "x-strength" not in plain.headers


def test_a_stream_runs_the_image_to_image_steps(live: LiveServer) -> None:
    body = {"image": RED, "prompt": "a red circle", "seed": 2, "strength": 0.5, "stream": True}
    body["preview_every"] = 1
    with httpx.stream("POST", live.url + "/v1/generate", json=body, timeout=WAIT_S) as response:
        assert response.status_code == 200
        events = list(read_events(response.iter_lines()))
    prior = [e for e in events if e["type"] == "step" and e["stage"] == "prior"]
    assert [e["step"] for e in prior] == [1, 2, 3]  # int(6 x 0.5) Stage C steps
    assert {e["total"] for e in prior} == {3}
    assert len([e for e in events if e["type"] == "preview"]) == 3
    result = events[-1]
    assert result["type"] == "result" and result["strength"] == 0.5
    plain = ok(generate(live, {**body, "stream": False, "preview_every": None}))
    np.testing.assert_array_equal(
        pixels(result["data"][0]["b64_json"]), pixels(plain["data"][0]["b64_json"])
    )


def test_batched_image_requests_give_their_solo_images(live: LiveServer, pool) -> None:
    """Image requests queued together are batched (static: same size and Stage C start) and
    each gets the image it gets alone."""
    pipeline: FaultyPipeline = live.pipeline  # type: ignore[attr-defined]
    bodies = [
        {"image": RED, "prompt": "one", "seed": 1, "strength": 0.5},
        {"image": GREEN, "prompt": "two", "seed": 2, "strength": 0.5},
    ]
    alone = [pixels(ok(generate(live, b))["data"][0]["b64_json"]) for b in bodies]
    pipeline.gate.clear()
    pipeline.entered.clear()
    try:
        holder = pool.submit(generate, live, {"prompt": "hold", "width": 64, "height": 64})
        assert pipeline.entered.wait(WAIT_S)
        futures = [pool.submit(generate, live, b) for b in bodies]
        wait_until(lambda: live.client.get("/health/ready").json()["queue_depth"] == 2, "queued")
    finally:
        pipeline.gate.set()
    outs = [ok(f.result(WAIT_S)) for f in futures]
    assert ok(holder.result(WAIT_S))["batch_images"] == 1
    assert [o["batch_images"] for o in outs] == [2, 2]  # the two img2img requests together
    for out, solo in zip(outs, alone, strict=True):
        got = pixels(out["data"][0]["b64_json"]).astype(int)
        assert np.abs(got - solo).max() <= 1  # batched kernels round the last bit differently


def test_image_requests_queue_are_cancelled_and_counted(live: LiveServer, pool) -> None:
    pipeline: FaultyPipeline = live.pipeline  # type: ignore[attr-defined]
    before = live.metric("cascade_requests_total", endpoint="/v1/generate", status="409")
    pipeline.gate.clear()
    pipeline.entered.clear()
    try:
        holder = pool.submit(generate, live, {"prompt": "hold", "width": 64, "height": 64})
        assert pipeline.entered.wait(WAIT_S)
        queued = []
        for i in range(2):  # one after the other: their places in the queue are known
            headers = {"X-Request-ID": f"img-{i}"}
            queued.append(pool.submit(generate, live, {"image": RED, "seed": i}, **headers))
            wait_until(
                lambda i=i: live.client.get("/health/ready").json()["queue_depth"] == i + 1,
                "queued",
            )
        full = generate(live, {"image": RED})  # CASCADE_MAX_QUEUE_SIZE=2 jobs already wait
        assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
        assert "retry-after" in full.headers
        state = live.client.get("/v1/requests/img-0").json()
        assert state["status"] == "queued" and state["queue_position"] == 0
        cancel = live.client.delete("/v1/requests/img-0").json()
        assert cancel["cancelled"] is True
        assert queued[0].result(WAIT_S).status_code == 409
    finally:
        pipeline.gate.set()
    assert ok(queued[1].result(WAIT_S))["image_variation"] is True
    assert ok(holder.result(WAIT_S))
    wait_until(
        lambda: (
            live.metric("cascade_requests_total", endpoint="/v1/generate", status="409")
            == before + 1
        ),
        "the cancellation counted",
    )


def test_413_names_the_limit_that_was_passed(live: LiveServer) -> None:
    big = png() + b"\0" * (MAX_IMAGE + 1 - len(png()))  # one byte over; sizes are checked first
    r = generate(live, {"image": b64(big)})
    error = r.json()["error"]
    assert (r.status_code, error["code"], error["field"]) == (413, "image_too_large", "image")
    assert (
        f"{len(big)} bytes; the limit is {MAX_IMAGE} bytes (CASCADE_MAX_IMAGE_BYTES)"
        in (error["message"])
    )
    # over the route's whole allowance: refused before parsing, naming both settings
    huge = b'{"image": "' + b"A" * (2 * MAX_IMAGE) + b'"}'
    r = live.client.post("/v1/generate", content=huge, headers={"content-type": "application/json"})
    message = r.json()["error"]["message"]
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert "CASCADE_MAX_IMAGE_BYTES" in message and "CASCADE_MAX_BODY_BYTES" in message
    # without an image the JSON limit stays, valid request or not
    for body in ({"prompt": "a" * (MAX_BODY + 10)}, {"prompt": "a", "junk": "b" * MAX_BODY}):
        r = generate(live, body)
        assert r.status_code == 413, r.text
        assert (
            f"larger than {MAX_BODY} bytes (CASCADE_MAX_BODY_BYTES" in r.json()["error"]["message"]
        )
    # with one, the other fields stay within it too
    r = generate(live, {"image": RED, "negative_prompt": "n" * (MAX_BODY + 10)})
    assert r.status_code == 413 and "the fields besides the image" in r.json()["error"]["message"]


def test_a_model_without_image_encoders_names_the_missing_file(tiny_pipeline: Any) -> None:
    from models.pipeline import CascadePipeline

    # the tiny networks as a snapshot without effnet_encoder.safetensors and image_encoder/ loads
    bare = CascadePipeline(
        tiny_pipeline.stage_c,
        tiny_pipeline.stage_b,
        tiny_pipeline.stage_a,
        tiny_pipeline.text_encoder,
        defaults=tiny_pipeline.defaults,
        limits=tiny_pipeline.limits,
        model_info={"name": "tiny-bare", "demo": True},
    )
    assert not bare.model_info["image_to_image"] and not bare.model_info["image_variation"]
    with serve(bare) as server:
        for body, missing in (
            ({"image": RED, "prompt": "x"}, "effnet_encoder.safetensors"),
            ({"image": RED}, "image_encoder/"),
        ):
            r = server.client.post("/v1/generate", json=body)
            error = r.json()["error"]
            assert (r.status_code, error["field"]) == (422, "image"), r.text
            assert missing in error["message"]
        assert server.client.post("/v1/generate", json={"prompt": "x"}).status_code == 200
