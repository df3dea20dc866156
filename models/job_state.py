"""The whole state of one generation job between two denoising steps, and what a step reports.

A job is one request (``GenerationParams``: ``n = num_images`` images of one prompt). Everything
needed to resume it lives here: its per-image generators, its conditioning, the stage it is in, its
position on that stage's noise grid and its current latent. The step engine (models/step_engine.py)
creates states, advances groups of them one step at a time and decodes finished ones; nothing else
is kept between steps, so a job may share each forward with different neighbours.

Stages run in order: PRIOR (Stage C, 20 steps by default) -> DECODER (Stage B) -> VQGAN (waiting
for Stage A) -> DONE. Text encoding happens when the state is created.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
from torch import Tensor

from models.request import GenerationParams, StageTimings
from models.sampler import StepCoefficients, step_coefficients
from models.schedule import logsnr_grid, noise_cond


class Stage(str, enum.Enum):
    PRIOR = "prior"
    DECODER = "decoder"
    VQGAN = "vqgan"
    DONE = "done"


@dataclass
class GridPosition:
    """Where a job is on one stage's noise grid: ``step`` steps of ``total`` done.

    r: [total] float32, the network's noise condition at each step; coefficients: one per step.
    """

    total: int
    r: Tensor
    coefficients: list[StepCoefficients]
    step: int = 0

    @classmethod
    def on_grid(
        cls, steps: int, shift: float, device: torch.device, t_start: float = 1.0
    ) -> GridPosition:
        """The grid t = linspace(t_start, 0, steps + 1) (t_start < 1: image-to-image)."""
        logsnrs = logsnr_grid(steps, shift, t_start)
        r = noise_cond(logsnrs[:-1]).to(device=device, dtype=torch.float32)
        return cls(steps, r, step_coefficients(logsnrs))

    @property
    def last(self) -> bool:
        """True when the next step is this stage's last one."""
        return self.step == self.total - 1


@dataclass
class Conditioning:
    """The keyword inputs of one network for a job's n images, conditional and unconditional
    (each tensor [n, ...], on the device), and the guidance applied between them."""

    cond: dict[str, Tensor]
    uncond: dict[str, Tensor]
    scale: float
    rho: float

    @property
    def guided(self) -> bool:
        """Guidance 1 is the conditional prediction alone: no unconditional half is computed."""
        return self.scale != 1.0


@dataclass(eq=False)
class JobState:
    """One job between steps. ``x`` is the current noisy latent [n, C, H, W] float32 of the current
    stage (for VQGAN/DONE: the final Stage B latent); ``x0`` the last clean-latent prediction of
    that stage (None before its first step)."""

    params: GenerationParams
    generators: list[torch.Generator]
    stage: Stage
    position: GridPosition
    conditioning: Conditioning
    x: Tensor
    decoder_clip: tuple[Tensor, Tensor]  # pooled prompt / pooled "" for Stage B, [n, 1, P] each
    prompt_truncated: bool = False
    negative_prompt_truncated: bool = False
    x0: Tensor | None = None
    timings: StageTimings = field(default_factory=StageTimings)

    @property
    def images(self) -> int:
        return self.params.num_images

    @property
    def group_key(self) -> tuple[str, tuple[int, ...]]:
        """States with equal keys can share one forward: same network, same latent shape. Step
        counts, shifts, guidance and the step each row is at may differ."""
        return (self.stage.value, tuple(self.x.shape[1:]))


@dataclass(frozen=True)
class StepEvent:
    """What one step did to one job: ``step`` (1-based) of ``total`` of ``stage`` is done.

    ``x0`` is the Stage C clean-latent prediction [n, 16, h, w] after this step, given only when
    the caller asked for previews (the decoder's x0 is not reported). ``finished_stage`` is True on
    the stage's last step.
    """

    state: JobState
    stage: Stage
    step: int
    total: int
    x0: Tensor | None = None

    @property
    def finished_stage(self) -> bool:
        return self.step == self.total
