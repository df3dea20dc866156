"""BatchWorker: the one task that turns queued jobs into pipeline batches and answers every job."""

from __future__ import annotations

import logging
import time

from models.request import NonFiniteOutput
from service.batching import collect_batch
from service.engine import Engine
from service.errors import (
    DeadlineExceeded,
    GenerationFailed,
    InternalError,
    NonFiniteImage,
    OutOfMemory,
)
from service.jobs import Job, JobQueue, JobResult
from service.metrics import Metrics

logger = logging.getLogger("service.worker")


class BatchWorker:
    def __init__(
        self,
        queue: JobQueue,
        engine: Engine,
        metrics: Metrics,
        max_batch_images: int,
        max_batch_wait_s: float,
    ) -> None:
        self.queue, self.engine, self.metrics = queue, engine, metrics
        self.max_batch_images, self.max_batch_wait_s = max_batch_images, max_batch_wait_s

    async def run(self) -> None:
        """Each iteration collects one batch of compatible jobs, answers the expired ones 504,
        skips the cancelled ones, runs the rest, and resolves every job it took before the next
        iteration. A failing batch fails only its own jobs. Ends only when the task is cancelled
        (at shutdown)."""
        while True:
            batch = await collect_batch(self.queue, self.max_batch_images, self.max_batch_wait_s)
            try:
                now = time.monotonic()
                live = []
                for job in batch:
                    if now > job.deadline:
                        if job.cancel(DeadlineExceeded(_deadline_message(job, now))):
                            self.metrics.queue_wait.observe(now - job.enqueued_at)
                    elif job.start(now):
                        self.metrics.queue_wait.observe(now - job.enqueued_at)
                        live.append(job)
                if live:
                    await self._run(live)
            except Exception as exc:
                # a bug here must not stop the worker: answer the jobs and go on
                logger.exception("worker iteration failed")
                for job in batch:
                    job.fail(
                        InternalError(f"internal error while batching: {type(exc).__name__}: {exc}")
                    )

    async def _run(self, jobs: list[Job]) -> None:
        """Run ``jobs`` as one batch. Out of memory: retry as two halves, down to single jobs."""
        images = sum(job.images for job in jobs)
        try:
            output = await self.engine.generate([job.params for job in jobs])
        except OutOfMemory as exc:
            self.metrics.observe_batch(images, "oom")
            if len(jobs) == 1:
                jobs[0].fail(
                    OutOfMemory(f"{exc.message}; retry with fewer images or a smaller size")
                )
                return
            logger.warning("out of memory on a batch of %d images; retrying in halves", images)
            half = len(jobs) // 2
            await self._run(jobs[:half])
            await self._run(jobs[half:])
            return
        except Exception as exc:
            logger.exception("batch of %d job(s) failed", len(jobs))
            self.metrics.observe_batch(images, "error")
            message = (
                f"generation failed ({type(exc).__name__}: {exc}); "
                "other requests are unaffected, retry"
            )
            for job in jobs:
                job.fail(GenerationFailed(message))
            return
        if len(output.results) != len(jobs):
            self.metrics.observe_batch(images, "error")
            for job in jobs:
                job.fail(
                    InternalError(
                        f"pipeline returned {len(output.results)} results for {len(jobs)} jobs"
                    )
                )
            return
        self.metrics.observe_batch(images, "ok")
        timings = output.timings
        self.metrics.observe_stages(
            {
                "text": timings.text,
                "prior": timings.prior,
                "decoder": timings.decoder,
                "vqgan": timings.vqgan,
            }
        )
        for job, result in zip(jobs, output.results, strict=True):
            if isinstance(result, NonFiniteOutput):
                job.fail(
                    NonFiniteImage(
                        f"the model produced NaN/inf pixels ({result}); try another seed"
                    )
                )
                continue
            self.metrics.images.inc(job.images)
            job.finish(
                JobResult(result, timings, images, (job.started_at or 0.0) - job.enqueued_at)
            )


def _deadline_message(job: Job, now: float) -> str:
    waited = now - job.enqueued_at
    return (
        f"the request waited {waited:.1f}s in the queue, past its deadline; "
        "the server is busy, retry later"
    )
