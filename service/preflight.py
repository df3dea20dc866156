"""Pre-flight: catch configuration mistakes before the server listens.

The model loads in the background after uvicorn listens (service/runtime.py), so a mistake found
there surfaces as "Uvicorn running on ..." followed by a traceback and a failed /health/live. The
checks here are cheap (file names, one key file, torch.cuda, one test bind; no tensor is read) and
run first, so such a mistake stops start-up with one line per problem: the setting (variable and
flag), what was found and what to do. ``__main__`` prints them and exits 2.

Checked: the weights folder (every network's file present, the CLIP text tower and tokenizer, no
stray pickle checkpoint taken for weights), the API key settings, the device, and the port.
"""

from __future__ import annotations

import errno
import os
import socket
import warnings
from collections.abc import Mapping
from pathlib import Path

from service.auth import AuthConfig, AuthConfigError, read_keys_file
from service.settings import Settings, setting_name

_LISTED = 6  # folder entries quoted in a message
README_WEIGHTS = 'README "Real weights"'


def check(settings: Settings, environ: Mapping[str, str] | None = None) -> list[str]:
    """Every configuration problem found, one message each (empty: the server can start)."""
    environ = os.environ if environ is None else environ
    problems = [
        check_weights(settings),
        check_api_keys(environ),
        check_device(settings.device),
        check_port(settings.host, settings.port),
    ]
    return [p for p in problems if p]


# --------------------------------------------------------------------------------------- weights


def check_weights(settings: Settings) -> str | None:
    """The weights folder has each network's file and the text encoder (names only, no data)."""
    root = settings.weights_dir
    if root is None:
        return None  # the built-in demo model, shipped in assets/
    from models.weights import CheckpointError, find_stage_files  # imports torch: only when needed

    label = f"{setting_name('weights_dir')}={str(root)!r}"
    todo = (
        f"Download the .safetensors weights as {README_WEIGHTS} shows, or unset "
        "CASCADE_WEIGHTS_DIR to serve the built-in demo model."
    )
    try:
        try:
            find_stage_files(root, settings.prior_variant, settings.decoder_variant)
        except CheckpointError as exc:
            # A folder holding another lite/big combination only needs the variant settings.
            return f"{label}: {exc} {_found(root)} {_variant_hint(root, settings) or todo}"
        text = _text_encoder_problem(root)
    except OSError as exc:  # e.g. a folder this user may not list
        return f"{label}: cannot read {exc.filename}: {exc.strerror}. {todo}"
    return f"{label}: {text} {todo}" if text else None


def _found(root: Path) -> str:
    """What the folder does hold, naming any pickle checkpoint (it is never unpickled)."""
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    if not entries:
        return "The folder is empty."
    pickles = sorted(
        str(p.relative_to(root))
        for p in [*root.iterdir(), *(c for d in root.iterdir() if d.is_dir() for c in d.iterdir())]
        if _is_pickle(p)
    )
    more = len(entries) - _LISTED
    shown = ", ".join(entries[:_LISTED]) + (f" and {more} more" if more > 0 else "")
    text = f"Found: {shown}."
    if pickles:
        text += (
            f" Not loaded: {', '.join(pickles[:_LISTED])} (pickle checkpoints are never "
            "unpickled: loading one can run arbitrary code)."
        )
    return text


def _is_pickle(path: Path) -> bool:
    from models.safetensors_header import PICKLE_SUFFIXES  # the loader refuses exactly these

    return path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES


def _variant_hint(root: Path, settings: Settings) -> str:
    """When the folder holds another lite/big combination, say which settings select it."""
    from models.weights import CheckpointError, find_stage_files

    for prior in ("lite", "big"):
        for decoder in ("lite", "big"):
            if (prior, decoder) == (settings.prior_variant, settings.decoder_variant):
                continue
            try:
                find_stage_files(root, prior, decoder)
            except CheckpointError:
                continue
            return (
                f"These are the {prior} prior and the {decoder} decoder: set "
                f"CASCADE_PRIOR_VARIANT={prior} CASCADE_DECODER_VARIANT={decoder} "
                f"(--prior-variant {prior} --decoder-variant {decoder})."
            )
    return ""


