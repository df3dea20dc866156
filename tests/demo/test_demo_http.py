"""The demo model through the HTTP service: the prompt-adherence set sent as real requests to a real uvicorn
server scores like the pipeline does, the service returns the same image as the CLI for the same seed (and the
same input picture and strength), a prompt outside the demo's vocabulary is answered with a warning (JSON and
raw PNG), and the README's API examples work against it."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import cli
from models.demo import DEMO_DIR, load_demo_pipeline
from models.demo_vocabulary import grammar_for_model
from tests.service.conftest import serve
from training.classify import accuracies, classify
from training.evaluate import prompt_set

REPO = Path(__file__).resolve().parents[2]


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
    print(
        "demo prompt adherence over HTTP: " + ", ".join(f"{k} {v:.1%}" for k, v in scores.items())
    )
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


def test_the_service_returns_the_cli_image_for_the_same_picture(live, tmp_path: Path) -> None:
    """Image-to-image: the same picture, prompt, seed and strength give the same pixels over HTTP
    and on the command line. The picture is 150 x 100, which both snap to 152 x 96, and its
    background is a PNG tRNS colour, so both must also read it by one rule (models/picture.py:
    composited on white)."""
    picture = Image.new("RGB", (150, 100), (128, 0, 128))
    picture.paste((255, 255, 0), (90, 30, 130, 70))
    source = tmp_path / "in.png"
    picture.save(source, transparency=(128, 0, 128))
    prompt, seed, strength = "a yellow square at the right on a white background", 11, 0.6
    fast = {"prior_steps": 4, "decoder_steps": 2}
    out = tmp_path / "cli.png"
    argv = [prompt, "--image", str(source), "--strength", str(strength), "--seed", str(seed)]
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in fast.items()]
    assert cli.main([*argv, *flags, "-o", str(out)]) == 0
    body = {
        "prompt": prompt,
        "image": base64.b64encode(source.read_bytes()).decode(),
        "strength": strength,
        "seed": seed,
        **fast,
    }
    r = live.client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    assert (r.json()["width"], r.json()["height"]) == (152, 96)
    from_http = png_to_tensor(base64.b64decode(r.json()["data"][0]["b64_json"]))
    from_cli = png_to_tensor(out.read_bytes())
    assert from_cli.shape == from_http.shape == (3, 96, 152)
    assert torch.equal(from_cli, from_http)
    # The transparent background mattered: the same picture without tRNS gives another image.
    opaque = io.BytesIO()
    picture.save(opaque, "PNG")
    body["image"] = base64.b64encode(opaque.getvalue()).decode()
    r = live.client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    without_trns = png_to_tensor(base64.b64decode(r.json()["data"][0]["b64_json"]))
    assert not torch.equal(without_trns, from_http)


def test_a_random_cli_seed_reproduces_over_http(live, tmp_path: Path, monkeypatch, capsys) -> None:
    """The CLI's random seeds stay in the API's range: the highest one it can draw is accepted by
    the server and gives the same image."""
    monkeypatch.setattr(cli.secrets, "randbelow", lambda n: n - 1)
    prompt, out = "a blue circle at the left on a orange background", tmp_path / "top.png"
    assert cli.main([prompt, "-o", str(out)]) == 0
    seed = int(capsys.readouterr().out.split("seed: ")[1].split()[0])
    assert seed == 2**32 - 1
    assert torch.equal(png_to_tensor(out.read_bytes()), generate(live, prompt, seed))


KNOWN = "a green square at the left on a white background"
GRAMMAR = "a {colour} {circle|square|triangle} [at the left |at the right ]on a {colour} background"


@pytest.mark.parametrize("response_format", ["b64_json", "png"])
def test_a_prompt_the_demo_model_knows_gets_no_warning(live, response_format: str) -> None:
    body = {"prompt": KNOWN, "seed": 3, "response_format": response_format}
    r = live.client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    assert "x-cascade-warning" not in r.headers
    if response_format == "b64_json":
        assert r.json()["warnings"] == []


def test_a_prompt_outside_the_vocabulary_is_answered_with_a_warning(live) -> None:
    r = live.client.post("/v1/generate", json={"prompt": "an astronaut riding a horse", "seed": 3})
    assert r.status_code == 200, r.text
    (warning,) = r.json()["warnings"]
    assert "'an', 'astronaut', 'riding', 'horse'" in warning and GRAMMAR in warning
    assert "red, green, blue, yellow, white, black, purple, orange" in warning
    assert "CASCADE_WEIGHTS_DIR" in warning
    assert r.headers["x-cascade-warning"] == warning  # one warning: the header says the same


def test_raw_png_carries_the_warning_in_one_ascii_header(live) -> None:
    body = {"prompt": "a café at dusk", "negative_prompt": "blurry", "seed": 3}
    r = live.client.post("/v1/generate", json=body, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    raw = dict(r.headers.raw)[b"x-cascade-warning"]
    assert raw.isascii() and b"\n" not in raw and b"\r" not in raw
    header = raw.decode()
    assert "'caf\\xe9', 'dusk'" in header and GRAMMAR in header
    assert "'blurry' in the negative prompt" in header
    # The JSON answer to the same request: the same two warnings, the word unescaped.
    body["response_format"] = "b64_json"
    warnings = live.client.post("/v1/generate", json=body).json()["warnings"]
    assert len(warnings) == 2 and "'café'" in warnings[0]
    assert header == " ".join(warnings).replace("é", "\\xe9")


def readme_api_section() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("\n## API\n", 1)[1].split("\n### Errors\n", 1)[0]


def test_the_readme_examples_use_prompts_the_demo_model_knows() -> None:
    section = readme_api_section()
    prompts = re.findall(r'"prompt": "([^"]*)"', section)
    assert len(prompts) >= 4, prompts  # curl JSON, curl PNG, Python JSON, Python PNG
    grammar = grammar_for_model({"demo": True, "weights": str(DEMO_DIR)})
    assert grammar is not None
    for prompt in prompts:
        assert grammar.check(prompt) == [], prompt


def test_the_readme_python_example_runs_with_the_standard_library(live, tmp_path: Path) -> None:
    (code,) = re.findall(r"```python\n(.*?)```", readme_api_section(), re.DOTALL)
    assert "http://127.0.0.1:8000" in code
    code = code.replace("http://127.0.0.1:8000", live.url)
    # httpx is only a dev extra: the example must not need it (nor anything else outside stdlib).
    blocked = "import sys\nfor name in ('httpx', 'requests'):\n    sys.modules[name] = None\n"
    run = subprocess.run(
        [sys.executable, "-c", blocked + code],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    for name in ("square-7.png", "square-8.png", "square.png"):
        assert png_to_tensor((tmp_path / name).read_bytes()).shape == (3, 128, 128), name
    first, second = run.stdout.splitlines()
    assert first == "7 []"
    assert second.startswith("7 queue_wait;dur=") and second.endswith("no warning")


def test_image_requests_on_the_demo_model(live) -> None:
    """Image-to-image and variation of a demo picture: answered when the demo model ships the
    encoder each needs (``image_to_image`` / ``image_variation`` in its model info), else a 422
    naming the file it lacks. Either way never a 500, and text-to-image is unaffected."""
    info = live.client.get("/health/ready").json()["model"]
    source = live.client.post("/v1/generate", json={"prompt": KNOWN, "seed": 5})
    assert source.status_code == 200, source.text
    picture = source.json()["data"][0]["b64_json"]
    cases = [
        ({"image": picture, "prompt": KNOWN, "seed": 5, "strength": 0.5}, "image_to_image",
         "effnet_encoder.safetensors"),
        ({"image": picture, "seed": 5}, "image_variation", "image_encoder/"),
    ]  # fmt: skip
    for body, capability, missing in cases:
        r = live.client.post("/v1/generate", json=body)
        if info.get(capability):
            assert r.status_code == 200, r.text
            out = r.json()
            assert (out["width"], out["height"]) == (128, 128)  # the demo picture's own size
            assert png_to_tensor(base64.b64decode(out["data"][0]["b64_json"])).shape == (
                3,
                128,
                128,
            )
        else:
            error = r.json()["error"]
            assert (r.status_code, error["field"]) == (422, "image"), r.text
            assert missing in error["message"] and "weights folder" in error["message"]
