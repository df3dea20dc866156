"""The request-id registry keeps in-flight jobs, then only a small record of answered ones."""

from __future__ import annotations

import asyncio

from models.request import GenerationParams
from service.errors import Cancelled
from service.job_registry import Finished, JobRegistry
from service.jobs import Job


def test_answered_jobs_leave_only_their_final_state_and_the_oldest_are_forgotten():
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        registry = JobRegistry(keep=2)
        jobs = [
            Job(GenerationParams("p"), loop.create_future(), 1e9, request_id=f"r{i}", owner="k")
            for i in range(3)
        ]
        for job in jobs:
            registry.add(job)
        assert registry.in_flight("r0") is jobs[0]
        jobs[0].work = object()  # engine state, as the scheduler holds it
        for job in jobs:
            job.cancel(Cancelled("x"))
            registry.finished(job)
        assert registry.in_flight("r0") is None and registry.get("r0") is None  # keep=2
        record = registry.get("r2")
        assert isinstance(record, Finished) and record.owner == "k"
        assert record.describe() == {"id": "r2", "status": "cancelled", "stage": "queued"}
        assert not record.cancel(Cancelled("again"))

    asyncio.run(scenario())