def _text_encoder_problem(root: Path) -> str | None:
    """The folders models.text.TextEncoder.from_pretrained reads: the CLIP text tower
    (config.json + safetensors weights) and its tokenizer (tokenizer.json, or vocab.json +
    merges.txt), in ``text_encoder/`` and ``tokenizer/`` or else at the root."""
    model_dir = root / "text_encoder" if (root / "text_encoder").is_dir() else root
    tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
    where = "text_encoder/" if model_dir != root else "text_encoder/ (or the folder itself)"
    if not (model_dir / "config.json").is_file():
        return f"no CLIP text encoder: {where} has no config.json."
    if not any(model_dir.glob("*.safetensors")):
        stray = sorted(p.name for p in model_dir.iterdir() if _is_pickle(p))
        found = f" (only {', '.join(stray)}: pickle, never unpickled)" if stray else ""
        return f"no CLIP text encoder weights: {where} has no .safetensors file{found}."
    tokenizer_files = (tok_dir / "tokenizer.json").is_file() or (
        (tok_dir / "vocab.json").is_file() and (tok_dir / "merges.txt").is_file()
    )
    if not tokenizer_files:
        where = "tokenizer/" if tok_dir != root else "tokenizer/ (or the folder itself)"
        return f"no CLIP tokenizer: {where} has neither tokenizer.json nor vocab.json + merges.txt."
    return None


# -------------------------------------------------------------------------------------- API keys


def check_api_keys(environ: Mapping[str, str]) -> str | None:
    """CASCADE_API_KEYS_FILE readable and holding keys; the auth settings consistent."""
    path = environ.get("CASCADE_API_KEYS_FILE", "").strip()
    if path:
        try:
            keys = read_keys_file(Path(path))
        except AuthConfigError as exc:
            return (
                f"{_sentence(exc)} Check the path and that this user may read it, or unset "
                "the variable."
            )
        if not keys:
            return (
                f"CASCADE_API_KEYS_FILE={path!r}: the file holds no key (only blank or # comment "
                "lines); put one key per line, or unset the variable to run without API keys."
            )
    try:
        AuthConfig.from_env(environ)
    except AuthConfigError as exc:
        return _sentence(exc)
    return None


def _sentence(exc: Exception) -> str:
    return str(exc).rstrip(".") + "."


# ---------------------------------------------------------------------------------------- device


def check_device(device: str) -> str | None:
    """cuda / cuda:N exists (auto and cpu always do)."""
    if not device.startswith("cuda"):
        return None
    import torch

    label = f"{setting_name('device')}={device!r}"
    with warnings.catch_warnings(record=True) as caught:  # e.g. "driver too old": said below
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if not available:
        if torch.version.cuda is None:
            why = f"the installed torch ({torch.__version__}) is a CPU-only build"
            todo = "install a CUDA build of torch (TORCH_SPEC, see README), or use auto or cpu."
        else:
            why = f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable GPU"
            if caught:
                why += f" ({' '.join(str(caught[0].message).split())})"
            todo = "check the driver and CUDA_VISIBLE_DEVICES, or use auto or cpu."
        return f"{label}: CUDA is not available: {why}; {todo}"
    index = torch.device(device).index
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        return f"{label}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}."
    return None


# ------------------------------------------------------------------------------------------ port


def check_port(host: str, port: int) -> str | None:
    """Bind (without listening) each address uvicorn will listen on, as asyncio does: with
    SO_REUSEADDR, so a port only in TIME_WAIT counts as free, and IPv6 sockets IPv6-only."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return (
            f"{setting_name('host')}={host!r}: not an address of this machine ({exc.strerror}); "
            "use 127.0.0.1, 0.0.0.0 or one of its addresses."
        )
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                return _bind_problem(host, port, exc)
    return None


def _bind_problem(host: str, port: int, exc: OSError) -> str:
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"{setting_name('port')}={port}: {where} is already in use (another server?); "
            "stop it, or choose another port with --port or CASCADE_PORT."
        )
    if exc.errno == errno.EACCES:
        return (
            f"{setting_name('port')}={port}: not allowed to listen on {where} (ports below 1024 "
            "need privileges); choose a port from 1024 up with --port or CASCADE_PORT."
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return (
            f"{setting_name('host')}={host!r}: not an address of this machine; use 127.0.0.1, "
            "0.0.0.0 or one of its addresses."
        )
    return f"{setting_name('port')}={port}: cannot listen on {where}: {exc.strerror}."
