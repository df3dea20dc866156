"""POST /v1/generate end to end on the real tiny pipeline behind uvicorn: both response formats,
seeds, every validation error (422 naming the field and limit), 413, bad JSON, and the OpenAPI
document."""

from __future__ import annotations

import base64
import io
import socket
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import LiveServer, serve


@pytest.fixture(scope="module")
def api(tiny_pipeline: Any) -> Iterator[LiveServer]:
    with serve(
        tiny_pipeline, max_batch_images=4, max_body_bytes=4096, max_prompt_chars=300
    ) as live:
        yield live


JSON = {"content-type": "application/json"}


def pixels(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode == "RGB"
    return np.asarray(image)


def b64_pixels(entry: dict[str, Any]) -> np.ndarray:
    return pixels(base64.b64decode(entry["b64_json"]))


def test_json_response_has_images_seeds_timings_and_model(api: LiveServer) -> None:
    body = {"prompt": "a red circle", "width": 192, "height": 128, "num_images": 2, "seed": 7}
    r = api.client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [d["seed"] for d in out["data"]] == [7, 8] and out["seed"] == 7
    for entry in out["data"]:
        assert b64_pixels(entry).shape == (128, 192, 3)
    assert (out["width"], out["height"]) == (192, 128)
    assert out["model"]["demo"] is True and out["model"]["name"] == "tiny-random"
    assert out["prompt_truncated"] is False and out["negative_prompt_truncated"] is False
    # The tiny random model declares no prompts it knows, so it has nothing to warn about.
    assert out["warnings"] == [] and "x-cascade-warning" not in r.headers
    t = out["timings"]
    assert set(t) == {
        "queue_wait", "first_step", "text", "prior", "decoder", "vqgan", "encode", "total"
    }  # fmt: skip
    assert all(v >= 0 for v in t.values()) and t["prior"] > 0 and t["decoder"] > 0
    assert t["queue_wait"] <= t["first_step"] <= t["total"]
    assert t["total"] >= t["prior"] + t["decoder"]
    assert r.headers["x-request-id"] == out["id"]


@pytest.mark.parametrize("how", ["accept", "response_format"])
def test_raw_png_response(api: LiveServer, how: str) -> None:
    body: dict[str, Any] = {"prompt": "a blue square", "width": 128, "height": 192, "seed": 11}
    headers = {"Accept": "image/png"} if how == "accept" else {}
    if how == "response_format":
        body["response_format"] = "png"
    r = api.client.post("/v1/generate", json=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert pixels(r.content).shape == (192, 128, 3)
    assert r.headers["x-seed"] == "11" and r.headers["x-demo-weights"] == "true"
    for name in (
        "queue_wait",
        "first_step",
        "text",
        "prior",
        "decoder",
        "vqgan",
        "encode",
        "total",
    ):
        assert f"{name};dur=" in r.headers["server-timing"]
    # the same request as JSON carries the same image
    body["response_format"] = "b64_json"
    j = api.client.post("/v1/generate", json=body).json()
    assert np.array_equal(b64_pixels(j["data"][0]), pixels(r.content))


def test_seeds_reproduce_and_image_i_uses_seed_plus_i(api: LiveServer) -> None:
    def image(seed: int, n: int = 1, index: int = 0) -> np.ndarray:
        body = {"prompt": "a green triangle", "seed": seed, "num_images": n}
        r = api.client.post("/v1/generate", json=body)
        assert r.status_code == 200, r.text
        return b64_pixels(r.json()["data"][index])

    first = image(5)
    assert np.array_equal(first, image(5))
    assert not np.array_equal(first, image(6))
    # image 1 of a two-image request with seed 5 is the single image of seed 6 (int8 tolerance: the
    # batch of two may take other CPU kernels than a batch of one)
    assert np.abs(image(5, n=2, index=1).astype(int) - image(6).astype(int)).max() <= 2


def test_random_seed_is_returned_and_reproduces(api: LiveServer) -> None:
    r = api.client.post("/v1/generate", json={"prompt": "a white circle"})
    out = r.json()
    seed = out["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**32
    again = api.client.post("/v1/generate", json={"prompt": "a white circle", "seed": seed}).json()
    assert np.array_equal(b64_pixels(out["data"][0]), b64_pixels(again["data"][0]))


def test_truncated_prompt_is_reported(api: LiveServer) -> None:
    r = api.client.post("/v1/generate", json={"prompt": "x" * 200, "seed": 1})
    assert r.status_code == 200 and r.json()["prompt_truncated"] is True


def test_raw_png_with_several_images_is_a_clear_422(api: LiveServer) -> None:
    r = api.client.post(
        "/v1/generate", json={"prompt": "a", "num_images": 2}, headers={"Accept": "image/png"}
    )
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["field"] == "num_images" and "b64_json" in err["message"]


@pytest.mark.parametrize(
    ("body", "field", "hint"),
    [
        ({}, "prompt", "required"),
        ({"prompt": ""}, "prompt", "at least 1"),
        ({"prompt": "   "}, "prompt", "non-whitespace"),
        ({"prompt": 5}, "prompt", "string"),
        ({"prompt": "a" * 301}, "prompt", "300"),
        ({"prompt": "a" * 301}, "prompt", "CASCADE_MAX_PROMPT_CHARS"),
        ({"prompt": "a", "negative_prompt": "b" * 301}, "negative_prompt", "300"),
        ({"prompt": "a", "width": 100}, "width", "multiple of 8"),
        ({"prompt": "a", "height": 1024}, "height", "512"),
        ({"prompt": "a", "width": 0}, "width", "greater than or equal to 1"),
        ({"prompt": "a", "num_images": 5}, "num_images", "limit of 4"),
        ({"prompt": "a", "num_images": 5}, "num_images", "CASCADE_MAX_BATCH_IMAGES"),
        ({"prompt": "a", "num_images": 0}, "num_images", "greater than or equal to 1"),
        ({"prompt": "a", "seed": -1}, "seed", "greater than or equal to 0"),
        ({"prompt": "a", "seed": 2**32}, "seed", "4294967295"),
        ({"prompt": "a", "prior_steps": 1000}, "prior_steps", "100"),
        ({"prompt": "a", "decoder_steps": 0}, "decoder_steps", "greater than or equal to 1"),
        ({"prompt": "a", "prior_guidance_scale": 99.0}, "prior_guidance_scale", "50"),
        (
            {"prompt": "a", "decoder_guidance_scale": -1},
            "decoder_guidance_scale",
            "greater than or equal to 0",
        ),
        ({"prompt": "a", "response_format": "jpeg"}, "response_format", "png"),
        ({"prompt": "a", "timeout_s": 0.05}, "timeout_s", "greater than or equal to 0.1"),
        ({"prompt": "a", "prior_steps": True}, "prior_steps", "JSON number"),
        ({"prompt": "a", "decoder_guidance_scale": "2"}, "decoder_guidance_scale", "JSON number"),
        ({"prompt": "a", "seed": "12"}, "seed", "JSON number"),
        ({"prompt": "a", "colour": "red"}, "colour", "unknown field"),
        ({"prompt": "a\x00b"}, "prompt", "U+0000"),
        ({"prompt": "a", "negative_prompt": "\x1b[31m"}, "negative_prompt", "U+001B"),
        ({"prompt": "a", "seed": 2**32 - 1, "num_images": 2}, "seed", "seed + num_images - 1"),
    ],
)
def test_invalid_fields_get_422_naming_field_and_limit(
    api: LiveServer, body: dict[str, Any], field: str, hint: str
) -> None:
    r = api.client.post("/v1/generate", json=body, headers={"X-Request-ID": "req-42"})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_field" and err["field"] == field
    assert field in err["message"] and hint in err["message"]
    assert err["request_id"] == "req-42" and r.headers["x-request-id"] == "req-42"


def test_bad_json_and_non_object_bodies(api: LiveServer) -> None:
    r = api.client.post(
        "/v1/generate", content=b'{"prompt": ', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = api.client.post("/v1/generate", json=["a list"])
    assert r.status_code == 422 and "JSON object" in r.json()["error"]["message"]
    r = api.client.post("/v1/generate", content=b'{"prompt": "a\xff"}', headers=JSON)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_oversized_bodies_get_413(api: LiveServer) -> None:
    # /v1/generate takes an image, so its bodies are refused before parsing only above
    # CASCADE_MAX_BODY_BYTES plus the image allowance; a body without an image is still held to
    # CASCADE_MAX_BODY_BYTES once parsed (tests/service/test_image_api.py: both limits)
    big = b'{"prompt": "' + b"a" * 5000 + b'"}'
    r = api.client.post("/v1/generate", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert "4096" in r.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * 1000
        yield b'"}'

    r = api.client.post(
        "/v1/generate", content=chunks(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    # the same with a hand-written chunked request on a raw socket (nothing buffers it client-side)
    with socket.create_connection(("127.0.0.1", api.port)) as sock:
        head = b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        body = b"".join(b"%x\r\n%s\r\n" % (1000, b"a" * 1000) for _ in range(6)) + b"0\r\n\r\n"
        sock.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n" + body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 413")
    # a client that declares a huge body and then stalls is answered without waiting for it
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        head = b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n"
        sock.sendall(head + b'{"prompt": "a')
        started = time.monotonic()
        assert sock.recv(65536).startswith(b"HTTP/1.1 413")
        assert time.monotonic() - started < 5


def test_unknown_route_is_a_json_404(api: LiveServer) -> None:
    r = api.client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_health_endpoints_when_ready(api: LiveServer) -> None:
    live = api.client.get("/health/live")
    r = api.client.get("/health/ready")
    assert live.status_code == 200 and r.status_code == 200
    assert r.json()["status"] == "ready" and r.json()["demo_weights"] is True
    # One snapshot, two probes: the same body (ready with a model, never ready with model null).
    assert live.json() == r.json()
    assert r.json()["ready"] is True and r.json()["model"]["name"] == "tiny-random"
    assert set(r.json()) == {
        "status", "ready", "model", "demo_weights", "queue_depth", "inflight_jobs", "message"
    }  # fmt: skip


def test_openapi_documents_every_route_and_error(api: LiveServer) -> None:
    doc = api.client.get("/openapi.json").json()
    for path in ("/v1/generate", "/health/live", "/health/ready", "/metrics"):
        assert path in doc["paths"], path
    responses = doc["paths"]["/v1/generate"]["post"]["responses"]
    assert set(responses) >= {"200", "400", "401", "413", "422", "500", "503", "504"}
    for code in ("400", "401", "413", "422", "500", "503", "504"):
        schema = responses[code]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith("/ErrorResponse"), code
    assert "Retry-After" in responses["503"]["headers"]
    assert set(responses["200"]["content"]) == {
        "application/json",
        "image/png",
        "text/event-stream",
    }
    assert responses["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/GenerateResponse"
    )
    assert "503" in doc["paths"]["/health/ready"]["get"]["responses"]
    assert api.client.get("/docs").status_code == 200
