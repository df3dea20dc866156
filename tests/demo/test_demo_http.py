"""The demo model through the HTTP service: the prompt-adherence set sent as real requests to a real uvicorn
server scores like the pipeline does, and the service returns the same image as the CLI for the same seed."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import cli
from models.demo import load_demo_pipeline
from tests.service.conftest import serve
from training.classify import accuracies, classify
from training.evaluate import prompt_set


def png_to_tensor(data: bytes) -> torch.Tensor:
    """PNG bytes -> uint8 [3, H, W]."""
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)


@pytest.fixture(scope="module")
def live():
    with serve(load_demo_pipeline(), max_batch_images=8, max_queue_size=64) as server:
        yield server


def generate(live, prompt: str, seed: int) -> torch.Tensor:
    r = live.client.post("/v1/generate", json={"prompt": prompt, "seed": seed})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["demo"] is True and body["width"] == 128
    return png_to_tensor(base64.b64decode(body["data"][0]["b64_json"]))


def test_prompt_adherence_through_the_server(live) -> None:
    prompts, seeds, truth = prompt_set()
    # Four clients at once, so the server also batches them as in production.
    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(lambda ps: generate(live, *ps), zip(prompts, seeds, strict=True)))
    scores = accuracies(classify(torch.stack(images)), truth)
    print("demo prompt adherence over HTTP: " + ", ".join(f"{k} {v:.1%}" for k, v in scores.items()))
    assert scores["both colours"] >= 0.75, scores
    assert scores["position"] >= 0.85, scores


def test_the_service_returns_the_cli_image_for_the_same_seed(live, tmp_path: Path) -> None:
    prompt, seed = "a yellow triangle at the right on a purple background", 31
    out = tmp_path / "cli.png"
    assert cli.main([prompt, "-o", str(out), "--seed", str(seed)]) == 0
    from_cli = png_to_tensor(out.read_bytes())
    from_http = generate(live, prompt, seed)
    assert from_cli.shape == from_http.shape == (3, 128, 128)
    assert torch.equal(from_cli, from_http)
