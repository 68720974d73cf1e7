"""Job store used when ``LIVEKIT_REDIS_URL`` is not set: jobs die with the process.

It still exists (rather than "no store") so that the manager has a single code path,
and its Deferreds are already fired so that it adds no reactor turns.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from rtcauthd.store.interface import Claim, IJobStore
from rtcauthd.store.model import StoredJob

log = Logger()


@implementer(IJobStore)
class MemoryStore:
    """Keeps the latest record per (room, identity) in a dict."""

    persistent = False

    def __init__(self) -> None:
        self._jobs: dict[tuple[str, str], StoredJob] = {}
        log.warn("LIVEKIT_REDIS_URL not set; jobs are kept in memory only and are lost on restart")

    def put(self, job: StoredJob) -> "Deferred[None]":
        self._jobs[job.key] = job
        return succeed(None)

    def delete(self, room: str, identity: str) -> "Deferred[None]":
        self._jobs.pop((room, identity), None)
        return succeed(None)

    def register(self, job: StoredJob) -> "Deferred[None]":
        return self.put(job)

    def claim_send(self, room: str, identity: str) -> "Deferred[Claim]":
        # Nobody else can own a job of this process; the record dies with it anyway.
        self._jobs.pop((room, identity), None)
        return succeed(Claim.GRANTED)

    def forward(self, room: str, identity: str, signal: str) -> "Deferred[str]":
        return succeed("none")

    def keep_signal(self, room: str, identity: str, signal: str) -> None:
        pass  # never asked: forward() never answers "mine"

    def set_listener(self, listener) -> None:
        pass  # jobs are never lost to, nor taken from, another process

    def load_all(self, on_late: Optional[Callable[[list[StoredJob]], object]] = None) -> "Deferred[list[StoredJob]]":
        # Never late: everything is here already.
        return succeed(list(self._jobs.values()))

    def close(self) -> "Deferred[None]":
        return succeed(None)
