"""Image-to-image and image variation in the engine (spec §7.8): the start latent against an
independent float64 version of the recipe, the noise grid, CLIP preprocessing against
transformers, strength 1 = text-to-image, the same images alone and in a mixed running group,
validation, and loading the optional encoders from a snapshot."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from models.clip_image import ClipPreprocessing
from models.effnet import EfficientNetEncoder
from models.init_image import encoder_pixels
from models.job_state import Stage
from models.request import GenerationParams, InvalidParams
from models.schedule import logsnr_grid, noise_cond
from models.step_engine import latent_sizes


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _params(pipe, prompt: str = "a red circle", **overrides) -> GenerationParams:
    return GenerationParams.from_defaults(pipe.defaults, prompt, **overrides)


def _recipe_scales_float64(t: float) -> tuple[float, float]:
    """gdf.diffuse's (a, b) at t, shift 1, written out in float64 from the spec (§7.1, §7.2)."""
    s = 0.008
    min_var = math.cos(s / (1 + s) * math.pi / 2) ** 2
    var = math.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / min_var
    var = min(max(var, 1e-4), 0.9999)
    logsnr = math.log(var / (1 - var))
    sig = 1 / (1 + math.exp(-logsnr))
    return math.sqrt(sig), math.sqrt(1 - sig)


@pytest.mark.parametrize("strength", [0.3, 0.8, 0.95])
def test_start_latent_is_the_recipes_noising(tiny_pipeline, strength):
    """x_init = a * encoder(picture) + b * eps, a/b of the shift-1 schedule at t = strength, eps the
    image's first draw from its generator (where text-to-image draws its initial noise)."""
    pipe = tiny_pipeline
    params = _params(pipe, image=_picture(160, 128), strength=strength, num_images=2, seed=5)
    with torch.inference_mode():
        (state,) = pipe.start([params])
        (hc, wc), _ = latent_sizes(params.width, params.height)
        pixels = EfficientNetEncoder.preprocess(encoder_pixels(params.image, (hc, wc))[None])
        latent = pipe.engine.image_encoder(pixels).double()
    a, b = _recipe_scales_float64(strength)
    for i in range(2):
        g = torch.Generator().manual_seed(5 + i)
        eps = torch.randn((16, hc, wc), generator=g, dtype=torch.float32).double()
        expected = a * latent[0] + b * eps
        torch.testing.assert_close(state.x[i].double(), expected, atol=2e-6, rtol=1e-6)


def test_grid_starts_at_strength_with_int_steps_times_strength(tiny_pipeline):
    pipe = tiny_pipeline
    params = _params(pipe, image=_picture(128, 128), strength=0.75, prior_steps=10)
    with torch.inference_mode():
        (state,) = pipe.start([params])
    assert state.position.total == 7  # int(10 x 0.75)
    expected = noise_cond(logsnr_grid(7, params.prior_shift, t_start=0.75)[:-1])
    torch.testing.assert_close(state.position.r, expected, atol=0, rtol=0)
    assert float(state.position.r[0]) < 0.9  # not pure noise (t = 1 gives 0.99)


def test_strength_one_is_text_to_image_exactly(tiny_pipeline):
    """strength 1.0 skips the encoder: the same images as without a picture, bit for bit."""
    pipe = tiny_pipeline
    plain = pipe.generate([_params(pipe, seed=9)]).results[0].images
    with_image = pipe.generate([_params(pipe, seed=9, image=_picture(90, 70), strength=1.0)])
    assert torch.equal(with_image.results[0].images, plain)


