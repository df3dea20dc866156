"""POST /v1/images/edits and /v1/images/variations with the official ``openai`` client against a
live uvicorn server (the real tiny pipeline, API keys on, both batching modes): PNGs of the asked
size, the same images as /v1/generate for the same seed and image, streaming edits, the client's
exception types and OpenAI's error shape for every refusal (400, 401, 404, 413), and the job
handling every generation route has (request id, cancellation, queue limit, metrics)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.service.conftest import WAIT_S, FaultyPipeline, LiveServer, serve, wait_until
from tests.service.test_image_input import png_declaring

KEY = "test-key-images"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_IMAGE = 60_000


def png(size: tuple[int, int] = (100, 60), colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    picture = Image.new("RGB", size, colour)
    picture.paste((20, 20, 220), (0, 0, size[0] // 2, size[1] // 2))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


PICTURE = png()
# OpenAI retired its variations endpoint and the client marks create_variation deprecated; this
# server keeps serving it.
variations = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")


def upload(data: bytes = PICTURE, name: str = "in.png") -> tuple[str, bytes, str]:
    return (name, data, "image/png")


def pixels(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as picture:
        return np.asarray(picture.convert("RGB"))


@pytest.fixture(scope="module", params=["continuous", "static"])
def live(request: pytest.FixtureRequest, tiny_pipeline: Any) -> Iterator[LiveServer]:
    pipeline = FaultyPipeline(tiny_pipeline)
    with pytest.MonkeyPatch.context() as env:  # keys are read once, when the app is built
        env.setenv("CASCADE_API_KEYS", KEY)
        env.delenv("CASCADE_API_KEYS_FILE", raising=False)
        with serve(
            pipeline,
            batching=request.param,
            max_batch_images=2,
            max_body_bytes=4096,
            max_image_bytes=MAX_IMAGE,
            max_queue_size=1,
        ) as server:
            server.pipeline = pipeline  # type: ignore[attr-defined]
            yield server


@pytest.fixture(scope="module")
def client(live: LiveServer) -> Iterator[openai.OpenAI]:
    # max_retries=0: a 5xx would otherwise be retried, hiding it behind the client's back-off
    with openai.OpenAI(api_key=KEY, base_url=f"{live.url}/v1", max_retries=0, timeout=WAIT_S) as c:
        yield c


def ours(live: LiveServer, body: dict[str, Any]) -> np.ndarray:
    """The image /v1/generate makes of ``body`` (with PICTURE as its image)."""
    r = live.client.post(
        "/v1/generate", json={"image": base64.b64encode(PICTURE).decode(), **body}, headers=AUTH
    )
    assert r.status_code == 200, r.text
    return pixels(r.json()["data"][0]["b64_json"])


# ------------------------------------------------------------------------------- edits


def test_edit_returns_images_of_the_asked_size(client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.edit(
        image=upload(),
        prompt="a red circle",
        size="64x96",
        n=2,
        extra_body={"seed": 3, "strength": 0.5},
    )
    result = raw.parse()
    assert isinstance(result, openai.types.ImagesResponse)
    assert raw.headers["x-seed"] == "3,4" and raw.headers["x-request-id"]
    assert [image.model_extra["seed"] for image in result.data] == [3, 4]
    for image in result.data:
        assert pixels(image.b64_json).shape == (96, 64, 3)
    assert (result.size, result.output_format, result.quality) == ("64x96", "png", "high")
    usage = result.usage  # (tokens are counted by the text encoder, which the wrapper hides)
    assert usage.total_tokens == usage.input_tokens and usage.input_tokens_details.image_tokens == 0


def test_edit_is_the_image_to_image_of_v1_generate(live: LiveServer, client) -> None:
    # size omitted: the picture's 100 x 60 snapped to 104 x 64; strength: the default 0.8
    result = client.images.edit(image=upload(), prompt="a cat", extra_body={"seed": 8})
    assert result.size == "104x64"
    expected = ours(live, {"prompt": "a cat", "seed": 8, "strength": 0.8})
    np.testing.assert_array_equal(pixels(result.data[0].b64_json), expected)
    with Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))) as picture:
        assert "Strength: 0.8, Image variation: false" in picture.text["parameters"]


@pytest.mark.parametrize(("output_format", "pil"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_edit_output_formats_and_quality(client, output_format: str, pil: str) -> None:
    result = client.images.edit(
        image=upload(), prompt="x", output_format=output_format, quality="low", size="auto"
    )
    assert (result.output_format, result.quality, result.size) == (output_format, "low", "104x64")
    with Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))) as picture:
        assert picture.format == pil and picture.size == (104, 64)


def test_a_list_of_one_image_is_taken_as_image(client) -> None:
    result = client.images.edit(image=[upload()], prompt="x", size="64x64")  # sent as image[]
    assert pixels(result.data[0].b64_json).shape == (64, 64, 3)


def test_a_streamed_edit_gives_the_partial_images_then_the_same_image(client) -> None:
    kwargs: dict[str, Any] = {"image": upload(), "prompt": "x", "extra_body": {"seed": 21}}
    events = list(client.images.edit(**kwargs, stream=True, partial_images=2))
    plain = client.images.edit(**kwargs)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["ImageEditPartialImageEvent"] * 2 + ["ImageEditCompletedEvent"]
    assert [e.type for e in events][-1] == "image_edit.completed"
    for event in events:
        assert event.size == "104x64" and pixels(event.b64_json).shape == (64, 104, 3)
    np.testing.assert_array_equal(pixels(events[-1].b64_json), pixels(plain.data[0].b64_json))


# -------------------------------------------------------------------------- variations


@variations
def test_variation_returns_images_of_the_asked_size(client) -> None:
    result = client.images.create_variation(image=upload(), n=2, size="64x64")
    assert len(result.data) == 2 and result.size == "64x64"
    for image in result.data:
        assert pixels(image.b64_json).shape == (64, 64, 3)


@variations
def test_variation_is_the_image_variation_of_v1_generate(live: LiveServer, client) -> None:
    result = client.images.create_variation(image=upload(), extra_body={"seed": 4})
    assert result.size == "104x64" and result.output_format == "png"
    expected = ours(live, {"seed": 4})  # no prompt: the variation defaults
    np.testing.assert_array_equal(pixels(result.data[0].b64_json), expected)


# ---------------------------------------------------------------------------- refusals


GIF = io.BytesIO()
Image.new("RGB", (8, 8)).save(GIF, "GIF")


@pytest.mark.parametrize(
    ("kwargs", "param", "words"),
    [
        ({"image": upload(GIF.getvalue(), "in.gif")}, "image", "GIF is not accepted"),
        ({"image": upload(b"hello")}, "image", "accepted formats: PNG, JPEG or WebP"),
        ({"image": upload(PICTURE[:50])}, "image", "corrupt or truncated"),
        ({"image": upload(png_declaring(60_000, 60_000))}, "image", "CASCADE_MAX_IMAGE_PIXELS"),
        ({"image": [upload(), upload()]}, "image", "2 images were sent"),
        ({"mask": upload()}, "mask", "not supported"),
        ({"extra_body": {"strength": 1}}, "strength", "less than 1"),
        ({"extra_body": {"strength": 0}}, "strength", "greater than 0"),
        ({"extra_body": {"strength": "half"}}, "strength", "valid number"),
        ({"extra_body": {"strength": 0.05}}, "strength", "at least 1 / prior_steps"),
        ({"extra_body": {"bogus": 1}}, "bogus", "unknown parameter; allowed: image, prompt"),
        ({"input_fidelity": "high"}, "input_fidelity", "use strength"),
        ({"size": "100x100"}, "size", "multiple of 8"),
        ({"n": 3}, "n", "n=3 is over the limit of 2"),
        ({"quality": "hd"}, "quality", "'low', 'medium' or 'high'"),
        ({"response_format": "url"}, "response_format", "keeps no images"),
        ({"prompt": " "}, "prompt", "non-whitespace"),
    ],
)
def test_bad_edits_are_bad_requests_naming_the_param(client, kwargs: dict, param: str, words):
    arguments = {"image": upload(), "prompt": "x", **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(**arguments)
    error = caught.value
    assert error.status_code == 400 and error.param == param, error.body
    assert words in error.message and error.type == "invalid_request_error", error.message


@variations
@pytest.mark.parametrize(
    ("kwargs", "param", "words"),
    [
        ({"image": upload(b"GIF89a" + b"\0" * 30)}, "image", "GIF is not accepted"),
        ({"extra_body": {"prompt": "a cat"}}, "prompt", "unknown parameter"),
        ({"size": "1024x1024"}, "size", "from 64 to 512"),
        ({"model": "dall-e-2"}, "model", "does not exist"),
    ],
)
def test_bad_variations_are_refused_naming_the_param(client, kwargs: dict, param: str, words):
    arguments = {"image": upload(), **kwargs}
    expected = openai.NotFoundError if param == "model" else openai.BadRequestError
    with pytest.raises(expected) as caught:
        client.images.create_variation(**arguments)
    assert caught.value.param == param and words in caught.value.message, caught.value.body


def test_every_refusal_is_in_openai_shape(live: LiveServer) -> None:
    edits = "/v1/images/edits"
    big = PICTURE + b"\0" * (MAX_IMAGE + 1 - len(PICTURE))
    cases = [
        (live.client.post(edits, json={"prompt": "x"}, headers=AUTH), 400, "invalid_form", None),
        (
            live.client.post(edits, data={"prompt": "x"}, files={}, headers=AUTH),
            400,
            "invalid_form",
            None,
        ),
        (
            live.client.post(
                edits,
                data={"prompt": "x", "image": "not a file"},
                files={"x": ("", b"")},
                headers=AUTH,
            ),
            400,
            "invalid_value",
            "image",
        ),
        (
            live.client.post(edits, data={"prompt": "x"}, files={"other": upload()}, headers=AUTH),
            400,
            "unknown_parameter",
            "other",
        ),
        (
            live.client.post(
                edits, data={"prompt": "x"}, files={"image": upload(big)}, headers=AUTH
            ),
            413,
            "image_too_large",
            "image",
        ),
        (
            live.client.post(
                edits, data={"prompt": "x"}, files={"image": upload(big * 2)}, headers=AUTH
            ),
            413,
            "body_too_large",
            None,
        ),
        (
            live.client.post(edits, data={"prompt": "x"}, files={"image": upload()}),
            401,
            "invalid_api_key",
            None,
        ),
        (
            live.client.post(
                "/v1/images/variations", data={"n": "2"}, files={"file": upload()}, headers=AUTH
            ),
            400,
            "unknown_parameter",
            "file",
        ),
    ]
    for response, status, code, param in cases:
        assert response.status_code == status, response.text
        body = response.json()
        assert body == {
            "error": {
                "message": body["error"]["message"],
                "type": "invalid_request_error",
                "param": param,
                "code": code,
            }
        }, response.text


def test_a_missing_image_is_a_missing_parameter(client) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.post(
            "/images/edits",
            body={"prompt": "x"},
            files=[("note", ("a.txt", b"x", "text/plain"))],
            options={"headers": {"Content-Type": "multipart/form-data"}},
            cast_to=openai.types.ImagesResponse,
        )
    assert caught.value.param == "note" and caught.value.code == "unknown_parameter"
    with pytest.raises(openai.BadRequestError) as caught:
        client.post(
            "/images/variations",
            body={"n": 1},
            files=[],
            options={"headers": {"Content-Type": "multipart/form-data"}},
            cast_to=openai.types.ImagesResponse,
        )
    assert caught.value.param == "image" and caught.value.code == "missing_required_parameter"


@variations
def test_a_wrong_key_is_an_authentication_error(live: LiveServer) -> None:
    with openai.OpenAI(api_key="wrong", base_url=f"{live.url}/v1", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError):
            wrong.images.edit(image=upload(), prompt="x")
        with pytest.raises(openai.AuthenticationError):
            wrong.images.create_variation(image=upload())


# --------------------------------------------------- the job: id, queue, cancel, metrics


def _post_edit(live: LiveServer, request_id: str) -> httpx.Response:
    with httpx.Client(base_url=live.url, timeout=WAIT_S) as client:
        return client.post(
            "/v1/images/edits",
            data={"prompt": "held"},
            files={"image": upload()},
            headers={**AUTH, "X-Request-ID": request_id},
        )


def test_edits_queue_are_cancelled_by_id_and_counted(live: LiveServer) -> None:
    pipeline: FaultyPipeline = live.pipeline  # type: ignore[attr-defined]
    counted = live.metric("cascade_requests_total", endpoint="/v1/images/edits", status="409")
    pipeline.gate.clear()
    pipeline.entered.clear()
    with ThreadPoolExecutor(3) as pool:
        try:
            running = pool.submit(_post_edit, live, "edit-running")
            assert pipeline.entered.wait(WAIT_S)
            queued = pool.submit(_post_edit, live, "edit-queued")
            wait_until(
                lambda: live.client.get("/health/ready").json()["queue_depth"] == 1, "queued"
            )
            full = _post_edit(live, "edit-refused")  # CASCADE_MAX_QUEUE_SIZE=1 already waits
            assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
            state = live.client.get("/v1/requests/edit-running", headers=AUTH).json()
            assert state["status"] == "running" and state["stage"] == "prior"
            # only its key sees it: without one, 401; the id is the one the client chose
            assert live.client.get("/v1/requests/edit-running").status_code == 401
            cancelled = live.client.delete("/v1/requests/edit-queued", headers=AUTH).json()
            assert cancelled["cancelled"] is True
            refused = queued.result(WAIT_S)
            assert refused.status_code == 409 and refused.json()["error"]["code"] == "cancelled"
            assert refused.headers["x-request-id"] == "edit-queued"
        finally:
            pipeline.gate.set()
        answered = running.result(WAIT_S)
    assert answered.status_code == 200 and answered.headers["x-request-id"] == "edit-running"
    wait_until(
        lambda: (
            live.metric("cascade_requests_total", endpoint="/v1/images/edits", status="409")
            == counted + 1
        ),
        "the cancellation counted under its route",
    )
    assert live.metric("cascade_requests_total", endpoint="/v1/images/edits", status="503") >= 1


def test_the_openapi_document_describes_the_upload_routes(live: LiveServer) -> None:
    document = live.client.get("/openapi.json").json()
    for path, name in (
        ("/v1/images/edits", "ImageEditRequest"),
        ("/v1/images/variations", "ImageVariationRequest"),
    ):
        operation = document["paths"][path]["post"]
        content = operation["requestBody"]["content"]
        assert content == {
            "multipart/form-data": {"schema": {"$ref": f"#/components/schemas/{name}"}}
        }
        assert {"200", "400", "401", "404", "413", "503"} <= set(operation["responses"])
        assert "422" not in operation["responses"]
        schema = document["components"]["schemas"][name]
        fields = schema["properties"]
        assert (fields["image"]["type"], fields["image"]["format"]) == ("string", "binary")
        assert schema["required"][0] == "image"
        # a form sends no null: each optional field is its value's type
        assert fields["model"]["enum"] == ["tiny-random"] and fields["model"]["type"] == "string"
        assert "|512)x(64|" in fields["size"]["pattern"]
        assert (fields["n"]["type"], fields["n"]["maximum"], fields["n"]["default"]) == (
            "integer",
            2,
            1,
        )
        assert all("anyOf" not in f and f.get("type") != "null" for f in fields.values())
    edit = document["components"]["schemas"]["ImageEditRequest"]["properties"]
    assert {k: edit["strength"][k] for k in ("type", "exclusiveMinimum", "exclusiveMaximum")} == {
        "type": "number",
        "exclusiveMinimum": 0,
        "exclusiveMaximum": 1,
    }
    assert "prompt" in document["components"]["schemas"]["ImageEditRequest"]["required"]
    stream = document["paths"]["/v1/images/edits"]["post"]["responses"]["200"]["content"]
    events = stream["text/event-stream"]["schema"]["properties"]["event"]["enum"]
    assert events == ["image_edit.partial_image", "image_edit.completed", "error"]
