"""Hand-written hostile and malformed requests against a real server (tiny model, tight limits): each one
gets a 4xx in the error envelope whose code and field/message name the problem (input images too:
other formats, corrupt and truncated files, bombs by header, strength and variation misused); valid
unicode succeeds."""

from __future__ import annotations

import base64
import io
import json
import socket

import httpx
import pytest
from PIL import Image

from tests.reliability.conftest import TIGHT_MAX_SIZE, TIGHT_MAX_STEPS, TIGHT_SETTINGS
from tests.service.test_image_input import png_declaring

JSON = {"content-type": "application/json"}


def _file(kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buffer, kind)
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


PICTURE = _b64(_file("PNG"))
MAX_PROMPT = TIGHT_SETTINGS["max_prompt_chars"]
MAX_BODY = TIGHT_SETTINGS["max_body_bytes"]
CHEAP = {"width": 64, "height": 64, "prior_steps": 1, "decoder_steps": 1}


def _error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["request_id"] == response.headers["x-request-id"]
    assert error["message"]
    return error


# (id, JSON body, field the 422 must name, a word the message must contain)
INVALID_FIELDS = [
    ("missing prompt", {"width": 64}, "prompt", "required"),
    ("prompt not a string", {"prompt": 123}, "prompt", "string"),
    ("prompt null", {"prompt": None}, "prompt", "string"),
    ("prompt empty", {"prompt": ""}, "prompt", "1 character"),
    ("prompt blank", {"prompt": " \t\n "}, "prompt", "non-whitespace"),
    ("prompt over limit", {"prompt": "a" * (MAX_PROMPT + 1)}, "prompt", str(MAX_PROMPT)),
    (
        "negative prompt over limit",
        {"prompt": "a", "negative_prompt": "n" * (MAX_PROMPT + 1)},
        "negative_prompt",
        str(MAX_PROMPT),
    ),
    ("width a word", {"prompt": "a", "width": "big"}, "width", "integer"),
    ("width zero", {"prompt": "a", "width": 0}, "width", "greater than"),
    ("width negative", {"prompt": "a", "width": -64}, "width", "greater than"),
    ("width huge", {"prompt": "a", "width": 10**9}, "width", str(TIGHT_MAX_SIZE)),
    ("width not a multiple of 8", {"prompt": "a", "width": 100}, "width", "multiple of 8"),
    ("height huge", {"prompt": "a", "height": 2**63}, "height", str(TIGHT_MAX_SIZE)),
    ("width fractional", {"prompt": "a", "width": 64.5}, "width", "fractional"),
    (
        "prior steps huge",
        {"prompt": "a", "prior_steps": 10**6},
        "prior_steps",
        str(TIGHT_MAX_STEPS),
    ),
    ("decoder steps zero", {"prompt": "a", "decoder_steps": 0}, "decoder_steps", "greater than"),
    ("num_images huge", {"prompt": "a", "num_images": 1000}, "num_images", "limit"),
    ("num_images zero", {"prompt": "a", "num_images": 0}, "num_images", "greater than"),
    ("num_images list", {"prompt": "a", "num_images": [1]}, "num_images", "integer"),
    ("seed negative", {"prompt": "a", "seed": -1}, "seed", "greater than"),
    ("seed 2^32", {"prompt": "a", "seed": 2**32}, "seed", "4294967295"),
    ("seed huge", {"prompt": "a", "seed": 10**400}, "seed", "4294967295"),
    ("seed fractional", {"prompt": "a", "seed": 1.5}, "seed", "integer"),
    (
        "guidance negative",
        {"prompt": "a", "prior_guidance_scale": -1},
        "prior_guidance_scale",
        "greater than",
    ),
    (
        "guidance huge",
        {"prompt": "a", "decoder_guidance_scale": 1e308},
        "decoder_guidance_scale",
        "50",
    ),
    (
        "response_format unknown",
        {"prompt": "a", "response_format": "gif"},
        "response_format",
        "png",
    ),
    ("timeout zero", {"prompt": "a", "timeout_s": 0}, "timeout_s", "greater than"),
    ("unknown field", {"prompt": "a", "steps": 5}, "steps", "unknown field"),
    (
        "two PNGs in one png body",
        {"prompt": "a", "num_images": 2, "response_format": "png"},
        "num_images",
        "one image",
    ),
    # input images (image-to-image, variation)
    ("strength without an image", {"prompt": "a", "strength": 0.5}, "strength", "add image"),
    (
        "variation without an image",
        {"prompt": "a", "image_variation": True},
        "image_variation",
        "add image",
    ),
    ("strength zero", {"image": PICTURE, "strength": 0}, "strength", "greater than 0"),
    ("strength over 1", {"image": PICTURE, "strength": 1.5}, "strength", "less than or equal to 1"),
    ("strength a string", {"image": PICTURE, "strength": "0.5"}, "strength", "JSON number"),
    (
        "strength under one step",
        {"image": PICTURE, "prompt": "a", "strength": 0.1, "prior_steps": 5},
        "strength",
        "at least 1 / prior_steps",
    ),
    (
        "strength 1 without variation",
        {"image": PICTURE, "prompt": "a", "strength": 1},
        "strength",
        "would not be used",
    ),
    (
        "variation a string",
        {"image": PICTURE, "image_variation": "yes"},
        "image_variation",
        "JSON boolean",
    ),
    ("image a number", {"image": 7}, "image", "string"),
    ("image not base64", {"image": "%%% not base64"}, "image", "base64"),
    ("image a GIF", {"image": _b64(_file("GIF"))}, "image", "accepted formats: PNG, JPEG or WebP"),
    ("image text", {"image": _b64(b"just some text")}, "image", "accepted formats"),
    ("image truncated", {"image": _b64(_file("PNG")[:60])}, "image", "corrupt or truncated"),
    ("image corrupt", {"image": _b64(_file("JPEG")[:30] + b"x" * 200)}, "image", "corrupt"),
    (
        "image bomb",
        {"image": _b64(png_declaring(60_000, 60_000))},
        "image",
        "CASCADE_MAX_IMAGE_PIXELS",
    ),
    ("image data URL of text", {"image": "data:text/plain;base64,QUJD"}, "image", "data URL"),
]


