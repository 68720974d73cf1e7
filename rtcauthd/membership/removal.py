"""Acting on a verdict: take a participant off the SFU, or close a call's LiveKit rooms.

Both are retried with the delegated-leave back-off for at most a minute
(docs/membership.md#removal); a participant already gone counts as removed. The
participant's delegated-leave job is stopped *before* the removal, so the
``participant_left`` webhook the removal causes finds no job that would send a leave for
somebody who is no longer in the room. A removal already under way for a participant is
not started again (a sweep and a join webhook may both ask for it) — with several
instances, not on any of them: ``shared`` (membership/shared.py) lets one instance at a
time remove a participant, and records the removal for all.
"""

from __future__ import annotations

import random as _random
from typing import Any, Callable, Optional, Set, Tuple

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from rtcauthd.leave.retry import retry_with_backoff
from rtcauthd.matrix.delayed_events import Outcome, OutcomeKind
from rtcauthd.membership.tracker import Entry, ParticipantTracker
from rtcauthd.metrics import Metrics
from rtcauthd.outbound.errors import describe

log = Logger()

#: seconds a RemoveParticipant / DeleteRoom is retried before the next sweep takes over
RETRY_BUDGET = 60.0


class Remover:
    """``rooms`` offers ``remove_participant(room, identity)`` and ``delete_room(room)``
    (Deferred[bool], False = not found); ``stop_job(room, identity)`` stops a delegated leave."""

    def __init__(
        self,
        *,
        clock: IReactorTime,
        rooms,
        tracker: ParticipantTracker,
        stop_job: Callable[[str, str], object],
        random: Callable[[], float] = _random.random,
        budget: float = RETRY_BUDGET,
        metrics: Optional[Metrics] = None,
        shared: Optional[Any] = None,
    ) -> None:
        self._clock = clock
        self._shared = shared
        self._rooms = rooms
        self._tracker = tracker
        self._stop_job = stop_job
        self._random = random
        self._budget = budget
        self._counts = (metrics if metrics is not None else Metrics()).membership_removals
        self._removing: Set[Tuple[str, str]] = set()
        self._deleting: Set[str] = set()

    @property
    def in_flight(self) -> int:
        return len(self._removing) + len(self._deleting)

    def remove(self, entry: Entry, why: str) -> "Deferred[bool]":
        """RemoveParticipant for a connected ``entry``; fires True once it is off the SFU."""
        key = entry.key
        if key in self._removing:
            return succeed(False)
        self._removing.add(key)
        if self._shared is None:
            return self._remove(entry, why)
        d = self._shared.begin_removal(*key)

        def decided(go: bool) -> "Deferred[bool] | bool":
            if go:
                return self._remove(entry, why)
            self._removing.discard(key)
            self._tracker.mark_removed(entry)  # removed (or being removed) by another instance
            return False

        return d.addCallback(decided)

    def _remove(self, entry: Entry, why: str) -> "Deferred[bool]":
        key = entry.key
        p = entry.participant
        self._stop(p.livekit_room, p.livekit_identity)
        log.info(
            "Removing {user_id} ({identity}) from LiveKit room {room}: {why}",
            user_id=p.matrix_user_id,
            identity=p.livekit_identity,
            room=p.livekit_room,
            why=why,
        )
        d = self._retried(lambda: self._rooms.remove_participant(p.livekit_room, p.livekit_identity))

        def done(outcome: Outcome) -> bool:
            self._removing.discard(key)
            done = outcome.kind is OutcomeKind.OK
            self._counts.labels(action="remove_participant", outcome="done" if done else "failed").inc()
            if self._shared is not None:
                self._shared.end_removal(*key, done)
            if done:
                self._tracker.mark_removed(entry)
                return True
            log.warn(
                "Could not remove {user_id} from LiveKit room {room} ({error}); the next sweep tries again",
                user_id=p.matrix_user_id,
                room=p.livekit_room,
                error=outcome.detail,
            )
            return False

        return d.addCallback(done)

    def delete_rooms(self, matrix_room_id: str) -> "Deferred[None]":
        """DeleteRoom for every LiveKit room tracked for ``matrix_room_id``; their entries go."""
        if matrix_room_id in self._deleting:
            return succeed(None)
        entries = self._tracker.in_matrix_room(matrix_room_id)
        rooms = sorted({e.participant.livekit_room for e in entries})
        for entry in entries:
            self._stop(*entry.key)
            self._tracker.forget(entry)
        self._deleting.add(matrix_room_id)
        waits = []
        for room in rooms:
            log.info(
                "Deleting LiveKit room {room}: this homeserver is no longer in {room_id}",
                room=room,
                room_id=matrix_room_id,
            )
            waits.append(self._retried(lambda room=room: self._rooms.delete_room(room)).addCallback(self._deleted, room))

        def finished(_: object) -> None:
            self._deleting.discard(matrix_room_id)

        return gatherResults(waits).addBoth(finished)

    def _deleted(self, outcome: Outcome, room: str) -> None:
        done = outcome.kind is OutcomeKind.OK
        self._counts.labels(action="delete_room", outcome="done" if done else "failed").inc()
        if not done:
            log.warn("Could not delete LiveKit room {room}: {error}", room=room, error=outcome.detail)

    def _stop(self, room: str, identity: str) -> None:
        try:
            self._stop_job(room, identity)
        except Exception:
            log.failure("Stopping the delegated leave of {room}/{identity} failed", room=room, identity=identity)

    def _retried(self, call: Callable[[], "Deferred[bool]"]) -> "Deferred[Outcome]":
        def attempt() -> "Deferred[Outcome]":
            # True (done) and False (already gone) both end the loop.
            return call().addCallbacks(lambda _found: Outcome.ok(), _as_retry)

        return retry_with_backoff(self._clock, attempt, self._budget, random=self._random)


def _as_retry(failure: Failure) -> Outcome:
    return Outcome.retry(detail=describe(failure))
