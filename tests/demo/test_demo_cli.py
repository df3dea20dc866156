"""The CLI on the demo model: the warning about a prompt the model does not know, and seeds in the
server's range (0 .. 2^32-1) so that a CLI image can be reproduced over HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from models import cli, pipeline, request
from service import schemas

FAST = ["--prior-steps", "2", "--decoder-steps", "2"]


def test_one_seed_bound_for_the_cli_the_api_and_the_pipeline() -> None:
    assert request.MAX_SEED == 2**32 - 1
    assert pipeline.MAX_SEED is request.MAX_SEED and cli.MAX_SEED is request.MAX_SEED
    seed_schema = schemas.GenerateRequest.model_json_schema()["properties"]["seed"]["anyOf"][0]
    assert seed_schema["maximum"] == request.MAX_SEED


def test_a_prompt_outside_the_vocabulary_is_warned_about(tmp_path: Path, capsys) -> None:
    out = tmp_path / "horse.png"
    assert cli.main(["an astronaut riding a horse", "-o", str(out), "--seed", "1", *FAST]) == 0
    err = capsys.readouterr().err
    assert "warning: the demo model does not know the words 'an', 'astronaut'" in err
    assert "real weights (--weights DIR)" in err and out.is_file()
    known = "a red circle at the left on a blue background"
    assert cli.main([known, "-o", str(out), "--seed", "1", *FAST]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_random_seed_is_one_the_server_accepts(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    bounds: list[int] = []

    def highest(n: int) -> int:  # the largest seed secrets.randbelow(n) could give
        bounds.append(n)
        return n - 1

    monkeypatch.setattr(cli.secrets, "randbelow", highest)
    argv = ["a red circle on a blue background", "-o", str(tmp_path / "x.png"), *FAST]
    assert cli.main([*argv, "--num-images", "2"]) == 0
    # Both images' seeds (seed, seed + 1) are <= 2^32-1, the most the HTTP API takes.
    assert f"seed: {2**32 - 2}" in capsys.readouterr().out and bounds == [2**32 - 1]


def test_a_seed_out_of_the_server_range_is_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.png"
    argv = ["a red circle on a blue background", "-o", str(out), "--seed", str(2**32)]
    assert cli.main(argv) == 2
    assert "seed" in capsys.readouterr().err and not out.exists()
