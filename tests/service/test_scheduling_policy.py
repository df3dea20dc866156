"""The scheduling policy alone (no torch, no HTTP), with a fake clock and a fake model: jobs are
step counters, one iteration advances one group by one step."""

from __future__ import annotations

from dataclasses import dataclass, field

from service import scheduling_policy as policy


@dataclass(eq=False)
class FakeJob:
    """A job of ``images`` images at one size, with ``prior`` + ``decoder`` steps."""

    name: str
    images: int = 1
    size: int = 1024
    prior: int = 20
    decoder: int = 10
    arrived: float = 0.0
    deadline: float = 1e9
    order: int = -1
    done_steps: int = 0
    first_step: float | None = None
    finished_at: float | None = None
    groups_seen: list[int] = field(default_factory=list)

    @property
    def started(self) -> bool:
        return self.first_step is not None

    @property
    def group(self):
        if self.done_steps < self.prior:
            return ("prior", self.size)
        if self.done_steps < self.prior + self.decoder:
            return ("decoder", self.size)
        return None


class FakeScheduler:
    """Drives the policy as service/scheduler.py does: admit, choose, step; one time unit per
    step (the fake clock)."""

    def __init__(self, max_batch: int, max_active: int) -> None:
        self.max_batch, self.max_active = max_batch, max_active
        self.now, self.queue, self.active, self.finished = 0.0, [], [], []
        self.next_order = 0

    def iterate(self) -> list[FakeJob]:
        for job in [j for j in self.active if j.group is None]:
            job.finished_at = self.now
            self.active.remove(job)
            self.finished.append(job)
        for job in policy.admit(self.queue, sum(j.images for j in self.active), self.max_active):
            self.queue.remove(job)
            job.order, self.next_order = self.next_order, self.next_order + 1
            self.active.append(job)
        group = policy.choose_group(self.active, self.max_batch)
        self.now += 1
        for job in group:
            job.done_steps += 1
            job.first_step = job.first_step if job.first_step is not None else self.now
            job.groups_seen.append(len(group))
        return group


def test_admission_is_oldest_first_and_a_large_job_is_never_overtaken():
    jobs = [FakeJob("a", 2), FakeJob("big", 4), FakeJob("c", 1)]
    assert [j.name for j in policy.admit(jobs, 0, 4)] == ["a"]  # big does not fit: c waits too
    assert [j.name for j in policy.admit(jobs, 3, 4)] == []
    assert [j.name for j in policy.admit(jobs[1:], 0, 4)] == ["big"]
    assert [j.name for j in policy.admit([FakeJob("huge", 9)], 0, 4)] == ["huge"]  # alone


def test_the_oldest_jobs_group_goes_first_with_younger_members_that_fit():
    a, b, c, d = (FakeJob(n, i) for n, i in (("a", 1), ("b", 2), ("c", 2), ("d", 1)))
    for order, job in enumerate((a, b, c, d)):
        job.order = order
    b.size = 512  # another group
    assert policy.choose_group([d, c, b, a], max_batch_images=4) == [a, c, d]
    a.done_steps = 30  # a waits for Stage A: b's group is now the oldest steppable one
    assert policy.choose_group([d, c, b, a], max_batch_images=4) == [b]
    assert policy.choose_group([], 4) == []


def test_deadline_means_before_the_first_step():
    waiting, running = FakeJob("w", deadline=5.0), FakeJob("r", deadline=5.0, first_step=1.0)
    assert policy.expired([waiting, running], now=4.9) == []
    assert policy.expired([waiting, running], now=5.1) == [waiting]


def test_no_starvation_of_a_rare_size_or_of_either_stage():
    """A steady stream of default-size jobs; one 512 px job among them still finishes within
    the steps of the jobs admitted before it, and every job's steps keep coming."""
    sched = FakeScheduler(max_batch=4, max_active=8)
    rare = FakeJob("rare", size=512)
    for i in range(60):
        sched.queue.append(rare if i == 10 else FakeJob(f"j{i}", arrived=sched.now))
        sched.iterate()
        sched.iterate()
    while sched.active or sched.queue:
        sched.iterate()
    assert rare in sched.finished and len(sched.finished) == 60
    # admitted with at most 7 others ahead of it, each needing 30 steps: a bounded wait
    assert rare.finished_at - rare.first_step <= 8 * 30
    for job in sched.finished:
        assert job.done_steps == job.prior + job.decoder


def test_new_jobs_join_a_running_group_instead_of_waiting_for_it():
    """A job arriving while another is at step 5 of Stage C gets its first step at once."""
    sched = FakeScheduler(max_batch=4, max_active=8)
    sched.queue.append(FakeJob("first"))
    for _ in range(5):
        sched.iterate()
    late = FakeJob("late", arrived=sched.now)
    sched.queue.append(late)
    group = sched.iterate()
    assert late in group and len(group) == 2 and late.first_step == sched.now


def test_forwards_never_exceed_the_image_bound():
    sched = FakeScheduler(max_batch=4, max_active=12)
    for i in range(20):
        sched.queue.append(FakeJob(f"j{i}", images=1 + i % 3))
    while sched.active or sched.queue:
        group = sched.iterate()
        assert sum(j.images for j in group) <= 4 or len(group) == 1
        assert sum(j.images for j in sched.active) <= 12
