"""Engine: owns the loaded pipeline and the thread that runs it.

The pipeline's calls block (a step takes milliseconds to seconds), so every call goes through a
dedicated compute thread; the event loop only awaits its futures and stays free for health checks,
metrics, new requests and cancellations. With stage overlap (CASCADE_STAGE_OVERLAP) Stage B steps
run on a second compute thread, at the same time as a Stage C step on the first: the two touch
different networks and different job states, and on CUDA each thread queues its kernels on a
stream of its own, so the GPU runs both forwards at once. The scheduler calls
``start`` (text), ``step`` (one batched denoising step) and ``decode`` (Stage A) on job states it
treats as opaque. This module and imaging.py are the only service modules that import torch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import torch
from PIL import Image

from models.job_state import Stage
from models.request import GenerationParams, GenerationResult, NonFiniteOutput, SamplingDefaults
from service.errors import OutOfMemory
from service.settings import Settings

logger = logging.getLogger("service.engine")
T = TypeVar("T")


class Pipeline(Protocol):
    """The part of models.pipeline.CascadePipeline the service uses (fault-injecting wrappers
    match it)."""

    defaults: SamplingDefaults
    limits: Any
    model_info: dict[str, str | bool]
    device: torch.device

    def validate(self, params: GenerationParams) -> None: ...

    def start(self, batch: Sequence[GenerationParams]) -> list[Any]: ...

    def step(self, states: Sequence[Any], *, previews: bool = False) -> list[Any]: ...

    def decode(self, states: Sequence[Any]) -> list[GenerationResult | NonFiniteOutput]: ...

    def preview(self, latents: Sequence[Any]) -> list[Any]: ...


def _images(states: Sequence[Any]) -> int:
    return sum(int(getattr(s, "images", 1)) for s in states)


class ComputeThread:
    """One daemon thread running submitted callables in order. A daemon, so that a batch still
    running when the drain timeout has passed cannot keep the process alive. ``setup`` runs on the
    thread before its first task (e.g. ``own_stream``)."""

    def __init__(
        self, name: str = "cascade-compute", setup: Callable[[], None] | None = None
    ) -> None:
        self._tasks: queue.SimpleQueue[
            tuple[concurrent.futures.Future[Any], Callable[[], Any]] | None
        ]
        self._tasks = queue.SimpleQueue()
        self._setup = setup
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        if self._setup is not None:
            self._setup()
        while (item := self._tasks.get()) is not None:
            future, fn = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 (the awaiting coroutine decides)
                    future.set_exception(exc)

    async def run(self, fn: Callable[[], T]) -> T:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._tasks.put((future, fn))
        return await asyncio.wrap_future(future)

    def stop(self) -> None:
        self._tasks.put(None)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu. Asking for CUDA on a machine without it is an
    error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"CASCADE_DEVICE={name} but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"CASCADE_DEVICE={name} but only {torch.cuda.device_count()} GPU(s) exist"
            )
    return device


def set_torch_threads(threads: int | None) -> None:
    """torch.set_num_threads: ``threads``, or for None one less than the CPUs this process may use (at
    least 1, ``models.cpu_features.default_threads``). torch's default of one thread per CPU stalls a
    server whose machine is shared (docs/bench_threads.md). Process-wide; called before the model loads.
    """
    from models.cpu_features import available_cpus, default_threads

    chosen = default_threads() if threads is None else threads
    torch.set_num_threads(chosen)
    logger.info(
        "torch uses %d CPU thread(s) of %d available%s",
        chosen,
        available_cpus(),
        "" if threads is not None else " (CASCADE_TORCH_THREADS unset: one left for the rest)",
    )


def load_pipeline(settings: Settings) -> Pipeline:
    """Build the pipeline the settings describe: a snapshot directory, or the built-in demo model
    (a tiny Stable Cascade trained on synthetic shapes, models/demo.py)."""
    device = resolve_device(settings.device)
    if settings.weights_dir is None:
        from models.demo import load_demo_pipeline

        if settings.dtype != "auto":
            logger.warning(
                "CASCADE_DTYPE=%s ignored: the built-in demo model runs in float32", settings.dtype
            )
        return load_demo_pipeline(
            device=device, dtype=torch.float32, cuda_graphs=settings.cuda_graphs
        )
    from models.pipeline import CascadePipeline

    dtype = None if settings.dtype == "auto" else getattr(torch, settings.dtype)
    return CascadePipeline.from_snapshot(
        settings.weights_dir,
        prior_variant=settings.prior_variant,
        decoder_variant=settings.decoder_variant,
        device=device,
        dtype=dtype,
        cuda_graphs=settings.cuda_graphs,
    )


def own_stream(device: torch.device) -> Callable[[], None]:
    """A call that makes the calling thread queue its CUDA work on a new stream of ``device``,
    once the work queued so far is done (nothing on the CPU): run first on each compute thread of
    an overlapping engine."""

    def setup() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.set_stream(torch.cuda.Stream(device))

    return setup


class Engine:
    """The loaded pipeline plus its compute thread (and, after ``start_overlap``, a second one for
    Stage B steps)."""

    def __init__(self, pipeline: Pipeline, thread: ComputeThread) -> None:
        self.pipeline = pipeline
        self._thread = thread
        self._decoder_thread: ComputeThread | None = None

    async def start_overlap(self) -> ComputeThread:
        """Run Stage B steps on a second compute thread from now on (stage overlap), each thread
        on a CUDA stream of its own; returns the new thread (to stop at shutdown)."""
        await self._thread.run(own_stream(self.device))
        self._decoder_thread = ComputeThread("cascade-compute-decoder", own_stream(self.device))
        return self._decoder_thread

    @property
    def overlaps(self) -> bool:
        """Whether a Stage C step and a Stage B step may be awaited at the same time."""
        return self._decoder_thread is not None

    @property
    def defaults(self) -> SamplingDefaults:
        return self.pipeline.defaults

    @property
    def model_info(self) -> dict[str, str | bool]:
        return dict(self.pipeline.model_info)

    @property
    def limits(self) -> Any:
        """What a request may ask for (models.pipeline.Limits: sizes, steps, guidance)."""
        return self.pipeline.limits

    @property
    def device(self) -> torch.device:
        return torch.device(self.pipeline.device)

    def validate(self, params: GenerationParams) -> None:
        """Raises models.request.InvalidParams(field, message)."""
        self.pipeline.validate(params)

    async def start(self, batch: Sequence[GenerationParams]) -> list[Any]:
        """Job states for validated requests (their text encoded in one call)."""
        batch = list(batch)
        return await self._run(lambda: self.pipeline.start(batch), sum(p.num_images for p in batch))

    @property
    def previews(self) -> bool:
        """Whether the model can draw previews (it has a Previewer)."""
        return bool(self.pipeline.model_info.get("previews"))

    async def step(
        self, states: Sequence[Any], previews: Sequence[bool] | None = None
    ) -> tuple[list[Any], list[torch.Tensor | None]]:
        """One denoising step of a group sharing one group key: the engine's StepEvents, and for
        each state whose ``previews`` flag is set a uint8 [n, 3, h, w] preview of its Stage C x0
        (None for the others, and for all when the model has no Previewer). A preview that fails
        is logged and left out: the step itself has happened and must not be retried."""
        states = list(states)
        wanted = list(previews or [False] * len(states))
        want_any = self.previews and any(wanted)

        def call() -> tuple[list[Any], list[torch.Tensor | None]]:
            events = self.pipeline.step(states, previews=want_any)
            pictures: list[torch.Tensor | None] = [None] * len(states)
            rows = [
                i for i, w in enumerate(wanted) if w and getattr(events[i], "x0", None) is not None
            ]
            if want_any and rows:
                try:
                    drawn = self.pipeline.preview([events[i].x0 for i in rows])
                except Exception:  # a preview is optional; the step stands
                    logger.exception("drawing %d preview(s) failed", len(rows))
                    drawn = []
                for i, picture in zip(rows, drawn, strict=False):
                    pictures[i] = picture
            return events, pictures

        decoder = bool(states) and getattr(states[0], "stage", None) is Stage.DECODER
        return await self._run(call, _images(states), self._decoder_thread if decoder else None)

    async def decode(self, states: Sequence[Any]) -> list[GenerationResult | NonFiniteOutput]:
        """Stage A for finished states: one result (or NonFiniteOutput) per state."""
        states = list(states)
        return await self._run(lambda: self.pipeline.decode(states), _images(states))

    async def _run(
        self, fn: Callable[[], T], images: int, thread: ComputeThread | None = None
    ) -> T:
        """``fn`` on the compute thread (``thread`` when one is given), in inference mode. Raises
        errors.OutOfMemory when the device ran out of memory, after freeing cached memory unless
        the engine overlaps stages (another thread may be stepping: the scheduler then calls
        ``release_memory`` once both steps are over); any other exception from the pipeline
        passes through."""

        def call() -> T:
            try:
                with torch.inference_mode():
                    return fn()
            except torch.OutOfMemoryError as exc:
                if not self.overlaps:
                    self._free_memory()
                raise OutOfMemory(
                    f"out of device memory for a step of {images} image(s): {exc}"
                ) from None

        return await (thread or self._thread).run(call)

    async def release_memory(self) -> None:
        """Give back the recorded CUDA graphs and the cached device memory (after running out of
        memory with stage overlap; no compute call may be in flight)."""
        await self._thread.run(self._free_memory)

    def _free_memory(self) -> None:
        if self.device.type == "cuda":
            clear = getattr(self.pipeline, "clear_cuda_graphs", None)
            if clear is not None:
                clear()  # recorded graphs hold activation memory: give it back first
            torch.cuda.empty_cache()

    async def warm_up(self) -> None:
        """One generation at the default size through the scheduler's calls, so the first real
        request pays no one-time costs; before it, the image encoders' first calls (their steps
        are those of text-to-image)."""
        info = self.pipeline.model_info
        if info.get("image_to_image") or info.get("image_variation"):
            picture = Image.new("RGB", (self.defaults.width, self.defaults.height), (128,) * 3)
            image_params = GenerationParams.from_defaults(
                self.defaults,
                "warm-up",
                image=picture,
                strength=0.5
                if info.get("image_to_image") and self.defaults.prior_steps > 1
                else 1.0,
                image_variation=bool(info.get("image_variation")),
            )
            await self.start([image_params])
        params = GenerationParams.from_defaults(self.defaults, "warm-up")
        states = await self.start([params])
        while states[0].stage in (Stage.PRIOR, Stage.DECODER):
            await self.step(states, [self.previews])  # previews too: their first call is slow
        results = await self.decode(states)
        if not results or isinstance(results[0], Exception):
            logger.warning("warm-up generation gave no image: %r", results)

    def memory_stats(self) -> tuple[int, int] | None:
        """(allocated, reserved) bytes on the CUDA device; None on CPU."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device)
