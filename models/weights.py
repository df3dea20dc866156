"""Loading Stable Cascade weights: official flat .safetensors files or diffusers model folders.

Sources (``models.weight_sources``)
- Official files (``stage_c[_lite][_bf16].safetensors``, ``stage_b...``, ``stage_a``, ``effnet_encoder``,
  ``previewer``): flat state dicts with the official keys. The architecture is inferred from the tensor shapes
  (``models.infer_config``), so a path is all a caller gives.
- diffusers folders (``prior/``, ``prior_lite/``, ``decoder/``, ``decoder_lite/``, ``vqgan/``): ``config.json`` plus
  ``diffusion_pytorch_model[.bf16].safetensors``, or shards listed in ``diffusion_pytorch_model.safetensors.index
  [.bf16].json``. Config and keys are converted to the official ones by ``models.convert``.
- Pickle checkpoints (.ckpt/.pt/.pth/.bin) are refused without being opened: unpickling runs arbitrary code.
- ``find_stage_files`` locates every network's weights in a Hugging Face snapshot.

How (lean and fast)
- The network is constructed on the ``meta`` device (no allocation, no random init); after loading, nothing may be
  left on meta (every parameter and buffer of these networks is in its checkpoint).
- Every header is read (``models.safetensors_header``) and every key, shape and dtype kind is checked against the
  network BEFORE any tensor data is touched, so a bad file raises one ``CheckpointError`` and nothing is
  half-loaded.
- The data are memory-mapped and, where the dtype and device already match, used in place; otherwise converted
  once, file by file in on-disk order (``models.weight_reading``).
- ``load_state_dict(..., assign=True)`` installs the tensors as they are.

dtype: None -> bfloat16 on CUDA, float32 on the CPU; float16 is refused (activations overflow in this model).
Returned networks are in eval mode with ``requires_grad`` off.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models import convert
from models.config import (
    EfficientNetConfig,
    PreviewerConfig,
    StageAConfig,
    StageBConfig,
    StageCConfig,
)
from models.cpu_features import warn_if_bf16_is_emulated
from models.effnet import EfficientNetEncoder
from models.infer_config import (
    CheckpointError,
    checkpoint_kind,
    describe_checkpoint,
    infer_effnet_config,
    infer_previewer_config,
    infer_stage_a_config,
    infer_stage_b_config,
    infer_stage_c_config,
)
from models.previewer import Previewer
from models.safetensors_header import read_headers, read_safetensors_header
from models.stage_a import StageA
from models.stage_b import StageB
from models.stage_c import StageC
from models.weight_reading import finalize, read_official, read_views
from models.weight_sources import (
    STAGE_NAMES,
    Source,
    StageFiles,
    find_stage_files,
    resolve_source,
)

# The loading API in one place: the loaders, and the file-finding and header helpers callers use with them.
__all__ = [
    "CheckpointError",
    "StageFiles",
    "find_stage_files",
    "infer_effnet_config",
    "infer_previewer_config",
    "infer_stage_a_config",
    "infer_stage_b_config",
    "infer_stage_c_config",
    "load_effnet",
    "load_previewer",
    "load_stage_a",
    "load_stage_b",
    "load_stage_c",
    "read_safetensors_header",
]

_FIRST = 5  # offending keys quoted per category in error messages


# ---------------------------------------------------------------------------------------- validation


def _summary(config: Any) -> str:
    fields = (
        "c_hidden",
        "blocks",
        "c_cond",
        "levels",
        "bottleneck_blocks",
        "codebook_size",
        "c_latent",
    )
    parts = [f"{f}={getattr(config, f)}" for f in fields if hasattr(config, f)]
    return f"{type(config).__name__}({', '.join(parts)})"


def _check_against_model(
    model: nn.Module,
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, torch.dtype],
    config: Any,
) -> None:
    """Strict: the same key set, every shape equal, integer tensors where the model has integer tensors."""
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong_shape = [
        f"{k} (file {list(shapes[k])}, model {list(expected[k].shape)})"
        for k in expected
        if k in shapes and tuple(shapes[k]) != tuple(expected[k].shape)
    ]
    wrong_kind = [
        f"{k} (file {dtypes[k]}, model {expected[k].dtype})"
        for k in expected
        if k in dtypes and dtypes[k].is_floating_point != expected[k].dtype.is_floating_point
    ]
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", wrong_shape),
        ("dtype mismatches", wrong_kind),
    ):
        if items:
            more = f" (+{len(items) - _FIRST} more)" if len(items) > _FIRST else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:_FIRST])}{more}")
    if problems:
        raise CheckpointError(
            f"does not match the network {_summary(config)}: " + "; ".join(problems)
        )


# -------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Spec:
    name: str  # e.g. "Stage C (prior)"
    kind: str  # checkpoint_kind() value
    loader: str  # the function to use for this kind
    network: Callable[[Any], nn.Module]
    infer: Callable[[Mapping[str, tuple[int, ...]]], Any]
    from_diffusers: Callable[[Mapping[str, Any]], Any] | None = None
    keys_from_diffusers: Callable[[Mapping[str, Tensor]], dict[str, Tensor]] | None = None
    diffusers_class: str | None = None


_SPECS = {
    "stage_c": _Spec(
        STAGE_NAMES["stage_c"],
        "stage_c",
        "load_stage_c",
        StageC,
        infer_stage_c_config,
        convert.stage_c_config_from_diffusers,
        convert.unet_diffusers_to_official,
        "StableCascadeUNet",
    ),
    "stage_b": _Spec(
        STAGE_NAMES["stage_b"],
        "stage_b",
        "load_stage_b",
        StageB,
        infer_stage_b_config,
        convert.stage_b_config_from_diffusers,
        convert.unet_diffusers_to_official,
        "StableCascadeUNet",
    ),
    "stage_a": _Spec(
        STAGE_NAMES["stage_a"],
        "stage_a",
        "load_stage_a",
        StageA,
        infer_stage_a_config,
        convert.stage_a_config_from_diffusers,
        convert.vq_diffusers_to_official,
        "PaellaVQModel",
    ),
    "effnet": _Spec(
        STAGE_NAMES["effnet"], "effnet", "load_effnet", EfficientNetEncoder, infer_effnet_config
    ),
    "previewer": _Spec(
        STAGE_NAMES["previewer"], "previewer", "load_previewer", Previewer, infer_previewer_config
    ),
}
_LOADER_OF_KIND = {s.kind: s.loader for s in _SPECS.values()}


def _resolve_dtype(dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == torch.float16:
        raise ValueError(
            "dtype torch.float16 is not supported: Stable Cascade activations overflow in fp16; "
            "use torch.bfloat16 or torch.float32"
        )
    if dtype not in (torch.float32, torch.bfloat16, torch.float64):
        raise ValueError(f"dtype {dtype} is not supported; use torch.bfloat16 or torch.float32")
    return dtype


def _config_from_diffusers(spec: _Spec, source: Source) -> Any:
    cfg = source.diffusers_config or {}
    cls_name = cfg.get("_class_name")
    if cls_name == "StableCascadeUnet" or "c_hidden" in cfg:
        raise CheckpointError(
            "config.json uses the pre-release diffusers format (StableCascadeUnet, c_in/c_hidden "
            "fields); download a current revision of the repository"
        )
    if spec.from_diffusers is None:
        raise CheckpointError(
            f"{spec.name} has no diffusers layout; pass its official .safetensors file"
        )
    if cls_name is not None and cls_name != spec.diffusers_class:
        raise CheckpointError(
            f"config.json describes a {cls_name}, not the {spec.diffusers_class} of a {spec.name}"
        )
    if spec.kind == "stage_c" and convert.is_stage_b_config(cfg):
        raise CheckpointError(
            "config.json describes a Stage B (decoder: effnet_in_channels is set), not a Stage C "
            "(prior) model; use load_stage_b"
        )
    if (
        spec.kind == "stage_b"
        and cls_name == "StableCascadeUNet"
        and not convert.is_stage_b_config(cfg)
    ):
        raise CheckpointError(
            "config.json describes a Stage C (prior: no effnet_in_channels), not a Stage B "
            "(decoder) model; use load_stage_c"
        )
    try:
        return spec.from_diffusers(cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"config.json: {e}") from None


def _load(
    kind: str,
    source: str | Path,
    device: torch.device | str,
    dtype: torch.dtype | None,
    variant: str | None,
    config: Any,
) -> nn.Module:
    spec = _SPECS[kind]
    device = torch.device(device)
    float_dtype = _resolve_dtype(dtype, device)
    warn_if_bf16_is_emulated(float_dtype, device)
    src = resolve_source(source, variant, float_dtype)
    try:
        infos = read_headers(src.files)
        if src.layout == "official":
            shapes = {k: i.shape for k, i in infos.items()}
            found = checkpoint_kind(shapes)
            if found != spec.kind:
                hint = f"; use {_LOADER_OF_KIND[found]}()" if found in _LOADER_OF_KIND else ""
                raise CheckpointError(
                    f"this looks like {describe_checkpoint(shapes)}, not a {spec.name} "
                    f"checkpoint{hint}"
                )
            cfg = config if config is not None else spec.infer(shapes)
            official = shapes
            dtypes = {k: i.dtype for k, i in infos.items()}
        else:
            cfg = config if config is not None else _config_from_diffusers(spec, src)
            assert spec.keys_from_diffusers is not None
            # Run the key conversion on meta tensors first: keys and shapes are validated before any data is read.
            try:
                meta = spec.keys_from_diffusers(
                    {
                        k: torch.empty(i.shape, dtype=i.dtype, device="meta")
                        for k, i in infos.items()
                    }
                )
            except ValueError as e:
                raise CheckpointError(f"diffusers keys cannot be converted: {e}") from None
            official = {k: tuple(t.shape) for k, t in meta.items()}
            dtypes = {k: t.dtype for k, t in meta.items()}
        # Parameters and buffers start on meta: no allocation, no random init. Every tensor of these
        # networks is in their checkpoints (BatchNorm statistics included); _place_remaining checks it.
        with torch.device("meta"):
            try:
                model = spec.network(cfg)
            except ValueError as e:
                raise CheckpointError(
                    f"the network cannot be built from {_summary(cfg)}: {e}"
                ) from None
        _check_against_model(model, official, dtypes, cfg)

        expected = model.state_dict(keep_vars=True)
        if src.layout == "official":
            state = read_official(infos, expected, device, float_dtype)
        else:
            assert spec.keys_from_diffusers is not None
            kept_as_is = device.type == "cpu" and all(
                i.dtype == float_dtype or not i.dtype.is_floating_point for i in infos.values()
            )
            state = finalize(
                spec.keys_from_diffusers(read_views(infos, populate=kept_as_is)),
                expected,
                device,
                float_dtype,
            )
    except CheckpointError as e:
        message = str(e)
        raise CheckpointError(
            message if message.startswith(str(src.path)) else f"{src.path}: {message}"
        ) from None

    model.load_state_dict(state, strict=True, assign=True)
    del state
    _place_remaining(model, device, float_dtype)
    model.requires_grad_(False)
    return model.eval()


def _place_remaining(model: nn.Module, device: torch.device, float_dtype: torch.dtype) -> None:
    """Move what the checkpoint did not provide (non-persistent buffers) like ``model.to(device, dtype)`` would."""
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is None:
                continue
            if buf.is_meta:
                raise RuntimeError(
                    f"buffer {name} of {type(module).__name__} was left on the meta device"
                )
            want = float_dtype if buf.dtype.is_floating_point else buf.dtype
            if buf.device != device or buf.dtype != want:
                module._buffers[name] = buf.to(device=device, dtype=want)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"parameters left on the meta device: {leftover[:_FIRST]}")


def load_stage_c(
    source: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    variant: str | None = None,
    config: StageCConfig | None = None,
) -> StageC:
    """Stage C from ``stage_c[_lite][_bf16].safetensors`` or a diffusers ``prior[_lite]/`` folder.

    ``variant``: diffusers weight variant ("bf16"); None picks bf16 files when loading in bf16, else fp32 files.
    ``config``: skip inference and use this architecture (the file must still match it exactly).
    """
    return _load("stage_c", source, device, dtype, variant, config)  # type: ignore[return-value]


def load_stage_b(
    source: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    variant: str | None = None,
    config: StageBConfig | None = None,
) -> StageB:
    """Stage B from ``stage_b[_lite][_bf16].safetensors`` or a diffusers ``decoder[_lite]/`` folder."""
    return _load("stage_b", source, device, dtype, variant, config)  # type: ignore[return-value]


def load_stage_a(
    source: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    variant: str | None = None,
    config: StageAConfig | None = None,
) -> StageA:
    """Stage A from ``stage_a.safetensors`` (scale_factor 0.43) or a diffusers ``vqgan/`` folder (its config's
    scale_factor, 0.3764 in the Hugging Face repository)."""
    return _load("stage_a", source, device, dtype, variant, config)  # type: ignore[return-value]


def load_effnet(
    source: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    config: EfficientNetConfig | None = None,
) -> EfficientNetEncoder:
    """The EfficientNet encoder from ``effnet_encoder.safetensors`` (there is no diffusers layout)."""
    return _load("effnet", source, device, dtype, None, config)  # type: ignore[return-value]


def load_previewer(
    source: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    config: PreviewerConfig | None = None,
) -> Previewer:
    """The Previewer from ``previewer.safetensors`` (there is no diffusers layout)."""
    return _load("previewer", source, device, dtype, None, config)  # type: ignore[return-value]
