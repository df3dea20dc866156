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

    @property
    def stage(self) -> str:
        return "prior" if self.done_steps < self.prior else "decoder"

    @property
    def step(self) -> int:
        return self.done_steps if self.stage == "prior" else self.done_steps - self.prior

    @property
    def total(self) -> int:
        return self.prior if self.stage == "prior" else self.decoder


class FakeScheduler:
    """Drives the policy as service/scheduler.py does: admit, choose, step; one time unit per
    step (the fake clock)."""

    def __init__(
        self,
        max_batch: int,
        max_active: int,
        catch_up: int = policy.CATCH_UP,
        overlap: bool = False,
    ) -> None:
        self.max_batch, self.max_active, self.catch_up = max_batch, max_active, catch_up
        self.overlap = overlap
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
        groups = policy.choose_groups(self.active, self.max_batch, self.catch_up, self.overlap)
        self.now += 1  # with overlap, the groups of one iteration run at the same time
        for group in groups:
            for job in group:
                job.done_steps += 1
                job.first_step = job.first_step if job.first_step is not None else self.now
                job.groups_seen.append(len(group))
        return [job for group in groups for job in group]


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
    assert policy.choose_group([d, c, b, a], max_batch_images=4, catch_up=0) == [b]
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


def test_jobs_a_few_steps_behind_catch_up_before_the_head_starts_stage_b():
    head, behind, far = FakeJob("head"), FakeJob("behind"), FakeJob("far", images=2)
    for order, job in enumerate((head, behind, far)):
        job.order = order
    head.done_steps, behind.done_steps, far.done_steps = 20, 15, 2  # head at Stage B step 0
    # behind: 5 steps left x 1 image waiting <= 30: it goes first (far shares its Stage C forward)
    assert policy.choose_group([head, behind, far], 4) == [behind, far]
    assert policy.choose_group([head, behind, far], 4, catch_up=0) == [head]
    behind.done_steps = 20  # now both wait at the boundary: far is 18 steps x 2 images away
    assert policy.choose_group([head, behind, far], 4) == [head, behind]
    head.done_steps = 21  # once the head is into Stage B it does not wait again
    behind.done_steps = 12
    assert policy.choose_group([head, behind, far], 4)[0] is head


def test_merging_at_the_boundary_fills_forwards_and_ends_sooner():
    """A job arriving a few steps after another: with catch-up both run Stage B in shared
    forwards; without it the late one runs its Stage B alone."""
    results = {}
    for catch_up in (0, policy.CATCH_UP):
        sched = FakeScheduler(max_batch=4, max_active=8, catch_up=catch_up)
        first, late = FakeJob("first"), FakeJob("late")
        sched.queue.append(first)
        for _ in range(4):
            sched.iterate()
        sched.queue.append(late)
        while sched.active or sched.queue:
            sched.iterate()
        results[catch_up] = (sched.now, first.finished_at, late.finished_at)
    forwards_without, _, late_without = results[0]
    forwards_with, first_with, late_with = results[policy.CATCH_UP]
    assert forwards_with < forwards_without and late_with < late_without
    assert first_with <= 30 + 4 + 1  # the head waited at most the 4 catch-up steps


def test_with_overlap_a_stage_c_group_runs_beside_the_stage_b_group():
    head, far, other = FakeJob("head"), FakeJob("far"), FakeJob("other", size=512)
    for order, job in enumerate((head, far, other)):
        job.order = order
    head.done_steps, far.done_steps = 20, 5  # head at Stage B step 0, far 15 steps behind
    # 15 steps x 1 image > OVERLAP_CATCH_UP: the head goes on, far's group runs beside it
    assert policy.choose_groups([other, far, head], 4, overlap=True) == [[head], [far]]
    far.done_steps = 25  # both in Stage B (one network): one group, never two at once
    assert policy.choose_groups([other, far, head], 4, overlap=True) == [[head, far], [other]]
    other.done_steps = 25  # every job in Stage B: the 512 px group waits its turn
    assert policy.choose_groups([other, far, head], 4, overlap=True) == [[head, far]]
    assert policy.choose_groups([], 4, overlap=True) == []


def test_with_overlap_the_catch_up_holds_the_head_but_not_stage_b_jobs_past_the_boundary():
    head, mid, near = FakeJob("head"), FakeJob("mid"), FakeJob("near")
    for order, job in enumerate((head, mid, near)):
        job.order = order
    head.done_steps, mid.done_steps, near.done_steps = 20, 24, 16  # mid: Stage B step 4
    # near: 4 steps x 1 waiting image <= OVERLAP_CATCH_UP: it catches up, the head waits at the
    # boundary; mid, already in Stage B, steps beside the catching-up job
    assert policy.choose_groups([head, mid, near], 4, overlap=True) == [[near], [mid]]
    near.done_steps = 8  # 12 steps behind: too far, the head goes on with mid, near beside
    assert policy.choose_groups([head, mid, near], 4, overlap=True) == [[head, mid], [near]]
    assert policy.choose_groups([head, mid, near], 4, catch_up=0, overlap=True) == [
        [head, mid],
        [near],
    ]


def test_with_overlap_no_job_waits_and_every_job_finishes():
    """A job arriving while another is in Stage B starts at once beside it; a stream of jobs
    all finish with their steps, none later than alone plus the bounded waits of its stage."""
    sched = FakeScheduler(max_batch=4, max_active=8, overlap=True)
    sched.queue.append(FakeJob("first"))
    for _ in range(22):
        sched.iterate()
    late = FakeJob("late", arrived=sched.now)
    sched.queue.append(late)
    stepped = sched.iterate()
    assert late in stepped and len(stepped) == 2  # first's Stage B step and late's Stage C step
    for i in range(40):
        sched.queue.append(FakeJob(f"j{i}", size=512 if i % 7 == 0 else 1024, arrived=sched.now))
        sched.iterate()
    while sched.active or sched.queue:
        sched.iterate()
    assert len(sched.finished) == 42
    for job in sched.finished:
        assert job.done_steps == job.prior + job.decoder
        assert job.finished_at - job.first_step <= 8 * 30
