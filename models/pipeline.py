"""Text -> Stage C -> Stage B -> Stage A for a batch of requests (stable_cascade_spec.md §1, §7-9).

One ``generate`` call runs a batch of ``GenerationParams`` that share ``batch_key()`` (size, step
counts, shifts) but may differ in prompt, negative prompt, seed, guidance scales, cfg_rho and image
count. Every image owns a CPU generator seeded with ``seed + i`` and every per-sample operation
(noise, guidance rescale, the networks themselves) stays within its sample, so an image never
depends on its batch neighbours.

Conditioning (official semantics, plus negative prompts):
- Stage C cond: clip_text / clip_text_pooled of the prompt, clip_img zeros [B, 1, c_clip_img].
  Stage C uncond: the same for the negative prompt ("" when none; the official code only has "").
- Stage B cond: effnet = the Stage C latent, clip = pooled prompt. Stage B uncond: effnet zeros,
  clip = pooled "" (the negative prompt is not used there; Stage B's text input has little effect).

Precision: on CUDA the networks run under bfloat16 autocast as the official inference does; on the
CPU in float32 by default. Latents, guidance and sampler arithmetic stay float32.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from models.config import StageAConfig, StageBConfig
from models.cuda_graphs import GraphCache
from models.request import (
    BatchOutput,
    GenerationParams,
    GenerationResult,
    InvalidParams,
    NonFiniteOutput,
    SamplingDefaults,
    StageTimings,
)
from models.sampler import cfg_denoiser, draw_noise, sample
from models.schedule import logsnr_grid
from models.text import TextEmbeddings, TextEncoder

# on_step(stage "prior" | "decoder", step (1-based), total), called after each sampler step.
StageCallback = Callable[[str, int, int], None]
from models.request import MAX_SEED  # noqa: E402  (one seed bound for every caller)
STAGE_C_COMPRESSION = 42.67  # pixels per Stage C latent cell (1024 px -> 24), spec §8


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
        **other: int | float,
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


def latent_sizes(width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((h, w) of the Stage C latent, (h, w) of the Stage B latent) for an image size (spec §8)."""
    stage_c = (math.ceil(height / STAGE_C_COMPRESSION), math.ceil(width / STAGE_C_COMPRESSION))
    return stage_c, (math.ceil(height / 4), math.ceil(width / 4))