@pytest.mark.parametrize(
    "body,field,word", [c[1:] for c in INVALID_FIELDS], ids=[c[0] for c in INVALID_FIELDS]
)
def test_invalid_field_is_422_naming_it(
    client: httpx.Client, body: dict, field: str, word: str
) -> None:
    error = _error(client.post("/v1/generate", json=body), 422, "invalid_field")
    assert error["field"] == field
    assert field in error["message"] or field.replace("_", " ") in error["message"], error
    assert word.lower() in error["message"].lower(), error


# Raw bodies: (id, bytes, headers, status, code)
RAW_BODIES = [
    ("not JSON", b"prompt=a cat", JSON, 400, "invalid_json"),
    ("truncated JSON", b'{"prompt": "a', JSON, 400, "invalid_json"),
    (
        "JSON NaN guidance",
        b'{"prompt": "a", "prior_guidance_scale": NaN}',
        JSON,
        422,
        "invalid_field",
    ),
    (
        "JSON Infinity guidance",
        b'{"prompt": "a", "decoder_guidance_scale": Infinity}',
        JSON,
        422,
        "invalid_field",
    ),
    ("lone surrogate in prompt", b'{"prompt": "a\\ud800b"}', JSON, 422, "invalid_field"),
    ("JSON array", b"[1, 2]", JSON, 422, "invalid_field"),
    ("JSON string", b'"a cat"', JSON, 422, "invalid_field"),
    ("empty body", b"", JSON, 422, "invalid_field"),
    ("text/plain", b'{"prompt": "a"}', {"content-type": "text/plain"}, 422, "invalid_field"),
    (
        "form encoded",
        b"prompt=a",
        {"content-type": "application/x-www-form-urlencoded"},
        422,
        "invalid_field",
    ),
    ("no content type", b'{"prompt": "a"}', {}, 422, "invalid_field"),
]


@pytest.mark.parametrize(
    "raw,headers,status,code", [c[1:] for c in RAW_BODIES], ids=[c[0] for c in RAW_BODIES]
)
def test_malformed_body_is_4xx(
    client: httpx.Client, raw: bytes, headers: dict, status: int, code: str
) -> None:
    error = _error(client.post("/v1/generate", content=raw, headers=headers), status, code)
    if code == "invalid_json":
        assert "JSON" in error["message"]
    elif error["field"] is None:
        assert "JSON object" in error["message"]


