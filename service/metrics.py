"""Every Prometheus metric of the service, defined once, on a per-app CollectorRegistry.

Names are fixed (dashboards depend on them): prefix ``cascade_``, base units (seconds, bytes).
Labels never carry prompts, seeds or request ids. Code records through the small methods below, not
metric literals.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Dense around a single generation's seconds, extended to the longest client timeout
# (serving.md §3.7).
LATENCY_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 45, 60, 90, 120, 180,
    300, 600,
)  # fmt: skip
ENCODE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2)
STAGES = ("text", "prior", "decoder", "vqgan")
ACTIVE_STAGES = ("prior", "decoder", "vqgan")
CANCEL_CAUSES = ("disconnect", "request", "deadline")


class Metrics:
    def __init__(self, max_batch_images: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "cascade_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.request_duration = Histogram(
            "cascade_request_duration_seconds",
            "Server-side time from request arrival to response, for every outcome",
            ["endpoint", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "cascade_queue_wait_seconds",
            "Time each job spent queued: enqueue to admission (or to expiry or abandonment)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "cascade_stage_duration_seconds",
            "Compute time of one stage for one job (the calls it took part in)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.encode_duration = Histogram(
            "cascade_encode_duration_seconds",
            "PNG (and base64) encoding of one request's images",
            ["format"],
            buckets=ENCODE_BUCKETS,
            registry=r,
        )
        image_buckets = tuple(range(1, max_batch_images + 1))
        self.batch_size = Histogram(
            "cascade_batch_size_images",
            "Images admitted together (one text-encoder call; in static mode, one batch)",
            buckets=image_buckets,
            registry=r,
        )
        self.batches = Counter(
            "cascade_batches",
            "Compute calls (text, denoising step, Stage A decode) by outcome (ok, error, oom)",
            ["outcome"],
            registry=r,
        )
        self.active_images = Gauge(
            "cascade_active_images",
            "Images admitted and not yet answered, by the stage they are in",
            ["stage"],
            registry=r,
        )
        self.step_batch_images = Histogram(
            "cascade_step_batch_images",
            "Images in one denoising forward (a CFG pair counts as one image)",
            ["stage"],
            buckets=image_buckets,
            registry=r,
        )
        self.steps = Counter(
            "cascade_steps", "Batched denoising steps (forwards) run", ["stage"], registry=r
        )
        self.overlapped_steps = Counter(
            "cascade_overlapped_steps",
            "Scheduler iterations that ran a Stage C step and a Stage B step at the same time "
            "(CASCADE_STAGE_OVERLAP)",
            registry=r,
        )
        self.time_to_first_step = Histogram(
            "cascade_time_to_first_step_seconds",
            "Time from arrival to the end of a job's first denoising step",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cancelled = Counter(
            "cascade_cancelled",
            "Jobs cancelled before they finished, by cause (disconnect, request, deadline)",
            ["cause"],
            registry=r,
        )
        self.images = Counter("cascade_images_generated", "Images generated", registry=r)
        self.rejected = Counter(
            "cascade_rejected_requests",
            "Requests refused or dropped, by reason",
            ["reason"],
            registry=r,
        )
        self.queue_depth = Gauge("cascade_queue_depth", "Jobs waiting in the queue", registry=r)
        self.inflight = Gauge(
            "cascade_inflight_jobs",
            "Admitted jobs not yet answered (queued, batching or running)",
            registry=r,
        )
        self.ready = Gauge(
            "cascade_ready", "1 when the model is loaded, warm and not draining", registry=r
        )
        self.draining = Gauge("cascade_draining", "1 while shutting down gracefully", registry=r)
        self._gpu: tuple[Gauge, Gauge] | None = None  # registered only once a CUDA device reports
        self.model_info = Gauge(
            "cascade_model_info",
            "The loaded model (value 1)",
            ["name", "demo", "prior", "decoder", "device", "dtype"],
            registry=r,
        )
        for stage in STAGES:  # export zeros before the first batch, so dashboards see every series
            self.stage_duration.labels(stage)
        for fmt in ("png", "b64_json"):
            self.encode_duration.labels(fmt)
        for stage in ("prior", "decoder"):
            self.step_batch_images.labels(stage)
            self.steps.labels(stage)
        self.set_active_images({})
        for cause in CANCEL_CAUSES:
            self.cancelled.labels(cause)

    def track_queue(self, depth: Callable[[], float], inflight: Callable[[], float]) -> None:
        """Gauges read live at scrape time."""
        self.queue_depth.set_function(depth)
        self.inflight.set_function(inflight)

    def set_model(self, info: dict[str, str | bool]) -> None:
        def text(key: str) -> str:
            value = info.get(key, "")
            return str(value).lower() if isinstance(value, bool) else str(value)

        self.model_info.labels(
            *(text(k) for k in ("name", "demo", "prior", "decoder", "device", "dtype"))
        ).set(1)

    def observe_request(self, endpoint: str, status: int, outcome: str, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.request_duration.labels(endpoint, outcome).observe(seconds)

    def observe_step(self, stage: str, images: int) -> None:
        self.steps.labels(stage).inc()
        self.step_batch_images.labels(stage).observe(images)

    def set_active_images(self, images: dict[str, int]) -> None:
        for stage in ACTIVE_STAGES:
            self.active_images.labels(stage).set(images.get(stage, 0))

    def observe_stages(self, timings: dict[str, float]) -> None:
        for stage in STAGES:
            self.stage_duration.labels(stage).observe(timings[stage])

    def set_gpu_memory(self, stats: tuple[int, int] | None) -> None:
        """(allocated, reserved) bytes from the CUDA allocator; None (CPU) exports nothing."""
        if stats is None:
            return
        if self._gpu is None:
            self._gpu = (
                Gauge(
                    "cascade_gpu_memory_allocated_bytes",
                    "CUDA memory held by tensors",
                    registry=self.registry,
                ),
                Gauge(
                    "cascade_gpu_memory_reserved_bytes",
                    "CUDA memory reserved by the caching allocator",
                    registry=self.registry,
                ),
            )
        self._gpu[0].set(stats[0])
        self._gpu[1].set(stats[1])

    def render(self) -> bytes:
        return generate_latest(self.registry)
