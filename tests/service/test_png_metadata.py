"""PNG metadata (service/imaging.py): each image carries its generation parameters, with its own
seed, in a ``parameters`` text chunk; nothing in it varies between runs, so the same request and
seed give the same bytes; CASCADE_PNG_METADATA=false leaves it out."""

from __future__ import annotations

import base64
import io
from typing import Any

import torch
from PIL import Image

from models.request import GenerationParams
from service.imaging import encode_b64_png, encode_png, png_parameters, png_parameters_of
from tests.service.conftest import serve

PARAMS = GenerationParams(
    prompt="a red circle on a blue background",
    negative_prompt="blurry",
    width=128,
    height=192,
    num_images=2,
    seed=42,
    prior_steps=20,
    prior_guidance_scale=4,
    decoder_steps=10,
    decoder_guidance_scale=1.5,
)


def _text(png: bytes) -> dict[str, str]:
    image = Image.open(io.BytesIO(png))
    image.load()
    return dict(image.text)


def _image() -> torch.Tensor:
    return torch.arange(3 * 8 * 8, dtype=torch.int64).remainder(256).to(torch.uint8).view(3, 8, 8)


def test_the_parameters_text() -> None:
    assert png_parameters(PARAMS, 1, "demo-shapes") == (
        "a red circle on a blue background\n"
        "Negative prompt: blurry\n"
        "Prior steps: 20, Prior CFG: 4.0, Decoder steps: 10, Decoder CFG: 1.5, Seed: 43, "
        "Size: 128x192, Model: demo-shapes"
    )
    no_negative = GenerationParams(prompt="a\\nb", seed=7)
    assert png_parameters(no_negative, 0, "m").splitlines()[1].startswith("Prior steps: 20,")
    texts = png_parameters_of(PARAMS, {"name": "demo-shapes", "demo": True}, enabled=True)
    assert [t.rsplit("Seed: ", 1)[1].split(",")[0] for t in texts] == ["42", "43"]
    assert png_parameters_of(PARAMS, {"name": "x"}, enabled=False) == [None, None]


def test_encode_writes_the_chunk_only_when_asked() -> None:
    image = _image()
    assert "parameters" not in _text(encode_png(image))
    text = png_parameters(PARAMS, 0, "demo-shapes")
    png = encode_png(image, text)
    assert _text(png) == {"parameters": text}
    assert png == encode_png(image, text)  # no time or anything else that varies
    assert base64.b64decode(encode_b64_png(image, text)) == png
    unicode = "un cercle rouge, été ☀"
    assert _text(encode_png(image, unicode))["parameters"] == unicode  # iTXt, UTF-8


def _pngs(live: Any, body: dict[str, Any]) -> list[bytes]:
    r = live.client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    return [base64.b64decode(entry["b64_json"]) for entry in r.json()["data"]]


def test_generated_images_carry_their_parameters(tiny_pipeline: Any) -> None:
    body = {"prompt": "a red circle", "negative_prompt": "dark", "num_images": 2, "seed": 5}
    with serve(tiny_pipeline, max_batch_images=2) as live:
        first = _pngs(live, body)
        assert _pngs(live, body) == first  # the same request and seed: the same bytes
        d = tiny_pipeline.defaults
        for i, png in enumerate(first):
            assert _text(png)["parameters"] == (
                f"a red circle\nNegative prompt: dark\nPrior steps: {d.prior_steps}, "
                f"Prior CFG: {float(d.prior_guidance_scale)}, Decoder steps: {d.decoder_steps}, "
                f"Decoder CFG: {float(d.decoder_guidance_scale)}, Seed: {5 + i}, "
                f"Size: {d.width}x{d.height}, Model: tiny-random"
            )
        raw = live.client.post(
            "/v1/generate", json={**body, "num_images": 1, "seed": 6, "response_format": "png"}
        )
        assert raw.status_code == 200 and raw.headers["content-type"] == "image/png"
        # image 1 of seed 5 is image 0 of seed 6 (its pixels only up to batched rounding)
        assert _text(raw.content) == _text(first[1])


def test_png_metadata_off(tiny_pipeline: Any) -> None:
    with serve(tiny_pipeline, png_metadata=False) as live:
        (png,) = _pngs(live, {"prompt": "a red circle", "seed": 5})
        assert "parameters" not in _text(png)
        raw = live.client.post("/v1/generate", json={"prompt": "x", "response_format": "png"})
        assert raw.status_code == 200 and "parameters" not in _text(raw.content)
