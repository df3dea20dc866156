"""Scheduler: the one task that admits queued jobs, advances them one denoising step at a time and
answers each one. The decisions are service/scheduling_policy.py's; this module carries them out.

One iteration, each compute call awaited on the compute thread (so requests, cancellations and
metrics are served in between):
  1. drop jobs already answered (cancelled, expired, disconnected): their rows are freed here;
  2. decode the jobs that finished Stage B (Stage A, one call);
  3. admit: continuous mode admits queued jobs oldest first within CASCADE_MAX_ACTIVE_IMAGES;
     static mode admits one batch of compatible jobs (service/batching.py) when nothing is active;
     their text is encoded in one call;
  4. advance the chosen group by one step (one batched forward); with stage overlap, a Stage C
     group and a Stage B group at the same time (each on its own compute thread), awaited
     together.
A call that raises is retried on each half of its jobs, down to one job, which alone fails, so a
job that breaks a forward fails only itself; out of memory also caps that group's forward size
for a while. A job whose images are NaN/inf fails alone. Nothing here imports torch: job states are the engine's, opaque to the service.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from models.request import NonFiniteOutput
from service import scheduling_policy as policy
from service.batching import collect_batch
from service.engine import Engine
from service.errors import (
    DeadlineExceeded,
    GenerationFailed,
    InternalError,
    NonFiniteImage,
    OutOfMemory,
)
from service.jobs import Job, JobQueue, JobResult, JobState
from service.metrics import Metrics

logger = logging.getLogger("service.scheduler")
Mode = Literal["continuous", "static"]
CAP_STEPS = 100  # steps a group stays capped after running out of memory
IDLE_WAIT_S = 0.05  # an iteration with nothing to compute waits this long (or for a new job)


class Scheduler:
    def __init__(
        self,
        queue: JobQueue,
        engine: Engine,
        metrics: Metrics,
        *,
        mode: Mode,
        max_batch_images: int,
        max_active_images: int,
        max_batch_wait_s: float,
        overlap: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``overlap``: step a Stage C group and a Stage B group at once (the engine runs them on
        two compute threads); continuous mode only."""
        self.queue, self.engine, self.metrics = queue, engine, metrics
        self.mode, self.clock, self.overlap = mode, clock, overlap
        self.max_batch_images, self.max_active_images = max_batch_images, max_active_images
        self.max_batch_wait_s = max_batch_wait_s
        self.active: list[Job] = []  # admitted, not yet answered by the scheduler
        self._order = itertools.count()
        self._caps: dict[Any, _Cap] = {}  # group key -> forward-size cap after out of memory
        self._calls = 0  # compute calls made, to tell an iteration that did nothing

    async def run(self) -> None:
        """Iterate until cancelled (at shutdown). A bug in one iteration fails the jobs it holds
        and the loop goes on."""
        while True:
            try:
                await self.iterate()
            except Exception as exc:
                logger.exception("scheduler iteration failed")
                for job in self.active:
                    job.fail(InternalError(f"internal error while scheduling: {exc!r}"))
                self.active.clear()
                self._publish()

    async def iterate(self) -> None:
        """One iteration (module docstring). Waits for a job when there is nothing to do, and
        always gives the event loop a turn: an iteration that computes nothing must not spin (the
        callbacks that take answered jobs out of the queue run on this loop too)."""
        self._drop_answered()
        for job in self.queue:
            if job.done:  # answered while queued: its done callback may not have run yet
                self.queue.discard(job)
        if not self.active and not len(self.queue):
            await self.queue.wait_for_put()
            return
        calls = self._calls
        self._expire(self.clock())
        finished = [job for job in self.active if job.stage == "vqgan"]
        if finished:
            await self._isolating(finished, self._decode)
            self._drop_answered()
        await self._admit()
        self._report_positions()
        self._drop_answered()
        groups = policy.choose_groups(self.active, self.max_batch_images, overlap=self.overlap)
        if len(groups) == 1:
            await self._isolating(self._capped(groups[0]), self._step)
        elif groups:
            await self._step_together([self._capped(group) for group in groups])
        self._publish()
        if self._calls == calls:  # nothing computed: wait for news instead of spinning
            await self.queue.wait_for_put(IDLE_WAIT_S)

    # ---- admission ----

    async def _admit(self) -> None:
        if self.mode == "static":
            if self.active or not len(self.queue):
                return
            jobs = await collect_batch(
                self.queue, self.max_batch_images, self.max_batch_wait_s, self.clock
            )
        else:
            active_images = sum(job.images for job in self.active)
            queued = [job for job in self.queue if not job.done]
            jobs = policy.admit(queued, active_images, self.max_active_images)
            for job in jobs:
                self.queue.take(job)
        now = self.clock()
        live = []
        for job in jobs:
            if job.done:  # answered while the static batch was forming
                continue
            if now > job.deadline:
                job.expire(DeadlineExceeded(_deadline_message(job, now)))
                self.metrics.cancelled.labels("deadline").inc()
            else:
                live.append(job)
            self.metrics.queue_wait.observe(now - job.enqueued_at)
        if live:
            self.metrics.batch_size.observe(sum(job.images for job in live))
            await self._isolating(live, self._start)

    async def _start(self, jobs: list[Job]) -> None:
        states = await self.engine.start([job.params for job in jobs])
        now = self.clock()
        for job, state in zip(jobs, states, strict=True):
            job.work, job.admitted_at, job.order = state, now, next(self._order)
            job.state, job.stage = JobState.ACTIVE, "prior"
            job.step, job.total = 0, job.params.prior_steps
            if not job.done:
                self.active.append(job)
                job.publish("started", stage=job.stage, total=job.total)

    # ---- stepping ----

    async def _step(self, jobs: list[Job]) -> None:
        images = sum(job.images for job in jobs)
        stage = jobs[0].stage
        previews = [job.wants_preview(job.step + 1) for job in jobs]
        events, pictures = await self.engine.step([job.work for job in jobs], previews)
        now = self.clock()
        self.metrics.observe_step(stage, images)
        for job, event, picture in zip(jobs, events, pictures, strict=True):
            if job.first_step_at is None:
                job.first_step_at = now
                self.metrics.time_to_first_step.observe(now - job.enqueued_at)
            job.batch_images = max(job.batch_images, images)
            job.step, job.total = event.step, event.total
            if job.watched:
                job.publish("step", stage=stage, step=event.step, total=event.total)
                if picture is not None:
                    job.publish(
                        "preview", stage=stage, step=event.step, total=event.total, images=picture
                    )
            if event.finished_stage:  # the state moved on to its next stage
                job.stage = event.state.stage.value
                job.step = 0
                job.total = job.params.decoder_steps if job.stage == "decoder" else 0

    async def _step_together(self, groups: list[list[Job]]) -> None:
        """Step groups of different networks at the same time. A group whose call raised is then
        retried as ``_isolating`` does, alone: the other group's step stands."""
        self._calls += 1
        self.metrics.overlapped_steps.inc()
        outcomes = await asyncio.gather(
            *(self._step(group) for group in groups), return_exceptions=True
        )
        for group, outcome in zip(groups, outcomes, strict=True):
            if outcome is None:
                self.metrics.batches.labels("ok").inc()
            elif isinstance(outcome, Exception):
                await self._recover(group, outcome, self._step)
            else:  # cancelled or exiting: not a job's failure
                raise outcome

    # ---- decoding ----

    async def _decode(self, jobs: list[Job]) -> None:
        results = await self.engine.decode([job.work for job in jobs])
        for job, result in zip(jobs, results, strict=True):
            self.active.remove(job)
            if isinstance(result, NonFiniteOutput):
                job.work = None
                job.fail(
                    NonFiniteImage(
                        f"the model produced NaN/inf pixels ({result}); try another seed"
                    )
                )
                continue
            timings, job.work = job.work.timings, None
            self.metrics.observe_stages(
                {name: getattr(timings, name) for name in ("text", "prior", "decoder", "vqgan")}
            )
            self.metrics.images.inc(job.images)
            job.finish(
                JobResult(
                    result,
                    timings,
                    job.batch_images,
                    queue_wait=(job.admitted_at or 0.0) - job.enqueued_at,
                    first_step=(job.first_step_at or 0.0) - job.enqueued_at,
                )
            )

    # ---- failures ----

    async def _isolating(
        self, jobs: list[Job], call: Callable[[list[Job]], Awaitable[None]]
    ) -> None:
        """``call(jobs)``; if it raises, retry each half, down to a single job, which alone fails:
        whoever shared a call with a failing job is unaffected (a failed call changes no job
        state). Out of memory also caps the group's forward size (``_caps``)."""
        self._calls += 1
        try:
            await call(jobs)
            self.metrics.batches.labels("ok").inc()
            return
        except Exception as exc:  # noqa: BLE001 (isolated below: only the failing job fails)
            await self._recover(jobs, exc, call)

    async def _recover(
        self, jobs: list[Job], exc: Exception, call: Callable[[list[Job]], Awaitable[None]]
    ) -> None:
        """After ``call(jobs)`` raised ``exc``: count it, cap the group on out of memory, fail a
        lone job, or retry each half (``_isolating``)."""
        error: Exception
        if isinstance(exc, OutOfMemory):
            if self.overlap:  # the engine left freeing memory to us: nothing is in flight now
                await self.engine.release_memory()
            self.metrics.batches.labels("oom").inc()
            error = OutOfMemory(f"{exc.message}; retry with fewer images or a smaller size")
            if call == self._step and len(jobs) > 1:
                self._caps[jobs[0].group] = _Cap(max(1, len(jobs) // 2))
        else:
            self.metrics.batches.labels("error").inc()
            logger.warning("a call for %d job(s) failed: %r", len(jobs), exc)
            error = GenerationFailed(
                f"generation failed ({type(exc).__name__}: {exc}); "
                "other requests are unaffected, retry"
            )
        if len(jobs) == 1:
            if isinstance(error, GenerationFailed):
                logger.error("job %s failed: %s", jobs[0].request_id, error.message)
            self._fail(jobs, error)
            return
        half = len(jobs) // 2
        await self._isolating(jobs[:half], call)
        await self._isolating(jobs[half:], call)

    def _fail(self, jobs: Sequence[Job], error: Exception) -> None:
        for job in jobs:
            job.fail(error)
            if job in self.active:
                self.active.remove(job)
            job.work = None

    def _capped(self, group: list[Job]) -> list[Job]:
        """The oldest jobs of ``group`` within the cap an out-of-memory error left on it. A cap
        is lifted after CAP_STEPS good steps, to try the full size again."""
        key = group[0].group
        cap = self._caps.get(key)
        if cap is None:
            return group
        cap.steps += 1
        if cap.steps > CAP_STEPS:
            del self._caps[key]
            return group
        chosen, images = [group[0]], group[0].images
        for job in group[1:]:
            if images + job.images <= cap.images:
                chosen.append(job)
                images += job.images
        return chosen

    # ---- bookkeeping ----

    def _expire(self, now: float) -> None:
        for job in policy.expired(self.active, now):
            if job.expire(DeadlineExceeded(_deadline_message(job, now))):
                self.metrics.cancelled.labels("deadline").inc()

    def _report_positions(self) -> None:
        """Tell streaming clients whose place in the queue changed (jobs ahead were admitted or
        left)."""
        for position, job in enumerate(self.queue):
            if job.watched and job.reported_position != position:
                job.reported_position = position
                job.publish("queued", queue_position=position)

    def _drop_answered(self) -> None:
        """Jobs answered from outside (cancel, disconnect, deadline) leave: their rows are not in
        the next forward."""
        if any(job.done for job in self.active):
            for job in self.active:
                if job.done:
                    job.work = None  # its latents and conditioning are freed here
            self.active = [job for job in self.active if not job.done]
        self._publish()

    def _publish(self) -> None:
        images = {"prior": 0, "decoder": 0, "vqgan": 0}
        for job in self.active:
            if job.stage in images:
                images[job.stage] += job.images
        self.metrics.set_active_images(images)


@dataclass
class _Cap:
    images: int
    steps: int = 0


def _deadline_message(job: Job, now: float) -> str:
    waited = now - job.enqueued_at
    return (
        f"the request waited {waited:.1f}s without starting, past its deadline; "
        "the server is busy, retry later"
    )
