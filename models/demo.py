"""The built-in demo model: a tiny Stable Cascade trained on synthetic coloured shapes (``assets/demo-model``).

The folder has the layout of real weights (official flat ``stage_a/b/c.safetensors`` files, ``text_encoder/`` and
``tokenizer/``) and is loaded through the same loaders, so using it exercises the real loading path. Its
``demo.json`` declares the model's identity and its own sampling defaults (128 px; Stage B guidance 1.5, which
follows the prompt better than the official 1.1 on this model), the size range it supports, and the prompts it
was trained on (``prompts``, read by ``models/demo_vocabulary.py``, which warns about any other prompt). How it was
made: ``training/train_demo.py``; what it can draw and how well: ``docs/demo_model.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from models.demo_vocabulary import PromptGrammar
from models.pipeline import CascadePipeline, Limits
from models.request import SamplingDefaults

DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo-model"
DEMO_FILES = ("stage_a.safetensors", "stage_b.safetensors", "stage_c.safetensors", "demo.json")


def demo_model_dir() -> Path:
    """The demo model's folder (``assets/demo-model`` next to the ``models`` package: repository checkout or
    editable install). Raises FileNotFoundError naming what is missing."""
    missing = [
        name
        for name in DEMO_FILES + ("text_encoder", "tokenizer")
        if not (DEMO_DIR / name).exists()
    ]
    if missing:
        raise FileNotFoundError(f"demo model folder {DEMO_DIR} lacks {', '.join(missing)}")
    return DEMO_DIR


def read_demo_config(path: str | Path | None = None) -> dict[str, Any]:
    """``demo.json`` of the demo folder, checked: name (str), description (str), demo (true), defaults (every
    SamplingDefaults field), limits (min_size, max_size), prompts (a grammar, ``models/demo_vocabulary.py``)."""
    folder = Path(path) if path is not None else demo_model_dir()
    file = folder / "demo.json"
    try:
        meta = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: cannot read the demo config ({e})") from None
    wrong = [
        f"{key!r} must be a {kind.__name__}"
        for key, kind in (
            ("name", str),
            ("description", str),
            ("demo", bool),
            ("defaults", dict),
            ("limits", dict),
            ("prompts", dict),
        )
        if not isinstance(meta.get(key), kind)
    ]
    if wrong:
        raise ValueError(f"{file}: field {wrong[0]}")
    fields = set(SamplingDefaults.__dataclass_fields__)
    if set(meta["defaults"]) != fields:
        raise ValueError(
            f"{file}: 'defaults' must have exactly the fields {sorted(fields)}, "
            f"got {sorted(meta['defaults'])}"
        )
    if set(meta["limits"]) - {"min_size", "max_size"}:
        raise ValueError(f"{file}: 'limits' may only hold min_size and max_size")
    PromptGrammar.from_config(
        meta["prompts"], source=f"{file}: 'prompts'"
    )  # the warnings rely on it
    return meta


def load_demo_pipeline(
    device: torch.device | str = "cpu",
    *,
    path: str | Path | None = None,
    dtype: torch.dtype | None = None,
    cuda_graphs: bool = True,
) -> CascadePipeline:
    """The demo model as a CascadePipeline, with the sampling defaults and size limits of its ``demo.json``.

    ``path``: another folder with the same layout (e.g. a fresh training output); default ``assets/demo-model``.
    dtype None -> float32 on the CPU, bfloat16 on CUDA (as for real weights). ``cuda_graphs`` as in
    ``CascadePipeline.from_snapshot``.
    """
    from models import weights
    from models.clip_image import ClipImageEncoder
    from models.text import TextEncoder

    folder = Path(path) if path is not None else demo_model_dir()
    meta = read_demo_config(folder)
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    stage_c = weights.load_stage_c(folder / "stage_c.safetensors", device=device, dtype=dtype)
    stage_b = weights.load_stage_b(folder / "stage_b.safetensors", device=device, dtype=dtype)
    stage_a = weights.load_stage_a(folder / "stage_a.safetensors", device=device, dtype=dtype)
    # The text tower is tiny: keep it in float32 whatever the networks' dtype.
    text_encoder = TextEncoder.from_pretrained(folder, device=device, dtype=torch.float32)
    limits = meta["limits"]
    preview_file = folder / "previewer.safetensors"  # optional: without it, no previews
    previewer = (
        weights.load_previewer(preview_file, device=device) if preview_file.exists() else None
    )
    # Optional as for real weights: the image encoder (image-to-image) and CLIP image tower (variations).
    effnet_file = folder / "effnet_encoder.safetensors"
    image_encoder = (
        weights.load_effnet(effnet_file, device=device) if effnet_file.exists() else None
    )
    clip_image = (
        ClipImageEncoder.from_pretrained(folder, device=device)
        if ClipImageEncoder.present(folder)
        else None
    )
    return CascadePipeline(
        stage_c,
        stage_b,
        stage_a,
        text_encoder,
        defaults=SamplingDefaults(**meta["defaults"]),
        limits=Limits.for_models(
            stage_a.config,
            stage_b.config,
            min_size=limits.get("min_size", 64),
            max_size=limits.get("max_size", 512),
        ),
        model_info={
            "name": meta["name"],
            "demo": True,
            "prior": "demo",
            "decoder": "demo",
            "weights": str(folder),
        },
        device=device,
        dtype=dtype,
        cuda_graphs=cuda_graphs,
        previewer=previewer,
        image_encoder=image_encoder,
        clip_image=clip_image,
    )
