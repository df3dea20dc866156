"""Micro-batch formation: which queued jobs run together. No torch, no HTTP."""

from __future__ import annotations

import time
from collections.abc import Callable

from service.jobs import Job, JobQueue


async def collect_batch(
    queue: JobQueue,
    max_images: int,
    max_wait_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> list[Job]:
    """Wait for the oldest job, then gather compatible jobs (same batch_key) for up to
    ``max_wait_s``.

    The oldest job always leads the batch, so a job with a rare key is never starved by a stream of
    others. Each iteration takes every compatible job that fits the remaining image budget; the loop
    ends when the budget is used up or the wait has passed. Jobs that do not fit stay queued in
    order. A job bigger than ``max_images`` still runs alone (the app refuses such requests, so it
    does not occur).
    """
    first = await queue.take_oldest()
    batch, images = [first], first.images
    until = clock() + max_wait_s
    while images < max_images:
        for job in queue.take_compatible(first.key, max_images - images):
            batch.append(job)
            images += job.images
        remaining = until - clock()
        if images >= max_images or remaining <= 0 or not await queue.wait_for_put(remaining):
            break
    return batch
