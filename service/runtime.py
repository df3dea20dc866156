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
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from models.request import GenerationParams
from service.engine import ComputeThread, Engine, Pipeline, set_torch_threads
from service.errors import (
    Cancelled,
    ClientDisconnected,
    DeadlineExceeded,
    Draining,
    NotFound,
    NotReady,
    RequestIdInUse,
)
from service.job_registry import Finished, JobRegistry
from service.jobs import Job, JobQueue, JobResult, Progress
from service.metrics import Metrics
from service.scheduler import Scheduler
from service.settings import Settings

logger = logging.getLogger("service.runtime")
T = TypeVar("T")
HEARTBEAT_S = 15.0  # a stream with no news for this long gets a comment line (keeps proxies open)
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
        self.registry = JobRegistry()  # by request id: in flight, and the last ones answered
        self.on_fatal: Callable[[], None] | None = None  # set by __main__: stop the process
        self._factory = pipeline_factory
        self._thread: ComputeThread | None = None
        self._decoder_thread: ComputeThread | None = None  # stage overlap's Stage B thread
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
            if self.settings.stage_overlap:
                self._decoder_thread = await engine.start_overlap()
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
        scheduler = Scheduler(
            self.queue,
            engine,
            self.metrics,
            mode=self.settings.batching,
            max_batch_images=self.settings.max_batch_images,
            max_active_images=self.settings.max_active_images,
            max_batch_wait_s=self.settings.max_batch_wait_ms / 1000,
            overlap=engine.overlaps,
        )
        self._tasks.append(asyncio.create_task(scheduler.run(), name="cascade-scheduler"))
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

    def submit(
        self,
        params: GenerationParams,
        timeout_s: float | None,
        request_id: str,
        owner: str | None = None,
        preview_steps: frozenset[int] = frozenset(),
    ) -> Job:
        """Queue a validated request; raises Draining/NotReady (503), QueueFull (503) or
        RequestIdInUse (409, a client-chosen id of a request still in flight)."""
        self.accepting()
        if self.registry.in_flight(request_id) is not None:
            raise RequestIdInUse(
                f"a request with X-Request-ID {request_id!r} is still queued or running; "
                "send a unique id (or none: the server assigns one)"
            )
        budget = min(self.settings.request_timeout_s, timeout_s or math.inf)
        now = time.monotonic()
        future = asyncio.get_running_loop().create_future()
        job = Job(
            params, future, deadline=now + budget, request_id=request_id, owner=owner,
            enqueued_at=now, preview_steps=preview_steps,
        )  # fmt: skip
        self.queue.put(job)
        self.inflight.add(job)
        self.registry.add(job)
        self._idle.clear()
        job.future.add_done_callback(lambda future: self._forget(job, future))
        return job

    def _forget(self, job: Job, future: asyncio.Future[JobResult]) -> None:
        if not future.cancelled():
            future.exception()  # mark retrieved: a client that left never reads its job's error
        self.queue.discard(job)
        self.inflight.discard(job)
        self.registry.finished(job)
        if not self.inflight:
            self._idle.set()

    def describe(self, request_id: str, owner: str | None) -> dict[str, Any]:
        """The state of a job this owner submitted (in flight or recently answered); NotFound."""
        job = self._owned(request_id, owner)
        return job.describe(self.queue.position(job) if isinstance(job, Job) else None)

    def cancel(self, request_id: str, owner: str | None) -> dict[str, Any]:
        """Cancel a queued or running job (its request gets 409 ``cancelled``; the scheduler frees
        its rows at the next step). A job already answered is left as it is. Returns its state
        with ``cancelled``: whether this call cancelled it."""
        job = self._owned(request_id, owner)
        position = self.queue.position(job) if isinstance(job, Job) else None
        cancelled = job.cancel(Cancelled(f"request {request_id} was cancelled by DELETE"))
        if cancelled:
            self.metrics.cancelled.labels("request").inc()
        info = job.describe(position if not cancelled else None)
        return {**info, "cancelled": cancelled}

    def _owned(self, request_id: str, owner: str | None) -> Job | Finished:
        job = self.registry.get(request_id)
        # With API keys on, another key's job is reported as unknown: ids are not secrets.
        if job is None or job.owner != owner:
            raise NotFound(
                f"no request with id {request_id!r} is queued, running or recently finished"
            )
        return job

    async def wait(self, job: Job, receive: Receive) -> JobResult:
        """The job's result. Until its first step the deadline applies (504, never computed);
        a client that disconnects cancels its job in any state (its rows are freed at the next
        step)."""
        watcher = asyncio.create_task(_wait_for_disconnect(receive))
        try:
            remaining = max(0.0, job.deadline - time.monotonic())
            await asyncio.wait(
                {job.future, watcher}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            if not job.future.done() and not watcher.done() and not self._expire(job):
                # already stepping: the deadline no longer applies
                await asyncio.wait({job.future, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not job.future.done():  # the client is gone
                self._disconnected(job)
            return job.future.result()
        except asyncio.CancelledError:
            # the server cancelled the request task (shutdown timeout): stop computing its job
            job.cancel(ClientDisconnected("request cancelled by the server"))
            raise
        finally:
            watcher.cancel()

    async def stream(self, job: Job) -> AsyncIterator[Progress]:
        """The job's progress as it happens: queued (with its position), started, every step,
        previews, and last its result or error; a heartbeat after HEARTBEAT_S without news. The
        deadline applies until the first step, as in ``wait``. A consumer that stops early (the
        client closed the stream) cancels the job: its rows are freed at the next step."""
        channel = job.listen()
        news: asyncio.Future[Progress] | None = None
        try:
            position = self.queue.position(job)
            if position is not None:
                job.reported_position = position
                yield Progress("queued", {"queue_position": position})
            while not job.future.done():
                news = asyncio.ensure_future(channel.get())
                remaining = max(0.0, job.deadline - time.monotonic())
                at_deadline = not job.started and remaining < HEARTBEAT_S
                timeout = remaining if at_deadline else HEARTBEAT_S
                await asyncio.wait(
                    {news, job.future}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if news.done():
                    yield news.result()
                    continue
                news.cancel()
                if job.future.done():
                    break
                if not (at_deadline and self._expire(job)):
                    yield Progress("heartbeat")
            while not channel.empty():  # what was published before the answer
                yield channel.get_nowait()
            error = job.future.exception()
            if error is None:
                yield Progress("result", {"result": job.future.result()})
            else:
                yield Progress("error", {"error": error})
        finally:
            if news is not None:
                news.cancel()
            job.unlisten(channel)
            if not job.future.done():
                self._disconnected(job)

    def _expire(self, job: Job) -> bool:
        """At the job's deadline: answer 504 unless it has had its first step; True if so."""
        expired = job.expire(
            DeadlineExceeded(
                "the request did not start within its "
                f"{job.deadline - job.enqueued_at:.1f}s deadline (the server is busy); retry later"
            )
        )
        if expired:
            self.metrics.cancelled.labels("deadline").inc()
            self.metrics.queue_wait.observe(time.monotonic() - job.enqueued_at)
        return expired

    def _disconnected(self, job: Job) -> None:
        running = job.admitted_at is not None
        if job.cancel(ClientDisconnected("client disconnected before its request finished")):
            self.metrics.cancelled.labels("disconnect").inc()
            if not running:
                self.metrics.queue_wait.observe(time.monotonic() - job.enqueued_at)

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
            if not job.started:
                job.cancel(
                    Draining(
                        "the server shut down before this request started (it was not computed); "
                        "retry after the Retry-After delay, on another replica or on this server "
                        "once restarted"
                    )
                )
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
        for thread in (self._thread, self._decoder_thread):
            if thread is not None:
                thread.stop()
        self._encode_pool.shutdown(wait=False)


async def _wait_for_disconnect(receive: Receive) -> None:
    """Return when the ASGI server reports the client gone (the request body has already been
    read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
