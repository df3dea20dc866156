"""The full text -> C -> B -> A pipeline on the tiny random model: sizes, batching, seeds,
validation, errors, timings, progress, and the CLI."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from PIL import Image

from models import cli
from models.pipeline import MAX_SEED, Limits
from models.request import GenerationParams, GenerationResult, InvalidParams, NonFiniteOutput

pytestmark = pytest.mark.usefixtures("single_thread")

# Fewer steps than the tiny defaults: these tests run many images.
FAST = dict(prior_steps=3, decoder_steps=2)


def params(**kw) -> GenerationParams:
    base = dict(prompt="a red circle", width=64, height=64, seed=0, **FAST)
    base.update(kw)
    return GenerationParams(**base)


def float_images(pipe, batch):
    return [r.images for r in pipe.generate(batch, output_type="float").results]


@pytest.mark.parametrize(("width", "height"), [(128, 128), (72, 136), (64, 64), (200, 88)])
def test_images_have_exactly_the_requested_size(tiny_pipeline, width, height):
    out = tiny_pipeline.generate([params(width=width, height=height, num_images=2)])
    (result,) = out.results
    assert isinstance(result, GenerationResult)
    assert result.images.shape == (2, 3, height, width)
    assert result.images.dtype == torch.uint8
    assert result.images.device.type == "cpu"
    assert result.seeds == [0, 1]
    assert result.images.float().std() > 10  # not a flat image


def test_default_sampling_settings_run_on_a_cpu(tiny_pipeline):
    d = tiny_pipeline.defaults
    # Small enough for a 2-core CPU (~0.1 s per image when the machine is idle); a wall-clock bound
    # would be flaky on a shared machine, so the settings themselves are checked.
    assert d.width * d.height <= 128 * 128
    assert d.prior_steps + d.decoder_steps <= 12
    p = GenerationParams.from_defaults(d, "a blue square")
    out = tiny_pipeline.generate([p])
    assert out.results[0].images.shape == (1, 3, d.height, d.width)


def test_image_is_independent_of_its_batch_neighbours(tiny_pipeline):
    size = dict(width=136, height=72)
    target = params(
        prompt="a red circle",
        negative_prompt="blurry",
        seed=5,
        num_images=2,
        prior_guidance_scale=3.0,
        decoder_guidance_scale=1.5,
        **size,
    )
    others = [
        params(prompt="a green triangle", seed=9, **size),
        params(
            prompt="a red circle",
            seed=7,
            num_images=3,
            cfg_rho=0.0,
            prior_guidance_scale=1.0,
            decoder_guidance_scale=1.0,
            **size,
        ),
        params(
            prompt="zzz " * 40, negative_prompt="noise", seed=11, prior_guidance_scale=7.0, **size
        ),
    ]
    (alone,) = float_images(tiny_pipeline, [target])
    batched = float_images(tiny_pipeline, [others[0], target, others[1], others[2]])
    assert (alone - batched[1]).abs().max() < 1e-5
    # The comparison is meaningful: a good share of pixels is not clipped to 0 or 1.
    assert ((alone > 0) & (alone < 1)).float().mean() > 0.05
    # Image i of a request is the image of seed + i alone.
    (second,) = float_images(tiny_pipeline, [dataclasses.replace(target, seed=6, num_images=1)])
    assert (second[0] - alone[1]).abs().max() < 1e-5
    # All guidance 1: alone it skips the unconditional half, in the batch it goes through the guided
    # formula, which then reduces to the conditional prediction; the images agree.
    (unguided,) = float_images(tiny_pipeline, [others[1]])
    assert (unguided - batched[2]).abs().max() < 1e-5


def test_same_seed_same_image_different_seed_different_image(tiny_pipeline):
    a1, a2, b = (
        r.images
        for r in tiny_pipeline.generate([params(seed=3), params(seed=3), params(seed=4)]).results
    )
    assert torch.equal(a1, a2)
    assert (a1.float() - b.float()).abs().mean() > 20


def test_prompt_and_negative_prompt_change_the_image(tiny_pipeline):
    base, other_prompt, neg, empty_neg = float_images(
        tiny_pipeline,
        [
            params(),
            params(prompt="a blue square"),
            params(negative_prompt="dark"),
            params(negative_prompt=""),
        ],
    )
    # The random tiny text tower has a weak effect, but far above float noise (1e-5).
    assert (base - other_prompt).abs().max() > 1e-2
    assert (base - neg).abs().max() > 1e-2
    assert torch.equal(base, empty_neg)


def test_truncation_is_reported_per_request(tiny_pipeline):
    out = tiny_pipeline.generate([params(prompt="word " * 30), params(negative_prompt="x" * 100)])
    assert [(r.prompt_truncated, r.negative_prompt_truncated) for r in out.results] == [
        (True, False),
        (False, True),
    ]


def test_unique_prompts_are_encoded_once_per_batch(tiny_pipeline):
    rows = []
    model = tiny_pipeline.text_encoder.model
    handle = model.register_forward_hook(
        lambda m, a, kw, o: rows.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        tiny_pipeline.generate(
            [
                params(prompt="a"),
                params(prompt="a", negative_prompt="b"),
                params(prompt="c", seed=2),
            ]
        )
    finally:
        handle.remove()
    assert rows == [3]  # "a", "b", "c" in one forward; "" comes from the cache


def test_unconditional_half_is_skipped_only_when_every_guidance_is_one(tiny_pipeline):
    seen = {"c": [], "b": []}
    hooks = [
        tiny_pipeline.stage_c.register_forward_hook(lambda m, a, o: seen["c"].append(o.shape[0])),
        tiny_pipeline.stage_b.register_forward_hook(lambda m, a, o: seen["b"].append(o.shape[0])),
    ]
    try:
        tiny_pipeline.generate(
            [
                params(num_images=2, prior_guidance_scale=4.0, decoder_guidance_scale=1.0),
                params(prior_guidance_scale=4.0, decoder_guidance_scale=1.0),
            ]
        )
    finally:
        for h in hooks:
            h.remove()
    assert seen["c"] == [6] * FAST["prior_steps"]  # 3 images, cond + uncond in one forward
    # Every decoder scale is 1: the conditional half only.
    assert seen["b"] == [3] * FAST["decoder_steps"]


def test_progress_callback_reports_every_step_of_each_stage(tiny_pipeline):
    calls = []
    tiny_pipeline.generate(
        [params(prior_steps=3, decoder_steps=2)], on_step=lambda *a: calls.append(a)
    )
    assert calls == [
        ("prior", 1, 3),
        ("prior", 2, 3),
        ("prior", 3, 3),
        ("decoder", 1, 2),
        ("decoder", 2, 2),
    ]


def test_timings_cover_every_stage(tiny_pipeline):
    t = tiny_pipeline.generate([params()]).timings
    assert min(t.text, t.prior, t.decoder, t.vqgan) > 0
    assert t.total == pytest.approx(t.text + t.prior + t.decoder + t.vqgan)


def test_nan_in_one_image_fails_only_its_request(tiny_pipeline):
    batch = [params(seed=1), params(seed=2, num_images=2, prompt="b"), params(seed=4, prompt="c")]
    clean = float_images(tiny_pipeline, batch)

    calls = []

    def corrupt(module, args, output):
        """A NaN deep inside Stage B (first block of level 1), in image 2 (request 1's second)."""
        calls.append(output.shape[0])
        output = output.clone()
        output[2, 0, 0, 0] = float("nan")
        return output

    handle = tiny_pipeline.stage_b.down_blocks[1][0].register_forward_hook(corrupt)
    try:
        results = tiny_pipeline.generate(batch, output_type="float").results
    finally:
        handle.remove()
    assert calls == [8] * FAST["decoder_steps"]  # the hook ran: 4 images, cond + uncond
    assert isinstance(results[1], NonFiniteOutput)
    assert "seeds 2..3" in str(results[1])
    for j in (0, 2):
        assert isinstance(results[j], GenerationResult)
        assert (results[j].images - clean[j]).abs().max() < 1e-5


def test_model_info_and_defaults_are_honest(tiny_pipeline):
    info = tiny_pipeline.model_info
    assert info["demo"] is True
    assert "random" in str(info["weights"])
    assert info["dtype"] == "float32"
    assert {"name", "prior", "decoder", "device"} <= set(info)
    lim, d = tiny_pipeline.limits, tiny_pipeline.defaults
    assert (lim.min_size, lim.max_size, lim.size_step) == (64, 512, 8)
    assert lim.min_size <= d.width <= lim.max_size
    assert d.prior_steps <= lim.max_steps


def test_limits_refuse_sizes_the_networks_cannot_process(tiny_pipeline):
    a, b = tiny_pipeline.stage_a.config, tiny_pipeline.stage_b.config
    assert Limits.for_models(a, b, min_size=64, max_size=2048).size_step == 8
    with pytest.raises(ValueError, match="64"):
        Limits.for_models(a, b, min_size=32, max_size=512)
    with pytest.raises(ValueError, match="multiples of 8"):
        Limits.for_models(a, b, min_size=100, max_size=512)


def test_real_limits_fit_the_real_networks():
    """Real-size check on the meta device: the smallest, an odd and the largest accepted sizes run
    through the released Stage B and Stage A (Stage C has no resampling, any latent size works).

    Stage B needs an even latent, and resizes skips whose sizes do not halve evenly. The lite and
    big decoders share the level structure that matters here; lite (the default) keeps this fast.
    """
    from models.config import StageAConfig, StageBConfig
    from models.pipeline import latent_sizes
    from models.stage_a import StageA
    from models.stage_b import StageB

    b_cfg = StageBConfig.lite()
    limits = Limits.for_models(
        StageAConfig(), b_cfg, min_size=Limits.min_size, max_size=Limits.max_size
    )
    assert (limits.min_size, limits.max_size, limits.size_step) == (256, 2048, 8)
    with torch.device("meta"):
        stage_b, stage_a = StageB(b_cfg).eval(), StageA(StageAConfig()).eval()
        for width, height in [(256, 256), (264, 1000), (2048, 776)]:
            (hc, wc), (hb, wb) = latent_sizes(width, height)
            eps = stage_b(
                torch.zeros(2, 4, hb, wb),
                torch.zeros(2),
                torch.zeros(2, 16, hc, wc),
                torch.zeros(2, 1, b_cfg.c_clip),
            )
            assert eps.shape == (2, 4, hb, wb)
            assert stage_a.decode(eps).shape == (2, 3, height, width)


INVALID = [
    ("width", 60, "from 64 to 512"),
    ("width", 520, "from 64 to 512"),
    ("height", 100, "multiple of 8"),
    ("height", 64.0, "integer multiple of 8"),
    ("prior_steps", 0, "from 1 to 100"),
    ("decoder_steps", 101, "from 1 to 100"),
    ("decoder_steps", 2.5, "integer"),
    ("prior_guidance_scale", -0.5, "from 0.0 to 50.0"),
    ("decoder_guidance_scale", math.nan, "finite"),
    ("prior_guidance_scale", math.inf, "finite"),
    ("prior_shift", 0.0, "> 0"),
    ("decoder_shift", -1.0, "> 0"),
    ("prior_shift", math.nan, "> 0"),
    ("cfg_rho", 1.5, "from 0.0 to 1.0"),
    ("cfg_rho", -0.1, "from 0.0 to 1.0"),
    ("num_images", 0, "from 1 to 16"),
    ("num_images", 17, "from 1 to 16"),
    ("seed", -1, "from 0 to"),
    ("seed", 2**63, "from 0 to"),
    ("seed", True, "integer"),
    ("prompt", None, "string"),
    ("negative_prompt", 3, "string"),
]


@pytest.mark.parametrize(
    ("field", "value", "message"), INVALID, ids=[f"{f}={v!r}" for f, v, _ in INVALID]
)
def test_invalid_parameters_are_rejected_naming_field_and_limit(
    tiny_pipeline, field, value, message
):
    bad = params(**{field: value})
    with pytest.raises(InvalidParams) as info:
        tiny_pipeline.validate(bad)
    assert info.value.field == field
    assert message in info.value.message
    with pytest.raises(InvalidParams):
        tiny_pipeline.generate([params(), bad])


def test_seed_range_counts_every_image_of_the_request(tiny_pipeline):
    tiny_pipeline.validate(params(seed=MAX_SEED))
    tiny_pipeline.validate(params(seed=MAX_SEED - 1, num_images=2))
    with pytest.raises(InvalidParams, match="seed"):
        tiny_pipeline.validate(params(seed=MAX_SEED, num_images=2))


def test_batch_must_share_one_batch_key(tiny_pipeline):
    with pytest.raises(InvalidParams) as info:
        tiny_pipeline.generate([params(), params(width=72)])
    assert info.value.field == "batch"
    assert tiny_pipeline.generate([]).results == []


@pytest.fixture(scope="module")
def tiny_snapshot(tiny_pipeline, tmp_path_factory):
    """The tiny weights laid out like a Stable Cascade snapshot: official .safetensors files at the
    root plus the diffusers-style text_encoder/ and tokenizer/ folders."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("snapshot")
    for name, net in (
        ("stage_c_lite", tiny_pipeline.stage_c),
        ("stage_b_lite", tiny_pipeline.stage_b),
        ("stage_a", tiny_pipeline.stage_a),
    ):
        state = {k: v.contiguous() for k, v in net.state_dict().items()}
        save_file(state, root / f"{name}.safetensors")
    tiny_pipeline.text_encoder.tokenizer.save_pretrained(root / "tokenizer")
    tiny_pipeline.text_encoder.model.save_pretrained(root / "text_encoder")
    return root


def test_from_snapshot_loads_official_files_and_text_folders(tiny_pipeline, tiny_snapshot):
    from models.pipeline import CascadePipeline

    loaded = CascadePipeline.from_snapshot(
        tiny_snapshot, prior_variant="lite", decoder_variant="lite", device="cpu"
    )
    assert loaded.model_info["demo"] is False
    assert loaded.model_info["prior"] == "lite"
    assert loaded.model_info["dtype"] == "float32"
    assert loaded.limits.min_size == 256
    assert loaded.limits.size_step == 8
    p = params(width=256, height=256, prompt="a green square", seed=9)
    (expected,), (got,) = float_images(tiny_pipeline, [p]), float_images(loaded, [p])
    assert (expected - got).abs().max() < 1e-5


def test_a_snapshot_previewer_is_loaded_when_present(tiny_pipeline, tiny_snapshot, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from models.pipeline import CascadePipeline

    without = CascadePipeline.from_snapshot(tiny_snapshot, device="cpu")
    assert without.model_info["previews"] is False and without.previewer is None
    with_previewer = tmp_path / "snapshot"
    shutil.copytree(tiny_snapshot, with_previewer)
    state = {k: v.contiguous() for k, v in tiny_pipeline.previewer.state_dict().items()}
    save_file(state, with_previewer / "previewer.safetensors")
    loaded = CascadePipeline.from_snapshot(with_previewer, device="cpu")
    assert loaded.model_info["previews"] is True
    (event,) = loaded.step(loaded.start([params(prompt="a cat", seed=2)]), previews=True)
    (picture,) = loaded.preview([event.x0])
    h, w = event.x0.shape[-2:]
    assert picture.dtype == torch.uint8 and picture.shape == (1, 3, 8 * h, 8 * w)
    with torch.inference_mode():  # the same weights give the same (unclamped) picture
        mine, reference = loaded.previewer(event.x0), tiny_pipeline.previewer(event.x0)
    assert mine.std() > 0 and torch.allclose(mine, reference)


def test_from_snapshot_names_what_is_missing(tmp_path):
    from models.pipeline import CascadePipeline

    with pytest.raises(ValueError, match="stage_c_lite"):
        CascadePipeline.from_snapshot(tmp_path, device="cpu")


def test_cli_runs_a_snapshot_directory(tiny_snapshot, tmp_path, capsys):
    out = tmp_path / "snap.png"
    argv = ["a cat", "-o", str(out), "--weights", str(tiny_snapshot), "--device", "cpu"]
    argv += ["--width", "256", "--height", "264", "--prior-steps", "2", "--decoder-steps", "2"]
    assert cli.main(argv) == 0
    with Image.open(out) as img:
        assert img.size == (256, 264)
    assert "stable-cascade-lite-lite" in capsys.readouterr().err


def test_cli_writes_pngs_of_the_requested_size(tmp_path, capsys):
    out = tmp_path / "sub" / "pic.png"
    code = cli.main(
        [
            "a red circle",
            "-o",
            str(out),
            "--width",
            "72",
            "--height",
            "136",
            "--seed",
            "12",
            "--prior-steps",
            "2",
            "--decoder-steps",
            "2",
            "--num-images",
            "2",
        ]
    )
    assert code == 0
    for i in range(2):
        with Image.open(tmp_path / "sub" / f"pic-{i}.png") as img:
            assert img.size == (72, 136)
            assert img.mode == "RGB"
    captured = capsys.readouterr()
    assert "seed: 12" in captured.out
    assert "prior" in captured.err
    assert "2/2" in captured.err


def test_cli_rejects_an_invalid_size(tmp_path, capsys):
    assert cli.main(["x", "-o", str(tmp_path / "a.png"), "--width", "70"]) == 2
    assert "width" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_a_snapshot_image_encoders_are_loaded_when_present(tiny_pipeline, tiny_snapshot, tmp_path):
    """effnet_encoder.safetensors and image_encoder/ + feature_extractor/ are loaded when present
    and give the in-memory pipeline's images; without them both flags are off."""
    import shutil

    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from models.pipeline import CascadePipeline

    without = CascadePipeline.from_snapshot(tiny_snapshot, device="cpu")
    assert not without.model_info["image_to_image"] and not without.model_info["image_variation"]
    root = tmp_path / "snapshot"
    shutil.copytree(tiny_snapshot, root)
    effnet = tiny_pipeline.engine.image_encoder.state_dict()
    save_file({k: v.contiguous() for k, v in effnet.items()}, root / "effnet_encoder.safetensors")
    tiny_pipeline.engine.clip_image.model.save_pretrained(root / "image_encoder")
    CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(root / "feature_extractor")
    loaded = CascadePipeline.from_snapshot(root, device="cpu")
    assert loaded.model_info["image_to_image"] and loaded.model_info["image_variation"]
    pixels = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    p = params(
        width=256,
        height=256,
        prompt="a cat",
        seed=3,
        image=Image.fromarray(pixels),
        strength=0.6,
        image_variation=True,
    )
    (expected,), (got,) = float_images(tiny_pipeline, [p]), float_images(loaded, [p])
    assert (expected - got).abs().max() < 1e-5
