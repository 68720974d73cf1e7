"""Deciding who has to go: the periodic sweep and the check on join (docs/membership.md#sweep).

A sweep first asks the SFU about pending participants (``GetParticipant``: present becomes
connected, absent with an expired token is forgotten), then asks the homeserver once per
Matrix room that has connected participants who is joined (``joined_members``), and hands
everybody not joined to the :class:`Remover`. What the homeserver answers is the only
reason to act: a 403 means "this homeserver left the room" only once ``is_joined`` for
the server confirms it, and every other failure — timeout, 5xx, a body that does not
parse, an unresolvable client-server API — changes nothing (**fail open**: an outage
never drops a call).

Bounds: at most one sweep at a time, ``parallel`` requests in flight, and a room whose
check has not started within one interval waits for the next sweep — which starts with
the rooms checked longest ago. With several instances (``shared``, membership/shared.py)
a sweep first merges the tracked set from Redis and then claims its rooms, so that each
Matrix room is looked at — SFU lookups and homeserver request alike — by one instance per
interval (docs/membership.md#several-instances).

A ``participant_joined`` webhook for a tracked participant runs :meth:`check_now`: one
``is_joined`` for that user, with its own request budget so that a slow sweep cannot
delay it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from twisted.internet.defer import Deferred, DeferredSemaphore, ensureDeferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from rtcauthd.livekit.presence import Presence
from rtcauthd.membership.removal import Remover
from rtcauthd.membership.tracker import Entry, ParticipantTracker
from rtcauthd.metrics import Metrics
from rtcauthd.outbound.errors import OutboundError, describe

log = Logger()

#: requests one sweep has in flight at once (homeserver and SFU together)
PARALLEL = 8
#: is_joined checks on join in flight at once
PARALLEL_ON_JOIN = 8
#: the shortest time a sweep may take to start all its room checks
MIN_SWEEP_BUDGET = 5.0


class MembershipSweep:
    """``homeserver`` offers ``joined_members(base_url, room_id)`` and ``is_joined(base_url,
    room_id, mxid=|server_name=)``; ``resolve_cs_api(server_name)`` the client-server API;
    ``get_participant(room, identity)`` a :class:`Presence` (never fails)."""

    def __init__(
        self,
        *,
        clock: IReactorTime,
        tracker: ParticipantTracker,
        remover: Remover,
        homeserver: Any,
        resolve_cs_api: Callable[[str], "Deferred[str]"],
        server_name: str,
        get_participant: Callable[[str, str], "Deferred[Presence]"],
        interval: float,
        parallel: int = PARALLEL,
        shared: Optional[Any] = None,
        unsent_keys: Callable[[], set] = set,
        metrics: Optional[Metrics] = None,
    ) -> None:
        self._clock = clock
        self._tracker = tracker
        self._remover = remover
        self._homeserver = homeserver
        self._resolve_cs_api = resolve_cs_api
        self._server_name = server_name
        self._get_participant = get_participant
        self._budget = max(float(interval), MIN_SWEEP_BUDGET)
        self._sweep_slots = DeferredSemaphore(parallel)
        self._join_slots = DeferredSemaphore(PARALLEL_ON_JOIN)
        self._shared = shared
        self._unsent_keys = unsent_keys
        self._merged_once = False
        self._checks = (metrics if metrics is not None else Metrics()).membership_checks
        self._running: Optional[Deferred] = None
        self._checking: set = set()
        #: Matrix room -> clock time of its last membership check (oldest first next time)
        self._last_checked: Dict[str, float] = {}

    @property
    def running(self) -> bool:
        return self._running is not None

    # -- the periodic sweep ------------------------------------------------------------

    def tick(self) -> Optional[Deferred]:
        """Start a sweep unless one still runs (then warn and skip); never fails."""
        if self._running is not None:
            log.warn("Membership sweep skipped: the previous one is still running")
            return None
        d = self._running = ensureDeferred(self.sweep())

        def finished(result: object) -> None:
            self._running = None
            if hasattr(result, "getTraceback"):
                log.failure("Membership sweep failed", result)

        d.addBoth(finished)
        return d

    async def sweep(self) -> None:
        deadline = self._clock.seconds() + self._budget
        mine = await self._claimed_rooms()
        await self._verify_pending(deadline, mine)
        rooms = {r: entries for r, entries in self._tracker.connected_by_room().items() if r in mine}
        if not rooms:
            return
        base_url = await self._cs_api()
        if base_url is None:
            return
        order = sorted(rooms, key=lambda room_id: self._last_checked.get(room_id, float("-inf")))
        late: List[str] = []
        await gatherResults(
            [self._sweep_slots.run(self._bounded_room_check, base_url, room_id, deadline, late) for room_id in order]
        )
        for room_id in list(self._last_checked):
            if room_id not in rooms:
                del self._last_checked[room_id]
        if late:
            log.warn(
                "Membership sweep: {count} room(s) not checked within {budget:g} s; they come first next time",
                count=len(late),
                budget=self._budget,
            )

    async def _claimed_rooms(self) -> set:
        """The Matrix rooms this instance sweeps now: all of them alone, else those Redis gives it."""
        if self._shared is None:
            return set(self._tracker.matrix_rooms())
        snapshot = await self._shared.snapshot()
        if snapshot is not None:
            participants, states = snapshot
            self._tracker.merge(participants, states, self._unsent_keys(), trust_connected=self._merged_once)
            self._merged_once = True
        return set(await self._shared.claim_rooms(self._tracker.matrix_rooms()))

    async def _verify_pending(self, deadline: float, rooms: set) -> None:
        pending = [e for e in self._tracker.pending() if e.participant.matrix_room_id in rooms]
        if pending:
            await gatherResults([self._sweep_slots.run(self._verify_one, entry, deadline) for entry in pending])

    def _verify_one(self, entry: Entry, deadline: float) -> "Deferred[None]":
        if self._clock.seconds() > deadline:
            return succeed(None)
        d = self._get_participant(*entry.key)

        def got(presence: Presence) -> None:
            if presence is Presence.PRESENT:
                self._tracker.mark_connected(entry)
                if self._shared is not None:
                    self._shared.connected(*entry.key)
            elif presence is Presence.ABSENT and self._tracker.token_expired(entry):
                self._tracker.forget(entry)
            # UNKNOWN: left as it is; the next sweep asks again

        return d.addCallback(got)

    def _bounded_room_check(self, base_url: str, room_id: str, deadline: float, late: List[str]) -> "Deferred[None]":
        if self._clock.seconds() > deadline:
            late.append(room_id)
            return succeed(None)
        return ensureDeferred(self._check_room(base_url, room_id))

    async def _check_room(self, base_url: str, room_id: str) -> None:
        self._last_checked[room_id] = self._clock.seconds()
        try:
            joined = await self._homeserver.joined_members(base_url, room_id)
        except OutboundError as e:
            if e.status == 403:
                self._checks.labels(kind="sweep", outcome="refused").inc()
                await self._homeserver_may_have_left(base_url, room_id)
            else:
                self._checks.labels(kind="sweep", outcome="failed").inc()
                log.warn(
                    "Membership check of {room_id} failed ({error}); nobody is removed",
                    room_id=room_id,
                    error=str(e),
                )
            return
        except Exception as e:
            self._checks.labels(kind="sweep", outcome="failed").inc()
            log.warn(
                "Membership check of {room_id} failed ({error}); nobody is removed", room_id=room_id, error=describe(e)
            )
            return
        self._checks.labels(kind="sweep", outcome="ok").inc()
        for entry in self._tracker.connected_by_room().get(room_id, []):
            if entry.participant.matrix_user_id not in joined:
                self._remover.remove(entry, f"no longer joined to {room_id}")

    async def _homeserver_may_have_left(self, base_url: str, room_id: str) -> None:
        """joined_members said 403: act only if the homeserver itself says it left the room."""
        try:
            joined = await self._homeserver.is_joined(base_url, room_id, server_name=self._server_name)
        except Exception as e:
            log.warn(
                "joined_members for {room_id} was refused and is_joined failed ({error}); nobody is removed",
                room_id=room_id,
                error=describe(e),
            )
            return
        if joined:
            log.error(
                "joined_members for {room_id} was refused although {server_name} is in the room: the "
                "application service's user namespace must cover this server's users (docs/membership.md#namespace)",
                room_id=room_id,
                server_name=self._server_name,
            )
            return
        await self._remover.delete_rooms(room_id)

    async def _cs_api(self) -> Optional[str]:
        try:
            return await self._resolve_cs_api(self._server_name)
        except Exception as e:
            log.warn(
                "Membership sweep: the client-server API of {server_name} cannot be resolved ({error}); "
                "no membership checks this round",
                server_name=self._server_name,
                error=describe(e),
            )
            return None

    # -- the check on join -------------------------------------------------------------

    def check_now(self, entry: Entry) -> "Deferred[None]":
        """``participant_joined`` for ``entry``: is its user still joined? Removed at once if not."""
        if entry.key in self._checking:
            return succeed(None)
        self._checking.add(entry.key)
        d = self._join_slots.run(lambda: ensureDeferred(self._check_entry(entry)))

        def finished(result: object) -> None:
            self._checking.discard(entry.key)
            if hasattr(result, "getTraceback"):
                log.failure("Membership check on join failed", result)

        return d.addBoth(finished)

    async def _check_entry(self, entry: Entry) -> None:
        base_url = await self._cs_api()
        if base_url is None:
            return
        p = entry.participant
        try:
            joined = await self._homeserver.is_joined(base_url, p.matrix_room_id, mxid=p.matrix_user_id)
        except Exception as e:
            self._checks.labels(kind="join", outcome="failed").inc()
            log.warn(
                "Membership check of {user_id} in {room_id} on join failed ({error}); not removed",
                user_id=p.matrix_user_id,
                room_id=p.matrix_room_id,
                error=describe(e),
            )
            return
        self._checks.labels(kind="join", outcome="ok").inc()
        current = self._tracker.get(*entry.key)
        if not joined and current is entry and entry.connected:
            self._remover.remove(entry, f"joined the call but is not joined to {p.matrix_room_id}")
