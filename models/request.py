"""The contract between a caller (CLI, HTTP service) and the pipeline: what one request asks for, and
what comes back. Plain dataclasses; no torch-specific types except the image tensors in results."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

# Seeds are 0 .. MAX_SEED (32 bits) everywhere: the HTTP API, the CLI and the pipeline, so that an
# image made by one can be reproduced by the other. Image i of a request uses seed + i: it must fit too.
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampling settings used when a request leaves them out. The official inference settings are the
    defaults; a model may declare its own (the built-in demo model does)."""

    width: int = 1024
    height: int = 1024
    prior_steps: int = 20
    prior_guidance_scale: float = 4.0
    prior_shift: float = 2.0
    decoder_steps: int = 10
    decoder_guidance_scale: float = 1.1
    decoder_shift: float = 1.0
    cfg_rho: float = 0.7


@dataclass(frozen=True)
class GenerationParams:
    """One request: ``num_images`` images of one prompt. Image ``i`` uses seed ``seed + i``."""

    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    num_images: int = 1
    seed: int = 0
    prior_steps: int = 20
    prior_guidance_scale: float = 4.0
    prior_shift: float = 2.0
    decoder_steps: int = 10
    decoder_guidance_scale: float = 1.1
    decoder_shift: float = 1.0
    cfg_rho: float = 0.7
    # Image input (spec §7.8). ``image``: RGB, EXIF orientation applied, alpha on white; None for
    # text-to-image. ``strength`` < 1 starts Stage C from the image's noised latent at t = strength
    # and runs int(prior_steps * strength) steps; 1.0 starts from pure noise (text-to-image, the
    # image then only conditions when ``image_variation``). ``image_variation``: Stage C is also
    # conditioned on the CLIP image embedding of ``image``.
    image: Image.Image | None = field(default=None, compare=False, repr=False)
    strength: float = 1.0
    image_variation: bool = False

    @property
    def uses_init_image(self) -> bool:
        """True when Stage C starts from the image's latent (strength < 1)."""
        return self.image is not None and self.strength < 1.0

    @property
    def prior_start(self) -> tuple[int, float]:
        """(Stage C steps run, t_start): (prior_steps, 1.0) from noise, else the recipe's
        (int(prior_steps * strength), strength)."""
        if not self.uses_init_image:
            return self.prior_steps, 1.0
        return int(self.prior_steps * self.strength), float(self.strength)

    @classmethod
    def from_defaults(
        cls, defaults: SamplingDefaults, prompt: str, **overrides: Any
    ) -> GenerationParams:
        """A request for ``prompt`` at a model's sampling defaults; ``overrides`` replace any field."""
        return cls(prompt=prompt, **{**dataclasses.asdict(defaults), **overrides})

    def batch_key(self) -> tuple[int, int, tuple[int, float], int, float, float]:
        """Requests with equal keys can share one batch: same latent sizes and the same noise grids.
        Prompts, seeds, guidance scales, image counts and image conditioning may differ inside a
        batch."""
        return (
            self.width,
            self.height,
            self.prior_start,
            self.decoder_steps,
            self.prior_shift,
            self.decoder_shift,
        )


class InvalidParams(ValueError):
    """A request the pipeline cannot run; ``field`` names the offending parameter."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NonFiniteOutput(RuntimeError):
    """The generated images of one request contained NaN or inf (never returned as a black image)."""


@dataclass
class GenerationResult:
    """The images of one request. ``images`` is uint8 [num_images, 3, height, width] on the CPU."""

    images: torch.Tensor
    seeds: list[int]
    prompt_truncated: bool = False
    negative_prompt_truncated: bool = False


@dataclass
class StageTimings:
    """Wall seconds spent in each stage for a whole batch (device-synchronised)."""

    text: float = 0.0
    prior: float = 0.0
    decoder: float = 0.0
    vqgan: float = 0.0

    @property
    def total(self) -> float:
        return self.text + self.prior + self.decoder + self.vqgan


@dataclass
class BatchOutput:
    """One entry per request, in request order: its images, or the error that failed only it."""

    results: list[GenerationResult | NonFiniteOutput]
    timings: StageTimings = field(default_factory=StageTimings)
