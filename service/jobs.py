"""A Job (one admitted request) and the bounded FIFO JobQueue the batching worker reads from.

Everything here runs on the event-loop thread, so no locks: state changes happen between awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field

from models.request import GenerationParams, GenerationResult, StageTimings
from service.errors import QueueFull, ServiceError


class JobState(enum.Enum):
    QUEUED = "queued"  # in the JobQueue
    TAKEN = "taken"  # in a batch being formed; can still be cancelled
    RUNNING = "running"  # handed to the pipeline; runs to the end
    DONE = "done"  # future resolved with a result or an error


@dataclass
class JobResult:
    """What the worker hands back to the waiting request."""

    result: GenerationResult
    timings: StageTimings  # of the whole batch
    batch_images: int
    queue_wait: float  # seconds from enqueue to batch start


@dataclass(eq=False)
class Job:
    params: GenerationParams
    future: asyncio.Future[JobResult]
    deadline: float  # time.monotonic() by which the batch must start
    request_id: str = ""
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    state: JobState = JobState.QUEUED

    @property
    def images(self) -> int:
        return self.params.num_images

    @property
    def key(self) -> Hashable:
        return self.params.batch_key()

    def start(self, now: float) -> bool:
        """Mark RUNNING; False if the job was cancelled (or already answered) and must not be
        computed."""
        if self.state is not JobState.TAKEN or self.future.done():
            return False
        self.state, self.started_at = JobState.RUNNING, now
        return True

    def cancel(self, error: ServiceError) -> bool:
        """Answer ``error`` if the job has not started computing; True if it was cancelled."""
        if self.state in (JobState.RUNNING, JobState.DONE):
            return False
        self.fail(error)
        return True

    def finish(self, result: JobResult) -> None:
        self.state = JobState.DONE
        if not self.future.done():
            self.future.set_result(result)

    def fail(self, error: BaseException) -> None:
        self.state = JobState.DONE
        if not self.future.done():
            self.future.set_exception(error)


class JobQueue:
    """Bounded FIFO of jobs. ``put`` never waits: a full queue raises QueueFull at once (503)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._jobs: deque[Job] = deque()
        self._put_event = asyncio.Event()

    def __len__(self) -> int:
        return len(self._jobs)

    def put(self, job: Job) -> None:
        if len(self._jobs) >= self.capacity:
            raise QueueFull(
                f"the queue is full ({self.capacity} jobs waiting); "
                "retry after the Retry-After delay"
            )
        job.state = JobState.QUEUED
        self._jobs.append(job)
        self._put_event.set()

    def discard(self, job: Job) -> None:
        """Remove a queued job (cancelled by its client); no-op if it was already taken."""
        with contextlib.suppress(ValueError):
            self._jobs.remove(job)

    async def take_oldest(self) -> Job:
        """Wait for a job and take the oldest one."""
        while not self._jobs:
            self._put_event.clear()
            await self._put_event.wait()
        job = self._jobs.popleft()
        job.state = JobState.TAKEN
        return job

    def take_compatible(self, key: Hashable, room: int) -> list[Job]:
        """Take, oldest first, every queued job with ``key`` whose images fit in ``room``."""
        taken: list[Job] = []
        for job in list(self._jobs):
            if job.images <= room and job.key == key:
                self._jobs.remove(job)
                job.state = JobState.TAKEN
                taken.append(job)
                room -= job.images
        return taken

    async def wait_for_put(self, timeout: float) -> bool:
        """Wait until the next ``put`` (True) or ``timeout`` seconds (False)."""
        self._put_event.clear()
        try:
            await asyncio.wait_for(self._put_event.wait(), timeout)
        except TimeoutError:
            return False
        return True
