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
            "Time each job spent queued: enqueue to batch start (or to expiry or abandonment)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "cascade_stage_duration_seconds",
            "Compute time of one stage for one batch",
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
        self.batch_size = Histogram(
            "cascade_batch_size_images",
            "Images per batch run by the pipeline",
            buckets=tuple(range(1, max_batch_images + 1)),
            registry=r,
        )
        self.batches = Counter(
            "cascade_batches", "Batches run, by outcome (ok, error, oom)", ["outcome"], registry=r
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

    def observe_batch(self, images: int, outcome: str) -> None:
        self.batch_size.observe(images)
        self.batches.labels(outcome).inc()

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
