"""The step engine: generation as resumable state, advanced one batched denoising step at a time.

    states = engine.start(params_list)      # CLIP text for all, initial Stage C noise per image
    events = engine.step(group)             # one sampler step of a group sharing group_key
    results = engine.decode(finished)       # Stage A for states in Stage.VQGAN, in one batch

A caller (``CascadePipeline.generate``, the service's scheduler) decides which states form each
group; states may join or leave between any two steps. Every image owns its CPU generator and
every per-sample operation stays within its row (models/denoise_step.py), so an image depends only
on its request and seed, not on its neighbours or on which step they are at (up to the last-bit
rounding of batched kernels). Plain PyTorch: no threads, no asyncio. Not thread-safe.

Conditioning (official semantics, plus negative prompts):
- Stage C cond: clip_text / clip_text_pooled of the prompt, clip_img zeros [n, 1, c_clip_img]
  (image variation: the CLIP image embedding of the request's picture, models/clip_image.py).
  Stage C uncond: the same for the negative prompt ("" when none; the official code only has ""),
  clip_img always zeros.
- Image-to-image (strength < 1): Stage C starts from the picture's encoder latent noised to
  t = strength, on the grid linspace(strength, 0, int(steps * strength) + 1) (models/init_image.py);
  the noise comes from each image's generator, in place of text-to-image's initial noise.
- Stage B cond: effnet = the Stage C latent, clip = pooled prompt. Stage B uncond: effnet zeros,
  clip = pooled "" (the negative prompt is not used there; Stage B's text input has little effect).

Precision: on CUDA the networks run under bfloat16 autocast as the official inference does; on the
CPU in float32 by default. Latents, guidance and sampler arithmetic stay float32.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Literal

import torch
from torch import Tensor, nn

from models.clip_image import ClipImageEncoder
from models.cuda_graphs import GraphCache
from models.denoise_step import Forward, bucket_size, denoise_step
from models.effnet import EfficientNetEncoder
from models.init_image import encoder_pixels, noised_latent
from models.job_state import Conditioning, GridPosition, JobState, Stage, StepEvent
from models.request import GenerationParams, GenerationResult, NonFiniteOutput
from models.sampler import draw_noise
from models.text import TextEncoder

STAGE_C_COMPRESSION = 42.67  # pixels per Stage C latent cell (1024 px -> 24), spec §8
# Forward batch sizes CUDA graphs are recorded for: a group is padded up to the next one.
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_NETWORKS = {Stage.PRIOR: "prior", Stage.DECODER: "decoder"}  # stages that step; graph cache names


def latent_sizes(width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((h, w) of the Stage C latent, (h, w) of the Stage B latent) for an image size (spec §8)."""
    stage_c = (math.ceil(height / STAGE_C_COMPRESSION), math.ceil(width / STAGE_C_COMPRESSION))
    return stage_c, (math.ceil(height / 4), math.ceil(width / 4))