class CascadePipeline:
    """The three stages plus the text encoder, on one device.

    ``generate`` is synchronous and not thread-safe: one thread calls it at a time.
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
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        # Stage C / Stage B forwards replayed as CUDA graphs (models/cuda_graphs.py); CUDA only.
        self.graphs: dict[str, GraphCache] | None = (
            {"prior": GraphCache(), "decoder": GraphCache()}
            if cuda_graphs and self.device.type == "cuda"
            else None
        )
        self.stage_c = stage_c.to(self.device).eval().requires_grad_(False)
        self.stage_b = stage_b.to(self.device).eval().requires_grad_(False)
        self.stage_a = stage_a.to(self.device).eval().requires_grad_(False)
        self.text_encoder = text_encoder
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
            **(model_info or {}),
        }

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
        return cls(
            weights.load_stage_c(files.stage_c, device=device, dtype=dtype),
            weights.load_stage_b(files.stage_b, device=device, dtype=dtype),
            # Stage A keeps float32 weights as in the official inference (it still runs under autocast).
            weights.load_stage_a(files.stage_a, device=device, dtype=torch.float32),
            TextEncoder.from_pretrained(text_root, device=device, dtype=dtype),
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

    # ---- generation ----

    @torch.inference_mode()
    def generate(
        self,
        batch: Sequence[GenerationParams],
        on_step: StageCallback | None = None,
        *,
        output_type: Literal["uint8", "float"] = "uint8",
    ) -> BatchOutput:
        """Generate every request of ``batch`` (all sharing one ``batch_key()``), in request order.

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
        timings = StageTimings()
        # The request index of each image, and each image's seed.
        owner = [j for j, p in enumerate(batch) for _ in range(p.num_images)]
        seeds = [p.seed + i for p in batch for i in range(p.num_images)]

        with self._timed(timings, "text"):
            text = self.text_encoder.encode(
                [p.prompt for p in batch] + [p.negative_prompt for p in batch]
            )
        images = self._sample_images(batch, owner, seeds, text, timings, on_step)
        results: list[GenerationResult | NonFiniteOutput] = []
        for j, params in enumerate(batch):
            mine = images[[k for k, o in enumerate(owner) if o == j]]
            if not bool(torch.isfinite(mine).all()):
                results.append(
                    NonFiniteOutput(
                        f"the images of seeds {params.seed}..{params.seed + params.num_images - 1} "
                        "contain NaN or inf"
                    )
                )
                continue
            mine = mine.clamp(0.0, 1.0)
            if output_type == "uint8":
                mine = mine.mul(255).round().to(torch.uint8)
            results.append(
                GenerationResult(
                    images=mine.cpu(),
                    seeds=[params.seed + i for i in range(params.num_images)],
                    prompt_truncated=text.truncated[j],
                    negative_prompt_truncated=text.truncated[len(batch) + j],
                )
            )
        return BatchOutput(results=results, timings=timings)

    def _sample_images(
        self,
        batch: list[GenerationParams],
        owner: list[int],
        seeds: list[int],
        text: TextEmbeddings,
        timings: StageTimings,
        on_step: StageCallback | None,
    ) -> Tensor:
        """Stage C -> Stage B -> Stage A for every image: [N, 3, H, W] float32, unclamped."""
        first, n = batch[0], len(owner)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        idx = torch.tensor(owner, device=self.device)
        # Rows 0..len(batch)-1 of `text` are the prompts, the next len(batch) rows the negatives.
        pos = idx
        neg = idx + len(batch)

        def per_image(name: str) -> Tensor:
            """A request's setting repeated for each of its images: [N]."""
            return torch.tensor([float(getattr(batch[j], name)) for j in owner], device=self.device)

        (hc, wc), (hb, wb) = latent_sizes(first.width, first.height)
        empty = self.text_encoder.empty

        with self._timed(timings, "prior"):
            c_img = torch.zeros(n, 1, self.stage_c.config.c_clip_img, device=self.device)
            cond = {
                "clip_text": text.clip_text[pos],
                "clip_text_pooled": text.clip_text_pooled[pos],
                "clip_img": c_img,
            }
            uncond = {
                "clip_text": text.clip_text[neg],
                "clip_text_pooled": text.clip_text_pooled[neg],
                "clip_img": c_img,
            }
            latent_c = self.sample_stage(
                self.stage_c,
                (self.stage_c.config.c_in, hc, wc),
                cond,
                uncond,
                per_image("prior_guidance_scale"),
                per_image("cfg_rho"),
                logsnr_grid(first.prior_steps, first.prior_shift),
                generators,
                _tag(on_step, "prior"),
            )
        with self._timed(timings, "decoder"):
            cond = {"effnet": latent_c, "clip": text.clip_text_pooled[pos]}
            uncond = {
                "effnet": torch.zeros_like(latent_c),
                "clip": empty.clip_text_pooled.expand(n, -1, -1),
            }
            latent_b = self.sample_stage(
                self.stage_b,
                (self.stage_b.config.c_in, hb, wb),
                cond,
                uncond,
                per_image("decoder_guidance_scale"),
                per_image("cfg_rho"),
                logsnr_grid(first.decoder_steps, first.decoder_shift),
                generators,
                _tag(on_step, "decoder"),
            )
        with self._timed(timings, "vqgan"), self._autocast():
            return self.stage_a.decode(latent_b).float()

    def sample_stage(
        self,
        model: nn.Module,
        shape: tuple[int, int, int],
        cond: Mapping[str, Tensor],
        uncond: Mapping[str, Tensor],
        scale: Tensor,
        rho: Tensor,
        logsnrs: Tensor,
        generators: Sequence[torch.Generator],
        on_step: Callable[[int, int], None] | None = None,
        x_init: Tensor | None = None,
    ) -> Tensor:
        """Sample one stage for B images with per-image guidance: the x0 latent [B, *shape] float32.

        Without ``x_init`` the start is fresh noise from each image's generator. With it
        (image-to-image: a latent already noised to logsnrs[0], e.g. with a grid from
        ``logsnr_grid(steps, shift, t_start)``) no initial noise is drawn.
        """
        x = (
            draw_noise(shape, generators, self.device)
            if x_init is None
            else x_init.float().to(self.device)
        )

        def forward(x: Tensor, r: Tensor, **conditions: Tensor) -> Tensor:
            with self._autocast():
                return model(x, r, **conditions).float()

        graphs = self._graph_cache(model)
        net = forward if graphs is None else graphs.wrap(forward)
        return sample(cfg_denoiser(net, cond, uncond, scale, rho), x, logsnrs, generators, on_step)

    def clear_cuda_graphs(self) -> None:
        """Release every recorded graph and its memory (e.g. after the device ran out of memory)."""
        for cache in (self.graphs or {}).values():
            cache.clear()

    # ---- helpers ----

    def _graph_cache(self, model: nn.Module) -> GraphCache | None:
        if self.graphs is None:
            return None
        if model is self.stage_c:
            return self.graphs["prior"]
        if model is self.stage_b:
            return self.graphs["decoder"]
        return None

    @contextmanager
    def _autocast(self) -> Iterator[None]:
        """Autocast to the pipeline's dtype (bfloat16: official inference); a no-op for float32.

        float32 on CUDA also turns cuDNN's TF32 convolutions off: they round inputs to 10 mantissa
        bits, and which kernel runs depends on the batch size, so an image would depend on how many
        others share its batch.
        """
        strict = self.device.type == "cuda" and self.dtype == torch.float32
        with (
            torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32),
            torch.backends.cudnn.flags(enabled=True, allow_tf32=False) if strict else nullcontext(),
        ):
            yield

    @contextmanager
    def _timed(self, timings: StageTimings, stage: str) -> Iterator[None]:
        """Add the wall time of the block (device-synchronised) to ``timings.<stage>``."""
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            setattr(timings, stage, getattr(timings, stage) + time.perf_counter() - start)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _tag(on_step: StageCallback | None, stage: str) -> Callable[[int, int], None] | None:
    if on_step is None:
        return None
    return lambda step, total: on_step(stage, step, total)


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
