"""Train the built-in demo model: a tiny Stable Cascade that draws coloured shapes, on the CPU, in about an hour.

Command (from the repository root; about 80 minutes of wall time on 2 cores)::

    nice -n 19 python -m training.train_demo --out assets/demo-model

Phases (each a single-threaded process; two run side by side, so two cores are used):

1. text (seconds): the offline word-level CLIP tokenizer and the frozen, randomly initialised CLIP text tower
   (``training.text_tower``), saved to ``<out>/tokenizer`` and ``<out>/text_encoder``.
2. Stage A and the semantic encoder, side by side (``--minutes-a`` 8 min / ``--minutes-encoder`` 12 min):
   - Stage A: AdamW lr 2e-3, cosine, batch 32 random 64 x 64 crops of 128 px renders, L1 + MSE. Then its BatchNorm
     statistics are recomputed over 2048 renders and the latent's per-channel mean/std are folded into the weights,
     so that latents (BatchNorm output / 0.43, the scale the weight loader assumes) have mean 0 and std 1.
   - Semantic encoder: AdamW lr 1e-3, batch 64, MSE of a 48 px reconstruction + 0.1 x attribute cross-entropy,
     latent noise std 0.1; then BatchNorm statistics recomputed; frozen.
3. Stages B and C, side by side (``--minutes-b`` / ``--minutes-c``, 60 min each, including the pre-computation of
   their training latents): eps prediction at t ~ U(0, 1) on the cosine schedule (shift 1), the network's r from
   the noise condition, the adaptive loss weight (100 logSNR buckets, beta 0.95), AdamW (0.9, 0.99), weight decay
   0.01, grad clip 1, batch 64, 200 warm-up steps then cosine decay, EMA 0.998.
   - Stage B (lr 1e-3): 12288 pre-computed renders (Stage A latents 4 x 32 x 32 + semantic latents 16 x 3 x 3);
     captions replaced by "" 20% of the time; the semantic latent gets noise of std U(0, 0.2) and is zeroed 10% of
     the time (the unconditional input of guidance).
   - Stage C (lr 1e-3): 32768 pre-computed semantic latents; captions replaced by "" 10% of the time; image
     embedding zeros.
   Both train with ``ZeroSafeGlobalResponseNorm`` (``training.diffusion``): the same forward as the inference GRN
   with a finite gradient for all-zero channels, which otherwise turn the run into NaN after a few hundred steps.
4. export: official-style flat safetensors files (``stage_a/b/c.safetensors``, float32, EMA weights for B and C)
   and ``demo.json`` with the demo's sampling defaults; then the prompt-adherence score of the result is printed.

Measured for the shipped weights (2 shared cores, nice 19): Stage A 891 steps in 8 min (PSNR 28.1 dB), encoder 1,064
steps in 12 min, Stage B 11,900 steps (~290 ms/step) and Stage C 9,785 steps (~340 ms/step) in 58 / 56 min; details
and prompt-adherence figures in docs/demo_model.md.

Reproducibility: everything is seeded (``--seed``). Each phase stops at its step count or its time budget,
whichever comes first, and its learning-rate schedule follows whichever of the two is further along
(progress = max(step / steps, elapsed / budget)). With budgets that do not bind (e.g. ``--minutes-scale 100``) a run
is exactly repeatable; with binding budgets (the default on a busy machine) the step counts depend on the speed.
Checkpoints go to ``--work`` every few minutes, so an interrupted run still leaves a usable phase result;
``--phase`` runs one phase alone (the default ``all`` runs them in order). Progress logs: ``--log-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from models.stage_a import StageA
from models.stage_b import StageB
from models.stage_c import StageC
from models.text import TextEncoder
from training import data
from training.demo_configs import STAGE_A, STAGE_B, STAGE_C
from training.diffusion import (
    AdaptiveLossWeight,
    Ema,
    init_unet_,
    learning_rate,
    noised,
    use_zero_safe_grn_,
)
from training.semantic_encoder import EncoderTrainingHeads, SemanticEncoder
from training.text_tower import build_text_model, build_word_tokenizer

REPO = Path(__file__).resolve().parent.parent
STAGE_A_SCALE = 0.43  # what the loader assumes for an official-layout stage_a file
CHECKPOINT_EVERY_S = 180.0

DEMO_DEFAULTS = {
    "width": 128,
    "height": 128,
    "prior_steps": 20,
    "prior_guidance_scale": 4.0,
    "prior_shift": 2.0,
    "decoder_steps": 10,
    "decoder_guidance_scale": 1.5,
    "decoder_shift": 1.0,
    "cfg_rho": 0.7,
}
DEMO_LIMITS = {"min_size": 64, "max_size": 512}
# The captions of training/data.py in the grammar of models/demo_vocabulary.py: what the model knows.
DEMO_PROMPTS = {
    "grammar": "a {colour} {" + "|".join(data.SHAPES) + "} ["
    + "|".join(phrase for phrase in data.POSITION_PHRASE.values() if phrase)
    + "]on a {colour} background",
    "slots": {"colour": list(data.COLOUR_NAMES)},
    "distinct": ["colour"],  # a caption's shape and background colours always differ
}


class Log:
    """Appends time-stamped lines to ``<log_dir>/<phase>.log`` (and prints them)."""

    def __init__(self, log_dir: Path, phase: str) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / f"{phase}.log"
        self.phase = phase
        self.start = time.time()

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} [{self.phase} {time.time() - self.start:7.1f}s] {message}"
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


class Budget:
    """Stop rule and schedule position of a phase: ``steps`` or ``minutes``, whichever comes first."""

    def __init__(self, steps: int, minutes: float) -> None:
        self.steps, self.seconds, self.start = steps, minutes * 60.0, time.time()

    def progress(self, step: int) -> float:
        return max(step / self.steps, (time.time() - self.start) / self.seconds)

    def done(self, step: int) -> bool:
        return step >= self.steps or time.time() - self.start >= self.seconds


def _adamw(params, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _optimizer_step(opt: torch.optim.Optimizer, params, loss: torch.Tensor, lr: float) -> None:
    """One AdamW step at learning rate ``lr`` with the gradient norm clipped to 1."""
    _set_lr(opt, lr)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _save(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ phases


def phase_text(out: Path, log: Log) -> None:
    tokenizer = build_word_tokenizer(data.vocabulary())
    model = build_text_model(tokenizer)
    tokenizer.save_pretrained(out / "tokenizer")
    model.save_pretrained(out / "text_encoder")
    log(f"text tower saved: vocabulary {len(tokenizer)} tokens, {sum(p.numel() for p in model.parameters())} params")


def phase_stage_a(work: Path, log: Log, steps: int, minutes: float, seed: int) -> None:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = StageA(STAGE_A).train()
    opt = _adamw(model.parameters(), 2e-3)
    budget, step, last_save = Budget(steps, minutes), 0, time.time()
    while not budget.done(step):
        images = data.render(data.sample_attributes(32, g), g)
        ox, oy = torch.randint(0, 65, (2, 32), generator=g).tolist()
        crops = torch.stack([im[:, y:y + 64, x:x + 64] for im, x, y in zip(images, ox, oy)])
        recon = model(crops)
        loss = F.l1_loss(recon, crops) + F.mse_loss(recon, crops)
        _optimizer_step(opt, model.parameters(), loss, learning_rate(2e-3, budget.progress(step), step, warmup=100))
        step += 1
        if step % 50 == 0:
            log(f"step {step} loss {loss.item():.5f} lr {opt.param_groups[0]['lr']:.2e}")
        if time.time() - last_save > CHECKPOINT_EVERY_S:
            _save({"model": model.state_dict(), "step": step}, work / "stage_a_raw.pt")
            last_save = time.time()
    log(f"trained {step} steps")
    model.eval()
    _finalize_stage_a(model, g, log)
    _save({"model": model.state_dict(), "step": step}, work / "stage_a.pt")


@torch.no_grad()
def _finalize_stage_a(model: StageA, g: torch.Generator, log: Log) -> None:
    """Recompute BatchNorm statistics over 2048 renders, then fold the latent's per-channel mean and std into the
    BatchNorm affine and the decoder's first conv (exactly compensated), so that encode() gives mean 0, std 1."""
    bn = model.down_blocks[-1][1]
    pre = torch.cat([
        model.down_blocks[:-1](model.in_block(data.render(data.sample_attributes(128, g), g)))
        for _ in range(16)
    ])
    feat = model.down_blocks[-1][0](pre)  # [N, 4, 32, 32] before BatchNorm
    bn.running_mean.copy_(feat.mean((0, 2, 3)))
    bn.running_var.copy_(feat.var((0, 2, 3)))
    y = bn(feat)
    m, s = y.mean((0, 2, 3)), y.std((0, 2, 3))
    k = STAGE_A_SCALE / s  # new BN output y' = (y - m) * k, so y' / 0.43 has unit std
    bn.weight.mul_(k)
    bn.bias.sub_(m).mul_(k)
    conv = model.up_blocks[0][0]  # receives y' (latent * scale_factor); must see y = y' / k + m
    conv.bias.add_(conv.weight[:, :, 0, 0] @ m)
    conv.weight.div_(k.view(1, -1, 1, 1))
    images = data.render(data.sample_attributes(256, g), g)
    latent = model.encode(images)
    mse = F.mse_loss(model.decode(latent).clamp(0, 1), images).item()
    log(f"latent mean {latent.mean((0, 2, 3)).tolist()} std {latent.std((0, 2, 3)).tolist()}; "
        f"PSNR {10 * math.log10(1 / mse):.2f} dB at 128 px")


