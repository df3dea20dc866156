"""The command line of ``python -m service`` / ``cascade-serve``: --help, flags and their variables,
a flag winning over its variable, --check, and a real start on the port a flag names."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from typing import Any

import httpx
import pytest

from service.__main__ import build_parser, serve
from service.settings import FLAGS, Settings, SettingsError, env_names
from tests.service.conftest import wait_until
from tests.service.service_process import (
    CHECK_S,
    ROOT,
    free_port,
    one_message,
    run_service,
    service_env,
)

START_S = 180.0  # importing torch and creating the app on 2 shared cores


def test_help_lists_every_flag_with_its_variable_and_exits_0() -> None:
    result = run_service("--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for field, flag in FLAGS.items():
        assert flag in text and f"CASCADE_{field.upper()}" in text, field
    assert "--check" in text and "flag wins" in text
    for variable in [*env_names(), "CASCADE_API_KEYS_FILE", "CASCADE_METRICS_REQUIRE_KEY"]:
        assert variable in text, variable  # the flagless ones are listed in the epilog


def test_help_loads_neither_torch_nor_the_app() -> None:
    probe = (
        "import sys\nfrom service.__main__ import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as exit:\n"
        "    print('EXIT', exit.code, 'torch' in sys.modules, 'service.app' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=service_env(),
        capture_output=True, text=True, timeout=CHECK_S, check=False,
    )  # fmt: skip
    assert result.stdout.splitlines()[-1] == "EXIT 0 False False", result.stdout + result.stderr


def test_flags_map_to_settings_fields() -> None:
    args = build_parser().parse_args(
        ["--host", "0.0.0.0", "--port", "8123", "--weights", "/w", "--prior-variant", "big"]
    )
    assert (args.host, args.port, args.weights_dir, args.prior_variant) == (
        "0.0.0.0", "8123", "/w", "big",
    )  # fmt: skip
    assert args.device is None and args.check is False  # absent: left to the variable


def test_a_flag_wins_over_its_variable() -> None:
    env = {"CASCADE_PORT": "9000", "CASCADE_DEVICE": "cpu", "CASCADE_HOST": "0.0.0.0"}
    s = Settings.from_env(env, flags={"port": "9001", "device": "auto"})
    assert (s.port, s.device, s.host) == (9001, "auto", "0.0.0.0")


def test_a_bad_flag_value_is_named_by_its_flag() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"CASCADE_PORT": "9000"}, flags={"port": "http"})
    assert "--port='http' (or CASCADE_PORT)" in str(info.value)
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"CASCADE_PORT": "http"})
    assert "CASCADE_PORT='http' (or --port)" in str(info.value)


def test_check_uses_the_flag_over_the_variable() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        port = free_port()
        ok = run_service("--check", "--port", str(port), port=str(taken))
        assert ok.returncode == 0, ok.stderr
        assert f"configuration OK (the built-in demo model, 127.0.0.1:{port})" in ok.stdout
        # Without the flag the variable's port is checked, and is in use.
        message = one_message(run_service("--check", port=str(taken)))
        assert f"CASCADE_PORT (--port)={taken}" in message


def test_a_bad_flag_stops_start_up_with_one_line() -> None:
    message = one_message(run_service("--port", "http"))
    assert "--port='http' (or CASCADE_PORT)" in message and "valid integer" in message


def test_an_unknown_argument_is_a_usage_error() -> None:
    result = run_service("--prot", "8001")
    assert result.returncode == 2 and "unrecognized arguments: --prot" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_server_listens_on_the_port_the_flag_names() -> None:
    port, other = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT, env=service_env(port=str(other), device="cpu", torch_threads="1"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:

        def live() -> bool:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=2).is_success
            except httpx.TransportError:
                return False

        wait_until(live, "/health/live on the --port port", timeout=START_S)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=START_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_a_port_taken_after_the_pre_flight_still_ends_in_one_message(
    tiny_pipeline: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """uvicorn's own bind failure (the port was taken between the check and the bind)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        status = serve(Settings(port=port, log_level="error"), lambda _: tiny_pipeline)
    assert status == 1
    err = capsys.readouterr().err
    assert f"could not listen on 127.0.0.1:{port}" in err and "--port or CASCADE_PORT" in err


def test_the_readme_settings_table_shows_each_flag() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = {}
    for line in readme.split("## Settings", 1)[1].split("\n## ", 1)[0].splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("CASCADE_"):
            rows[cells[0]] = cells[1]
    assert set(env_names()) <= set(rows)
    for variable in env_names():
        field = variable.removeprefix("CASCADE_").lower()
        assert rows[variable] == FLAGS.get(field, ""), variable
