"""JobQueue and collect_batch without HTTP or a model: grouping by batch_key, the image cap, the
wait, fairness to the oldest job, and immediate rejection when the queue is full."""

from __future__ import annotations

import asyncio
import time

import pytest

from models.request import GenerationParams
from service.batching import collect_batch
from service.errors import DeadlineExceeded, QueueFull
from service.jobs import Job, JobQueue, JobState


def job(prompt: str, width: int = 128, images: int = 1) -> Job:
    params = GenerationParams(prompt=prompt, width=width, height=128, num_images=images)
    return Job(params, asyncio.get_running_loop().create_future(), deadline=time.monotonic() + 60)


def prompts(batch: list[Job]) -> list[str]:
    return [j.params.prompt for j in batch]


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_compatible_jobs_are_batched_oldest_first_and_others_keep_their_place() -> None:
    async def scenario() -> None:
        q = JobQueue(10)
        for j in [job("a"), job("x", width=256), job("b"), job("y", width=256), job("c")]:
            q.put(j)
        assert prompts(await collect_batch(q, max_images=8, max_wait_s=0)) == ["a", "b", "c"]
        assert prompts(await collect_batch(q, max_images=8, max_wait_s=0)) == ["x", "y"]
        assert len(q) == 0

    run(scenario())


def test_cap_counts_images_not_requests() -> None:
    async def scenario() -> None:
        q = JobQueue(10)
        for j in [job("a", images=2), job("b", images=3), job("c", images=2), job("d", images=1)]:
            q.put(j)
        # 2 + (3 does not fit in 4) + 2 = 4 images; "b" and "d" stay queued, in order
        assert prompts(await collect_batch(q, max_images=4, max_wait_s=0)) == ["a", "c"]
        assert prompts(await collect_batch(q, max_images=4, max_wait_s=0)) == ["b", "d"]

    run(scenario())


def test_oldest_job_is_never_starved_by_a_stream_of_others() -> None:
    async def scenario() -> None:
        q = JobQueue(100)
        q.put(job("rare", width=256))
        for i in range(20):
            q.put(job(f"common{i}"))
        first = await collect_batch(q, max_images=4, max_wait_s=0)
        assert prompts(first) == ["rare"]

    run(scenario())


def test_waits_for_company_up_to_max_wait_then_goes() -> None:
    async def scenario() -> None:
        q = JobQueue(10)
        q.put(job("a"))

        async def late_arrivals() -> None:
            await asyncio.sleep(0.02)
            q.put(job("other", width=256))  # wakes the collector, but is not compatible
            await asyncio.sleep(0.02)
            q.put(job("b"))

        task = asyncio.create_task(late_arrivals())
        started = time.monotonic()
        batch = await collect_batch(q, max_images=4, max_wait_s=0.3)
        waited = time.monotonic() - started
        await task
        assert prompts(batch) == ["a", "b"]
        assert (
            0.3 <= waited < 2.0
        )  # "b" arrived early, but the batch was not full: it waited the window

    run(scenario())


def test_a_full_batch_leaves_without_waiting() -> None:
    async def scenario() -> None:
        q = JobQueue(10)
        for name in "abcd":
            q.put(job(name))
        started = time.monotonic()
        batch = await collect_batch(q, max_images=4, max_wait_s=5.0)
        assert prompts(batch) == list("abcd") and time.monotonic() - started < 1.0

    run(scenario())


def test_full_queue_rejects_at_once_and_cancelled_jobs_leave_it() -> None:
    async def scenario() -> None:
        q = JobQueue(2)
        a, b = job("a"), job("b")
        q.put(a)
        q.put(b)
        with pytest.raises(QueueFull, match="2 jobs"):
            q.put(job("c"))
        assert a.cancel(DeadlineExceeded("late")) and a.state is JobState.DONE
        q.discard(a)
        q.put(job("d"))
        assert prompts(await collect_batch(q, max_images=4, max_wait_s=0)) == ["b", "d"]
        with pytest.raises(DeadlineExceeded):
            a.future.result()

    run(scenario())


def test_a_job_that_has_stepped_no_longer_expires_but_can_still_be_cancelled() -> None:
    async def scenario() -> None:
        q = JobQueue(2)
        q.put(job("a"))
        (taken,) = await collect_batch(q, max_images=1, max_wait_s=0)
        taken.first_step_at = time.monotonic()
        assert not taken.expire(DeadlineExceeded("late")) and not taken.future.done()
        assert taken.cancel(DeadlineExceeded("cancelled")) and taken.outcome == "cancelled"
        assert not taken.cancel(DeadlineExceeded("twice"))

    run(scenario())
