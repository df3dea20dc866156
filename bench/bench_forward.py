"""One network forward of Stage C lite and Stage B lite: ours vs diffusers' StableCascadeUNet, same weights.

Setting: a 512x512 output image. Stage C lite runs at latent 12x12 with batch 2 (one CFG pair), Stage B lite at
latent 128x128 with batch 1 (decoder guidance off, as diffusers' default). Random weights, CPU, float32 and
bfloat16. The bfloat16 rows use bf16 weights under ``torch.autocast("cpu", torch.bfloat16)``, as official
inference runs.

Memory: the two implementations share one set of weight tensors. Our official-format state dict is turned
into diffusers names with ``models.convert`` (q/k/v are views of our packed in_proj) and loaded into a
``meta``-built diffusers model with ``assign=True``, so a 1B model costs its weights once. For bf16, our model
is cast and the diffusers model re-pointed at the cast tensors. Runs are interleaved (ours, diffusers, ours,
...) after a warm-up so that load changes on a shared machine hit both sides alike; the median is reported.

Usage: ``python bench/bench_forward.py [--quick] [--repeats N] [--models c,b] [--dtypes fp32,bf16]
[--seed N] [--off SWITCH | --on SWITCH] [--out docs/bench_forward.md]``. ``--off FOLD_KV_MAPPER`` (or another
``models.cpu_kernels`` switch) adds our forward with that optimisation off to the interleaved runs, ``--on``
with one that this CPU leaves off (``--on ONEDNN_FLOAT32_LINEAR`` on an AVX2 CPU): an A/B in one process, on
the same weights. The report names the CPU's kind and which switches it turned on.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from models import convert, cpu_features, cpu_kernels
from models.config import StageBConfig, StageCConfig
from models.stage_b import StageB
from models.stage_c import StageC

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_pair(which: str, seed: int = 0) -> tuple[nn.Module, nn.Module, Callable, Callable]:
    """Our model (random init from ``seed``) and a diffusers model sharing its weights, plus a call for
    each."""
    from diffusers import StableCascadeUNet

    torch.manual_seed(seed)  # the weights; the inputs have their own generator

    if which == "c":
        cfg = StageCConfig.lite()
        ours = StageC(cfg).eval()
        dcfg = convert.stage_c_config_to_diffusers(cfg)
        B, g = 2, torch.Generator().manual_seed(0)
        x = torch.randn(B, 16, 12, 12, generator=g)
        r = torch.rand(B, generator=g)
        txt = torch.randn(B, 77, 1280, generator=g)
        pooled = torch.randn(B, 1, 1280, generator=g)
        img = torch.zeros(B, 1, 768)

        def run_ours(m):
            return m(x, r, txt, pooled, img)

        def run_ref(m):
            return m(x, r, clip_text_pooled=pooled, clip_text=txt, clip_img=img).sample
    else:
        cfg = StageBConfig.lite()
        ours = StageB(cfg).eval()
        dcfg = convert.stage_b_config_to_diffusers(cfg)
        B, g = 1, torch.Generator().manual_seed(0)
        x = torch.randn(B, 4, 128, 128, generator=g)
        r = torch.rand(B, generator=g)
        effnet = torch.randn(B, 16, 12, 12, generator=g)
        pooled = torch.randn(B, 1, 1280, generator=g)

        def run_ours(m):
            return m(x, r, effnet, pooled)

        def run_ref(m):
            return m(x, r, clip_text_pooled=pooled, effnet=effnet).sample

    # Default init leaves GRN gamma/beta at zero; give them values so that no branch is trivially skipped.
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith(("gamma", "beta")):
                p.normal_(0, 0.05)
    with torch.device("meta"):
        ref = StableCascadeUNet(**{k: v for k, v in dcfg.items() if not k.startswith("_")}).eval()
    share_weights(ours, ref)
    return ours, ref, run_ours, run_ref


def share_weights(ours: nn.Module, ref: nn.Module) -> None:
    """Point ``ref``'s parameters at ``ours``' tensors (diffusers names, q/k/v as views): no copy."""
    ref.load_state_dict(convert.unet_official_to_diffusers(ours.state_dict()), strict=True, assign=True)


SWITCHES = (
    "BF16_VIA_FLOAT32", "FOLD_KV_MAPPER", "ONEDNN_FLOAT32_LINEAR", "ONEDNN_SCORE_GEMM", "PREPACK_BF16_WEIGHTS",
    "USE_CPU_BF16_ATTENTION", "USE_ONEDNN_LINEAR",
)


@contextmanager
def switched(switch: tuple[str, bool] | None):
    """``models.cpu_kernels.<name> = value`` inside the block, for ``switch = (name, value)`` (no-op for
    None)."""
    if switch is None:
        yield
        return
    name, value = switch
    saved = getattr(cpu_kernels, name)
    setattr(cpu_kernels, name, value)
    try:
        yield
    finally:
        setattr(cpu_kernels, name, saved)


def cpu_paths() -> str:
    """The CPU's kind and the fast-path switches as this process has them."""
    on = [name for name in SWITCHES if getattr(cpu_kernels, name)]
    off = [name for name in SWITCHES if not getattr(cpu_kernels, name)]
    bf16 = "yes" if cpu_kernels._onednn_bf16 else "no (the bf16 prepack and fold paths do not apply)"
    return (f"{cpu_features.describe()}; oneDNN bf16 kernels: {bf16}; switches on: {', '.join(on)}; "
            f"off: {', '.join(off) or 'none'}")