def phase_encoder(work: Path, log: Log, steps: int, minutes: float, seed: int) -> None:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    enc, heads = SemanticEncoder().train(), EncoderTrainingHeads().train()
    params = list(enc.parameters()) + list(heads.parameters())
    opt = _adamw(params, 1e-3)
    budget, step, last_save = Budget(steps, minutes), 0, time.time()
    while not budget.done(step):
        attrs = data.sample_attributes(64, g)
        images = data.render(attrs, g)
        latent = enc(images)
        latent = latent + 0.1 * torch.randn(latent.shape, generator=g)
        target = F.interpolate(images, size=(48, 48), mode="bilinear", antialias=True, align_corners=False) * 2 - 1
        recon_loss = F.mse_loss(heads.decode(latent), target)
        labels = attrs.stacked()
        ce = sum(F.cross_entropy(logits, labels[:, i]) for i, logits in enumerate(heads.classify(latent)))
        loss = recon_loss + 0.1 * ce
        _optimizer_step(opt, params, loss, learning_rate(1e-3, budget.progress(step), step, warmup=100))
        step += 1
        if step % 50 == 0:
            log(f"step {step} recon {recon_loss.item():.5f} ce {float(ce):.4f} lr {opt.param_groups[0]['lr']:.2e}")
        if time.time() - last_save > CHECKPOINT_EVERY_S:
            _save({"model": enc.state_dict(), "step": step}, work / "encoder_raw.pt")
            last_save = time.time()
    log(f"trained {step} steps")
    with torch.no_grad():  # population statistics for the affine-free BatchNorm
        enc.eval()
        feats = torch.cat([enc.to_latent(enc.features(
            F.interpolate(data.render(data.sample_attributes(128, g), g), size=(96, 96), mode="bilinear",
                          antialias=True, align_corners=False) * 2 - 1)) for _ in range(16)])
        enc.norm.running_mean.copy_(feats.mean((0, 2, 3)))
        enc.norm.running_var.copy_(feats.var((0, 2, 3)))
        attrs = data.sample_attributes(512, g)
        logits = heads.classify(enc(data.render(attrs, g)))
        acc = [(lo.argmax(1) == attrs.stacked()[:, i]).float().mean().item() for i, lo in enumerate(logits)]
        log(f"attribute head accuracy (fg, bg, shape, position) on fresh renders: {acc}")
    _save({"model": enc.state_dict(), "step": step}, work / "encoder.pt")