@pytest.mark.parametrize(
    "raw",
    [b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", b'{"prompt": "a\xff\xfe"}'],
    ids=["nested 5000 deep", "invalid UTF-8"],
)
def test_unparsable_body_is_invalid_json(client: httpx.Client, raw: bytes) -> None:
    _error(client.post("/v1/generate", content=raw, headers=JSON), 400, "invalid_json")


def test_oversized_bodies_are_413(client: httpx.Client) -> None:
    big = json.dumps({"prompt": "a" * (MAX_BODY + 10)}).encode()
    error = _error(client.post("/v1/generate", content=big, headers=JSON), 413, "body_too_large")
    assert str(MAX_BODY) in error["message"]
    # Chunked (no Content-Length): counted while reading, refused all the same.
    chunks = iter([big[: MAX_BODY // 2], big[MAX_BODY // 2 :]])
    _error(client.post("/v1/generate", content=chunks, headers=JSON), 413, "body_too_large")


def _raw_post(client: httpx.Client, declared: int, body: bytes, timeout_s: float) -> bytes:
    """POST with a hand-written Content-Length; the status line of the answer."""
    with socket.create_connection(
        (client.base_url.host, client.base_url.port), timeout=timeout_s
    ) as sock:
        head = f"POST /v1/generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
        sock.sendall(head.encode() + body)
        return sock.recv(4096).split(b"\r\n", 1)[0]


def test_declared_oversized_body_is_413(client: httpx.Client) -> None:
    body = json.dumps({"prompt": "a" * (2 * MAX_BODY)}).encode()
    assert _raw_post(client, len(body), body, 10).startswith(b"HTTP/1.1 413")


def test_declared_oversized_body_refused_without_waiting_for_it(client: httpx.Client) -> None:
    assert _raw_post(client, MAX_BODY * 1000, b'{"prompt": "a', 2).startswith(b"HTTP/1.1 413")


def test_wrong_method_and_unknown_path(client: httpx.Client) -> None:
    _error(client.get("/v1/generate"), 405, "method_not_allowed")
    _error(client.post("/v1/generat", json={"prompt": "a"}), 404, "not_found")


@pytest.mark.parametrize(
    "prompt",
    [
        "一只猫在屋顶上 🐱",
        "café crème, e\u0301",
        "مرحبا بالعالم",
        "\u202eRTL override\u200b\ufeff",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 " * 20,
        "tabs\tand\nnewlines\r\n",
    ],
    ids=["cjk+emoji", "combining", "arabic", "bidi+zero-width", "astral plane", "tab/newline"],
)
def test_valid_unicode_prompts_succeed(client: httpx.Client, prompt: str) -> None:
    response = client.post(
        "/v1/generate", json={"prompt": prompt, "negative_prompt": prompt, **CHEAP, "seed": 7}
    )
    assert response.status_code == 200, response.text[:300]
    body = response.json()
    assert len(body["data"]) == 1 and body["seed"] == 7


@pytest.mark.parametrize("seed", [0, 2**32 - 1])
def test_seed_range_edges_succeed(client: httpx.Client, seed: int) -> None:
    response = client.post("/v1/generate", json={"prompt": "edge", "seed": seed, **CHEAP})
    assert response.status_code == 200, response.text[:300]
    assert response.json()["data"][0]["seed"] == seed


def test_every_returned_seed_can_be_sent_back(client: httpx.Client) -> None:
    response = client.post(
        "/v1/generate", json={"prompt": "a", "seed": 2**32 - 1, "num_images": 2, **CHEAP}
    )
    if response.status_code == 422:
        assert response.json()["error"]["field"] == "seed"
        return
    assert response.status_code == 200, response.text[:300]
    for image in response.json()["data"]:
        again = client.post("/v1/generate", json={"prompt": "a", "seed": image["seed"], **CHEAP})
        assert again.status_code == 200, again.text[:300]


@pytest.mark.parametrize(
    "prompt",
    ["a\x00b", "bell\x07", "\x1b[31mred\x1b[0m", "del\x7f"],
    ids=["NUL", "BEL", "ANSI escape", "DEL"],
)
def test_control_characters_are_refused(client: httpx.Client, prompt: str) -> None:
    error = _error(
        client.post("/v1/generate", json={"prompt": prompt, **CHEAP}), 422, "invalid_field"
    )
    assert error["field"] == "prompt"


@pytest.mark.parametrize(
    "extra",
    [
        {"seed": True},
        {"seed": "12"},
        {"width": "64"},
        {"timeout_s": True},
        {"prior_guidance_scale": "2.5"},
    ],
    ids=["seed true", "seed string", "width string", "timeout true", "guidance string"],
)
def test_numbers_as_booleans_or_strings_are_refused(client: httpx.Client, extra: dict) -> None:
    body = {"prompt": "a", **CHEAP, **extra}
    error = _error(client.post("/v1/generate", json=body), 422, "invalid_field")
    assert error["field"] == next(iter(extra))
