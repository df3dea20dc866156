"""The scheduler loop never spins: an iteration with nothing to compute gives the event loop a
turn, so a job answered while queued (whose done callback has not run yet) cannot wedge it."""

from __future__ import annotations

import asyncio
import threading

from models.request import GenerationParams
from service.errors import Cancelled
from service.jobs import Job, JobQueue
from service.metrics import Metrics
from service.scheduler import Scheduler


def test_a_job_answered_while_queued_does_not_wedge_the_loop():
    finished = threading.Event()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        queue = JobQueue(4)
        scheduler = Scheduler(
            queue, engine=None, metrics=Metrics(4), mode="continuous",  # type: ignore[arg-type]
            max_batch_images=4, max_active_images=8, max_batch_wait_s=0.0,
        )  # fmt: skip
        job = Job(GenerationParams("p"), loop.create_future(), deadline=1e9)
        queue.put(job)
        job.cancel(Cancelled("cancelled by DELETE"))  # answered; nobody took it out of the queue
        task = asyncio.create_task(scheduler.run())
        for _ in range(20):  # other tasks keep running: the scheduler yields
            await asyncio.sleep(0.01)
        assert len(queue) == 0 and not scheduler.active
        task.cancel()
        finished.set()

    thread = threading.Thread(target=lambda: asyncio.run(scenario()), daemon=True)
    thread.start()
    assert finished.wait(30), "the scheduler spun on the event loop without yielding"
