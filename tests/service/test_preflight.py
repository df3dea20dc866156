"""service/preflight.py: configuration mistakes are found before the server listens, each reported
as one line naming the setting, what was found and what to do; ``python -m service`` then exits 2
without a traceback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from service import preflight
from service.settings import Settings
from tests.service.service_process import one_message, run_service

DEMO = Path(__file__).resolve().parents[2] / "assets" / "demo-model"
LITE_FILES = ("stage_c_lite.safetensors", "stage_b_lite.safetensors", "stage_a.safetensors")
TEXT_FILES = (
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json",
)


def snapshot(root: Path, *files: str) -> Path:
    """A weights folder with these (empty) files: the checks look at names, never at data."""
    root.mkdir(parents=True, exist_ok=True)
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()
    return root


def weights_problem(root: Path, prior: str = "lite", decoder: str = "lite") -> str | None:
    settings = Settings(weights_dir=root, prior_variant=prior, decoder_variant=decoder)
    return preflight.check_weights(settings)


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


# ----------------------------------------------------------------------------------------- weights


def test_complete_folders_pass(tmp_path: Path) -> None:
    assert weights_problem(snapshot(tmp_path / "official", *LITE_FILES, *TEXT_FILES)) is None
    diffusers = [
        f"{d}/{f}"
        for d in ("prior_lite", "decoder_lite", "vqgan")
        for f in ("config.json", "diffusion_pytorch_model.bf16.safetensors")
    ]
    tokenizer = ("tokenizer/vocab.json", "tokenizer/merges.txt")
    folders = snapshot(tmp_path / "diffusers", *diffusers, *TEXT_FILES[:2], *tokenizer)
    assert weights_problem(folders) is None
    assert weights_problem(DEMO, "big", "big") is None  # the shipped demo model's real layout


def test_an_empty_folder_says_it_is_empty_and_what_to_do(tmp_path: Path) -> None:
    message = weights_problem(snapshot(tmp_path / "w"))
    assert message is not None
    assert message.startswith(f"CASCADE_WEIGHTS_DIR (--weights)='{tmp_path / 'w'}': ")
    assert "stage_c_lite.safetensors" in message and "The folder is empty." in message
    assert "unset CASCADE_WEIGHTS_DIR" in message and 'README "Real weights"' in message


@pytest.mark.parametrize(
    "stray", ["model.ckpt", "stage_c_lite.bin", "prior_lite/diffusion_pytorch_model.bin"]
)
def test_a_pickle_checkpoint_is_named_as_not_loaded(tmp_path: Path, stray: str) -> None:
    message = weights_problem(snapshot(tmp_path / "w", stray, "prior_lite/config.json"))
    assert message is not None
    assert f"Not loaded: {stray} (pickle checkpoints are never unpickled" in message


def test_another_variant_is_pointed_out(tmp_path: Path) -> None:
    big_prior = ("stage_c_bf16.safetensors", *LITE_FILES[1:], *TEXT_FILES)
    message = weights_problem(snapshot(tmp_path / "w", *big_prior))
    assert message is not None and "stage_c_lite.safetensors" in message
    assert "CASCADE_PRIOR_VARIANT=big CASCADE_DECODER_VARIANT=lite" in message
    assert "--prior-variant big" in message


@pytest.mark.parametrize(
    ("missing", "expected"),
    [
        ("text_encoder/config.json", "no CLIP text encoder: text_encoder/ has no config.json"),
        ("text_encoder/model.safetensors", "text_encoder/ has no .safetensors file"),
        ("tokenizer/tokenizer.json", "no CLIP tokenizer: tokenizer/ has neither tokenizer.json"),
    ],
)
def test_the_text_encoder_and_tokenizer_are_required(
    tmp_path: Path, missing: str, expected: str
) -> None:
    files = [f for f in TEXT_FILES if f != missing] + ["tokenizer/tokenizer_config.json"]
    message = weights_problem(snapshot(tmp_path / "w", *LITE_FILES, *files))
    assert message is not None and expected in message, message


def test_a_pickle_text_encoder_is_named(tmp_path: Path) -> None:
    root = snapshot(
        tmp_path / "w", *LITE_FILES, "text_encoder/config.json",
        "text_encoder/pytorch_model.bin", "tokenizer/tokenizer.json",
    )  # fmt: skip
    message = weights_problem(root)
    assert message is not None and "(only pytorch_model.bin: pickle, never unpickled)" in message


def test_no_text_encoder_folder(tmp_path: Path) -> None:
    message = weights_problem(snapshot(tmp_path / "w", *LITE_FILES, "tokenizer/tokenizer.json"))
    assert message is not None and "text_encoder/ (or the folder itself) has no config.json" in (
        message
    )


# ---------------------------------------------------------------------------------------- API keys


def test_api_key_files(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# operators\nkey-one\n\nkey-two  # ci\n")
    assert preflight.check_api_keys({"CASCADE_API_KEYS_FILE": str(keys)}) is None
    assert preflight.check_api_keys({"CASCADE_API_KEYS": "a,b"}) is None
    assert preflight.check_api_keys({}) is None

    missing = preflight.check_api_keys({"CASCADE_API_KEYS_FILE": str(tmp_path / "nope")})
    assert missing is not None and f"CASCADE_API_KEYS_FILE='{tmp_path / 'nope'}'" in missing
    assert "cannot read" in missing and "unset the variable" in missing
    folder = preflight.check_api_keys({"CASCADE_API_KEYS_FILE": str(tmp_path)})
    assert folder is not None and "cannot read" in folder  # unreadable as a file, even for root

    keys.write_text("# no keys yet\n\n")
    empty = preflight.check_api_keys({"CASCADE_API_KEYS_FILE": str(keys), "CASCADE_API_KEYS": "a"})
    assert empty is not None and "holds no key" in empty and "one key per line" in empty


def test_metrics_key_without_keys() -> None:
    message = preflight.check_api_keys({"CASCADE_METRICS_REQUIRE_KEY": "true"})
    assert message is not None and "CASCADE_METRICS_REQUIRE_KEY" in message
    assert "CASCADE_API_KEYS" in message
    env = {"CASCADE_METRICS_REQUIRE_KEY": "true", "CASCADE_API_KEYS": "k"}
    assert preflight.check_api_keys(env) is None


# ------------------------------------------------------------------------------------ device, port


def test_devices() -> None:
    assert preflight.check_device("cpu") is None and preflight.check_device("auto") is None
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        assert preflight.check_device("cuda") is None
        message = preflight.check_device(f"cuda:{count}")
        assert message is not None and f"has {count} GPU(s)" in message
    else:
        message = preflight.check_device("cuda:0")
        assert message is not None and "CASCADE_DEVICE (--device)='cuda:0'" in message
        assert "CUDA is not available" in message and "use auto or cpu" in message


def test_ports(busy_port: int) -> None:
    message = preflight.check_port("127.0.0.1", busy_port)
    assert message is not None and f"CASCADE_PORT (--port)={busy_port}" in message
    assert "already in use" in message and "--port or CASCADE_PORT" in message
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = int(sock.getsockname()[1])
    assert preflight.check_port("127.0.0.1", free) is None
    bad_host = preflight.check_port("no-such-host.invalid", free)
    assert bad_host is not None and "CASCADE_HOST (--host)='no-such-host.invalid'" in bad_host


def test_every_problem_is_reported(tmp_path: Path, busy_port: int) -> None:
    settings = Settings(weights_dir=snapshot(tmp_path / "w"), port=busy_port)
    problems = preflight.check(settings, {"CASCADE_METRICS_REQUIRE_KEY": "yes"})
    assert [p.split(" ", 1)[0] for p in problems] == [
        "CASCADE_WEIGHTS_DIR",
        "CASCADE_METRICS_REQUIRE_KEY",
        "CASCADE_PORT",
    ]


# ----------------------------------------------- python -m service: exit 2, one line, no traceback


@pytest.fixture
def stray_checkpoint(tmp_path: Path) -> str:
    return str(snapshot(tmp_path / "ckpt", "stage_c_lite.ckpt"))


def test_start_up_stops_on_a_stray_checkpoint(stray_checkpoint: str) -> None:
    message = one_message(run_service(weights_dir=stray_checkpoint))
    assert (
        "CASCADE_WEIGHTS_DIR (--weights)" in message and "Not loaded: stage_c_lite.ckpt" in message
    )


def test_start_up_stops_on_weights_without_a_text_encoder(tmp_path: Path) -> None:
    root = str(snapshot(tmp_path / "w", *LITE_FILES))
    message = one_message(run_service("--weights", root))
    assert f"CASCADE_WEIGHTS_DIR (--weights)='{root}'" in message and "text encoder" in message


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"api_keys_file": "/no/such/keys"}, "CASCADE_API_KEYS_FILE='/no/such/keys': cannot read"),
        ({"metrics_require_key": "true"}, "CASCADE_METRICS_REQUIRE_KEY is true but no API keys"),
    ],
)
def test_start_up_stops_on_key_settings(settings: dict[str, str], expected: str) -> None:
    assert expected in one_message(run_service(**settings))


def test_start_up_stops_on_an_empty_keys_file(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("\n")
    message = one_message(run_service(api_keys_file=str(tmp_path / "keys")))
    assert "holds no key" in message


def test_start_up_stops_on_a_missing_gpu() -> None:
    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    message = one_message(run_service(device=device))
    assert f"CASCADE_DEVICE (--device)='{device}'" in message


def test_start_up_stops_on_a_port_in_use(busy_port: int) -> None:
    message = one_message(run_service("--port", str(busy_port)))
    assert "already in use" in message and "--port or CASCADE_PORT" in message
