"""Per-image latency of the demo pipeline under CPU contention, for candidate thread settings.

Each candidate (torch intra-op threads, OpenMP wait policy) runs in a fresh process, because the OpenMP
runtime reads its environment once, when torch loads it. Every candidate is measured in three conditions:

- idle: nothing else of this benchmark running (other users of the machine are not stopped);
- busy neighbour: one other process spinning a busy loop (one core's worth of unrelated work);
- twin: a second process generating with the same setting at the same time (a server and a client,
  or two replicas, on one machine).

The timed process loads the demo model, generates two warm-up images, then ``--images`` images one at a
time at the model's defaults (128x128); it reports the median, 90th percentile and maximum seconds per
image. A run that exceeds ``--limit`` seconds is stopped and reported with the images it finished.

Usage: ``python bench/bench_threads.py [--images 12] [--threads 1,2] [--policies default,PASSIVE]
[--conditions idle,busy neighbour,twin] [--limit 180] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUSY_LOOP = "while True:\n    pass\n"
CONDITIONS = ("idle", "busy neighbour", "twin")


def child(threads: int, images: int, forever: bool) -> None:
    """Generate and print one JSON line: the seconds of each timed image (or loop until killed)."""
    import torch

    torch.set_num_threads(threads)
    from models.demo import load_demo_pipeline
    from models.request import GenerationParams

    pipeline = load_demo_pipeline()
    params = GenerationParams.from_defaults(pipeline.defaults, "a red circle on a blue background")
    for _ in range(2):
        pipeline.generate([params])
    print("ready", flush=True)
    times = []
    while forever or len(times) < images:
        start = time.perf_counter()
        pipeline.generate([params])
        times.append(time.perf_counter() - start)
        if not forever:
            print(json.dumps({"image_s": times[-1]}), flush=True)


def child_env(policy: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    return env


def spawn(threads: int, policy: str, images: int, forever: bool = False) -> subprocess.Popen:
    """A benchmark process (``--child``); its stderr (library progress bars) is dropped."""
    args = [sys.executable, __file__, "--child", "--threads", str(threads), "--images", str(images)]
    return subprocess.Popen(
        args + (["--forever"] if forever else []),
        env=child_env(policy), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
    )


def lines_of(proc: subprocess.Popen) -> queue.Queue:
    """A queue that receives every stdout line of ``proc`` (then None at its end), read by a thread."""
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line.strip())
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def wait_ready(lines: queue.Queue) -> None:
    """Block until the process printed "ready" (model loaded, warmed up)."""
    while (line := lines.get()) != "ready":
        if line is None:
            raise RuntimeError("a benchmark process exited before it was ready (run it with --child)")


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def measure(threads: int, policy: str, condition: str, images: int, limit: float) -> list[float]:
    """Seconds per image of one timed process in ``condition`` (cut short after ``limit`` seconds)."""
    neighbour = None
    try:
        if condition == "busy neighbour":
            neighbour = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
        elif condition == "twin":
            neighbour = spawn(threads, policy, images, forever=True)
            wait_ready(lines_of(neighbour))
        timed = spawn(threads, policy, images)
        times: list[float] = []
        try:
            lines = lines_of(timed)
            wait_ready(lines)
            deadline = time.monotonic() + limit
            while len(times) < images and (left := deadline - time.monotonic()) > 0:
                try:
                    line = lines.get(timeout=left)
                except queue.Empty:
                    break
                if line is None:
                    break
                times.append(json.loads(line)["image_s"])
        finally:
            stop(timed)
        return times
    finally:
        stop(neighbour)


def summary(times: list[float], images: int) -> str:
    if not times:
        return "no image finished"
    q = sorted(times)
    p90 = q[min(len(q) - 1, round(0.9 * (len(q) - 1)))]
    cut = "" if len(times) == images else f" (stopped after {len(times)} of {images})"
    return f"{statistics.median(q):.2f} / {p90:.2f} / {q[-1]:.2f}{cut}"


def machine() -> str:
    """The CPU, its kind and flags, torch and the OpenMP runtime it runs its threads with."""
    sys.path.insert(0, str(ROOT))
    import torch

    from models import cpu_features

    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    info = torch.__config__.parallel_info()
    backend = info.split("ATen parallel backend:")[-1].strip() if "ATen parallel backend:" in info else "?"
    gomp = (Path(torch.__file__).parent / "lib" / "libgomp.so.1").exists()
    return (f"CPU: {cpu}, {os.cpu_count()} cores visible, {cpu_features.describe()}; torch "
            f"{torch.__version__}, ATen parallel backend {backend} "
            f"({'GNU libgomp' if gomp else 'OpenMP runtime other than the bundled libgomp'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--threads", default="1,2", help="comma list of torch intra-op thread counts")
    ap.add_argument("--policies", default="default,PASSIVE", help="OMP_WAIT_POLICY values ('default': unset)")
    ap.add_argument("--conditions", default=",".join(CONDITIONS), help="comma list of: " + ", ".join(CONDITIONS))
    ap.add_argument("--limit", type=float, default=180.0, help="seconds one timed process may take")
    ap.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--forever", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, str(ROOT))
        child(int(args.threads), args.images, args.forever)
        return

    conditions = args.conditions.split(",")
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        ap.error(f"--conditions: unknown {sorted(unknown)}")
    load_start = os.getloadavg()[0]
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        for policy in args.policies.split(","):
            cells = []
            for condition in conditions:
                times = measure(threads, policy, condition, args.images, args.limit)
                cells.append(summary(times, args.images))
                print(f"threads {threads}, OMP_WAIT_POLICY {policy:8s} {condition:15s}: {cells[-1]}",
                      flush=True)
            rows.append(f"| {threads} | {policy} | " + " | ".join(cells) + " |")
    header = ("| torch threads | OMP_WAIT_POLICY | " + " | ".join(conditions) + " |\n"
              "|---|---|" + "---|" * len(conditions))
    table = "\n".join([header, *rows])
    note = (f"{machine()}\nSeconds per image (median / p90 / max) of {args.images} images after 2 warm-ups, "
            f"demo model at 128x128; 1-min load average {load_start:.2f} at start, "
            f"{os.getloadavg()[0]:.2f} at end")
    print(f"\n{table}\n\n{note}")
    if args.out:
        Path(args.out).write_text(f"{table}\n\n{note}\n")


if __name__ == "__main__":
    main()
