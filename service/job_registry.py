"""Jobs by request id, so that a client can cancel (DELETE) or poll (GET) its request.

In-flight jobs are kept until answered; then only a small record of the last ``keep`` answered ones
(their final state and owner, never their images or engine state), so that a cancel racing with
the answer, or a poll just after it, still finds the request.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from service.errors import ServiceError
from service.jobs import Job


@dataclass(frozen=True)
class Finished:
    """What is remembered of an answered job."""

    request_id: str
    owner: str | None
    info: dict[str, Any]

    def describe(self, position: int | None = None) -> dict[str, Any]:
        return dict(self.info)

    def cancel(self, error: ServiceError) -> bool:
        return False  # already answered


class JobRegistry:
    def __init__(self, keep: int = 1024) -> None:
        self.keep = keep
        self._live: dict[str, Job] = {}
        self._recent: OrderedDict[str, Finished] = OrderedDict()

    def add(self, job: Job) -> None:
        self._recent.pop(job.request_id, None)
        self._live[job.request_id] = job

    def finished(self, job: Job) -> None:
        """``job`` was answered: keep only its final state."""
        if self._live.get(job.request_id) is job:
            del self._live[job.request_id]
            self._recent[job.request_id] = Finished(job.request_id, job.owner, job.describe())
            while len(self._recent) > self.keep:
                self._recent.popitem(last=False)

    def in_flight(self, request_id: str) -> Job | None:
        return self._live.get(request_id)

    def get(self, request_id: str) -> Job | Finished | None:
        return self._live.get(request_id) or self._recent.get(request_id)
