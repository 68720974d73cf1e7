"""Membership enforcement as the daemon sees it: one object to register tokens, feed
webhooks, start and stop (docs/membership.md).

The AS routes call :meth:`MembershipMonitor.register` for every token they mint; the
webhook route hands every verified event to :meth:`MembershipMonitor.on_webhook`. Start-up
reads the tracked set back from Redis before the first sweep, which runs at once when
there was something to read, so that a restart cannot leave a removed user in the call
for longer than one interval. With several instances (``shared``) a webhook for a
participant another instance registered is looked up in Redis and checked all the same,
and ``participant_left`` asks Redis whether one of the instances removed it.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from rtcauthd.membership.shared import SharedMembership
from rtcauthd.membership.sweep import MembershipSweep
from rtcauthd.membership.tracker import ParticipantTracker

log = Logger()

PARTICIPANT_JOINED = "participant_joined"
PARTICIPANT_LEFT = "participant_left"
ROOM_FINISHED = "room_finished"


class MembershipMonitor:
    """``store`` is a membership store (``load_all``, ``flush``, ``close``); the tracker writes to it."""

    def __init__(
        self,
        *,
        clock: IReactorTime,
        tracker: ParticipantTracker,
        sweep: MembershipSweep,
        store,
        interval: float,
        shared: Optional[SharedMembership] = None,
    ) -> None:
        self._shared = shared
        self._clock = clock
        self.tracker = tracker
        self.sweep = sweep
        self._store = store
        self._interval = float(interval)
        self._loop: Optional[LoopingCall] = None
        self._stopped = False

    # -- from the token routes and the webhook route --------------------------------------

    def register(self, *, matrix_room_id: str, matrix_user_id: str, livekit_room: str, livekit_identity: str) -> None:
        """A token was minted for this participant: its membership is enforced from now on."""
        self.tracker.register(
            matrix_room_id=matrix_room_id,
            matrix_user_id=matrix_user_id,
            livekit_room=livekit_room,
            livekit_identity=livekit_identity,
        )

    def on_webhook(self, event) -> None:
        """A verified LiveKit webhook (``event``, ``room_name``, ``participant_identity``)."""
        kind, room, identity = event.event, event.room_name, event.participant_identity
        shared = self._shared if self._shared is not None and self._shared.active else None
        if kind == PARTICIPANT_JOINED:
            entry = self.tracker.joined(room, identity)
            if entry is not None:
                if shared is not None:
                    shared.connected(room, identity)
                self._check(entry)
            elif shared is not None and identity:
                shared.lookup(room, identity).addCallback(self._joined_elsewhere)
        elif kind == PARTICIPANT_LEFT:
            if shared is None:
                self.tracker.left(room, identity)
            else:
                shared.left(room, identity).addCallback(self._left, room, identity)
        elif kind == ROOM_FINISHED:
            self.tracker.room_finished(room)

    def _check(self, entry) -> None:
        if not self._stopped:
            self.sweep.check_now(entry)

    def _joined_elsewhere(self, participant) -> None:
        """A join for a participant registered by another instance: tracked and checked here."""
        if participant is None:
            return  # not ours (no AS token minted it), ignored
        entry = self.tracker.adopt(participant, connected=True)
        self._shared.connected(*participant.key)
        self._check(entry)

    def _left(self, deleted: Optional[bool], room: str, identity: str) -> None:
        entry = self.tracker.get(room, identity)
        if deleted is False and entry is not None:
            self.tracker.mark_removed(entry)  # an instance removed it: kept for the reconnect
        elif deleted is not False:
            self.tracker.left(room, identity)

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> "Deferred[int]":
        """Read the tracked set back, then sweep every interval; fires with how many were read."""
        d = self._store.load_all()

        def loaded(participants) -> int:
            recovered = self.tracker.recover(participants)
            if recovered:
                log.info("Recovered {count} tracked participant(s); verifying them now", count=recovered)
            if not self._stopped:
                self._loop = LoopingCall(self._tick)
                self._loop.clock = self._clock
                self._loop.start(self._interval, now=bool(recovered))
            return recovered

        return d.addCallback(loaded)

    def _tick(self) -> None:
        self._store.flush()  # changes Redis could not take last time
        self.sweep.tick()

    def stop(self) -> "Deferred[None]":
        self._stopped = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self._store.close() if self._store is not None else succeed(None)


def build_monitor(
    *, config, clock, homeserver, resolve_cs_api, rooms, stop_job, tls_policy=None, store=None, metrics=None,
    redis_target=None, cluster=None,
) -> MembershipMonitor:
    """The monitor wired from the Config (AS mode with a non-zero interval; the caller checks).
    ``redis_target`` is the job store's (Sentinels included); ``cluster()`` its Cluster, or
    None while this instance runs alone."""
    from rtcauthd.membership.removal import RETRY_BUDGET, Remover
    from rtcauthd.membership.store import MemoryParticipantStore, RedisParticipantStore

    if store is None:
        if redis_target is not None:
            store = RedisParticipantStore(redis_target, clock=clock, tls_policy=tls_policy)
        elif config.redis_url:
            store = RedisParticipantStore.from_url(config.redis_url, clock=clock, tls_policy=tls_policy)
        else:
            store = MemoryParticipantStore()
    shared = None
    if cluster is not None and getattr(store, "persistent", False):
        shared = SharedMembership(
            clock=clock,
            connection=lambda: store.connection,
            cluster=cluster,
            interval=config.membership_check_interval,
            removal_budget=RETRY_BUDGET,
        )
    tracker = ParticipantTracker(clock=clock, store=store, token_ttl=config.token_ttl)
    remover = Remover(clock=clock, rooms=rooms, tracker=tracker, stop_job=stop_job, metrics=metrics, shared=shared)
    sweep = MembershipSweep(
        clock=clock,
        tracker=tracker,
        remover=remover,
        homeserver=homeserver,
        resolve_cs_api=resolve_cs_api,
        server_name=config.hs_server_name,
        get_participant=rooms.get_participant,
        interval=config.membership_check_interval,
        metrics=metrics,
        shared=shared,
        unsent_keys=getattr(store, "unsent_keys", set),
    )
    log.info(
        "Membership enforcement on: every {interval} s the homeserver is asked who is joined",
        interval=config.membership_check_interval,
    )
    return MembershipMonitor(
        clock=clock, tracker=tracker, sweep=sweep, store=store, interval=config.membership_check_interval, shared=shared
    )
