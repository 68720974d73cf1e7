"""Requests are parsed as they arrive but handled in small batches, ``/healthz`` first.

One reactor thread serves every connection. When thousands of requests arrive at once
(a flood), handling them all in the reactor turn that read them blocks everything else
for as long as that takes — a second or more — and a health probe that arrived meanwhile
waits behind the whole flood, so the service looks dead exactly when it is busiest.

Reading and parsing a request is cheap next to handling it (routing, rate limit, JSON,
the token work, the answer and its log line). So each fully read request goes into a
first-in, first-out queue, and the queue is worked through ``batch`` requests per reactor
turn: between batches the reactor reads sockets again, and a ``/healthz`` request is
handled the moment it has been read, ahead of the queue.

Requests the service is *for* wait in a lane of their own that goes first: token
requests naming a ``LIVEKIT_FULL_ACCESS_HOMESERVERS`` homeserver, and application-service
requests carrying the hs_token (they come from our own Synapse). So a flood of strangers
delays the operator's users by a batch, not by the whole flood. Claiming a full-access
name only buys a place in that lane, where the per-client rate limit still applies and
the tokens are checked against the operator's own homeserver. One slot of every batch
goes to the other lane while it has requests, so it is never starved.

The queue needs no bound of its own: each connection has at most one request being
handled (Twisted holds pipelined ones back), and connections are capped by
``RTCAUTH_MAX_CONNECTIONS``.
"""

from __future__ import annotations

import enum
import hmac
import json
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
#: Legacy token routes whose body names the caller's homeserver.
TOKEN_PATHS = frozenset({b"/get_token", b"/sfu/get"})
#: Where the application-service routes live (Synapse's proxy and its pings).
APPSERVICE_PREFIX = b"/_matrix/"


class Lane(enum.Enum):
    NOW = "now"  # handled as soon as read
    FIRST = "first"  # the service's own users
    NEXT = "next"  # everyone else


def healthz_now(request) -> Lane:
    """The default classifier: only ``/healthz`` is special."""
    return Lane.NOW if request.path in PRIORITY_PATHS else Lane.NEXT


def served_first(is_full_access: Callable[[str], bool], hs_token: Optional[str] = None) -> Callable[[object], Lane]:
    """A classifier that puts full-access token requests and our Synapse's requests first.

    It reads only what is already in memory (the parsed path, headers and body); a body
    that is not the expected JSON simply goes to the ``NEXT`` lane, where the route will
    answer it with its usual error.
    """
    bearer = b"Bearer " + hs_token.encode("utf-8") if hs_token else None

    def classify(request) -> Lane:
        path = request.path
        if path in PRIORITY_PATHS:
            return Lane.NOW
        if path in TOKEN_PATHS:
            name = _claimed_server_name(request)
            return Lane.FIRST if name is not None and is_full_access(name) else Lane.NEXT
        if bearer is not None and path.startswith(APPSERVICE_PREFIX):
            values = request.requestHeaders.getRawHeaders(b"Authorization") or ()
            if len(values) == 1 and hmac.compare_digest(values[0], bearer):
                return Lane.FIRST
        return Lane.NEXT

    return classify


#: A token request is a few hundred bytes; anything much larger is not read for its lane.
CLASSIFY_MAX_BODY = 4096


def _claimed_server_name(request) -> Optional[str]:
    raw = request.content.getvalue()
    if len(raw) > CLASSIFY_MAX_BODY:
        return None
    try:
        body = json.loads(raw)
        name = body["openid_token"]["matrix_server_name"]
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError):
        return None
    return name if isinstance(name, str) else None


class AdmissionQueue:
    """Runs ``handle(request)`` for queued requests, ``batch`` per reactor turn.

    ``classify`` picks each request's :class:`Lane`; within a lane the order is arrival.
    """

    def __init__(
        self,
        clock: IReactorTime,
        handle: Callable[[object], None],
        *,
        batch: int = DEFAULT_BATCH,
        classify: Callable[[object], Lane] = healthz_now,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self._clock = clock
        self._handle = handle
        self._batch = batch
        self._classify = classify
        self._first: Deque = deque()
        self._next: Deque = deque()
        self._scheduled: Optional[object] = None
        self.peak = 0

    def __len__(self) -> int:
        return len(self._first) + len(self._next)

    def admit(self, request) -> None:
        """Handle a ``NOW`` request at once; queue any other one at the end of its lane."""
        try:
            lane = self._classify(request)
        except Exception:
            log.failure("Choosing a lane for a request failed; it waits in the other lane")
            lane = Lane.NEXT
        if lane is Lane.NOW:
            self._handle(request)
            return
        (self._first if lane is Lane.FIRST else self._next).append(request)
        self.peak = max(self.peak, len(self))
        if self._scheduled is None:
            self._scheduled = self._clock.callLater(0, self._run_batch)

    def _take(self) -> list:
        """This turn's requests: the first lane, but one slot for the other while it waits."""
        from_next = min(len(self._next), max(1, self._batch - len(self._first)))
        from_first = min(len(self._first), self._batch - from_next)
        taken = [self._first.popleft() for _ in range(from_first)]
        taken += [self._next.popleft() for _ in range(from_next)]
        return taken

    def _run_batch(self) -> None:
        self._scheduled = None
        try:
            for request in self._take():
                if getattr(request, "_disconnected", False):
                    continue  # the client gave up while queued; nothing to answer
                try:
                    self._handle(request)
                except Exception:
                    # Twisted's Request.process answers its own failures; this is a last
                    # guard so one bad request can never stall the requests behind it.
                    log.failure("Handling a queued request failed")
        finally:
            if len(self) and self._scheduled is None:
                self._scheduled = self._clock.callLater(0, self._run_batch)
