"""The OpenAI-compatible routes end to end with the official ``openai`` client against a live
uvicorn server (the real tiny pipeline, API keys on): images of the requested size and format,
the same image as /v1/generate for the same seed, the client's exception types for our errors
(400 naming the parameter, 401, 404), OpenAI's error shape on every refusal, and /v1/models."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from PIL import Image

from tests.service.conftest import WAIT_S, LiveServer, serve

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {**AUTH, "Content-Type": "application/json"}
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def live(tiny_pipeline: Any) -> Iterator[LiveServer]:
    with pytest.MonkeyPatch.context() as env:  # keys are read once, when the app is built
        env.setenv("CASCADE_API_KEYS", KEY)
        env.delenv("CASCADE_API_KEYS_FILE", raising=False)
        with serve(tiny_pipeline, max_batch_images=2, max_body_bytes=4096) as server:
            yield server


@pytest.fixture(scope="module")
def client(live: LiveServer) -> Iterator[openai.OpenAI]:
    # max_retries=0: a 5xx would otherwise be retried, hiding it behind the client's back-off
    with openai.OpenAI(api_key=KEY, base_url=f"{live.url}/v1", max_retries=0, timeout=WAIT_S) as c:
        yield c


def pixels(b64: str) -> np.ndarray:
    """A base64 image file -> its RGB pixels [H, W, 3]."""
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return np.asarray(image.convert("RGB"))


def test_generate_returns_decodable_images_of_the_requested_size(client: openai.OpenAI) -> None:
    result = client.images.generate(prompt=PROMPT, size="64x96", extra_body={"seed": 3})
    assert isinstance(result, openai.types.ImagesResponse)
    assert result.data is not None and len(result.data) == 1
    image = result.data[0]
    assert image.revised_prompt is None and image.url is None
    assert pixels(image.b64_json).shape == (96, 64, 3)
    assert (result.size, result.output_format, result.quality) == ("64x96", "png", "high")
    assert result.background == "opaque"
    usage = result.usage
    assert usage is not None and usage.output_tokens == 0
    # the tiny tokenizer has no merges: one token per byte of each word, plus BOS and EOS
    assert (
        usage.input_tokens_details.text_tokens
        == usage.input_tokens
        == len(PROMPT.replace(" ", "")) + 2
    )
    assert usage.total_tokens == usage.input_tokens
    assert usage.input_tokens_details.image_tokens == 0
    assert image.model_extra == {"seed": 3}  # our extra field rides along, the client keeps it


def test_n_2_gives_two_images_with_consecutive_seeds(client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.generate(
        prompt=PROMPT, n=2, size="auto", quality="low", extra_body={"seed": 10}
    )
    result = raw.parse()
    assert raw.headers["x-seed"] == "10,11"
    assert [image.model_extra["seed"] for image in result.data] == [10, 11]
    first, second = (pixels(image.b64_json) for image in result.data)
    assert first.shape == second.shape == (128, 128, 3)  # auto: the model's default size
    assert not np.array_equal(first, second)
    assert result.quality == "low"


@pytest.mark.parametrize(
    ("output_format", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")]
)
def test_output_formats_decode(client: openai.OpenAI, output_format: str, pil_format: str) -> None:
    result = client.images.generate(
        prompt=PROMPT, output_format=output_format, output_compression=80, extra_body={"seed": 5}
    )
    assert result.output_format == output_format
    data = base64.b64decode(result.data[0].b64_json)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == pil_format and image.size == (128, 128)


def test_a_seed_reproduces_the_image_of_v1_generate(
    live: LiveServer, client: openai.OpenAI
) -> None:
    body = {"prompt": PROMPT, "seed": 1234, "width": 64, "height": 64, "prior_steps": 3}
    ours = live.client.post("/v1/generate", json=body, headers=AUTH)
    assert ours.status_code == 200, ours.text
    result = client.images.generate(
        prompt=PROMPT,
        size="64x64",
        extra_body={"seed": 1234, "prior_steps": 3},  # decoder_steps: quality auto = default
    )
    expected = pixels(ours.json()["data"][0]["b64_json"])
    assert np.array_equal(pixels(result.data[0].b64_json), expected)


def test_quality_medium_is_the_same_as_its_documented_step_counts(
    live: LiveServer, client: openai.OpenAI
) -> None:
    # tiny defaults 6 / 4 -> medium ceil(3.6) / ceil(2.4) = 4 / 3
    body = {"prompt": PROMPT, "seed": 9, "prior_steps": 4, "decoder_steps": 3}
    ours = live.client.post("/v1/generate", json=body, headers=AUTH).json()
    result = client.images.generate(prompt=PROMPT, quality="medium", extra_body={"seed": 9})
    assert np.array_equal(pixels(result.data[0].b64_json), pixels(ours["data"][0]["b64_json"]))


def test_a_stream_yields_the_partial_images_then_the_same_final_image(
    client: openai.OpenAI,
) -> None:
    kwargs: dict[str, Any] = {"prompt": PROMPT, "size": "64x96", "extra_body": {"seed": 21}}
    events = list(client.images.generate(**kwargs, stream=True, partial_images=2))
    plain = client.images.generate(**kwargs)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["ImageGenPartialImageEvent"] * 2 + ["ImageGenCompletedEvent"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for event in events:
        assert (event.size, event.output_format, event.quality) == ("64x96", "png", "high")
        assert pixels(event.b64_json).shape == (96, 64, 3)  # partial images too, scaled up
    final = events[-1]
    assert final.usage.total_tokens == plain.usage.total_tokens > 0
    assert np.array_equal(pixels(final.b64_json), pixels(plain.data[0].b64_json))


def test_a_stream_of_two_images_without_partials(client: openai.OpenAI) -> None:
    events = list(
        client.images.generate(
            prompt=PROMPT, n=2, stream=True, output_format="jpeg", extra_body={"seed": 5}
        )
    )
    assert [type(e).__name__ for e in events] == ["ImageGenCompletedEvent"] * 2
    assert [e.model_extra["image_index"] for e in events] == [0, 1]
    assert [e.model_extra["seed"] for e in events] == [5, 6]
    for event in events:
        with Image.open(io.BytesIO(base64.b64decode(event.b64_json))) as image:
            assert image.format == "JPEG"


def test_an_error_event_is_raised_by_the_client(live: LiveServer) -> None:
    from service.errors import Cancelled
    from service.openai_stream import _error_event

    text = _error_event(Cancelled("request x was cancelled by DELETE"), "x").decode()
    name, data = text.strip().split("\n")
    assert name == "event: error"
    assert json.loads(data.removeprefix("data: ")) == {
        "error": {
            "message": "request x was cancelled by DELETE",
            "type": "invalid_request_error",
            "param": None,
            "code": "cancelled",
        }
    }


def test_an_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(prompt=PROMPT, model="gpt-image-1")
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    assert "tiny-random" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-image-1")


@pytest.mark.parametrize(
    ("kwargs", "param", "words"),
    [
        ({"size": "100x100"}, "size", "multiple of 8"),
        ({"size": "big"}, "size", "pattern"),
        ({"size": "1024x1024"}, "size", "from 64 to 512"),
        ({"n": 3}, "n", "n=3 is over the limit of 2"),
        ({"n": 0}, "n", "greater than or equal to 1"),
        ({"quality": "hd"}, "quality", "'low', 'medium' or 'high'"),
        ({"response_format": "url"}, "response_format", "keeps no images"),
        ({"background": "transparent"}, "background", "opaque"),
        ({"style": "vivid"}, "style", "describe the style in the prompt"),
        ({"output_format": "gif"}, "output_format", "gif and svg are not available"),
        ({"output_compression": 101}, "output_compression", "less than or equal to 100"),
        ({"partial_images": 4}, "partial_images", "less than or equal to 3"),
        ({"extra_body": {"seed": -1}}, "seed", "greater than or equal to 0"),
        ({"extra_body": {"prior_steps": 1000}}, "prior_steps", "1 to 100"),
        ({"extra_body": {"prior_steps": "20"}}, "prior_steps", "a JSON number"),
        ({"extra_body": {"width": 64}}, "width", "unknown parameter; allowed: prompt"),
        ({"extra_body": {"complexity": "low"}}, "complexity", "does not support it"),
        ({"stream": "yes"}, "stream", "a JSON boolean"),
    ],
)
def test_bad_parameters_are_bad_requests_naming_the_param(
    client: openai.OpenAI, kwargs: dict[str, Any], param: str, words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt=PROMPT, **kwargs)
    error = caught.value
    assert error.status_code == 400 and error.param == param, error.body
    assert words in error.message and param in error.message, error.message
    assert error.type == "invalid_request_error"


def test_every_refusal_is_in_openai_shape(live: LiveServer) -> None:
    url = "/v1/images/generations"
    cases = [
        (live.client.post(url, content=b"{not json", headers=JSON), 400, "invalid_json", None),
        (live.client.post(url, json=[1], headers=AUTH), 400, "invalid_type", None),
        (live.client.post(url, json={}, headers=AUTH), 400, "missing_required_parameter", "prompt"),
        (
            live.client.post(url, json={"prompt": "x" * 5000}, headers=AUTH),
            413,
            "body_too_large",
            None,
        ),
        (live.client.post(url, json={"prompt": PROMPT}), 401, "invalid_api_key", None),
        (live.client.get("/v1/models"), 401, "invalid_api_key", None),
        (live.client.get("/v1/images/nothing", headers=AUTH), 404, "not_found", None),
    ]
    for response, status, code, param in cases:
        assert response.status_code == status, response.text
        assert response.json() == {
            "error": {
                "message": response.json()["error"]["message"],
                "type": "invalid_request_error",
                "param": param,
                "code": code,
            }
        }, response.text
    # the service's own routes keep their envelope and their 422
    ours = live.client.post("/v1/generate", json={"prompt": PROMPT, "n": 2}, headers=AUTH)
    assert ours.status_code == 422 and ours.json()["error"]["code"] == "invalid_field"
    assert live.client.post("/v1/generate", json={}).json()["error"]["code"] == "unauthorized"


def test_the_api_key_works_and_a_wrong_one_is_an_authentication_error(live: LiveServer) -> None:
    with openai.OpenAI(api_key="wrong", base_url=f"{live.url}/v1", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as caught:
            wrong.models.list()
        assert caught.value.code == "invalid_api_key" and "invalid API key" in caught.value.message
        with pytest.raises(openai.AuthenticationError):
            wrong.images.generate(prompt=PROMPT)


def test_models_list_and_retrieve_the_loaded_model(client: openai.OpenAI) -> None:
    models = list(client.models.list())
    assert [m.id for m in models] == ["tiny-random"]
    (model,) = models
    assert model.object == "model" and model.owned_by == "cascade-serve" and model.created > 0
    assert client.models.retrieve("tiny-random") == model
    named = client.images.generate(prompt=PROMPT, model="tiny-random", size="64x64")
    assert pixels(named.data[0].b64_json).shape == (64, 64, 3)


def test_the_openapi_document_declares_the_openai_routes(live: LiveServer) -> None:
    document = live.client.get("/openapi.json").json()
    generate = document["paths"]["/v1/images/generations"]["post"]
    assert {"200", "400", "401", "404", "503"} <= set(generate["responses"])
    assert "422" not in generate["responses"]
    fields = document["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    assert fields["model"]["anyOf"][0]["enum"] == ["tiny-random"]
    assert "|512)x(64|" in fields["size"]["anyOf"][0]["pattern"]
    assert {"/v1/models", "/v1/models/{model_id}"} <= set(document["paths"])


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # create_variation, see README
def test_the_readme_example_runs(live: LiveServer, tmp_path: Path, monkeypatch, capsys) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("\n### OpenAI-compatible API\n", 1)[1].split("\n## ", 1)[0]
    example, streaming, images = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    code = example + streaming + images  # the later examples go on with the first one's client
    assert 'base_url="http://127.0.0.1:8000/v1", api_key="unused"' in code
    code = code.replace("http://127.0.0.1:8000", live.url).replace('"unused"', repr(KEY))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - our own README
    for seed in (42, 43):
        with Image.open(tmp_path / f"triangle-{seed}.webp") as image:
            assert image.format == "WEBP" and image.size == (128, 128)
    models, summary, *events, images_line = capsys.readouterr().out.splitlines()
    assert images_line == "128x128 2"  # the edit keeps the picture's size; two variations
    assert models == "['tiny-random']" and summary.startswith("128x128 medium ")
    assert [e.strip() for e in events] == [
        "image_generation.partial_image 0",
        "image_generation.partial_image 1",
        "image_generation.completed",
    ]
