"""Which jobs the scheduler admits and which group it advances next. Plain Python: no torch, no
asyncio, no HTTP, no clock of its own (callers pass ``now``), so it is tested alone.

Vocabulary. A *queued* job waits in the FIFO queue. *Admitting* a job encodes its text and gives
it engine state; it is then *active* and counts towards ``max_active_images`` (the memory bound:
latents and conditioning of every active image stay on the device). A *group* is the set of active
jobs that can share one forward: same network and latent shape (``group`` key), whatever step each
is at. Every iteration of the scheduler runs at most one forward, of at most ``max_batch_images``
images (the activation-memory bound).

The continuous policy:
- **Admission, oldest first.** Queued jobs are admitted in arrival order while their images fit
  in ``max_active_images``; the first that does not fit stops admission, so a large job is never
  overtaken by a stream of small ones. Admitted jobs join the group of their stage at its next
  step; nobody waits for a running batch to end.
- **Group choice, oldest job first.** The group advanced is the one holding the earliest-admitted
  job that has a step to run (its *head*). Since every admitted job ends after a bounded number of
  steps and admission is FIFO, each job's group is chosen within a bounded number of iterations:
  neither a rare size nor either stage starves.
- **Catching up at the Stage C -> Stage B boundary.** A forward costs nearly the same with one image
  as with several (the networks are bound by their fixed per-forward work at serving sizes), so
  what decides both throughput and latency is how full the forwards are. Jobs that joined a group
  later are some Stage C steps behind; if the head went on into Stage B alone, they would finish
  Stage C and then run all of Stage B in forwards of their own. So when the head is about to start
  Stage B and same-size jobs are still in Stage C, the jobs closest to the end of Stage C are
  advanced first, as long as (their steps left) x (images waiting at the boundary) <= ``catch_up``
  (image-steps of delay accepted to merge; 0 turns this off) and the waiting images do not already
  fill a forward. They then enter Stage B together with the head. The head's delay is bounded
  (each wait needs more images waiting, and stops once they fill a forward), so this keeps the
  no-starvation bound.
- **Rows of the chosen group, oldest first**, while their images fit in ``max_batch_images``; a
  job that does not fit is passed over for younger ones that do (it is still the oldest of the
  jobs left out, so it goes first next time its group is chosen).
- **Overlap** (``CASCADE_STAGE_OVERLAP``): Stage C and Stage B are different networks, so a Stage C
  forward and a Stage B forward can run at the same time (two CUDA streams). Then each iteration
  advances the group chosen above and, beside it, the group of the oldest job in the other stage.
  The head going on into Stage B no longer stops the jobs behind it (they keep stepping beside it
  and join its Stage B group, at whatever step it is, when they get there), so the catch-up is
  smaller (``OVERLAP_CATCH_UP``): it only saves the Stage B forwards of jobs a few steps behind, and
  while it holds the head at the boundary, the jobs waiting there are not stepped beside the
  catching-up ones. Groups of one network never run at once.
- **Deadline** = before the job's first step: a queued job, or an admitted job that has not
  stepped, is expired once ``now`` passes its deadline.

The static policy (today's request-level batching, ``CASCADE_BATCHING=static``) admits a batch of
compatible jobs only when nothing is active (service/batching.py forms it) and then advances that
whole batch every iteration; jobs leave it only when cancelled.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Protocol, TypeVar


class Queued(Protocol):
    """What admission needs to know of a queued job."""

    @property
    def images(self) -> int: ...


class Active(Protocol):
    """What group choice needs to know of an active job: ``order`` is its admission sequence
    number (smaller = admitted earlier); ``group`` its group key, None when it has no step to run
    (e.g. waiting for Stage A); ``stage`` "prior" or "decoder"; ``step`` / ``total`` its position
    in that stage; ``size`` its image size (jobs of one size share a Stage B group)."""

    @property
    def images(self) -> int: ...

    @property
    def order(self) -> int: ...

    @property
    def group(self) -> Hashable | None: ...

    @property
    def stage(self) -> str: ...

    @property
    def step(self) -> int: ...

    @property
    def total(self) -> int: ...

    @property
    def size(self) -> Hashable: ...


Q = TypeVar("Q", bound=Queued)
A = TypeVar("A", bound=Active)


class Expirable(Protocol):
    @property
    def deadline(self) -> float: ...

    @property
    def started(self) -> bool: ...


E = TypeVar("E", bound=Expirable)


def admit(queued: Iterable[Q], active_images: int, max_active_images: int) -> list[Q]:
    """The queued jobs (oldest first) to admit now: a prefix of ``queued`` whose images fit in
    ``max_active_images - active_images``. A job larger than ``max_active_images`` is admitted
    alone once nothing is active (the app refuses such requests, so it does not occur)."""
    chosen: list[Q] = []
    room = max_active_images - active_images
    for job in queued:
        if job.images > room and (chosen or active_images > 0):
            break
        chosen.append(job)
        room -= job.images
    return chosen


CATCH_UP = 30  # image-steps of delay the head accepts at the Stage B boundary to merge (docstring)


def choose_group(active: Sequence[A], max_batch_images: int, catch_up: int = CATCH_UP) -> list[A]:
    """The jobs to advance by one step: the head's group (or the catching-up Stage C jobs, see the
    module docstring), oldest first (catching-up jobs: closest to the end first), while they fit in
    ``max_batch_images`` images (the first one always goes, even if larger). Empty when no active
    job has a step to run."""
    steppable = [job for job in active if job.group is not None]
    if not steppable:
        return []
    head = min(steppable, key=lambda job: job.order)
    order = lambda job: job.order
    if head.stage == "decoder" and head.step == 0 and catch_up > 0:
        waiting = sum(j.images for j in steppable if j.group == head.group and j.step == 0)
        behind = [j for j in steppable if j.stage == "prior" and j.size == head.size]
        if behind and waiting < max_batch_images:
            lead = min(behind, key=lambda j: (j.total - j.step, j.order))
            if (lead.total - lead.step) * waiting <= catch_up:
                head = lead
                order = lambda job: (job.total - job.step, job.order)
    members = sorted((j for j in steppable if j.group == head.group and j is not head), key=order)
    chosen, room = [head], max_batch_images - head.images
    for job in members:
        if job.images <= room:
            chosen.append(job)
            room -= job.images
    return chosen


# With overlap the jobs behind keep stepping while the head runs Stage B: a shorter wait pays. Chosen in
# bench/simulate_scheduling.py (docs/bench_scheduling.md, "Stage overlap").
OVERLAP_CATCH_UP = 10


def choose_groups(
    active: Sequence[A],
    max_batch_images: int,
    catch_up: int | None = None,
    overlap: bool = False,
) -> list[list[A]]:
    """The groups to advance in this iteration: ``[choose_group(...)]``, or with ``overlap`` up to
    two to run at the same time: that group, then beside it the oldest job's group of the other
    stage, less the jobs a catch-up holds at the Stage B boundary (module docstring). ``catch_up``:
    default CATCH_UP, OVERLAP_CATCH_UP with overlap. Empty when no active job has a step to run."""
    if catch_up is None:
        catch_up = OVERLAP_CATCH_UP if overlap else CATCH_UP
    first = choose_group(active, max_batch_images, catch_up)
    if not overlap or not first:
        return [first] if first else []
    steppable = [job for job in active if job.group is not None]
    head = min(steppable, key=lambda job: job.order)
    held = head.group if first[0].stage != head.stage else None  # the catch-up is holding it
    others = [
        job
        for job in steppable
        if job.stage != first[0].stage and not (job.group == held and job.step == 0)
    ]
    second = choose_group(others, max_batch_images, catch_up=0)
    return [first, second] if second else [first]


def expired(jobs: Iterable[E], now: float) -> list[E]:
    """The jobs whose deadline has passed before their first step."""
    return [job for job in jobs if not job.started and now > job.deadline]