def test_variation_conditions_stage_c_on_the_clip_embedding_and_uncond_on_zeros(tiny_pipeline):
    pipe = tiny_pipeline
    picture = _picture(100, 140, seed=3)
    with torch.inference_mode():
        (state,) = pipe.start(
            [_params(pipe, "", image=picture, image_variation=True, num_images=2)]
        )
        embed = pipe.engine.clip_image.embed([picture])
    cond, uncond = state.conditioning.cond["clip_img"], state.conditioning.uncond["clip_img"]
    assert cond.shape == (2, 1, pipe.stage_c.config.c_clip_img)
    torch.testing.assert_close(cond, embed.expand(2, -1, -1))
    assert float(cond.abs().sum()) > 0 and not uncond.any()
    plain = pipe.generate([_params(pipe, "", seed=1)]).results[0].images
    varied = pipe.generate([_params(pipe, "", seed=1, image=picture, image_variation=True)])
    assert not torch.equal(varied.results[0].images, plain)


@pytest.mark.parametrize("size", [(224, 224), (300, 200), (150, 401), (225, 224), (31, 64)])
def test_clip_preprocessing_matches_transformers(size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    picture = _picture(*size, seed=size[0])
    ours = ClipPreprocessing().pixels(picture)
    theirs = CLIPImageProcessorPil()(images=picture, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 224, 224)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_preprocessing_is_read_from_the_saved_processor_config(tmp_path):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    CLIPImageProcessorPil(
        size={"shortest_edge": 48}, crop_size={"height": 40, "width": 32}
    ).save_pretrained(tmp_path)
    settings = ClipPreprocessing.from_file(tmp_path / "preprocessor_config.json")
    assert (settings.shortest_edge, settings.crop) == (48, (40, 32))
    assert settings.pixels(_picture(64, 96)).shape == (3, 40, 32)


def test_encoder_pixels_crop_to_the_output_aspect_then_resize():
    """A 200 x 100 picture for a 3 x 6 latent (an output twice as wide as high) keeps its whole
    frame; for a 3 x 3 latent its centre 100 x 100 is used."""
    picture = Image.new("RGB", (200, 100), (255, 0, 0))
    picture.paste((0, 0, 255), (0, 0, 50, 100))  # left quarter blue
    wide = encoder_pixels(picture, (3, 6))
    square = encoder_pixels(picture, (3, 3))
    assert wide.shape == (3, 96, 192) and square.shape == (3, 96, 96)
    assert float(wide[2, :, :40].mean()) > 0.95  # the blue quarter is there
    assert float(square[2].max()) < 0.05  # cropped away: all red
    assert float(square[0].min()) > 0.95


def test_image_to_image_alone_and_in_a_mixed_running_group_give_the_same_images(tiny_pipeline):
    """Image-to-image jobs (two strengths, so they start at other noise levels) share Stage C
    forwards with text-to-image and variation jobs that joined at other steps."""
    pipe = tiny_pipeline
    picture = _picture(128, 128, seed=11)
    requests = [
        _params(pipe, "a blue square", seed=1),
        _params(pipe, "a red circle", seed=2, image=picture, strength=0.5, num_images=2),
        _params(pipe, "", seed=3, image=_picture(96, 160, seed=4), image_variation=True),
        _params(
            pipe,
            "a green triangle",
            seed=4,
            image=_picture(128, 128, seed=12),
            strength=0.9,
            image_variation=True,
        ),
    ]
    solo = [pipe.generate([p]).results[0].images for p in requests]
    states, joins, steps, shared = [], {0: 0, 1: 1, 2: 2, 3: 3}, 0, 0
    with torch.inference_mode():
        while len(states) < len(requests) or any(s.stage is not Stage.VQGAN for s in states):
            if steps in joins:
                states += pipe.start([requests[joins[steps]]])
            groups: dict = {}
            for s in states:
                if s.stage is not Stage.VQGAN:
                    groups.setdefault(s.group_key, []).append(s)
            for group in groups.values():
                shared = max(shared, len(group))
                pipe.step(group)
            steps += 1
        results = pipe.decode(states)
    assert shared >= 3  # the forwards really were shared
    for result, alone in zip(results, solo, strict=True):
        diff = (result.images.int() - alone.int()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01


def test_the_picture_decides_the_image(tiny_pipeline):
    """Same prompt, seed and strength, two pictures: two images. (Otherwise the tests above could
    not see a picture given to the wrong row.)"""
    pipe = tiny_pipeline
    a, b = (_params(pipe, image=_picture(128, 128, seed=s), strength=0.5, seed=1) for s in (1, 2))
    image_a, image_b = (pipe.generate([p]).results[0].images.int() for p in (a, b))
    diff = (image_a - image_b).abs()
    # Well beyond the tolerance of the alone-vs-batched comparisons (max 1 level, < 1% of values).
    assert int(diff.max()) > 4 and float((diff > 1).float().mean()) > 0.01


def test_static_batch_of_image_and_text_requests(tiny_pipeline):
    """generate() batches requests of one batch_key: image-to-image at one strength with others of
    the same Stage C grid; another strength is another batch key."""
    pipe = tiny_pipeline
    picture = _picture(128, 128)
    a = _params(pipe, "a", image=picture, strength=0.5, seed=1)
    b = _params(pipe, "b", image=_picture(128, 128, seed=2), strength=0.5, seed=2)
    assert a.batch_key() == b.batch_key() != _params(pipe, "a").batch_key()
    together = pipe.generate([a, b]).results
    for params, result in zip([a, b], together, strict=True):
        alone = pipe.generate([params]).results[0].images
        assert int((result.images.int() - alone.int()).abs().max()) <= 1


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"strength": 0.5}, "strength", "needs an image"),
        ({"image_variation": True}, "image_variation", "needs an image"),
        ({"image": "picture"}, "image", "RGB picture"),
        ({"strength": 0.0, "image": "rgb"}, "strength", "> 0 and <= 1"),
        ({"strength": 1.5, "image": "rgb"}, "strength", "> 0 and <= 1"),
        ({"strength": float("nan"), "image": "rgb"}, "strength", "> 0 and <= 1"),
        ({"strength": 0.1, "prior_steps": 6, "image": "rgb"}, "strength", "1 / prior_steps"),
        ({"image_variation": "yes", "image": "rgb"}, "image_variation", "true or false"),
    ],
)
def test_invalid_image_fields_name_the_field(tiny_pipeline, overrides, field, words):
    if overrides.get("image") == "rgb":
        overrides = {**overrides, "image": _picture(64, 64)}
    with pytest.raises(InvalidParams) as err:
        tiny_pipeline.validate(_params(tiny_pipeline, **overrides))
    assert err.value.field == field and words in err.value.message


