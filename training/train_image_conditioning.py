"""Image-to-image and variations for the demo model: its image encoder, its CLIP image tower and the
image conditioning of its Stage C, trained on the CPU in minutes.

    nice -n 19 python -m training.train_image_conditioning --out assets/demo-model

The demo's Stage C latent space was defined by a training-only semantic encoder (training/
semantic_encoder.py) that is not shipped, and its Stage C was trained with ``clip_img`` always zero.
Phases (seeded; each writes to ``--work``):

1. ``pairs``: the shipped demo model draws N pictures of random captions at its defaults; each
   job's final Stage C latent [16, 3, 3] and decoded 128 px picture are kept. They pair pictures
   with latents of the demo's own latent space.
2. ``encoder``: a small EfficientNet (``EfficientNetConfig``, V2-S structure, official keys) learns
   picture -> latent (MSE) on the pairs, fed exactly as the pipeline feeds it (models/init_image.py:
   resized to 96 px, ImageNet-normalised). Shipped as ``effnet_encoder.safetensors``.
3. ``tower``: a small ``CLIPVisionModelWithProjection`` (224 px, patch 32, projection 16 = Stage C's
   ``c_clip_img``) learns to predict the four attributes of rendered pictures from its
   ``image_embeds`` (a linear head, dropped afterwards), so the embedding carries colours, shape
   and position as CLIP's carries what a picture shows. Shipped as ``image_encoder/`` with CLIP's
   preprocessing in ``feature_extractor/``.
4. ``mapper``: Stage C's diffusion loss on the pairs with clip_img = the tower's embedding of the
   picture (caption "" for most samples, as a variation has no prompt), training ONLY
   ``clip_img_mapper.weight``. Its bias and every other tensor stay bit-identical, so a zero
   embedding (text-to-image, and every unconditional input) gives exactly the previous outputs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor

from models.clip_image import CLIP_MEAN, CLIP_STD
from models.config import EfficientNetConfig
from models.effnet import EfficientNetEncoder
from training import data
from training.diffusion import AdaptiveLossWeight, learning_rate, noised, use_zero_safe_grn_

ENCODER_INPUT = 96  # 32 x the 3 x 3 Stage C latent of a 128 px picture (models/init_image.py)
TOWER_SIZE = 224
# Narrow V2-S structure: one or two layers per stage, a few hundred thousand parameters.
ENCODER = EfficientNetConfig(
    stem=16,
    stages=(
        ("fused", 1, 3, 1, 16, 16, 1),
        ("fused", 4, 3, 2, 16, 24, 2),
        ("fused", 4, 3, 2, 24, 32, 2),
        ("mb", 4, 3, 2, 32, 64, 2),
        ("mb", 4, 3, 1, 64, 80, 1),
        ("mb", 4, 3, 2, 80, 96, 2),
    ),
    head=256,
)


def _log(work: Path, phase: str, message: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} [{phase}] {message}"
    print(line, flush=True)
    with open(work / "image_conditioning.log", "a") as f:
        f.write(line + "\n")


# ------------------------------------------------------------------------------------------ pairs


@torch.inference_mode()
def phase_pairs(out: Path, work: Path, n: int, seed: int) -> None:
    """[n, 16, 3, 3] Stage C latents, [n, 3, 128, 128] uint8 pictures and their captions."""
    from models.demo import load_demo_pipeline
    from models.job_state import Stage
    from models.request import GenerationParams

    pipe = load_demo_pipeline(path=out)
    g = torch.Generator().manual_seed(seed)
    latents, pictures, captions = [], [], []
    started = time.time()
    for first in range(0, n, 64):
        attrs = data.sample_attributes(min(64, n - first), g)
        texts = data.captions_of(attrs)
        requests = [
            GenerationParams.from_defaults(pipe.defaults, t, seed=seed * 100_000 + first + i)
            for i, t in enumerate(texts)
        ]
        states = pipe.start(requests)
        while any(s.stage is Stage.PRIOR for s in states):
            pipe.step(states)
        latents.append(torch.cat([s.conditioning.cond["effnet"] for s in states]))
        pipe.engine.run(states)
        pictures.append(torch.cat([r.images for r in pipe.decode(states)]))
        captions += texts
        _log(work, "pairs", f"{first + len(texts)}/{n} in {time.time() - started:.0f} s")
    torch.save(
        {"latent": torch.cat(latents), "picture": torch.cat(pictures), "caption": captions},
        work / "pairs.pt",
    )


# ---------------------------------------------------------------------------------------- encoder


def encoder_input(pictures: Tensor) -> Tensor:
    """uint8 [B, 3, 128, 128] -> the encoder's input [B, 3, 96, 96] (as models/init_image.py)."""
    x = pictures.float() / 255
    x = F.interpolate(
        x, size=(ENCODER_INPUT,) * 2, mode="bilinear", antialias=True, align_corners=False
    )
    return EfficientNetEncoder.preprocess(x.clamp(0, 1))


