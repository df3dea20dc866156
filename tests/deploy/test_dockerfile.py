"""Dockerfile and .dockerignore: hadolint clean, pinned CUDA base matching the torch CUDA build, non-root,
health check on readiness, SIGTERM reaching the server, weights never in the build context.

No Docker engine runs here, so the image is not built; these checks read the real file.
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess

from tests.deploy.tooling import REPO, find_tool

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    """Instructions split per build stage (global ARGs before the first FROM are stage 0)."""
    result: list[list[tuple[str, str]]] = [[]]
    for keyword, args in instructions():
        if keyword == "FROM":
            result.append([])
        result[-1].append((keyword, args))
    return result


def arg_defaults() -> dict[str, str]:
    defaults = {}
    for keyword, args in instructions():
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults[name] = value
    return defaults


def test_hadolint_passes() -> None:
    hadolint = find_tool("hadolint")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_cuda_base_is_pinned_and_matches_the_torch_build() -> None:
    defaults = arg_defaults()
    base = defaults["CUDA_IMAGE"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-(?:cudnn-)?runtime-ubuntu\d+\.\d+", base)
    assert match, f"base image {base!r} is not a version-pinned nvidia/cuda runtime image"
    major, minor = match.group(1), match.group(2)
    for stage in stages()[1:]:
        assert stage[0][1].split()[0] == "${CUDA_IMAGE}", (
            f"every stage must build on the pinned base: {stage[0]}"
        )
    assert defaults["TORCH_VERSION"] == "2.13.0", (
        "torch must be pinned to the version the project tests"
    )
    index = defaults["TORCH_INDEX_URL"]
    assert index == f"https://download.pytorch.org/whl/cu{major}{minor}", (
        f"torch index {index} does not match the base image's CUDA {major}.{minor}"
    )
    runs = " ".join(args for keyword, args in instructions() if keyword == "RUN")
    assert '"torch==${TORCH_VERSION}"' in runs and '--index-url "${TORCH_INDEX_URL}"' in runs


def test_final_stage_runs_the_server_as_non_root_with_signals_and_health() -> None:
    final = stages()[-1]
    keywords = [k for k, _ in final]
    users = [args for keyword, args in final if keyword == "USER"]
    assert users, "the final stage must switch to a non-root USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]} must be numeric and non-root"
    assert keywords.index("USER") < keywords.index("CMD")

    (healthcheck,) = [args for keyword, args in final if keyword == "HEALTHCHECK"]
    assert "/health/ready" in healthcheck and "CMD" in healthcheck
    assert "--start-period=" in healthcheck, (
        "a loading replica needs a start period before it counts unhealthy"
    )

    assert ("STOPSIGNAL", "SIGTERM") in final
    (entrypoint,) = [json.loads(args) for keyword, args in final if keyword == "ENTRYPOINT"]
    (cmd,) = [
        json.loads(args) for keyword, args in final if keyword == "CMD"
    ]  # exec form: JSON arrays
    assert entrypoint == ["/usr/bin/tini", "--"], "tini as PID 1 forwards SIGTERM and reaps zombies"
    assert cmd == ["python", "-m", "service"], "one server process per container"

    env = " ".join(args for keyword, args in final if keyword == "ENV")
    for setting in (
        "CASCADE_HOST=0.0.0.0",
        "CASCADE_WEIGHTS_DIR=/weights",
        "CASCADE_DEVICE=cuda",
        "CASCADE_DRAIN_TIMEOUT_S=",
        "HF_HUB_OFFLINE=1",
    ):
        assert setting in env, f"final stage ENV lacks {setting}"


def test_weights_are_never_copied_into_the_image() -> None:
    sources: list[str] = []
    for keyword, args in instructions():
        if keyword == "ADD":
            raise AssertionError(f"ADD {args}: use COPY (no remote downloads or archives)")
        if keyword == "COPY" and "--from=" not in args:
            sources += args.split()[:-1]
    allowed = {
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "./",
        "models/",
        "service/",
        "docker/healthcheck.py",
    }
    assert set(sources) <= allowed, f"unexpected COPY sources: {set(sources) - allowed}"
    assert (REPO / "docker" / "healthcheck.py").is_file()

    patterns = [
        p.strip()
        for p in (REPO / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    for weight_file in (
        "weights/stage_c.safetensors",
        "snap/prior_lite/model.safetensors",
        "x/model.bin",
        "ckpt/model.ckpt",
    ):
        assert any(
            fnmatch.fnmatch(weight_file, p.replace("**/", "*"))
            or weight_file.startswith(p.rstrip("/") + "/")
            for p in patterns
        ), f".dockerignore lets {weight_file} into the build context"
    for needed in ("models", "service", "docker", "pyproject.toml"):
        assert needed not in patterns, f".dockerignore excludes {needed}, which the build needs"


def documented_builds() -> list[dict[str, str]]:
    """The build arguments of each row of docs/deploy.md's driver table (`NAME=value` in backticks)."""
    text = (REPO / "docs" / "deploy.md").read_text()
    section = text.split("### CUDA builds and drivers", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| CUDA ")]
    assert len(rows) >= 2, "docs/deploy.md lost its driver table"
    return [dict(re.findall(r"`([A-Z_]+)=([^`\s]+)`", row)) for row in rows]


def test_every_documented_build_pairs_its_cuda_base_with_the_same_torch_build() -> None:
    defaults = arg_defaults()
    builds = documented_builds()
    assert builds[0] == {}, "the first row is the default build: no arguments"
    for args in builds[1:]:
        assert set(args) <= set(defaults), f"unknown build argument in {args}"
        build = {**defaults, **args}
        match = re.fullmatch(
            r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu\d+\.\d+", build["CUDA_IMAGE"]
        )
        assert match, build["CUDA_IMAGE"]
        assert build["TORCH_INDEX_URL"] == (
            f"https://download.pytorch.org/whl/cu{match.group(1)}{match.group(2)}"
        ), f"{args}: the torch build does not match the base image's CUDA"
    # The example command below the table is the CUDA 12.6 row.
    text = (REPO / "docs" / "deploy.md").read_text()
    cu126 = next(a for a in builds if a.get("TORCH_INDEX_URL", "").endswith("/cu126"))
    for name, value in cu126.items():
        assert f"--build-arg {name}={value}" in text
        assert f"--build-arg {name}={value}" in DOCKERFILE.read_text()
