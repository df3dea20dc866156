"""End-to-end parity with diffusers' Stable Cascade pipelines on the same tiny random weights.

diffusers (0.42.1) is the oracle: its StableCascadeCombinedPipeline (prior + decoder), assembled
from components (its pipeline-level from_pretrained cannot load the VQ model on >= 0.38), runs the
tiny networks converted with models/convert.py. Our pipeline runs with the settings diffusers
implements: plain CFG (cfg_rho 0) and shift 1. Both draw every image's noise from that image's
generator in the same order (Stage C initial noise, one tensor per Stage C step, Stage B initial
noise, one per Stage B step), so the same seed gives the same noise.

Known systematic differences (diffusers_oracle.md §5), quantified on this model at 128 px, 6 + 4
steps:
1. diffusers feeds the networks the raw grid time t; the official code (and ours) feeds the noise
   condition r = noise_cond(logSNR(t)). They differ only at t = 1 (r = 0.99358), but an untrained
   network's error at the first step is amplified ~100x by x0 = (x - b eps) / a with a = 0.01, so
   stock diffusers lands far off: mean |image difference| ~0.05 (vs ~0.48 between two seeds).
2. diffusers returns the latent after its last scheduler step (to alpha_bar = 0.9999), we return the
   last x0: the latents differ by a factor ~sqrt(0.9999), relative ~5e-5.
3. Stage A scale: the tiny VQ has 0.43 and the converted diffusers VQ gets the same value, so no
   difference.

The strict test bridges difference 1 inside the test: the diffusers UNets receive r computed from
diffusers' own t, and everything else (UNet code, scheduler, CFG, RNG order, VQ decode) is stock
diffusers. Only difference 2 remains: measured max |image difference| 6e-5, Stage C latents within
5.1e-5 relative. The stock test checks the loose bound of difference 1.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from models.convert import (
    stage_a_config_to_diffusers,
    stage_b_config_to_diffusers,
    stage_c_config_to_diffusers,
    unet_official_to_diffusers,
    vq_official_to_diffusers,
)
from models.request import GenerationParams
from models.schedule import cosine_logsnr, noise_cond

pytestmark = pytest.mark.usefixtures("single_thread")

diffusers = pytest.importorskip("diffusers")

SIZE, PRIOR_STEPS, DECODER_STEPS = (
    128,
    6,
    4,
)  # 128 px: ceil(128/42.67)=3 and 3*10.67 -> 32 = 128/4 in both
PRIOR_CFG, DECODER_CFG = 4.0, 2.0  # both > 1, so diffusers runs CFG in both stages
PROMPTS = ["a red circle", "a blue square on a green background"]
SEEDS = [0, 1]


def _config(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def oracle(tiny_pipeline):
    """StableCascadeCombinedPipeline on the tiny pipeline's weights, text tower and tokenizer."""
    from diffusers import DDPMWuerstchenScheduler, StableCascadeCombinedPipeline, StableCascadeUNet
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel

    def unet(config: dict, official_state: dict) -> StableCascadeUNet:
        model = StableCascadeUNet(**_config(config))
        model.load_state_dict(unet_official_to_diffusers(official_state), strict=True)
        return model.eval()

    pipe = tiny_pipeline
    prior = unet(stage_c_config_to_diffusers(pipe.stage_c.config), pipe.stage_c.state_dict())
    decoder = unet(stage_b_config_to_diffusers(pipe.stage_b.config), pipe.stage_b.state_dict())
    vqgan = PaellaVQModel(**_config(stage_a_config_to_diffusers(pipe.stage_a.config)))
    vqgan.load_state_dict(vq_official_to_diffusers(pipe.stage_a.state_dict()), strict=True)
    assert vqgan.config.scale_factor == pipe.stage_a.config.scale_factor == 0.43
    text_model, tokenizer = pipe.text_encoder.model, pipe.text_encoder.tokenizer
    combined = StableCascadeCombinedPipeline(
        tokenizer=tokenizer,
        text_encoder=text_model,
        decoder=decoder,
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=vqgan.eval(),
        prior_prior=prior,
        prior_text_encoder=text_model,
        prior_tokenizer=tokenizer,
        prior_scheduler=DDPMWuerstchenScheduler(),
        prior_feature_extractor=None,
        prior_image_encoder=None,
    )
    combined.set_progress_bar_config(disable=True)
    return combined