def phase_encoder(work: Path, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    pairs = torch.load(work / "pairs.pt")
    inputs, targets = encoder_input(pairs["picture"]), pairs["latent"]
    held = max(16, len(targets) // 10)  # the last pairs are held out
    model = EncoderWithAffineOut(EfficientNetEncoder(ENCODER)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    for step in range(steps):
        idx = torch.randint(0, len(targets) - held, (64,), generator=g)
        loss = F.mse_loss(model(inputs[idx]), targets[idx])
        for group in opt.param_groups:
            group["lr"] = learning_rate(2e-3, step / steps, step, warmup=50)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            _log(work, "encoder", f"step {step} mse {loss.item():.4f}")
    encoder = model.fold().eval()
    with torch.no_grad():
        test = F.mse_loss(encoder(inputs[-held:]), targets[-held:]).item()
        var = targets[-held:].var().item()
    _log(work, "encoder", f"held-out mse {test:.4f} (latent variance {var:.4f})")
    save_file(
        {k: v.contiguous() for k, v in encoder.state_dict().items()},
        work / "effnet_encoder.safetensors",
    )


class EncoderWithAffineOut(torch.nn.Module):
    """Training wrapper: the encoder plus a per-channel affine after its non-affine BatchNorm (the
    official mapper has none), folded into the BatchNorm's running statistics by ``fold``."""

    def __init__(self, encoder: EfficientNetEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        c = encoder.config.c_latent
        self.scale = torch.nn.Parameter(torch.ones(1, c, 1, 1))
        self.shift = torch.nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x) * self.scale + self.shift

    @torch.no_grad()
    def fold(self) -> EfficientNetEncoder:
        """(y - mean) / sqrt(var + eps) * s + t == (y - mean') / sqrt(var' + eps) with
        var' = (var + eps) / s^2 - eps and mean' = mean - t * sqrt(var' + eps)."""
        bn = self.encoder.mapper[1]
        s, t = self.scale.flatten(), self.shift.flatten()
        if bool((s.abs() < 1e-3).any()):
            raise ValueError("an output scale collapsed to zero: cannot fold it")
        std_new = (bn.running_var + bn.eps).sqrt() / s.abs()
        # A negative scale flips the channel: fold its sign into the 1x1 conv before the BatchNorm.
        sign = torch.sign(s)
        self.encoder.mapper[0].weight.mul_(sign.view(-1, 1, 1, 1))
        bn.running_mean.mul_(sign)
        bn.running_var.copy_(std_new.pow(2) - bn.eps)
        bn.running_mean.sub_(t * std_new)
        return self.encoder


# ------------------------------------------------------------------------------------------ tower


def tower_input(images: Tensor) -> Tensor:
    """float [B, 3, 128, 128] in [0, 1] -> CLIP's input [B, 3, 224, 224] (bicubic, normalised)."""
    x = F.interpolate(images, size=(TOWER_SIZE,) * 2, mode="bicubic", align_corners=False).clamp(
        0, 1
    )
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def phase_tower(work: Path, steps: int, seed: int) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=TOWER_SIZE,
        patch_size=32,
        projection_dim=16,
    )
    tower = CLIPVisionModelWithProjection(config).train()
    classes = (
        len(data.COLOUR_NAMES),
        len(data.COLOUR_NAMES),
        len(data.SHAPES),
        len(data.POSITIONS),
    )
    head = torch.nn.Linear(16, sum(classes))
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    for step in range(steps):
        attrs = data.sample_attributes(64, g)
        embeds = tower(pixel_values=tower_input(data.render(attrs, g))).image_embeds
        logits = head(embeds).split(classes, dim=1)
        labels = attrs.stacked().unbind(1)
        loss = sum(F.cross_entropy(lg, lb) for lg, lb in zip(logits, labels, strict=True))
        for group in opt.param_groups:
            group["lr"] = learning_rate(2e-3, step / steps, step, warmup=50)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            right = [
                float((lg.argmax(1) == lb).float().mean())
                for lg, lb in zip(logits, labels, strict=True)
            ]
            _log(work, "tower", f"step {step} loss {loss.item():.3f} fg/bg/shape/pos {right}")
    tower.eval().save_pretrained(work / "image_encoder")
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    CLIPImageProcessorPil().save_pretrained(work / "feature_extractor")  # CLIP's own settings


# ----------------------------------------------------------------------------------------- mapper


def phase_mapper(out: Path, work: Path, steps: int, seed: int) -> None:
    """Train clip_img_mapper.weight of the shipped Stage C; write the new stage_c.safetensors."""
    from models import weights
    from models.clip_image import ClipImageEncoder
    from models.text import TextEncoder

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    pairs = torch.load(work / "pairs.pt")
    clip = ClipImageEncoder.from_pretrained(work)
    pictures = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pairs["picture"]]
    embeds = torch.cat([clip.embed(pictures[i : i + 256]) for i in range(0, len(pictures), 256)])
    text = TextEncoder.from_pretrained(out).encode([""] + list(pairs["caption"]))
    stage_c = use_zero_safe_grn_(
        weights.load_stage_c(out / "stage_c.safetensors", dtype=torch.float32)
    )
    stage_c.train().requires_grad_(False)
    weight = stage_c.clip_img_mapper.weight
    weight.requires_grad_(True)
    before = {k: v.clone() for k, v in stage_c.state_dict().items()}
    opt = torch.optim.AdamW([weight], lr=3e-3, weight_decay=0.0)
    weighting = AdaptiveLossWeight()
    latents = pairs["latent"]
    for step in range(steps):
        idx = torch.randint(0, len(latents), (64,), generator=g)
        # "" for 70% (a variation), the picture's own caption otherwise (prompt + picture).
        rows = torch.where(torch.rand(64, generator=g) < 0.7, 0, idx + 1)
        x_t, eps, r, logsnr = noised(latents[idx], g)
        pred = stage_c(
            x_t,
            r,
            clip_text=text.clip_text[rows],
            clip_text_pooled=text.clip_text_pooled[rows],
            clip_img=embeds[idx],
        )
        per_sample = (pred - eps).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * weighting.weight(logsnr)).mean()
        weighting.update(logsnr, per_sample.detach())
        for group in opt.param_groups:
            group["lr"] = learning_rate(3e-3, step / steps, step, warmup=50)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            _log(work, "mapper", f"step {step} mse {per_sample.mean().item():.4f}")
    after = stage_c.state_dict()
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    if changed != ["clip_img_mapper.weight"]:
        raise RuntimeError(f"only clip_img_mapper.weight may change, changed: {changed}")
    original = load_file(str(out / "stage_c.safetensors"))
    original["clip_img_mapper.weight"] = (
        weight.detach().to(original["clip_img_mapper.weight"].dtype).contiguous()
    )
    save_file(original, work / "stage_c.safetensors")


