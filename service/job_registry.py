"""Jobs by request id, so that a client can cancel (DELETE) or poll (GET) its request.

In-flight jobs are kept until answered, then the last ``keep`` answered ones (oldest forgotten
first), so that a cancel racing with the answer, or a poll just after it, still finds the job.
"""

from __future__ import annotations

from collections import OrderedDict

from service.jobs import Job


class JobRegistry:
    def __init__(self, keep: int = 1024) -> None:
        self.keep = keep
        self._live: dict[str, Job] = {}
        self._recent: OrderedDict[str, Job] = OrderedDict()

    def add(self, job: Job) -> None:
        self._recent.pop(job.request_id, None)
        self._live[job.request_id] = job

    def finished(self, job: Job) -> None:
        """``job`` was answered: move it to the recent ones."""
        if self._live.get(job.request_id) is job:
            del self._live[job.request_id]
            self._recent[job.request_id] = job
            while len(self._recent) > self.keep:
                self._recent.popitem(last=False)

    def in_flight(self, request_id: str) -> Job | None:
        return self._live.get(request_id)

    def get(self, request_id: str) -> Job | None:
        return self._live.get(request_id) or self._recent.get(request_id)
