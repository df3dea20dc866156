"""A Job (one admitted request) and the bounded FIFO JobQueue the scheduler reads from.

Everything here runs on the event-loop thread, so no locks: state changes happen between awaits.
A job's answer is its future: resolved once, by the scheduler (result or error), by its request
(deadline, disconnect) or by a cancel (DELETE /v1/requests/{id}); whoever comes first wins, and the
scheduler drops a job whose future is resolved at the next step boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections import deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from models.request import GenerationParams, GenerationResult, StageTimings
from service.errors import QueueFull, ServiceError


class JobState(enum.Enum):
    QUEUED = "queued"  # in the JobQueue
    TAKEN = "taken"  # taken from the queue, being admitted (static mode: the batch is forming)
    ACTIVE = "active"  # has engine state; stepped by the scheduler (``stage``, ``step``)
    DONE = "done"  # future resolved with a result or an error


@dataclass
class JobResult:
    """What the scheduler hands back to the waiting request."""

    result: GenerationResult
    timings: StageTimings  # of this job: the calls it took part in
    batch_images: int  # most images in one forward this job took part in
    queue_wait: float  # seconds from enqueue to admission
    first_step: float  # seconds from enqueue to the end of the first step


@dataclass
class Progress:
    """One event in a job's life, for whoever streams it (service/streaming.py): ``type`` is
    queued (``queue_position``), started, step (``stage``, ``step``, ``total``: steps done of
    that stage), preview (the same plus ``images``, uint8 [n, 3, h, w]), then result
    (``result``: JobResult) or error (``error``: the exception); heartbeat carries nothing."""

    type: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class Job:
    params: GenerationParams
    future: asyncio.Future[JobResult]
    deadline: float  # time.monotonic() by which the job's first step must have run
    request_id: str = ""
    owner: str | None = None  # digest of the API key that submitted it (None: keys are off)
    enqueued_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_step_at: float | None = None
    state: JobState = JobState.QUEUED
    stage: str = "queued"  # then "prior", "decoder", "vqgan", "done"
    step: int = 0  # steps done in ``stage``
    total: int = 0  # steps of ``stage``
    order: int = 0  # admission sequence number (scheduling_policy: smaller = older)
    work: Any = None  # the engine's JobState once admitted (opaque here: no torch)
    batch_images: int = 0
    outcome: str | None = None  # once done: "done", "failed" or "cancelled"
    preview_steps: frozenset[int] = frozenset()  # Stage C steps done after which to draw a preview
    reported_position: int | None = None  # the queue position last published
    _listeners: list[asyncio.Queue[Progress]] = field(default_factory=list, repr=False)

    @property
    def images(self) -> int:
        return self.params.num_images

    @property
    def key(self) -> Hashable:
        return self.params.batch_key()

    @property
    def group(self) -> Hashable | None:
        """The engine's group key while the job has a denoising step to run, else None (what
        scheduling_policy.choose_group reads, with ``stage``, ``step``, ``total`` and ``size``)."""
        return self.work.group_key if self.stage in ("prior", "decoder") else None

    @property
    def size(self) -> tuple[int, int]:
        return (self.params.width, self.params.height)

    @property
    def started(self) -> bool:
        """True once the job's first denoising step has run (the deadline no longer applies)."""
        return self.first_step_at is not None

    @property
    def done(self) -> bool:
        return self.future.done()

    @property
    def watched(self) -> bool:
        """Someone streams this job's progress (nobody computes events for jobs without)."""
        return bool(self._listeners)

    def wants_preview(self, steps_done: int) -> bool:
        """Whether a preview is due once Stage C has ``steps_done`` steps done."""
        return self.stage == "prior" and steps_done in self.preview_steps and self.watched

    def listen(self) -> asyncio.Queue[Progress]:
        """A channel that receives every event published from now on (unbounded: events are
        few, a handful per step)."""
        channel: asyncio.Queue[Progress] = asyncio.Queue()
        self._listeners.append(channel)
        return channel

    def unlisten(self, channel: asyncio.Queue[Progress]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(channel)

    def publish(self, type: str, **data: Any) -> None:
        for channel in self._listeners:
            channel.put_nowait(Progress(type, data))

    def cancel(self, error: ServiceError) -> bool:
        """Answer ``error`` now, queued or running; the scheduler frees its rows at the next step
        boundary. False if the job was already answered."""
        if self.done:
            return False
        self.fail(error, outcome="cancelled")
        return True

    def expire(self, error: ServiceError) -> bool:
        """Answer ``error`` if the job has not had its first step; True if it was expired."""
        return not self.started and self.cancel(error)

    def finish(self, result: JobResult) -> None:
        self.state, self.stage = JobState.DONE, "done"
        if not self.future.done():
            self.outcome = "done"
            self.future.set_result(result)

    def fail(self, error: BaseException, outcome: str = "failed") -> None:
        self.state = JobState.DONE
        if not self.future.done():
            self.outcome = outcome
            self.future.set_exception(error)

    def describe(self, position: int | None = None) -> dict[str, Any]:
        """The job's state for clients (DELETE / GET /v1/requests/{id}): status, stage, step."""
        status = self.outcome or ("queued" if self.state is JobState.QUEUED else "running")
        info: dict[str, Any] = {"id": self.request_id, "status": status, "stage": self.stage}
        if self.stage in ("prior", "decoder"):
            info.update(step=self.step, total=self.total)
        if position is not None:
            info["queue_position"] = position
        return info


class JobQueue:
    """Bounded FIFO of jobs. ``put`` never waits: a full queue raises QueueFull at once (503)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._jobs: deque[Job] = deque()
        self._put_event = asyncio.Event()

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Job]:
        """The queued jobs, oldest first (a snapshot: the queue may be changed while iterating)."""
        return iter(list(self._jobs))

    def put(self, job: Job) -> None:
        if len(self._jobs) >= self.capacity:
            raise QueueFull(
                f"the queue is full ({self.capacity} jobs waiting, CASCADE_MAX_QUEUE_SIZE); "
                "retry after the Retry-After delay"
            )
        job.state = JobState.QUEUED
        self._jobs.append(job)
        self._put_event.set()

    def position(self, job: Job) -> int | None:
        """0 for the oldest queued job; None when ``job`` is not queued."""
        with contextlib.suppress(ValueError):
            return self._jobs.index(job)
        return None

    def discard(self, job: Job) -> None:
        """Remove a queued job (cancelled by its client); no-op if it was already taken."""
        with contextlib.suppress(ValueError):
            self._jobs.remove(job)

    def take(self, job: Job) -> None:
        """Take a queued job out of the queue for admission."""
        self._jobs.remove(job)
        job.state = JobState.TAKEN

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

    async def wait_for_put(self, timeout: float | None = None) -> bool:
        """Wait until the next ``put`` (True) or ``timeout`` seconds (False; None: no limit)."""
        self._put_event.clear()
        try:
            await asyncio.wait_for(self._put_event.wait(), timeout)
        except TimeoutError:
            return False
        return True