def export(out: Path, work: Path) -> None:
    """Copy the trained files into ``out`` (the demo model folder)."""
    import shutil

    for name in ("effnet_encoder.safetensors", "stage_c.safetensors"):
        shutil.copy(work / name, out / name)
    for folder in ("image_encoder", "feature_extractor"):
        shutil.rmtree(out / folder, ignore_errors=True)
        shutil.copytree(work / folder, out / folder)
    _log(work, "export", f"wrote {out}: " + json.dumps(sorted(p.name for p in out.iterdir())))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", default="assets/demo-model", help="the demo model folder (read and updated)"
    )
    p.add_argument("--work", default="/tmp/demo-image-train", help="intermediate files and the log")
    p.add_argument(
        "--phase", default="all", choices=("all", "pairs", "encoder", "tower", "mapper", "export")
    )
    p.add_argument("--pairs", type=int, default=1536)
    p.add_argument("--encoder-steps", type=int, default=1000)
    p.add_argument("--tower-steps", type=int, default=600)
    p.add_argument("--mapper-steps", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    phases = (
        ("pairs", "encoder", "tower", "mapper", "export") if args.phase == "all" else (args.phase,)
    )
    for phase in phases:
        started = time.time()
        if phase == "pairs":
            phase_pairs(out, work, args.pairs, args.seed + 1)
        elif phase == "encoder":
            phase_encoder(work, args.encoder_steps, args.seed + 2)
        elif phase == "tower":
            phase_tower(work, args.tower_steps, args.seed + 3)
        elif phase == "mapper":
            phase_mapper(out, work, args.mapper_steps, args.seed + 4)
        else:
            export(out, work)
        _log(work, phase, f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
