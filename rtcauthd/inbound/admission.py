"""Requests are parsed as they arrive but handled in small batches, ``/healthz`` first.

One reactor thread serves every connection. When thousands of requests arrive at once
(a flood), handling them all in the reactor turn that read them blocks everything else
for as long as that takes — a second or more — and a health probe that arrived meanwhile
waits behind the whole flood, so the service looks dead exactly when it is busiest.

Reading and parsing a request is cheap next to handling it (routing, rate limit, JSON,
the token work, the answer and its log line). So each fully read request goes into a
first-in, first-out queue, and the queue is worked through ``batch`` requests per reactor
turn: between batches the reactor reads sockets again, and a ``/healthz`` request is
handled the moment it has been read, ahead of the queue. The queue needs no bound of its
own: each connection has at most one request being handled (Twisted holds pipelined ones
back), and connections are capped by ``RTCAUTH_MAX_CONNECTIONS``.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Deque, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

#: Requests handled per reactor turn. Small enough that one turn stays in the low
#: milliseconds; large enough that the scheduling costs nothing next to the work.
DEFAULT_BATCH = 8

#: Paths that skip the queue: a monitor must see the service alive while it is busy.
PRIORITY_PATHS = frozenset({b"/healthz"})


class AdmissionQueue:
    """Runs ``handle(request)`` for queued requests, ``batch`` per reactor turn, in order."""

    def __init__(
        self,
        clock: IReactorTime,
        handle: Callable[[object], None],
        *,
        batch: int = DEFAULT_BATCH,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self._clock = clock
        self._handle = handle
        self._batch = batch
        self._queue: Deque = deque()
        self._scheduled: Optional[object] = None
        self.peak = 0

    def __len__(self) -> int:
        return len(self._queue)

    def admit(self, request) -> None:
        """Handle a priority request now; queue any other one behind those already waiting."""
        if request.path in PRIORITY_PATHS:
            self._handle(request)
            return
        self._queue.append(request)
        if len(self._queue) > self.peak:
            self.peak = len(self._queue)
        if self._scheduled is None:
            self._scheduled = self._clock.callLater(0, self._run_batch)

    def _run_batch(self) -> None:
        self._scheduled = None
        try:
            for _ in range(min(self._batch, len(self._queue))):
                request = self._queue.popleft()
                if getattr(request, "_disconnected", False):
                    continue  # the client gave up while queued; nothing to answer
                try:
                    self._handle(request)
                except Exception:
                    # Twisted's Request.process answers its own failures; this is a last
                    # guard so one bad request can never stall the requests behind it.
                    log.failure("Handling a queued request failed")
        finally:
            if self._queue and self._scheduled is None:
                self._scheduled = self._clock.callLater(0, self._run_batch)