def time_pair(
    ours, ref, run_ours, run_ref, dtype: torch.dtype, repeats: int, alt: tuple[str, bool] | None = None
) -> dict[str, float]:
    """Warm up both, then ``repeats`` interleaved timed forwards each.

    Returns medians of wall time and of process CPU time (all threads; steadier than wall time when other
    jobs share the cores) for both sides, and the max relative difference of the two outputs. ``alt``
    (name, value): also time ours with that ``models.cpu_kernels`` switch set so ("ours_alt"), interleaved
    with the others, for an A/B of one optimisation in one run.
    """
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
    sides = [("ours", run_ours, ours, None), ("ref", run_ref, ref, None)]
    if alt is not None:
        sides.insert(1, ("ours_alt", run_ours, ours, alt))
    times: dict[str, list[float]] = {k: [] for side, *_ in sides for k in (side, side + "_cpu")}
    with torch.inference_mode(), ctx:
        a, b = run_ours(ours).float(), run_ref(ref).float()  # warm-up, and a sanity check of agreement
        diff = ((a - b).abs().max() / b.abs().max()).item()
        if alt is not None:
            with switched(alt):
                run_ours(ours)  # warm-up of the other path
        for _ in range(repeats):
            for side, fn, model, switch in sides:
                with switched(switch):
                    t0, c0 = time.perf_counter(), time.process_time()
                    fn(model)
                    times[side].append(time.perf_counter() - t0)
                    times[side + "_cpu"].append(time.process_time() - c0)
    result = {k: statistics.median(v) for k, v in times.items()}
    result["diff"] = diff
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 timed repeat instead of 5")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--models", default="c,b", help="comma list of c (Stage C lite), b (Stage B lite)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--out", default=None, help="also write the results table (markdown) to this file")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ab = ap.add_mutually_exclusive_group()
    ab.add_argument("--off", choices=SWITCHES, default=None,
                    help="also time ours with this models.cpu_kernels switch off (A/B in the same run)")
    ab.add_argument("--on", choices=SWITCHES, default=None,
                    help="also time ours with this models.cpu_kernels switch on (A/B in the same run)")
    args = ap.parse_args()
    alt = (args.off, False) if args.off else (args.on, True) if args.on else None
    alt_label = f"{alt[0]} {'on' if alt[1] else 'off'}" if alt else ""
    repeats = args.repeats or (1 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    names = {"c": "Stage C lite, B=2, latent 12x12", "b": "Stage B lite, B=1, latent 128x128"}

    rows = []
    for which in args.models.split(","):
        ours, ref, run_ours, run_ref = build_pair(which, args.seed)
        for dname in args.dtypes.split(","):
            dtype = dtypes[dname]
            if dtype != torch.float32:
                ours.to(dtype)
                share_weights(ours, ref)  # drops diffusers' references to the float32 tensors
                gc.collect()
            t = time_pair(ours, ref, run_ours, run_ref, dtype, repeats, alt)
            rows.append((names[which], dname, t))
            print(f"{names[which]:34s} {dname:5s} wall: ours {t['ours']:7.3f} s, diffusers "
                  f"{t['ref']:7.3f} s, ratio {t['ours'] / t['ref']:5.2f} | cpu: ours {t['ours_cpu']:7.3f} s, "
                  f"diffusers {t['ref_cpu']:7.3f} s, ratio {t['ours_cpu'] / t['ref_cpu']:5.2f} | "
                  f"max rel diff {t['diff']:.1e}", flush=True)
            if alt:
                print(f"{'':34s} {'':5s} wall: ours with {alt_label} {t['ours_alt']:7.3f} s, ratio "
                      f"{t['ours_alt'] / t['ref']:5.2f} | cpu {t['ours_alt_cpu']:7.3f} s", flush=True)
        del ours, ref
        gc.collect()

    header = (
        "| forward (512x512 image) | dtype | ours wall (s) | diffusers wall (s) | ratio wall "
        "| ours CPU (s) | diffusers CPU (s) | ratio CPU | max rel. diff |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {n} | {d} | {t['ours']:.3f} | {t['ref']:.3f} | {t['ours'] / t['ref']:.2f} "
        f"| {t['ours_cpu']:.3f} | {t['ref_cpu']:.3f} | {t['ours_cpu'] / t['ref_cpu']:.2f} | {t['diff']:.1e} |"
        for n, d, t in rows
    ]
    if alt:
        header = header.replace("| max rel. diff |", f"| max rel. diff | ours, {alt_label}, wall (s) | ratio |")
        header += "---|---|"
        lines = [
            line + f" {t['ours_alt']:.3f} | {t['ours_alt'] / t['ref']:.2f} |"
            for line, (_, _, t) in zip(lines, rows)
        ]
    table = "\n".join([header, *lines])
    machine = (f"CPU: {cpu_model()}, {os.cpu_count()} cores visible, torch {torch.__version__} "
               f"({torch.get_num_threads()} threads); median of {repeats} interleaved repeat(s) after 1 warm-up; "
               f"1-min load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end\n"
               f"CPU paths: {cpu_paths()}")
    print()
    print(table)
    print(machine)
    if args.out:
        Path(args.out).write_text(f"{table}\n\n{machine}\n")


if __name__ == "__main__":
    main()
