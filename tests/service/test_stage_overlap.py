"""Stage overlap (CASCADE_STAGE_OVERLAP) through uvicorn on the tiny pipeline: a Stage C step and a
Stage B step run at the same time on two compute threads, every job still gets the image it gets
alone, and a step that fails fails only its own job, not the one stepping beside it.

How a test knows the two steps ran at once: the two first steps it names wait for each other at a
barrier. Steps that ran one after the other could not pass it (the first would time out and fail
its job)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from service.scheduling_policy import OVERLAP_CATCH_UP
from tests.service.conftest import WAIT_S, FaultyPipeline, serve, wait_until
from tests.service.test_continuous import held_in_first_step, image, post

A = {"prompt": "ahead", "seed": 1, "prior_steps": 1, "decoder_steps": 3}
# more Stage C steps than OVERLAP_CATCH_UP: A does not wait for B at the Stage B boundary
B = {"prompt": "behind", "seed": 2, "prior_steps": OVERLAP_CATCH_UP + 1, "decoder_steps": 2}


@pytest.fixture
def pool():
    with ThreadPoolExecutor(8) as executor:
        yield executor


class MeetingPipeline(FaultyPipeline):
    """The FaultyPipeline whose step for ``meet`` (prompt -> stage) waits, the first time that
    prompt steps in that stage, at a two-party barrier; also records the thread of every step."""

    def __init__(self, inner: Any, meet: dict[str, str]) -> None:
        super().__init__(inner)
        self.meet = dict(meet)
        self.barrier = threading.Barrier(len(meet), timeout=WAIT_S)
        self.threads: dict[str, set[str]] = {"prior": set(), "decoder": set()}

    def step(self, states, *, previews=False):
        stage = states[0].stage.value
        self.threads[stage].add(threading.current_thread().name)
        for state in states:
            if self.meet.get(state.params.prompt) == stage:
                del self.meet[state.params.prompt]
                self.barrier.wait()
        return super().step(states, previews=previews)


def start_side_by_side(live, pipeline, pool, second: dict) -> tuple[Any, Any]:
    """``A`` held in its only Stage C step while ``second`` queues; once released, A's Stage B
    and ``second``'s Stage C are the two groups of the next iteration."""
    ahead = held_in_first_step(live, pipeline, pool, A, "ahead")
    other = post(live, pool, second)
    wait_until(lambda: live.client.get("/health/ready").json()["queue_depth"] == 1, "queued")
    pipeline.gate.set()
    return ahead, other


def test_a_stage_c_step_runs_beside_a_stage_b_step_and_images_are_unchanged(tiny_pipeline, pool):
    pipeline = MeetingPipeline(tiny_pipeline, {"ahead": "decoder", "behind": "prior"})
    with serve(pipeline, stage_overlap=True, max_batch_images=4) as live:
        ahead, behind = start_side_by_side(live, pipeline, pool, B)
        together = {"ahead": ahead.result(), "behind": behind.result()}
        assert not pipeline.meet and not pipeline.barrier.broken  # both reached the barrier
        assert live.metric("cascade_overlapped_steps_total") >= 1
        assert pipeline.threads == {
            "prior": {"cascade-compute"},
            "decoder": {"cascade-compute-decoder"},
        }
        for name, body in (("ahead", A), ("behind", B)):
            alone = live.client.post("/v1/generate", json=body)
            assert np.abs(image(together[name]) - image(alone)).max() <= 1


def test_a_failing_step_fails_only_its_job_not_the_one_beside_it(tiny_pipeline, pool):
    pipeline = MeetingPipeline(tiny_pipeline, {"ahead": "decoder", "explode": "prior"})
    pipeline.raise_for = "explode"
    with serve(pipeline, stage_overlap=True, max_batch_images=4) as live:
        ahead, doomed = start_side_by_side(live, pipeline, pool, {**B, "prompt": "explode"})
        assert ahead.result().status_code == 200
        r = doomed.result()
        assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
        assert not pipeline.barrier.broken  # the failing step did run beside the other one
        assert live.client.post("/v1/generate", json=B).status_code == 200
        wait_until(lambda: live.metric("cascade_inflight_jobs") == 0, "nothing in flight")