def _load_frozen(work: Path) -> tuple[StageA, SemanticEncoder]:
    stage_a = StageA(STAGE_A)
    stage_a.load_state_dict(torch.load(work / "stage_a.pt")["model"])
    enc = SemanticEncoder()
    enc.load_state_dict(torch.load(work / "encoder.pt")["model"])
    return stage_a.eval().requires_grad_(False), enc.eval().requires_grad_(False)


def _caption_table(out: Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Embeddings of "" (row 0) and every caption (rows 1..504), with the shipped text tower:
    clip_text [505, 77, 64], clip_text_pooled [505, 1, 64], and caption -> row."""
    encoder = TextEncoder.from_pretrained(out)
    captions = data.all_captions()
    emb = encoder.encode([""] + captions)
    return emb.clip_text, emb.clip_text_pooled, {c: i + 1 for i, c in enumerate(captions)}


@torch.no_grad()
def _precompute(n: int, g: torch.Generator, stage_a: StageA | None, enc: SemanticEncoder,
                rows: dict[str, int], log: Log) -> dict[str, torch.Tensor]:
    """Render ``n`` pictures in chunks; keep their semantic latents, caption rows and (with ``stage_a``) latents."""
    out: dict[str, list[torch.Tensor]] = {"semantic": [], "caption": [], "stage_a": []}
    for start in range(0, n, 256):
        attrs = data.sample_attributes(min(256, n - start), g)
        images = data.render(attrs, g)
        out["semantic"].append(enc(images))
        out["caption"].append(torch.tensor([rows[c] for c in data.captions_of(attrs)]))
        if stage_a is not None:
            out["stage_a"].append(stage_a.encode(images))
    log(f"pre-computed {n} training pictures")
    return {k: torch.cat(v) for k, v in out.items() if v}


def _train_unet(name: str, model: torch.nn.Module, batch_fn, work: Path, log: Log, steps: int, minutes: float,
                lr: float, g: torch.Generator) -> None:
    """The shared diffusion loop of Stages B and C. ``batch_fn(g)`` -> (x0, conditions dict)."""
    opt = _adamw(model.parameters(), lr)
    ema, weighting = Ema(model), AdaptiveLossWeight()
    budget, step, last_save, running = Budget(steps, minutes), 0, time.time(), 0.0
    while not budget.done(step):
        x0, cond = batch_fn(g)
        x_t, eps, r, logsnr = noised(x0, g)
        pred = model(x_t, r, **cond)
        per_sample = (pred - eps).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * weighting.weight(logsnr)).mean()
        weighting.update(logsnr, per_sample)
        _optimizer_step(opt, model.parameters(), loss, learning_rate(lr, budget.progress(step), step))
        ema.update(model)
        step += 1
        running = 0.98 * running + 0.02 * per_sample.mean().item() if step > 1 else per_sample.mean().item()
        if step % 50 == 0:
            log(f"step {step} mse {running:.4f} weighted {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{(time.time() - budget.start) / step * 1000:.0f} ms/step")
        if time.time() - last_save > CHECKPOINT_EVERY_S:
            _save({"ema": ema.state_dict(), "step": step}, work / f"{name}.pt")
            last_save = time.time()
    log(f"trained {step} steps")
    _save({"ema": ema.state_dict(), "step": step}, work / f"{name}.pt")


def _unet_data(out: Path, work: Path, log: Log, seed: int, n_data: int, with_stage_a: bool
               ) -> tuple[torch.Generator, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Seeds the phase, then returns its generator, the pre-computed training data (Stage A latents only
    ``with_stage_a``) and the caption embedding table (text, pooled)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    stage_a, enc = _load_frozen(work)
    text, pooled, rows = _caption_table(out)
    d = _precompute(n_data, g, stage_a if with_stage_a else None, enc, rows, log)
    return g, d, text, pooled


def phase_stage_b(out: Path, work: Path, log: Log, steps: int, minutes: float, seed: int, n_data: int) -> None:
    start = time.time()
    g, d, _, pooled = _unet_data(out, work, log, seed, n_data, with_stage_a=True)
    model = use_zero_safe_grn_(init_unet_(StageB(STAGE_B), seed)).train()

    def batch(g: torch.Generator):
        idx = torch.randint(0, d["stage_a"].shape[0], (64,), generator=g)
        caption = torch.where(torch.rand(64, generator=g) < 0.2, 0, d["caption"][idx])
        sem = d["semantic"][idx]
        sem = sem + 0.2 * torch.rand(64, 1, 1, 1, generator=g) * torch.randn(sem.shape, generator=g)
        sem = sem * (torch.rand(64, 1, 1, 1, generator=g) >= 0.1)
        return d["stage_a"][idx], {"effnet": sem, "clip": pooled[caption]}

    remaining = minutes - (time.time() - start) / 60
    _train_unet("stage_b", model, batch, work, log, steps, remaining, 1e-3, g)


def phase_stage_c(out: Path, work: Path, log: Log, steps: int, minutes: float, seed: int, n_data: int) -> None:
    start = time.time()
    g, d, text, pooled = _unet_data(out, work, log, seed, n_data, with_stage_a=False)
    model = use_zero_safe_grn_(init_unet_(StageC(STAGE_C), seed)).train()
    clip_img = torch.zeros(64, 1, STAGE_C.c_clip_img)

    def batch(g: torch.Generator):
        idx = torch.randint(0, d["semantic"].shape[0], (64,), generator=g)
        caption = torch.where(torch.rand(64, generator=g) < 0.1, 0, d["caption"][idx])
        return d["semantic"][idx], {"clip_text": text[caption], "clip_text_pooled": pooled[caption],
                                    "clip_img": clip_img}

    remaining = minutes - (time.time() - start) / 60
    _train_unet("stage_c", model, batch, work, log, steps, remaining, 1e-3, g)


def export(out: Path, work: Path, log: Log) -> None:
    """Write the official-layout flat files and demo.json into ``out``."""
    stage_a = torch.load(work / "stage_a.pt")["model"]
    files = {
        "stage_a.safetensors": stage_a,
        "stage_b.safetensors": torch.load(work / "stage_b.pt")["ema"],
        "stage_c.safetensors": torch.load(work / "stage_c.pt")["ema"],
    }
    for name, state in files.items():
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / name))
        log(f"wrote {out / name} ({(out / name).stat().st_size / 1e6:.2f} MB)")
    meta = {
        "name": "demo-shapes",
        "demo": True,
        "description": "Tiny Stable Cascade (Stages A, B, C and a 64-wide CLIP text tower, 4.4 M parameters) "
                       "trained on synthetic pictures of one coloured shape on a plain background. Prompts: "
                       "'a {colour} {circle|square|triangle} [at the left |at the right ]on a {colour} background' "
                       "with colours red, green, blue, yellow, white, black, purple, orange. 128 px. "
                       "Optional live previews: previewer.safetensors (Stage C latent -> RGB at 8x, "
                       "training/train_previewer.py).",
        "trained_by": "python -m training.train_demo --out assets/demo-model",
        "defaults": DEMO_DEFAULTS,
        "limits": DEMO_LIMITS,
        "prompts": DEMO_PROMPTS,
    }
    (out / "demo.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"wrote {out / 'demo.json'}")


# ------------------------------------------------------------------------------------------------ driver


def _spawn(args: argparse.Namespace, phase: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "training.train_demo", "--phase", phase] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "phase"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL)


def _run_parallel(args: argparse.Namespace, phases: list[str], log: Log) -> None:
    procs = [(p, _spawn(args, p)) for p in phases]
    for phase, proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"phase {phase} failed (exit {proc.returncode}); see {args.log_dir}/{phase}.log")
        log(f"phase {phase} finished")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="assets/demo-model", help="where the model files go")
    p.add_argument("--work", default="/tmp/demo-model-train/work", help="intermediate checkpoints")
    p.add_argument("--log-dir", default="/tmp/demo-model-train/logs", help="one progress log per phase")
    p.add_argument("--phase", default="all",
                   choices=["all", "text", "stage_a", "encoder", "stage_b", "stage_c", "export", "eval"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes-a", type=float, default=8.0)
    p.add_argument("--minutes-encoder", type=float, default=12.0)
    p.add_argument("--minutes-b", type=float, default=60.0)
    p.add_argument("--minutes-c", type=float, default=60.0)
    p.add_argument("--minutes-scale", type=float, default=1.0, help="multiplies every time budget")
    p.add_argument("--steps-a", type=int, default=3000)
    p.add_argument("--steps-encoder", type=int, default=3000)
    p.add_argument("--steps-b", type=int, default=14000)
    p.add_argument("--steps-c", type=int, default=24000)
    p.add_argument("--data-b", type=int, default=12288, help="pre-computed training pictures for Stage B")
    p.add_argument("--data-c", type=int, default=32768, help="pre-computed training pictures for Stage C")
    args = p.parse_args(argv)
    out, work, log_dir = Path(args.out), Path(args.work), Path(args.log_dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # one core per process: two phases share the machine's two cores
    log = Log(log_dir, args.phase)
    scale = args.minutes_scale
    if args.phase == "all":
        phase_text(out, log)
        _run_parallel(args, ["stage_a", "encoder"], log)
        _run_parallel(args, ["stage_b", "stage_c"], log)
        export(out, work, log)
        _evaluate(out, log)
    elif args.phase == "text":
        phase_text(out, log)
    elif args.phase == "stage_a":
        phase_stage_a(work, log, args.steps_a, args.minutes_a * scale, args.seed + 1)
    elif args.phase == "encoder":
        phase_encoder(work, log, args.steps_encoder, args.minutes_encoder * scale, args.seed + 2)
    elif args.phase == "stage_b":
        phase_stage_b(out, work, log, args.steps_b, args.minutes_b * scale, args.seed + 3, args.data_b)
    elif args.phase == "stage_c":
        phase_stage_c(out, work, log, args.steps_c, args.minutes_c * scale, args.seed + 4, args.data_c)
    elif args.phase == "export":
        export(out, work, log)
    elif args.phase == "eval":
        _evaluate(out, log)


def _evaluate(out: Path, log: Log) -> None:
    from models.demo import load_demo_pipeline
    from training.evaluate import evaluate_pipeline

    scores = evaluate_pipeline(load_demo_pipeline(path=out))
    log("prompt adherence: " + ", ".join(f"{k} {v:.1%}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