class StepEngine:
    """The networks of one pipeline, driven one step at a time. ``graphs``: a GraphCache per stage
    ("prior", "decoder") to replay forwards as CUDA graphs (groups are then padded to
    GRAPH_BUCKETS), or None."""

    def __init__(
        self,
        stage_c: nn.Module,
        stage_b: nn.Module,
        stage_a: nn.Module,
        text_encoder: TextEncoder,
        *,
        device: torch.device,
        dtype: torch.dtype,
        graphs: dict[str, GraphCache] | None = None,
        image_encoder: nn.Module | None = None,
        clip_image: ClipImageEncoder | None = None,
    ) -> None:
        self.stage_c, self.stage_b, self.stage_a = stage_c, stage_b, stage_a
        self.text_encoder = text_encoder
        self.device, self.dtype, self.graphs = device, dtype, graphs
        if device.type == "cuda" and dtype == torch.float32:
            # autocast() turns TF32 off per call; the flag is process-wide, so when two threads
            # step at once (stage overlap) one's exit could turn it back on under the other.
            torch.backends.cudnn.allow_tf32 = False
        # EfficientNet encoder (image-to-image) and CLIP image tower (variations); None: absent.
        self.image_encoder, self.clip_image = image_encoder, clip_image

    # ---- creating states ----

    def start(self, batch: Sequence[GenerationParams]) -> list[JobState]:
        """A fresh state per request, in Stage.PRIOR at step 0: the prompts and negative prompts of
        the whole batch go through the text encoder in one call (the pictures of image requests
        through the image encoders, batched too), and each image's generator (seeded seed + i)
        draws its initial Stage C noise. Every state's ``timings.text`` is the time of these
        calls."""
        batch = list(batch)
        if not batch:
            return []
        started = self._clock()
        text = self.text_encoder.encode(
            [p.prompt for p in batch] + [p.negative_prompt for p in batch]
        )
        empty = self.text_encoder.empty
        latents, embeds = self._encode_init_images(batch), self._embed_images(batch)
        states = []
        for j, params in enumerate(batch):
            n = params.num_images
            generators = [torch.Generator("cpu").manual_seed(params.seed + i) for i in range(n)]
            (hc, wc), _ = latent_sizes(params.width, params.height)
            pos, neg = slice(j, j + 1), slice(len(batch) + j, len(batch) + j + 1)
            c_img = torch.zeros(n, 1, self.stage_c.config.c_clip_img, device=self.device)
            steps, t_start = params.prior_start
            x = draw_noise((self.stage_c.config.c_in, hc, wc), generators, self.device)
            if j in latents:
                x = noised_latent(latents[j], x, params.strength)

            def rows(t: Tensor, n: int = n) -> Tensor:
                return t.expand(n, *t.shape[1:]).to(self.device)

            states.append(
                JobState(
                    params=params,
                    generators=generators,
                    stage=Stage.PRIOR,
                    position=GridPosition.on_grid(steps, params.prior_shift, self.device, t_start),
                    conditioning=Conditioning(
                        cond={
                            "clip_text": rows(text.clip_text[pos]),
                            "clip_text_pooled": rows(text.clip_text_pooled[pos]),
                            "clip_img": rows(embeds[j]) if j in embeds else c_img,
                        },
                        uncond={
                            "clip_text": rows(text.clip_text[neg]),
                            "clip_text_pooled": rows(text.clip_text_pooled[neg]),
                            "clip_img": c_img,
                        },
                        scale=float(params.prior_guidance_scale),
                        rho=float(params.cfg_rho),
                    ),
                    x=x,
                    decoder_clip=(
                        rows(text.clip_text_pooled[pos]),
                        rows(empty.clip_text_pooled),
                    ),
                    prompt_truncated=text.truncated[j],
                    negative_prompt_truncated=text.truncated[len(batch) + j],
                )
            )
        elapsed = self._clock() - started
        for state in states:
            state.timings.text += elapsed
        return states

    def _encode_init_images(self, batch: Sequence[GenerationParams]) -> dict[int, Tensor]:
        """The encoder latent [1, 16, h, w] of the picture of each image-to-image request (by
        index in ``batch``), one encoder forward per latent shape."""
        wanted = [j for j, p in enumerate(batch) if p.uses_init_image]
        if not wanted:
            return {}
        if self.image_encoder is None:
            raise ValueError("image-to-image needs an image encoder (effnet_encoder.safetensors)")
        by_shape: dict[tuple[int, int], list[int]] = {}
        for j in wanted:
            shape, _ = latent_sizes(batch[j].width, batch[j].height)
            by_shape.setdefault(shape, []).append(j)
        out: dict[int, Tensor] = {}
        for shape, members in by_shape.items():
            pixels = torch.stack([encoder_pixels(batch[j].image, shape) for j in members])
            pixels = EfficientNetEncoder.preprocess(pixels.to(self.device))
            with self.autocast():
                encoded = self.image_encoder(pixels).float()
            for k, j in enumerate(members):
                out[j] = encoded[k : k + 1]
        return out

    def _embed_images(self, batch: Sequence[GenerationParams]) -> dict[int, Tensor]:
        """The CLIP image embedding [1, 1, D] of the picture of each variation request."""
        wanted = [j for j, p in enumerate(batch) if p.image_variation]
        if not wanted:
            return {}
        if self.clip_image is None:
            raise ValueError("image variation needs a CLIP image encoder (image_encoder/)")
        embeds = self.clip_image.embed([batch[j].image for j in wanted]).to(self.device)
        return {j: embeds[k : k + 1] for k, j in enumerate(wanted)}

    # ---- stepping ----

    def step(self, states: Sequence[JobState], *, previews: bool = False) -> list[StepEvent]:
        """One denoising step for every state of ``states`` (one forward; all share group_key and
        are in PRIOR or DECODER with a step left). A state finishing Stage C moves to Stage B (its
        first Stage B noise is drawn); one finishing Stage B moves to VQGAN. Each state's stage
        time grows by this step's wall time. ``previews``: events carry the Stage C x0."""
        states = list(states)
        if not states:
            return []
        stage = states[0].stage
        if stage not in _NETWORKS:
            raise ValueError(f"a state in {stage.value} has no denoising step to run")
        key = states[0].group_key
        for state in states:
            if state.group_key != key or state.position.step >= state.position.total:
                raise ValueError("a step's states must share group_key and have a step left")
        self._claim_for_stream(states)
        started = self._clock()
        pad_to = (lambda rows: bucket_size(rows, GRAPH_BUCKETS)) if self.graphs else None
        x0s = denoise_step(self._forward(stage), states, pad_to)
        events = []
        for state, x0 in zip(states, x0s, strict=True):
            events.append(
                StepEvent(
                    state,
                    stage,
                    state.position.step,
                    state.position.total,
                    x0 if previews and stage is Stage.PRIOR else None,
                )
            )
            if state.position.step == state.position.total:
                self._finish_stage(state)
        elapsed = self._clock() - started
        for state in states:
            setattr(state.timings, stage.value, getattr(state.timings, stage.value) + elapsed)
        return events

    def _finish_stage(self, state: JobState) -> None:
        """PRIOR -> DECODER (Stage C's x0 conditions Stage B) or DECODER -> VQGAN."""
        if state.stage is Stage.DECODER:
            state.stage = Stage.VQGAN
            state.x = state.x0  # the final Stage B latent, for Stage A
            return
        params, latent_c = state.params, state.x0
        _, (hb, wb) = latent_sizes(params.width, params.height)
        noise = draw_noise((self.stage_b.config.c_in, hb, wb), state.generators, self.device)
        state.conditioning = Conditioning(
            cond={"effnet": latent_c, "clip": state.decoder_clip[0]},
            uncond={"effnet": torch.zeros_like(latent_c), "clip": state.decoder_clip[1]},
            scale=float(params.decoder_guidance_scale),
            rho=float(params.cfg_rho),
        )
        state.position = GridPosition.on_grid(
            params.decoder_steps, params.decoder_shift, self.device
        )
        state.stage, state.x, state.x0 = Stage.DECODER, noise, None

    def run(
        self, states: Sequence[JobState], on_event: Callable[[StepEvent], None] | None = None
    ) -> None:
        """Step ``states`` until every one is in VQGAN: each round advances, one forward per
        group, every group of states that still has steps (the states of one static batch share
        one group throughout)."""
        while True:
            groups: dict[tuple, list[JobState]] = {}
            for state in states:
                if state.stage in _NETWORKS:
                    groups.setdefault(state.group_key, []).append(state)
            if not groups:
                return
            for group in groups.values():
                for event in self.step(group):
                    if on_event is not None:
                        on_event(event)

    # ---- decoding ----

    def decode(
        self, states: Sequence[JobState], output_type: Literal["uint8", "float"] = "uint8"
    ) -> list[GenerationResult | NonFiniteOutput]:
        """Stage A for states in VQGAN, one batched decode per latent shape; one entry per state,
        in order. A state whose images contain NaN/inf gets NonFiniteOutput; the others are
        unaffected. ``output_type="float"``: float32 in [0, 1] instead of uint8, [n, 3, H, W]."""
        states = list(states)
        images: list[Tensor | None] = [None] * len(states)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, state in enumerate(states):
            if state.stage is not Stage.VQGAN:
                raise ValueError(f"only states in vqgan can be decoded, not {state.stage.value}")
            by_shape.setdefault(tuple(state.x.shape[1:]), []).append(i)
        for members in by_shape.values():
            started = self._clock()
            with self.autocast():
                decoded = self.stage_a.decode(torch.cat([states[i].x for i in members])).float()
            elapsed = self._clock() - started
            offset = 0
            for i in members:
                n = states[i].images
                images[i] = decoded[offset : offset + n]
                offset += n
                states[i].timings.vqgan += elapsed
        results: list[GenerationResult | NonFiniteOutput] = []
        for state, mine in zip(states, images, strict=True):
            state.stage = Stage.DONE
            results.append(_result(state, mine, output_type))
        return results

    # ---- device helpers ----

    def _forward(self, stage: Stage) -> Forward:
        """The network of ``stage`` as forward(x, r, **conditions) -> float32 eps, through the
        stage's CUDA graph cache when there is one."""
        model = self.stage_c if stage is Stage.PRIOR else self.stage_b
        graphs = self.graphs[_NETWORKS[stage]] if self.graphs else None

        def forward(x: Tensor, r: Tensor, **conditions: Tensor) -> Tensor:
            with self.autocast():
                return model(x, r, **conditions).float()

        return forward if graphs is None else graphs.wrap(forward)

    @contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast to the engine's dtype (bfloat16: official inference); a no-op for float32.

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

    def _side_stream(self) -> torch.cuda.Stream | None:
        """The calling thread's CUDA stream when it is not the default one (stage overlap runs
        each compute thread on a stream of its own), else None."""
        if self.device.type != "cuda":
            return None
        stream = torch.cuda.current_stream(self.device)
        return None if stream == torch.cuda.default_stream(self.device) else stream

    def _claim_for_stream(self, states: Sequence[JobState]) -> None:
        """On a side stream, tell the allocator that this stream uses the states' tensors: a
        state's latents may come from another stream (Stage C's thread hands them to Stage B's),
        and a tensor this step replaces must not go back to that stream's pool while this
        stream's kernels still read it."""
        stream = self._side_stream()
        if stream is None:
            return
        for state in states:
            tensors = [state.x, state.position.r, *state.decoder_clip]
            tensors += [*state.conditioning.cond.values(), *state.conditioning.uncond.values()]
            if state.x0 is not None:
                tensors.append(state.x0)
            for tensor in tensors:
                if tensor.device.type == "cuda":
                    tensor.record_stream(stream)

    def _clock(self) -> float:
        """Wall time after the device has finished the work this thread queued (with stage
        overlap, another thread's stream may still be busy: that is not waited for)."""
        if self.device.type == "cuda":
            stream = self._side_stream()
            if stream is None:
                torch.cuda.synchronize(self.device)
            else:
                stream.synchronize()
        return time.perf_counter()


def _result(
    state: JobState, images: Tensor | None, output_type: str
) -> GenerationResult | NonFiniteOutput:
    params = state.params
    assert images is not None
    if not bool(torch.isfinite(images).all()):
        return NonFiniteOutput(
            f"the images of seeds {params.seed}..{params.seed + params.num_images - 1} "
            "contain NaN or inf"
        )
    images = images.clamp(0.0, 1.0)
    if output_type == "uint8":
        images = images.mul(255).round().to(torch.uint8)
    return GenerationResult(
        images=images.cpu(),
        seeds=[params.seed + i for i in range(params.num_images)],
        prompt_truncated=state.prompt_truncated,
        negative_prompt_truncated=state.negative_prompt_truncated,
    )
