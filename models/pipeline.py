"""Text -> Stage C -> Stage B -> Stage A for a batch of requests (stable_cascade_spec.md §1, §7-9).

``CascadePipeline`` owns the networks of one model on one device, checks requests against what they
can process (``Limits``), and exposes the step engine (models/step_engine.py) that generates:
``start`` / ``step`` / ``decode`` for a scheduler that lets jobs join and leave between steps, and
``generate`` = "run these requests to completion together" for the CLI, training evaluation and
tests. Every image owns a CPU generator seeded with ``seed + i`` and every per-sample operation
stays within its sample, so an image never depends on its batch neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torch import Tensor, nn

from models.clip_image import ClipImageEncoder
from models.config import StageAConfig, StageBConfig
from models.cuda_graphs import GraphCache
from models.job_state import JobState, StepEvent
from models.request import (
    MAX_SEED,
    BatchOutput,
    GenerationParams,
    GenerationResult,
    InvalidParams,
    NonFiniteOutput,
    SamplingDefaults,
    StageTimings,
)
from models.step_engine import StepEngine, latent_sizes  # noqa: F401 (re-exported)
from models.text import TextEncoder

# on_step(stage "prior" | "decoder", step (1-based), total), called after each sampler step.
StageCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Limits:
    """What a request may ask for. Sizes are multiples of ``size_step`` in [min_size, max_size].

    ``size_step`` = (Stage A downscale) x (Stage B patch size) = 4 x 2 = 8 makes the Stage B latent
    H/4 exact and even (its PixelUnshuffle(2) needs that), so the image comes out at exactly the
    requested size. The smallest size the maths allows is size_step x 2^(Stage B levels - 1) = 64 px
    (one cell at Stage B's deepest level); ``for_models`` refuses anything below it. Guidance may be
    anything in [0, max_guidance_scale]: 1 is the conditional prediction alone, 0 the unconditional
    one.
    """

    min_size: int = 256
    max_size: int = 2048
    size_step: int = 8
    max_steps: int = 100
    max_guidance_scale: float = 50.0
    max_shift: float = 20.0
    max_num_images: int = 16

    @classmethod
    def for_models(
        cls,
        stage_a: StageAConfig,
        stage_b: StageBConfig,
        *,
        min_size: int,
        max_size: int,
        **other: float,
    ) -> Limits:
        """Limits whose size step and minimum respect what these Stage A/B configs can process."""
        step = 2**stage_a.levels * stage_b.patch_size
        smallest = step * 2 ** (len(stage_b.c_hidden) - 1)
        if min_size < smallest or min_size % step or max_size % step or max_size < min_size:
            raise ValueError(
                f"size range {min_size}-{max_size} must be multiples of {step} "
                f"starting at >= {smallest}"
            )
        return cls(min_size=min_size, max_size=max_size, size_step=step, **other)  # type: ignore[arg-type]

    def snap(self, width: int, height: int) -> tuple[int, int]:
        """The allowed (width, height) nearest to a picture's size: scaled (aspect ratio kept) to
        fit in [min_size, max_size] when a side is out of it, then each side rounded to the nearest
        multiple of size_step within the range. E.g. 1000 x 744 -> 1000 x 744; 4000 x 3000 with
        max 2048 -> 2048 x 1536."""
        if width < 1 or height < 1:
            raise ValueError(f"a picture has a positive size, got {width} x {height}")
        scale = min(1.0, self.max_size / max(width, height))
        scale = max(
            scale, min(self.min_size / min(width, height), self.max_size / max(width, height))
        )
        step = self.size_step

        def side(v: float) -> int:
            return min(self.max_size, max(self.min_size, step * round(v * scale / step)))

        return side(width), side(height)


class CascadePipeline:
    """The three stages plus the text encoder, on one device, and the step engine over them.

    Synchronous and not thread-safe: one thread calls it at a time.
    """

    def __init__(
        self,
        stage_c: nn.Module,
        stage_b: nn.Module,
        stage_a: nn.Module,
        text_encoder: TextEncoder,
        *,
        defaults: SamplingDefaults | None = None,
        limits: Limits | None = None,
        model_info: Mapping[str, str | bool] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        cuda_graphs: bool = False,
        previewer: nn.Module | None = None,
        image_encoder: nn.Module | None = None,
        clip_image: ClipImageEncoder | None = None,
    ) -> None:
        self.device = torch.device(device)
        if clip_image is not None and clip_image.dim != stage_c.config.c_clip_img:
            raise ValueError(
                f"the CLIP image tower gives {clip_image.dim}-d embeddings, Stage C takes "
                f"{stage_c.config.c_clip_img}-d clip_img"
            )
        # Stage C / Stage B forwards replayed as CUDA graphs (models/cuda_graphs.py); CUDA only.
        graphs = (
            {"prior": GraphCache(), "decoder": GraphCache()}
            if cuda_graphs and self.device.type == "cuda"
            else None
        )
        self.stage_c = stage_c.to(self.device).eval().requires_grad_(False)
        self.stage_b = stage_b.to(self.device).eval().requires_grad_(False)
        self.stage_a = stage_a.to(self.device).eval().requires_grad_(False)
        self.text_encoder = text_encoder
        # Stage C latent -> rough RGB (models/previewer.py); None: no previews.
        self.previewer = (
            previewer.to(self.device).eval().requires_grad_(False) if previewer else None
        )
        self.engine = StepEngine(
            self.stage_c,
            self.stage_b,
            self.stage_a,
            text_encoder,
            device=self.device,
            dtype=dtype,
            graphs=graphs,
            # EfficientNet encoder for image-to-image (effnet_encoder.safetensors), CLIP image
            # tower for variations (image_encoder/); None: requests that need them get a 4xx.
            image_encoder=(
                image_encoder.to(self.device).eval().requires_grad_(False)
                if image_encoder is not None
                else None
            ),
            clip_image=clip_image,
        )
        self.defaults = defaults or SamplingDefaults()
        self.limits = limits or Limits.for_models(
            stage_a.config, stage_b.config, min_size=Limits.min_size, max_size=Limits.max_size
        )
        self.model_info: dict[str, str | bool] = {
            "name": "stable-cascade",
            "demo": False,
            "device": str(self.device),
            "dtype": str(dtype).removeprefix("torch."),
            "cuda_graphs": self.graphs is not None,
            "previews": self.previewer is not None,
            "image_to_image": image_encoder is not None,
            "image_variation": clip_image is not None,
            **(model_info or {}),
        }

    @property
    def dtype(self) -> torch.dtype:
        """The autocast dtype of the networks (float32: no autocast)."""
        return self.engine.dtype

    @dtype.setter
    def dtype(self, value: torch.dtype) -> None:
        self.engine.dtype = value

    @property
    def graphs(self) -> dict[str, GraphCache] | None:
        """The CUDA graph cache of each stage ("prior", "decoder"), or None."""
        return self.engine.graphs

    @graphs.setter
    def graphs(self, value: dict[str, GraphCache] | None) -> None:
        self.engine.graphs = value

    @classmethod
    def from_snapshot(
        cls,
        root: str | Path | Sequence[str | Path],
        *,
        prior_variant: str = "lite",
        decoder_variant: str = "lite",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        cuda_graphs: bool = True,
    ) -> CascadePipeline:
        """Load a Stable Cascade snapshot directory, or several searched in order (official
        .safetensors files or diffusers folders, see ``weights.find_stage_files``), with the CLIP
        text tower from the first one that has ``text_encoder/`` + ``tokenizer/``. device None ->
        CUDA if available; dtype None -> bfloat16 on CUDA, float32 on the CPU. ``cuda_graphs``:
        replay the sampler's network forwards as CUDA graphs (no effect on the CPU)."""
        from models import weights  # safetensors + key conversion are only needed here

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        roots = [Path(root)] if isinstance(root, (str, Path)) else [Path(r) for r in root]
        files = weights.find_stage_files(
            roots,
            prior_variant=prior_variant,
            decoder_variant=decoder_variant,
            prefer_bf16=dtype == torch.bfloat16,
        )
        text_root = next((r for r in roots if (r / "text_encoder").is_dir()), roots[0])
        clip_root = next((r for r in roots if ClipImageEncoder.present(r)), None)
        return cls(
            weights.load_stage_c(files.stage_c, device=device, dtype=dtype),
            weights.load_stage_b(files.stage_b, device=device, dtype=dtype),
            # Stage A keeps float32 weights as in the official inference (it still runs under autocast).
            weights.load_stage_a(files.stage_a, device=device, dtype=torch.float32),
            TextEncoder.from_pretrained(text_root, device=device, dtype=dtype),
            # The Previewer is optional (``previewer.safetensors``): without it there are no previews.
            previewer=(
                weights.load_previewer(files.previewer, device=device, dtype=torch.float32)
                if files.previewer is not None
                else None
            ),
            # Optional too: effnet_encoder.safetensors (image-to-image), image_encoder/ +
            # feature_extractor/ (variations, the CLIP tower in the text tower's dtype).
            image_encoder=(
                weights.load_effnet(files.effnet, device=device, dtype=torch.float32)
                if files.effnet is not None
                else None
            ),
            clip_image=(
                ClipImageEncoder.from_pretrained(clip_root, device=device, dtype=dtype)
                if clip_root is not None
                else None
            ),
            model_info={
                "name": f"stable-cascade-{prior_variant}-{decoder_variant}",
                "demo": False,
                "prior": prior_variant,
                "decoder": decoder_variant,
                "weights": ", ".join(str(r) for r in roots),
            },
            device=device,
            dtype=dtype,
            cuda_graphs=cuda_graphs,
        )

    # ---- validation ----

    def validate(self, params: GenerationParams) -> None:
        """Raise InvalidParams(field, message) for the first parameter this pipeline cannot run."""
        lim = self.limits
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(params, name), str):
                raise InvalidParams(name, "must be a string")
        for name in ("width", "height"):
            v = getattr(params, name)
            if not _is_int(v) or not lim.min_size <= v <= lim.max_size or v % lim.size_step:
                raise InvalidParams(
                    name,
                    f"must be an integer multiple of {lim.size_step} "
                    f"from {lim.min_size} to {lim.max_size}, got {v!r}",
                )
        for name in ("prior_steps", "decoder_steps"):
            _check_range(params, name, 1, lim.max_steps, integer=True)
        for name in ("prior_guidance_scale", "decoder_guidance_scale"):
            _check_range(params, name, 0.0, lim.max_guidance_scale)
        for name in ("prior_shift", "decoder_shift"):
            v = getattr(params, name)
            if not _is_real(v) or not 0 < v <= lim.max_shift:
                raise InvalidParams(name, f"must be a number > 0 and <= {lim.max_shift}, got {v!r}")
        _check_range(params, "cfg_rho", 0.0, 1.0)
        _check_range(params, "num_images", 1, lim.max_num_images, integer=True)
        _check_range(params, "seed", 0, MAX_SEED - params.num_images + 1, integer=True)
        self._validate_image(params)

    def _validate_image(self, params: GenerationParams) -> None:
        """The image fields: a picture for strength < 1 or image_variation, a strength that
        leaves at least one Stage C step, and the encoder each needs."""
        v = params.strength
        if not _is_real(v) or not 0 < v <= 1:
            raise InvalidParams("strength", f"must be a number > 0 and <= 1, got {v!r}")
        if not isinstance(params.image_variation, bool):
            raise InvalidParams("image_variation", "must be true or false")
        if params.image is None:
            if v != 1:
                raise InvalidParams("strength", "needs an image (image-to-image)")
            if params.image_variation:
                raise InvalidParams("image_variation", "needs an image")
            return
        if not isinstance(params.image, Image.Image) or params.image.mode != "RGB":
            raise InvalidParams("image", "must be an RGB picture")
        if params.uses_init_image and params.prior_start[0] < 1:
            raise InvalidParams(
                "strength",
                f"must be at least 1 / prior_steps = {1 / params.prior_steps:.4g} "
                f"(int(prior_steps x strength) Stage C steps are run), got {v!r}",
            )
        if params.uses_init_image and self.engine.image_encoder is None:
            raise InvalidParams(
                "image",
                "this model has no image encoder for image-to-image "
                "(effnet_encoder.safetensors in the weights folder)",
            )
        if params.image_variation and self.engine.clip_image is None:
            raise InvalidParams(
                "image",
                "this model has no CLIP image encoder for image variations "
                "(image_encoder/ and feature_extractor/ in the weights folder)",
            )

    # ---- generation ----

    def start(self, batch: Sequence[GenerationParams]) -> list[JobState]:
        """Validated requests -> fresh job states (text encoded, initial noise drawn)."""
        return self.engine.start(batch)

    def step(self, states: Sequence[JobState], *, previews: bool = False) -> list[StepEvent]:
        """One denoising step of a group sharing ``group_key`` (see StepEngine.step)."""
        return self.engine.step(states, previews=previews)

    def decode(
        self, states: Sequence[JobState], output_type: Literal["uint8", "float"] = "uint8"
    ) -> list[GenerationResult | NonFiniteOutput]:
        """Stage A for finished states (see StepEngine.decode)."""
        return self.engine.decode(states, output_type)

    @torch.inference_mode()
    def preview(self, latents: Sequence[Tensor]) -> list[Tensor]:
        """Rough pictures of Stage C latents (e.g. a StepEvent's x0) through the Previewer: each
        [n, c, h, w] -> uint8 [n, 3, 8h, 8w] on the CPU, one forward per latent shape. Raises
        RuntimeError when this pipeline has no Previewer (``model_info["previews"]`` is False)."""
        if self.previewer is None:
            raise RuntimeError("this pipeline has no Previewer (previewer.safetensors)")
        latents = list(latents)
        out: list[Tensor | None] = [None] * len(latents)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, latent in enumerate(latents):
            by_shape.setdefault(tuple(latent.shape[1:]), []).append(i)
        for members in by_shape.values():
            batch = torch.cat([latents[i] for i in members]).to(self.device, torch.float32)
            pictures = self.previewer(batch).float().clamp(0.0, 1.0).mul(255).round()
            pictures = pictures.to(torch.uint8).cpu()
            offset = 0
            for i in members:
                n = latents[i].shape[0]
                out[i] = pictures[offset : offset + n]
                offset += n
        return [picture for picture in out if picture is not None]

    @torch.inference_mode()
    def generate(
        self,
        batch: Sequence[GenerationParams],
        on_step: StageCallback | None = None,
        *,
        output_type: Literal["uint8", "float"] = "uint8",
    ) -> BatchOutput:
        """Generate every request of ``batch`` (all sharing one ``batch_key()``), in request order,
        all its jobs advancing together.

        ``output_type="float"`` returns float32 images in [0, 1] instead of uint8 (same [n, 3, H, W]
        layout). A request whose images contain NaN/inf gets a NonFiniteOutput entry; the others are
        unaffected.
        """
        batch = list(batch)
        if not batch:
            return BatchOutput(results=[])
        for params in batch:
            self.validate(params)
        if len({p.batch_key() for p in batch}) > 1:
            raise InvalidParams(
                "batch", "all requests of a batch must share batch_key() (size, steps, shifts)"
            )
        states = self.engine.start(batch)
        first = states[0]

        def report(event: StepEvent) -> None:
            if on_step is not None and event.state is first:
                on_step(event.stage.value, event.step, event.total)

        self.engine.run(states, report)
        results = self.engine.decode(states, output_type)
        # The jobs of one batch took part in the same calls: the first one's times are the batch's.
        timings = StageTimings(**vars(first.timings))
        return BatchOutput(results=results, timings=timings)

    def clear_cuda_graphs(self) -> None:
        """Release every recorded graph and its memory (e.g. after the device ran out of memory)."""
        for cache in (self.graphs or {}).values():
            cache.clear()


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_range(
    params: GenerationParams, name: str, lo: float, hi: float, *, integer: bool = False
) -> None:
    v = getattr(params, name)
    ok = _is_int(v) if integer else _is_real(v)
    if not ok or not lo <= v <= hi:
        kind = "an integer" if integer else "a finite number"
        raise InvalidParams(name, f"must be {kind} from {lo} to {hi}, got {v!r}")
