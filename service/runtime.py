"""Runtime: the life of one server process — load and warm up, admit jobs, wait for them, drain,
stop.

States: starting -> ready -> draining -> stopped, or starting -> failed. Loading runs in the
background (started by the FastAPI lifespan) so /health/live answers and /health/ready says 503
while weights load.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from models.request import GenerationParams
from service.engine import ComputeThread, Engine, Pipeline, set_torch_threads
from service.errors import ClientDisconnected, DeadlineExceeded, Draining, NotReady
from service.jobs import Job, JobQueue, JobResult
from service.metrics import Metrics
from service.settings import Settings
from service.worker import BatchWorker

logger = logging.getLogger("service.runtime")
T = TypeVar("T")
Receive = Callable[[], Awaitable[dict[str, Any]]]


class Runtime:
    def __init__(
        self, settings: Settings, metrics: Metrics, pipeline_factory: Callable[[Settings], Pipeline]
    ) -> None:
        self.settings, self.metrics = settings, metrics
        self.state = "starting"
        self.failure: str | None = None
        self.engine: Engine | None = None
        self.queue = JobQueue(settings.max_queue_size)
        self.inflight: set[Job] = set()
        self.on_fatal: Callable[[], None] | None = None  # set by __main__: stop the process
        self._factory = pipeline_factory
        self._thread: ComputeThread | None = None
        self._encode_pool = ThreadPoolExecutor(
            settings.encode_threads, thread_name_prefix="cascade-encode"
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._idle = asyncio.Event()
        metrics.track_queue(lambda: len(self.queue), lambda: len(self.inflight))

    # --- start-up --------------------------------------------------------------------------------
    def start(self) -> None:
        """Begin loading and warming up in the background (returns at once)."""
        self._thread = ComputeThread()
        self._tasks.append(asyncio.create_task(self._load(self._thread), name="cascade-load"))

    async def _load(self, thread: ComputeThread) -> None:
        try:
            started = time.monotonic()
            # On the (daemon) compute thread: loading may take minutes and must not keep a
            # stopping process alive.
            set_torch_threads(self.settings.torch_threads)
            pipeline = await thread.run(lambda: self._factory(self.settings))
            engine = Engine(pipeline, thread)
            info = engine.model_info
            logger.info("model loaded in %.1fs: %s", time.monotonic() - started, info)
            if info.get("demo"):
                logger.warning(
                    "serving DEMO weights (%s): images are not Stable Cascade output",
                    info.get("name"),
                )
            await engine.warm_up()
        except Exception as exc:
            logger.exception("loading the model failed")
            self.state, self.failure = (
                "failed",
                f"model loading failed: {type(exc).__name__}: {exc}",
            )
            if self.on_fatal is not None:
                self.on_fatal()
            return
        self.engine = engine
        self.metrics.set_model(info)
        worker = BatchWorker(
            self.queue,
            engine,
            self.metrics,
            self.settings.max_batch_images,
            self.settings.max_batch_wait_ms / 1000,
        )
        self._tasks.append(asyncio.create_task(worker.run(), name="cascade-worker"))
        if self.state == "starting":
            self._set_state("ready")
        logger.info("ready after %.1fs", time.monotonic() - started)

    def _set_state(self, state: str) -> None:
        self.state = state
        self.metrics.ready.set(1 if state == "ready" else 0)
        self.metrics.draining.set(1 if state == "draining" else 0)

    # --- requests --------------------------------------------------------------------------------
    def accepting(self) -> Engine:
        """The engine, if new requests are admitted now; else Draining or NotReady (503)."""
        if self.state in ("draining", "stopped"):
            raise Draining(
                "the server is shutting down and takes no new requests; retry after the "
                "Retry-After delay (behind a load balancer another replica takes it; a single "
                "server answers again once restarted)"
            )
        if self.state != "ready" or self.engine is None:
            raise NotReady(
                self.failure or "the model is still loading; retry after the Retry-After delay"
            )
        return self.engine

    def submit(self, params: GenerationParams, timeout_s: float | None, request_id: str) -> Job:
        """Queue a validated request; raises Draining/NotReady (503) or QueueFull (503)."""
        self.accepting()
        budget = min(self.settings.request_timeout_s, timeout_s or math.inf)
        now = time.monotonic()
        future = asyncio.get_running_loop().create_future()
        job = Job(params, future, deadline=now + budget, request_id=request_id, enqueued_at=now)
        self.queue.put(job)
        self.inflight.add(job)
        self._idle.clear()
        job.future.add_done_callback(lambda future: self._forget(job, future))
        return job

    def _forget(self, job: Job, future: asyncio.Future[JobResult]) -> None:
        if not future.cancelled():
            future.exception()  # mark retrieved: a client that left never reads its job's error
        self.inflight.discard(job)
        if not self.inflight:
            self._idle.set()

    async def wait(self, job: Job, receive: Receive) -> JobResult:
        """The job's result. Before its batch starts, the job is dropped (never computed) when
        its client disconnects (504 when its deadline passes). Once running it is waited for to
        the end."""
        watcher = asyncio.create_task(_wait_for_disconnect(receive))
        try:
            remaining = max(0.0, job.deadline - time.monotonic())
            await asyncio.wait(
                {job.future, watcher}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            if not job.future.done():
                if watcher.done():
                    error: Exception = ClientDisconnected(
                        "client disconnected while the request was queued"
                    )
                else:
                    error = DeadlineExceeded(
                        "the request did not start within its "
                        f"{job.deadline - job.enqueued_at:.1f}s deadline (the server is busy); "
                        "retry later"
                    )
                if job.cancel(error):  # still queued: drop it
                    self.queue.discard(job)
                    self.metrics.queue_wait.observe(time.monotonic() - job.enqueued_at)
                else:  # already computing: wait for it, unless the client is gone
                    await asyncio.wait({job.future, watcher}, return_when=asyncio.FIRST_COMPLETED)
                    if not job.future.done():
                        raise ClientDisconnected(
                            "client disconnected while its batch was computing"
                        )
            return job.future.result()
        except asyncio.CancelledError:
            # the server cancelled the request task (shutdown timeout): never compute its job
            if job.cancel(ClientDisconnected("request cancelled by the server")):
                self.queue.discard(job)
            raise
        finally:
            watcher.cancel()

    async def encode(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-heavy encoding in the encode thread pool."""
        return await asyncio.get_running_loop().run_in_executor(self._encode_pool, fn, *args)

    # --- shutdown --------------------------------------------------------------------------------
    async def drain(self, timeout_s: float) -> None:
        """Stop admitting (readiness 503, new requests 503) and wait up to ``timeout_s`` for
        every admitted job to finish. Jobs that have not started by then are answered 503;
        running ones are left to end."""
        if self.state in ("draining", "stopped"):
            return
        self._set_state("draining")
        logger.info("draining: %d job(s) in flight, up to %.0fs", len(self.inflight), timeout_s)
        if self.inflight:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout_s)
            except TimeoutError:
                logger.error("drain timeout passed with %d job(s) unfinished", len(self.inflight))
        for job in list(self.inflight):
            if job.cancel(
                Draining(
                    "the server shut down before this request started (it was not computed); "
                    "retry after the Retry-After delay, on another replica or on this server "
                    "once restarted"
                )
            ):
                self.queue.discard(job)
        logger.info("drained")

    async def stop(self) -> None:
        """Cancel the worker, answer anything left, and release the threads."""
        await self.drain(0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for job in list(self.inflight):
            job.fail(
                Draining(
                    "the server stopped before this request finished; retry after the "
                    "Retry-After delay, on another replica or on this server once restarted"
                )
            )
        self._set_state("stopped")
        if self._thread is not None:
            self._thread.stop()
        self._encode_pool.shutdown(wait=False)


async def _wait_for_disconnect(receive: Receive) -> None:
    """Return when the ASGI server reports the client gone (the request body has already been
    read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
