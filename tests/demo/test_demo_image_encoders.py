"""The demo model's image encoder and CLIP image tower (training/train_image_conditioning.py): they
load like real weights, the encoder maps the demo's pictures back to its latent space, the tower's
embedding tells colours apart, and the training's BatchNorm fold is exact."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from models import weights
from models.clip_image import ClipImageEncoder
from models.demo import demo_model_dir, load_demo_pipeline
from models.effnet import EfficientNetEncoder
from models.job_state import Stage
from models.request import GenerationParams
from training import data
from training.train_image_conditioning import ENCODER, EncoderWithAffineOut, encoder_input


@pytest.fixture(scope="module")
def demo():
    return load_demo_pipeline()


def test_the_files_load_with_the_real_weights_loaders():
    folder = demo_model_dir()
    encoder = weights.load_effnet(folder / "effnet_encoder.safetensors")
    assert encoder.config == ENCODER
    assert sum(p.numel() for p in encoder.parameters()) < 500_000
    tower = ClipImageEncoder.from_pretrained(folder)
    assert tower.dim == 16 and tower.preprocessing.crop == (224, 224)


@torch.inference_mode()
def test_the_encoder_maps_demo_pictures_near_their_latents(demo):
    """Pictures the demo draws (other seeds than its training pairs) go back to latents close to the
    Stage C latents they were decoded from: error well below the latents' variance."""
    g = torch.Generator().manual_seed(77)
    captions = data.captions_of(data.sample_attributes(16, g))
    states = demo.start(
        [
            GenerationParams.from_defaults(demo.defaults, c, seed=900_000 + i)
            for i, c in enumerate(captions)
        ]
    )
    while any(s.stage is Stage.PRIOR for s in states):
        demo.step(states)
    latents = torch.cat([s.conditioning.cond["effnet"] for s in states])
    demo.engine.run(states)
    pictures = torch.cat([r.images for r in demo.decode(states)])
    encoded = demo.engine.image_encoder(encoder_input(pictures))
    error = float((encoded - latents).pow(2).mean())
    print(f"encoder mse {error:.3f}, latent variance {float(latents.var()):.3f}")
    assert error < 0.5 * float(latents.var())


@torch.inference_mode()
def test_the_towers_embedding_tells_colours_apart(demo):
    """Nearest class mean of the embeddings of rendered pictures finds the background colour."""
    g = torch.Generator().manual_seed(5)
    attrs = data.sample_attributes(128, g)
    images = data.render(attrs, g).mul(255).round().to(torch.uint8)
    pictures = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
    embeds = demo.engine.clip_image.embed(pictures)[:, 0]
    train, test = slice(0, 96), slice(96, 128)
    means = torch.stack([embeds[train][attrs.bg[train] == c].mean(0) for c in range(8)])
    guess = torch.cdist(embeds[test], means).argmin(1)
    accuracy = float((guess == attrs.bg[test]).float().mean())
    print(f"background colour from the embedding: {accuracy:.0%}")
    assert accuracy >= 0.8


def test_the_output_affine_folds_into_the_batchnorm_exactly():
    torch.manual_seed(0)
    model = EncoderWithAffineOut(EfficientNetEncoder(ENCODER)).train()
    model(torch.randn(8, 3, 96, 96))  # BatchNorm statistics
    with torch.no_grad():
        scales = torch.linspace(-2, 2, 17)
        model.scale.copy_(scales[scales != 0].view(1, 16, 1, 1))  # negative ones too
        model.shift.copy_(torch.linspace(-1, 1, 16).view(1, 16, 1, 1))
    model.eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = model(x)
        folded = model.fold()(x)
    torch.testing.assert_close(folded, expected, atol=1e-4, rtol=1e-4)
