"""CUDA checks and benchmarks in one run: correctness on the GPU first, then speed at the released sizes.

Made for a short lease of a GPU machine: every section runs on its own (a failure is reported and the next
section still runs), results are appended to a markdown report as they come, and the table is printed last.

Correctness (float32 comparisons with TF32 off, so they measure our code, not the matrix units' rounding):
- tiny pipeline: CUDA float32 vs CPU float32 images; CUDA bfloat16 (autocast, the GPU default) vs CPU float32;
- batch invariance on CUDA: a request alone vs inside a batch of 4 with other prompts, seeds and guidance;
- our Stage C / Stage B (tiny configs) vs diffusers' StableCascadeUNet with the same weights on CUDA, float32;
- the built-in demo model through the HTTP service on CUDA vs the same request through the CPU pipeline.

Speed (random weights at the released sizes, bfloat16; CUDA events / synchronised wall clock, medians):
- one forward at a 1024x1024 image: ours (bf16 weights under autocast, the official setting) vs diffusers
  StableCascadeUNet sharing the same weight tensors (plain bf16 as diffusers pipelines run, and under autocast);
- end to end at 1024x1024 (Stage C 20 steps CFG 4, Stage B 10 steps without CFG, Stage A): our pipeline vs
  diffusers' StableCascadeCombinedPipeline on the same weights, batch 1 and 4, with per-stage times and peak
  memory;
- loading a lite bfloat16 official file onto the GPU vs reading its bytes;
- static vs continuous batching of a stream of 16 requests, up to 8 images per forward
  (``bench/cuda_scheduling.py``).

    python bench/bench_cuda.py [--out DIR] [--quick] [--sections a,b,...] [--device cuda]

``--device cpu --tiny`` runs every section with tiny networks on the CPU (a check of the script itself).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from models import convert
from models.config import StageAConfig, StageBConfig, StageCConfig
from models.cuda_graphs import GraphCache
from models.pipeline import CascadePipeline, Limits
from models.request import GenerationParams, NonFiniteOutput
from models.stage_a import StageA
from models.stage_b import StageB
from models.stage_c import StageC
from models.text import TextEncoder, build_byte_tokenizer, random_clip_text_model
from models.tiny import build_tiny_pipeline

from cuda_scheduling import bench_scheduling


class Report:
    """Markdown lines, appended to ``path`` as they come (a killed run keeps what it measured)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []
        path.write_text("")

    def add(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
            self.lines.append(line)
        with self.path.open("a") as f:
            f.write("\n".join(lines) + "\n")


def rel(a: Tensor, b: Tensor) -> float:
    """max|a - b| / max|b| in float64."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def strict_fp32(enabled: bool) -> None:
    """TF32 off for the float32 comparisons (on for speed, as PyTorch's defaults have it for convolutions)."""
    torch.backends.cuda.matmul.allow_tf32 = not enabled
    torch.backends.cudnn.allow_tf32 = not enabled


# ------------------------------------------------------------------------------------------ correctness


def params(prompt: str, seed: int, **kw) -> GenerationParams:
    base = dict(width=128, height=128, prior_steps=6, decoder_steps=4)
    return GenerationParams(prompt=prompt, seed=seed, **{**base, **kw})


def images_of(pipe: CascadePipeline, batch: list[GenerationParams]) -> list[Tensor]:
    out = pipe.generate(batch)
    for r in out.results:
        if isinstance(r, NonFiniteOutput):
            raise r
    return [r.images.float() for r in out.results]


def check_tiny_pipeline(rep: Report, device: torch.device) -> None:
    """CUDA vs CPU images of the tiny random pipeline, and batch invariance on CUDA."""
    strict_fp32(True)
    req = [params("a red circle", 3, num_images=2), params("a blue square", 11, prior_guidance_scale=6.0)]
    cpu = images_of(build_tiny_pipeline(0, "cpu"), req)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        pipe = build_tiny_pipeline(0, device)
        pipe.dtype = dtype  # autocast dtype; weights stay float32 as the tiny pipeline builds them
        pipe.text_encoder.model.to(dtype)
        got = images_of(pipe, req)
        diff = max((g - c).abs().max().item() for g, c in zip(got, cpu, strict=True))
        mean = statistics.mean((g - c).abs().mean().item() for g, c in zip(got, cpu, strict=True))
        # batch invariance on this device: request 0 alone vs inside a batch of 4 mixed requests
        alone = images_of(pipe, req[:1])[0]
        mixed = [
            params("green triangle", 5, negative_prompt="blurry"),
            req[0],
            params("", 7, prior_guidance_scale=1.0),
            params("yellow star", 9, num_images=3, cfg_rho=0.0),
        ]
        inside = images_of(pipe, mixed)[1]
        inv = (alone - inside).abs().max().item()
        rows.append(f"| tiny pipeline, {str(dtype)[6:]} on {device.type} | max {diff:.0f} / mean {mean:.3f} "
                    f"(0-255 levels) | {inv:.0f} |")
    rep.add("", "### Tiny pipeline: this device vs the CPU (float32), and batch invariance", "",
            "| run | image difference vs CPU float32 | alone vs in a batch of 4: max difference (levels) |",
            "|---|---|---|", *rows)


def check_unet_parity(rep: Report, device: torch.device) -> None:
    """Our Stage C / B (tiny) vs diffusers StableCascadeUNet with the same weights, float32 on ``device``."""
    from diffusers import StableCascadeUNet

    from models.tiny import randomize_

    strict_fp32(True)
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, net in (("Stage C (tiny)", StageC(StageCConfig.tiny())), ("Stage B (tiny)", StageB(StageBConfig.tiny()))):
        randomize_(net, 5, 0.05)
        dcfg = (convert.stage_c_config_to_diffusers if isinstance(net, StageC) else
                convert.stage_b_config_to_diffusers)(net.config)
        ref = StableCascadeUNet(**{k: v for k, v in dcfg.items() if not k.startswith("_")})
        ref.load_state_dict(convert.unet_official_to_diffusers(net.state_dict()), strict=True)
        net, ref = net.to(device).eval(), ref.to(device).eval()
        c = net.config
        if isinstance(net, StageC):
            x = torch.randn(2, c.c_in, 8, 8, generator=g)
            kw = dict(clip_text=torch.randn(2, 77, c.c_clip_text, generator=g),
                      clip_text_pooled=torch.randn(2, 1, c.c_clip_text_pooled, generator=g),
                      clip_img=torch.randn(2, 1, c.c_clip_img, generator=g))
        else:
            x = torch.randn(2, c.c_in, 32, 32, generator=g)
            kw = dict(effnet=torch.randn(2, c.c_effnet, 8, 8, generator=g),
                      clip_text_pooled=torch.randn(2, 1, c.c_clip, generator=g))
        r = torch.rand(2, generator=g)
        x, r, kw = x.to(device), r.to(device), {k: v.to(device) for k, v in kw.items()}
        with torch.no_grad():
            ref_out = ref(x, r, **kw).sample
            ours = net(x, r, **kw) if isinstance(net, StageC) else net(x, r, kw["effnet"], kw["clip_text_pooled"])
        rows.append(f"| {name} | {rel(ours, ref_out):.1e} |")
    rep.add("", f"### Parity with diffusers StableCascadeUNet on {device.type}, float32 (bar < 1e-5)", "",
            "| network | max abs diff / max abs ref |", "|---|---|", *rows)


def check_service(rep: Report, device: torch.device) -> None:
    """The built-in demo model served over HTTP on ``device`` (CUDA graphs on and off) vs the CPU
    pipeline, same requests; then with stage overlap, among other requests."""
    import io

    import httpx
    import numpy as np
    from PIL import Image
    from server_process import ServerProcess

    from models.demo import load_demo_pipeline

    body = {"prompt": "a red circle on the left of a blue square", "seed": 42, "response_format": "png"}
    pipe = load_demo_pipeline(device="cpu")
    cpu_img = pipe.generate([GenerationParams.from_defaults(pipe.defaults, body["prompt"], seed=42)])
    cpu_img = cpu_img.results[0].images[0].permute(1, 2, 0).float()
    lines, images = [], {}
    for graphs in ("true", "false"):
        with ServerProcess({"CASCADE_DEVICE": device.type, "CASCADE_CUDA_GRAPHS": graphs}) as server:
            t0 = time.perf_counter()
            resp = httpx.post(f"{server.url}/v1/generate", json=body, timeout=120)
            first = time.perf_counter() - t0
            assert resp.status_code == 200, (resp.status_code, resp.text[:500])
            images[graphs] = torch.from_numpy(np.array(Image.open(io.BytesIO(resp.content)))).float()
            t0 = time.perf_counter()
            n_ok = sum(httpx.post(f"{server.url}/v1/generate", json={**body, "seed": s}, timeout=120).status_code
                       == 200 for s in range(8))
            per_req = (time.perf_counter() - t0) / 8
            metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
            info = httpx.get(f"{server.url}/health/ready", timeout=10).json().get("model")
        gpu = [line for line in metrics.splitlines() if line.startswith("cascade_gpu_memory")]
        diff = (images[graphs] - cpu_img).abs()
        lines += [f"- CASCADE_CUDA_GRAPHS={graphs}: first request 200 in {first:.2f} s, then {n_ok}/8 more 200s at "
                  f"{per_req * 1000:.0f} ms each (sequential); image vs the CPU pipeline's: max {diff.max():.0f}, "
                  f"mean {diff.mean():.3f} levels",
                  f"  - model: {info}", f"  - GPU memory gauges: {' ; '.join(gpu) or 'NONE'}"]
    same = torch.equal(images["true"], images["false"])
    lines.append(served_with_stage_overlap(device, body, images["true"]))
    rep.add("", f"### Built-in demo model over HTTP on {device.type}", "", *lines,
            f"- image with graphs = image without: {'yes' if same else 'NO'}")


def served_with_stage_overlap(device: torch.device, body: dict, reference: torch.Tensor) -> str:
    """CASCADE_STAGE_OVERLAP=true: ``body`` among 7 other requests sent 50 ms apart (so that some
    are in Stage B while others are in Stage C), its image against ``reference`` (the same request
    alone, graphs on); how many iterations overlapped."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import numpy as np
    from PIL import Image
    from server_process import ServerProcess

    settings = {"CASCADE_DEVICE": device.type, "CASCADE_STAGE_OVERLAP": "true"}
    with ServerProcess(settings) as server, ThreadPoolExecutor(8) as pool:
        futures = []
        for s in range(8):
            futures.append(pool.submit(httpx.post, f"{server.url}/v1/generate",
                                       json={**body, "seed": 42 + s}, timeout=300))
            time.sleep(0.05)
        responses = [f.result() for f in futures]
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    ok = sum(r.status_code == 200 for r in responses)
    overlapped = [line for line in metrics.splitlines() if line.startswith("cascade_overlapped_steps_total")]
    if responses[0].status_code != 200:
        return f"- CASCADE_STAGE_OVERLAP=true: {ok}/8 200s; first: {responses[0].status_code} {responses[0].text[:300]}"
    mine = torch.from_numpy(np.array(Image.open(io.BytesIO(responses[0].content)))).float()
    diff = (mine - reference).abs()
    return (f"- CASCADE_STAGE_OVERLAP=true, 8 requests 50 ms apart: {ok}/8 200s, {'; '.join(overlapped) or 'NO METRIC'}; "
            f"seed 42's image vs alone: max {diff.max():.0f}, mean {diff.mean():.3f} levels")


# --------------------------------------------------------------------------------------------- speed


def random_(module: nn.Module, seed: int) -> nn.Module:
    """Fill parameters in place, on their device: N(0, 1/fan_in) matrices, N(0, 0.02) vectors, so that
    activations stay O(1) through deep stacks and no block is trivially the identity."""
    g = torch.Generator(next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.ndim >= 2 else 0
            std = fan_in**-0.5 if fan_in > 1 else 0.02
            p.normal_(0, std, generator=g)
    return module


def build_networks(size: str, device: torch.device, tiny: bool) -> tuple[StageC, StageB]:
    c_cfg = StageCConfig.tiny() if tiny else getattr(StageCConfig, size)()
    b_cfg = StageBConfig.tiny() if tiny else getattr(StageBConfig, size)()
    with torch.device(device):
        stage_c = random_(StageC(c_cfg), 1).to(torch.bfloat16).eval().requires_grad_(False)
        stage_b = random_(StageB(b_cfg), 2).to(torch.bfloat16).eval().requires_grad_(False)
    return stage_c, stage_b


def diffusers_twin(net: nn.Module) -> nn.Module:
    """diffusers StableCascadeUNet holding ``net``'s tensors (converted names, q/k/v as views): no copy."""
    from diffusers import StableCascadeUNet

    cfg = (convert.stage_c_config_to_diffusers if isinstance(net, StageC) else
           convert.stage_b_config_to_diffusers)(net.config)
    with torch.device("meta"):
        ref = StableCascadeUNet(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
    ref.load_state_dict(convert.unet_official_to_diffusers(net.state_dict()), strict=True, assign=True)
    return ref.requires_grad_(False)


def time_cuda(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` after 2 warm-ups (CUDA events on a GPU, wall clock otherwise)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_forward(rep: Report, device: torch.device, sizes: list[str], tiny: bool, repeats: int) -> None:
    strict_fp32(False)
    hc, hb = (3, 32) if tiny else (24, 256)  # a 1024x1024 image: Stage C 24x24, Stage B 256x256
    rows = []
    for size in sizes:
        stage_c, stage_b = build_networks(size, device, tiny)
        g = torch.Generator(device).manual_seed(0)
        for net, batch in ((stage_c, 2), (stage_b, 1)):
            cfg = net.config
            if isinstance(net, StageC):
                x = torch.randn(batch, cfg.c_in, hc, hc, device=device, generator=g)
                kw = dict(clip_text=torch.randn(batch, 77, cfg.c_clip_text, device=device, generator=g),
                          clip_text_pooled=torch.randn(batch, 1, cfg.c_clip_text_pooled, device=device, generator=g),
                          clip_img=torch.zeros(batch, 1, cfg.c_clip_img, device=device))
                name = f"Stage C {size}, B={batch}, {hc}x{hc}"
            else:
                x = torch.randn(batch, cfg.c_in, hb, hb, device=device, generator=g)
                kw = dict(effnet=torch.randn(batch, cfg.c_effnet, hc, hc, device=device, generator=g),
                          clip_text_pooled=torch.randn(batch, 1, cfg.c_clip, device=device, generator=g))
                name = f"Stage B {size}, B={batch}, {hb}x{hb}"
            r = torch.rand(batch, device=device, generator=g)
            ref = diffusers_twin(net)
            args = (x, r, *kw.values())
            bf = {k: v.to(torch.bfloat16) for k, v in kw.items()}

            def ours():
                with torch.autocast(device.type, torch.bfloat16):
                    return net(*args)

            def ref_bf16():  # how diffusers pipelines run it: bf16 weights and inputs, no autocast
                return ref(x.to(torch.bfloat16), r.to(torch.bfloat16), **bf).sample

            def ref_autocast():
                with torch.autocast(device.type, torch.bfloat16):
                    return ref(x, r, **kw).sample

            graphs = GraphCache()

            def ours_graphed():
                return graphs.run(ours_on, x, r, kw)

            def ours_on(x_, r_, **kw_):
                with torch.autocast(device.type, torch.bfloat16):
                    return net(x_, r_, *kw_.values())

            with torch.inference_mode():
                diff = rel(ours().float(), ref_autocast().float())
                t_graph = time_cuda(ours_graphed, device, repeats)  # its 2 warm-ups: eager, then record
                graph_same = torch.equal(ours_graphed(), ours())
                t_ours = time_cuda(ours, device, repeats)
                t_ref = time_cuda(ref_bf16, device, repeats)
                t_ref_ac = time_cuda(ref_autocast, device, repeats)
                t_ours2 = time_cuda(ours, device, repeats)  # second look at ours: the spread between runs
            rows.append(f"| {name} | {t_ours * 1e3:.1f} / {t_ours2 * 1e3:.1f} | {t_graph * 1e3:.1f} | "
                        f"{t_ref * 1e3:.1f} | {t_ref_ac * 1e3:.1f} | {min(t_ours, t_ours2) / t_ref:.2f} | "
                        f"{min(t_ours, t_ours2) / t_ref_ac:.2f} | **{t_graph / t_ref:.2f}** | "
                        f"{'yes' if graph_same else 'NO'} | {diff:.1e} |")
            print(rows[-1], flush=True)
            del ref
        del stage_c, stage_b
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rep.add("", f"### One forward at a 1024x1024 image, bfloat16, median of {repeats} (ms)", "",
            "| forward | ours (autocast), two runs | ours, CUDA graph | diffusers bf16 | diffusers autocast "
            "| ours / diffusers bf16 | ours / diffusers autocast | graph / diffusers bf16 | graph = eager "
            "| max rel. diff vs diffusers autocast |",
            "|---|---|---|---|---|---|---|---|---|---|", *rows)


def clip_text_encoder(device: torch.device, tiny: bool) -> TextEncoder:
    """A random CLIP text tower of ViT-bigG/14's size (1280 wide, 32 layers) with the offline tokenizer."""
    tok = build_byte_tokenizer()
    width, layers, heads = (32, 2, 4) if tiny else (1280, 32, 20)
    model = random_clip_text_model(
        tok, width=width, layers=layers, heads=heads, mlp=4 * width, seed=0, hidden_act="gelu"
    )
    return TextEncoder(tok, model, device=device, dtype=torch.bfloat16)


def timed_runs(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float]:
    """(median seconds, peak GiB allocated) of ``repeats`` synchronised runs after one warm-up run."""
    fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return statistics.median(times), peak


def bench_pipeline(rep: Report, device: torch.device, sizes: list[str], tiny: bool, repeats: int) -> None:
    """End to end at 1024x1024: ours (eager and with CUDA graphs) vs diffusers' combined pipeline,
    same weights, batch 1 and 4."""
    from diffusers import DDPMWuerstchenScheduler, StableCascadeCombinedPipeline
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel

    strict_fp32(False)
    px = 128 if tiny else 1024
    prior_steps, decoder_steps = (4, 3) if tiny else (20, 10)
    text = clip_text_encoder(device, tiny)
    a_cfg = StageAConfig.tiny() if tiny else StageAConfig()
    with torch.device(device):
        stage_a = random_(StageA(a_cfg), 3).eval()
    vq = PaellaVQModel(**{k: v for k, v in convert.stage_a_config_to_diffusers(a_cfg).items() if not k.startswith("_")})
    vq.load_state_dict(convert.vq_official_to_diffusers(stage_a.state_dict()), strict=True)
    vq = vq.to(device, torch.bfloat16).eval()
    rows = []
    for size in sizes:
        stage_c, stage_b = build_networks(size, device, tiny)
        limits = Limits.for_models(a_cfg, stage_b.config, min_size=64, max_size=2048)
        pipes = {graphs: CascadePipeline(stage_c, stage_b, stage_a, text, device=device, dtype=torch.bfloat16,
                                         limits=limits, cuda_graphs=graphs) for graphs in (False, True)}
        ref = StableCascadeCombinedPipeline(
            tokenizer=text.tokenizer, text_encoder=text.model, decoder=diffusers_twin(stage_b),
            scheduler=DDPMWuerstchenScheduler(), vqgan=vq, prior_prior=diffusers_twin(stage_c),
            prior_text_encoder=text.model, prior_tokenizer=text.tokenizer,
            prior_scheduler=DDPMWuerstchenScheduler(), prior_feature_extractor=None, prior_image_encoder=None)
        ref.set_progress_bar_config(disable=True)
        for batch in (1, 4):
            prompts = [f"a photograph of object number {i} on a table" for i in range(batch)]
            reqs = [GenerationParams(prompt=p, seed=i, width=px, height=px, prior_steps=prior_steps,
                                     decoder_steps=decoder_steps, prior_guidance_scale=4.0,
                                     decoder_guidance_scale=1.0, cfg_rho=0.0) for i, p in enumerate(prompts)]
            last = {}

            def ours(graphs: bool) -> None:
                out = pipes[graphs].generate(reqs)
                last[graphs] = out

            def theirs():
                ref(prompt=prompts, negative_prompt=[""] * batch, height=px, width=px,
                    prior_num_inference_steps=prior_steps, prior_guidance_scale=4.0,
                    num_inference_steps=decoder_steps, decoder_guidance_scale=0.0,
                    generator=[torch.Generator().manual_seed(i) for i in range(batch)], output_type="pt")

            with torch.inference_mode():
                eager = timed_runs(lambda: ours(False), device, repeats)
                graphed = timed_runs(lambda: ours(True), device, repeats)
                diff = timed_runs(theirs, device, repeats)
                eager2 = timed_runs(lambda: ours(False), device, repeats)
            same = all(torch.equal(a.images, b.images) for a, b in
                       zip(last[False].results, last[True].results, strict=True)
                       if not isinstance(a, Exception) and not isinstance(b, Exception))
            finite = sum(not isinstance(r, NonFiniteOutput) for r in last[True].results)
            t = last[True].timings
            best_eager = min(eager[0], eager2[0])
            rows.append(
                f"| C {size} + B {size}, batch {batch} | {eager[0]:.2f} / {eager2[0]:.2f} | {graphed[0]:.2f} | "
                f"{diff[0]:.2f} | {best_eager / diff[0]:.2f} | **{graphed[0] / diff[0]:.2f}** | "
                f"{batch / graphed[0]:.2f} | {t.text:.3f} / {t.prior:.2f} / {t.decoder:.2f} / {t.vqgan:.2f} | "
                f"{eager[1]:.1f} / {graphed[1]:.1f} / {diff[1]:.1f} | {finite}/{batch} | {'yes' if same else 'NO'} |")
            print(rows[-1], flush=True)
        del pipes, ref, stage_c, stage_b
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rep.add("", f"### End to end, {px}x{px}, Stage C {prior_steps} steps CFG 4 + Stage B {decoder_steps} steps "
            f"(no CFG) + Stage A, bfloat16, median of {repeats} (s)", "",
            "| models | ours eager, two runs | ours, CUDA graphs | diffusers | eager / diffusers "
            "| graphs / diffusers | ours img/s (graphs) | ours text / C / B / A (s, graphs) "
            "| peak GiB eager / graphs / diffusers | finite images | graphs = eager images |",
            "|---|---|---|---|---|---|---|---|---|---|---|", *rows)


def bench_load(rep: Report, device: torch.device, tiny: bool) -> None:
    """A lite bfloat16 official file onto the device vs reading its bytes (page cache dropped before each)."""
    from bench_load import evict, write_checkpoint

    from models import weights

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for stage, loader in (("stage_c_lite", weights.load_stage_c), ("stage_b_lite", weights.load_stage_b)):
            path = Path(d) / f"{stage}_bf16.safetensors"
            if tiny:
                net = StageC(StageCConfig.tiny()) if stage == "stage_c_lite" else StageB(StageBConfig.tiny())
                from safetensors.torch import save_file

                save_file({k: v.to(torch.bfloat16) for k, v in net.state_dict().items()}, path)
                nbytes = path.stat().st_size
            else:
                nbytes = write_checkpoint(stage, "bfloat16", path)
            evict(path)
            t0 = time.perf_counter()
            with path.open("rb", buffering=0) as f:
                buf = bytearray(16 << 20)
                while f.readinto(buf):
                    pass
            read = time.perf_counter() - t0
            evict(path)
            t0 = time.perf_counter()
            net = loader(path, device=device)
            sync(device)
            load = time.perf_counter() - t0
            dtype = next(net.parameters()).dtype
            rows.append(f"| {stage}_bf16 ({nbytes / 2**30:.2f} GiB) -> {device.type} {str(dtype)[6:]} | {read:.2f} | "
                        f"{load:.2f} | **{load / read:.2f}** |")
            del net
            gc.collect()
    rep.add("", "### Loading onto the device (cold page cache before each)", "",
            "| file | read bytes (s) | load_stage_* onto the device (s) | load / read |", "|---|---|---|---|", *rows)


# ---------------------------------------------------------------------------------------------- main


def scheduling_pipeline(size: str, device: torch.device, tiny: bool) -> CascadePipeline:
    """The released networks of ``size`` (random weights, bfloat16, CUDA graphs on a GPU)."""
    stage_c, stage_b = build_networks(size, device, tiny)
    a_cfg = StageAConfig.tiny() if tiny else StageAConfig()
    with torch.device(device):
        stage_a = random_(StageA(a_cfg), 3).eval()
    limits = Limits.for_models(a_cfg, stage_b.config, min_size=64, max_size=2048)
    return CascadePipeline(stage_c, stage_b, stage_a, clip_text_encoder(device, tiny), device=device,
                           dtype=torch.bfloat16, limits=limits, cuda_graphs=True)


SECTIONS = {
    "tiny": lambda rep, a: check_tiny_pipeline(rep, a.device),
    "parity": lambda rep, a: check_unet_parity(rep, a.device),
    "forward": lambda rep, a: bench_forward(rep, a.device, a.sizes, a.tiny, a.repeats),
    "pipeline": lambda rep, a: bench_pipeline(rep, a.device, a.sizes, a.tiny, max(2, a.repeats // 4)),
    "service": lambda rep, a: check_service(rep, a.device),
    "load": lambda rep, a: bench_load(rep, a.device, a.tiny),
    "scheduling": lambda rep, a: bench_scheduling(
        rep, a.device, a.sizes, a.tiny, lambda size: scheduling_pipeline(size, a.device, a.tiny)),
}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        gpu = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, CUDA {torch.version.cuda}"
    else:
        gpu = "no GPU (CPU run of the script)"
    import diffusers
    import transformers

    return (f"{gpu}; torch {torch.__version__}, transformers {transformers.__version__}, diffusers "
            f"{diffusers.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} CPU cores")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the report")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--sizes", default="lite,big", help="released sizes for the speed sections")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--tiny", action="store_true", help="tiny networks (a check of this script on the CPU)")
    args = ap.parse_args()
    args.device = torch.device(args.device)
    args.sizes = args.sizes.split(",")
    rep = Report(Path(args.out) / "bench_cuda.md")
    rep.add(f"Machine: {machine(args.device)}", f"Started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    status = {}
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            SECTIONS[name](rep, args)
            status[name] = f"ok in {time.perf_counter() - t0:.0f} s"
        except Exception as exc:  # noqa: BLE001 - one failed section must not cost the others
            status[name] = f"FAILED after {time.perf_counter() - t0:.0f} s: {type(exc).__name__}: {exc}"
            rep.add("", f"### {name}: FAILED", "", "```", traceback.format_exc()[-3000:], "```")
        gc.collect()
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"== section {name}: {status[name]}", flush=True)
    (Path(args.out) / "bench_cuda_status.json").write_text(json.dumps(status, indent=1))
    print("\n" + "\n".join(rep.lines))


if __name__ == "__main__":
    main()