def test_a_model_without_the_encoders_names_the_missing_files(tiny_pipeline):
    from models.pipeline import CascadePipeline

    bare = CascadePipeline(
        tiny_pipeline.stage_c,
        tiny_pipeline.stage_b,
        tiny_pipeline.stage_a,
        tiny_pipeline.text_encoder,
        defaults=tiny_pipeline.defaults,
        limits=tiny_pipeline.limits,
    )
    assert not bare.model_info["image_to_image"] and not bare.model_info["image_variation"]
    picture = _picture(64, 64)
    with pytest.raises(InvalidParams, match="effnet_encoder.safetensors"):
        bare.validate(_params(bare, image=picture, strength=0.5))
    with pytest.raises(InvalidParams, match="image_encoder/"):
        bare.validate(_params(bare, image=picture, image_variation=True))
    bare.validate(_params(bare, image=picture, strength=1.0))  # text-to-image needs neither


@pytest.mark.parametrize(
    ("size", "snapped"),
    [
        ((128, 128), (128, 128)),
        ((1000, 744), (512, 384)),  # longer side to 512, aspect kept
        ((131, 70), (128, 72)),  # nearest multiples of 8
        ((30, 20), (96, 64)),  # shorter side up to 64
        ((10, 1000), (64, 512)),  # both bounds: as close as the range allows
    ],
)
def test_a_pictures_size_snaps_to_the_nearest_allowed_size(tiny_pipeline, size, snapped):
    assert tiny_pipeline.limits.snap(*size) == snapped