@contextmanager
def official_noise_condition(oracle):
    """Make the diffusers UNets see r = noise_cond(logSNR(t)) (official conditioning), not raw t."""
    unets = (oracle.prior_pipe.prior, oracle.decoder_pipe.decoder)
    for unet in unets:
        stock = unet.forward

        def forward(*args, timestep_ratio, _stock=stock, **kwargs):
            r = noise_cond(cosine_logsnr(timestep_ratio.float())).to(timestep_ratio)
            return _stock(*args, timestep_ratio=r, **kwargs)

        unet.forward = forward
    try:
        yield
    finally:
        for unet in unets:
            del unet.forward  # back to the class's forward


@contextmanager
def capture_effnet(module):
    """Record the ``effnet`` keyword (the Stage C latent) of every call of a Stage B network."""
    seen = []
    handle = module.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["effnet"].clone()), with_kwargs=True
    )
    try:
        yield seen
    finally:
        handle.remove()


def run_oracle(oracle, seeds):
    with torch.no_grad(), capture_effnet(oracle.decoder_pipe.decoder) as effnet:
        images = oracle(
            prompt=PROMPTS,
            negative_prompt=[""] * len(PROMPTS),
            height=SIZE,
            width=SIZE,
            prior_num_inference_steps=PRIOR_STEPS,
            prior_guidance_scale=PRIOR_CFG,
            num_inference_steps=DECODER_STEPS,
            decoder_guidance_scale=DECODER_CFG,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            output_type="pt",
        ).images
    return torch.cat(list(images)).view(len(seeds), 3, SIZE, SIZE), effnet[0][
        : len(seeds)
    ]  # cond half


def run_ours(pipe, seeds):
    batch = [
        GenerationParams(
            prompt=p,
            width=SIZE,
            height=SIZE,
            seed=s,
            prior_steps=PRIOR_STEPS,
            prior_guidance_scale=PRIOR_CFG,
            prior_shift=1.0,
            decoder_steps=DECODER_STEPS,
            decoder_guidance_scale=DECODER_CFG,
            decoder_shift=1.0,
            cfg_rho=0.0,
        )
        for p, s in zip(PROMPTS, seeds, strict=True)
    ]
    with capture_effnet(pipe.stage_b) as effnet:
        results = pipe.generate(batch, output_type="float").results
    return torch.cat([r.images for r in results]), effnet[0][: len(seeds)]


@pytest.fixture(scope="module")
def ours(tiny_pipeline):
    return {
        "same": run_ours(tiny_pipeline, SEEDS),
        "other": run_ours(tiny_pipeline, [s + 100 for s in SEEDS]),
    }


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_matches_diffusers_with_the_official_noise_condition(oracle, ours):
    with official_noise_condition(oracle):
        ref_images, ref_latent_c = run_oracle(oracle, SEEDS)
    images, latent_c = ours["same"]
    # Only difference 2 remains (last x0 vs post-step latent, ~5e-5 relative): 4x headroom on the
    # latents and ~8x on the images (measured 5.1e-5 and 6e-5).
    assert _rel(latent_c, ref_latent_c) < 2e-4
    assert (images - ref_images).abs().max() < 5e-4
    # The test can fail: other seeds give a different Stage C latent and image by orders of
    # magnitude more.
    other_images, other_latent_c = ours["other"]
    assert _rel(other_latent_c, ref_latent_c) > 0.3
    assert (other_images - ref_images).abs().mean() > 0.2


def test_stock_diffusers_differs_only_by_the_known_conventions(oracle, ours):
    ref_images, _ = run_oracle(oracle, SEEDS)
    images, _ = ours["same"]
    other_images, _ = ours["other"]
    # Difference 1 (raw t vs r at the first step, amplified by the untrained networks): measured
    # mean 0.045.
    same = float((images - ref_images).abs().mean())
    other = float((other_images - ref_images).abs().mean())
    assert same < 0.1
    assert other > 3 * 0.1
