"""Settings.from_env: typed CASCADE_* variables, defaults, and one clear error naming every bad
value."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from service.settings import Settings, SettingsError, env_names
from tests.service.service_process import one_message, run_service


def test_defaults_with_nothing_configured() -> None:
    s = Settings.from_env({"PATH": "/bin"})
    assert (s.host, s.port, s.weights_dir, s.device, s.dtype) == (
        "127.0.0.1",
        8000,
        None,
        "auto",
        "auto",
    )
    assert (s.prior_variant, s.decoder_variant) == ("lite", "lite")
    assert s.drain_timeout_s == 30.0


def test_values_are_typed(tmp_path: Path) -> None:
    s = Settings.from_env(
        {
            "CASCADE_WEIGHTS_DIR": str(tmp_path),
            "CASCADE_PRIOR_VARIANT": "big",
            "CASCADE_DEVICE": "cuda:1",
            "CASCADE_DTYPE": "bfloat16",
            "CASCADE_MAX_QUEUE_SIZE": "7",
            "CASCADE_MAX_BATCH_WAIT_MS": "2.5",
            "CASCADE_REQUEST_TIMEOUT_S": "",  # empty counts as unset
        }
    )
    assert s.weights_dir == tmp_path and s.prior_variant == "big" and s.device == "cuda:1"
    assert s.max_queue_size == 7 and s.max_batch_wait_ms == 2.5 and s.request_timeout_s == 300.0


@pytest.mark.parametrize(
    ("name", "value", "hint"),
    [
        ("CASCADE_PORT", "http", "integer"),
        ("CASCADE_PORT", "70000", "65535"),
        ("CASCADE_MAX_QUEUE_SIZE", "0", "greater than or equal to 1"),
        ("CASCADE_DEVICE", "tpu", "auto, cpu, cuda or cuda:N"),
        ("CASCADE_DTYPE", "float16", "bfloat16"),
        ("CASCADE_DECODER_VARIANT", "huge", "lite"),
        ("CASCADE_WEIGHTS_DIR", "/no/such/dir", "not a directory"),
        ("CASCADE_DRAIN_TIMEOUT_S", "-1", "greater than or equal to 0"),
        ("CASCADE_PNG_METADATA", "maybe", "boolean"),
        ("CASCADE_CORS_ORIGINS", "app.example.com", "scheme://host[:port]"),
        ("CASCADE_CORS_ORIGINS", "https://app.example.com/", "drop the path"),
        ("CASCADE_CORS_ORIGINS", "https://a.example,https://b.example/api", "drop the path"),
        ("CASCADE_CORS_ORIGINS", "https://app.example.com:443", "'https://app.example.com'"),
        ("CASCADE_CORS_ORIGINS", "http://localhost:0", "1..65535"),
        ("CASCADE_CORS_ORIGINS", "null", "not an origin"),
        ("CASCADE_CORS_ORIGINS", "*,https://app.example.com", "give it alone"),
        ("CASCADE_MAX_IMAGE_BYTES", "100", "greater than or equal to 1024"),
        ("CASCADE_MAX_IMAGE_BYTES", "8MiB", "integer"),
        ("CASCADE_MAX_IMAGE_BYTES", "1000000000", "less than or equal to 268435456"),
        ("CASCADE_MAX_IMAGE_PIXELS", "0", "greater than or equal to 4096"),
        ("CASCADE_MAX_IMAGE_PIXELS", "100000000", "less than or equal to 89478485"),
    ],
)
def test_bad_values_name_the_variable_value_and_rule(name: str, value: str, hint: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({name: value})
    assert f"{name}={value!r}" in str(info.value) and hint in str(info.value)


def test_cors_origins_and_png_metadata() -> None:
    assert Settings.from_env({}).cors_origins == () and Settings.from_env({}).png_metadata
    s = Settings.from_env(
        {
            "CASCADE_CORS_ORIGINS": " https://App.Example.com, http://localhost:3000,,"
            "http://[::1]:8080",
            "CASCADE_PNG_METADATA": "false",
        }
    )
    # lower case, as browsers send Origin; blank entries skipped
    assert s.cors_origins == (
        "https://app.example.com",
        "http://localhost:3000",
        "http://[::1]:8080",
    )
    assert s.png_metadata is False
    assert Settings.from_env({"CASCADE_CORS_ORIGINS": "*"}).cors_origins == ("*",)


def test_unknown_variables_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="service.settings"):
        Settings.from_env({"CASCADE_MAX_QUEUE_SZE": "3"})
    assert "CASCADE_MAX_QUEUE_SZE" in caplog.text and "CASCADE_MAX_QUEUE_SIZE" in caplog.text


def test_every_field_has_an_env_name_and_a_description() -> None:
    assert "CASCADE_DRAIN_TIMEOUT_S" in env_names() and "CASCADE_WEIGHTS_DIR" in env_names()
    assert all(field.description for field in Settings.model_fields.values())


def test_keep_alive_outlasts_the_idle_timeouts_in_front(monkeypatch) -> None:
    """uvicorn closes idle connections after CASCADE_KEEP_ALIVE_S; nginx's upstream keep-alive
    (60 s by default, docker/nginx.conf sets none) and httpx's pool (5 s) must give up first, or a
    request sent as the server closes gets no answer (bench/keepalive_race.py)."""
    import service.__main__ as main_module

    captured: dict = {}

    class Stop(Exception):
        pass

    def config(app, **kwargs):
        captured.update(kwargs)
        raise Stop

    monkeypatch.setattr(main_module.uvicorn, "Config", config)
    with pytest.raises(Stop):
        main_module.serve(Settings(), lambda _: None)
    assert captured["timeout_keep_alive"] == Settings().keep_alive_s == 75 > 60 > 5  # noqa: PLR0133
    nginx = (Path(__file__).resolve().parents[2] / "docker" / "nginx.conf").read_text()
    assert "keepalive_timeout" not in nginx
    assert Settings.from_env({"CASCADE_KEEP_ALIVE_S": "120"}).keep_alive_s == 120


def test_image_limits_default_and_read() -> None:
    s = Settings.from_env({})
    assert (s.max_image_bytes, s.max_image_pixels) == (8 * 1024 * 1024, 4096 * 4096)
    s = Settings.from_env(
        {"CASCADE_MAX_IMAGE_BYTES": "2097152", "CASCADE_MAX_IMAGE_PIXELS": "1048576"}
    )
    assert (s.max_image_bytes, s.max_image_pixels) == (2 * 1024 * 1024, 1024 * 1024)


@pytest.mark.parametrize(
    ("setting", "value", "hint"),
    [
        ("max_image_bytes", "-1", "greater than or equal to 1024"),
        ("max_image_pixels", "lots", "integer"),
    ],
)
def test_a_bad_image_limit_stops_start_up_with_one_line(
    setting: str, value: str, hint: str
) -> None:
    message = one_message(run_service(**{setting: value}))
    assert f"CASCADE_{setting.upper()}={value!r}" in message and hint in message


def test_stage_overlap_is_off_by_default_and_needs_continuous_batching() -> None:
    assert Settings.from_env({}).stage_overlap is False
    assert Settings.from_env({"CASCADE_STAGE_OVERLAP": "1"}).stage_overlap is True
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"CASCADE_STAGE_OVERLAP": "true", "CASCADE_BATCHING": "static"})
    assert "CASCADE_STAGE_OVERLAP needs CASCADE_BATCHING=continuous" in str(info.value)
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"CASCADE_STAGE_OVERLAP": "maybe"})
    assert "CASCADE_STAGE_OVERLAP='maybe'" in str(info.value) and "boolean" in str(info.value)
