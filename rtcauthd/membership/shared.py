"""Membership enforcement shared by several instances on one Redis (docs/membership.md#several-instances).

Tokens are minted by any instance and LiveKit sends each webhook to one of them, so no
instance sees the whole picture by itself. Redis does: ``lk-jwt:participants`` (upstream's
format, written by every instance's tracker) is the tracked set, and keys of our own add
what upstream's record does not carry:

- ``rtcauth:membership:state`` — hash, participant field -> ``connected`` or ``removed``;
  a removal done by one instance is known to all, so nobody repeats it;
- ``rtcauth:membership:room:<Matrix room>`` — which instance sweeps that room. The
  holder renews it every sweep; another instance takes it only once it has expired or
  its holder is dead (liveness key gone, or forgotten by the cluster's takeover), so each
  room is checked once per interval across the instances and a dead sweeper's rooms move;
- ``rtcauth:membership:removing:<field>`` — held while one instance removes a
  participant, so a sweep and a join check on two instances do not both remove it.

Every check-and-write is one Lua script. Redis failures never block enforcement: a
claim that cannot be made counts as granted (this instance then sweeps what it knows,
as a single instance would), and a failed write is only logged.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from rtcauthd.cluster.coordinator import key_of
from rtcauthd.cluster.scripts import INSTANCES
from rtcauthd.membership.record import PARTICIPANTS_KEY, Participant, ParticipantRecordError, decode_record, encode_field
from rtcauthd.store.redis_connection import describe

__all__ = ["SharedMembership", "CONNECTED", "REMOVED"]

log = Logger()

STATE_KEY = b"rtcauth:membership:state"
ROOM_PREFIX = b"rtcauth:membership:room:"
REMOVING_PREFIX = b"rtcauth:membership:removing:"
CONNECTED = b"connected"
REMOVED = b"removed"
#: rooms per CLAIM call, so that one script never blocks Redis for long
CLAIM_BATCH = 500

#: KEYS: room claim keys. ARGV: iid, ttl ms, instance key prefix, instances set.
#: Per room 1 = this instance sweeps it now (renewed or taken), 0 = a live peer does.
CLAIM = """
local out = {}
for i, key in ipairs(KEYS) do
  local holder = redis.call('GET', key)
  local live = holder and holder ~= ARGV[1]
    and redis.call('EXISTS', ARGV[3] .. holder) == 1
    and redis.call('SISMEMBER', ARGV[4], holder) == 1
  if live then out[i] = 0 else redis.call('SET', key, ARGV[1], 'PX', ARGV[2]) out[i] = 1 end
end
return out
"""

#: KEYS: state hash, removing key. ARGV: field, iid, ms. 1 = go ahead; 0 = already
#: removed (and not seen joining since) or being removed elsewhere.
BEGIN_REMOVAL = """
if redis.call('HGET', KEYS[1], ARGV[1]) == 'removed' then return 0 end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return 1 end
return 0
"""

#: KEYS: state hash, removing key. ARGV: field, iid, done (1/0).
END_REMOVAL = """
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], ARGV[1], 'removed') end
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
return 1
"""

#: KEYS: participants hash, state hash. ARGV: field. ``participant_left``: the record
#: goes unless the participant was removed by one of us (then it stays for the reconnect).
LEFT = """
if redis.call('HGET', KEYS[2], ARGV[1]) == 'removed' then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""


def claim_key(room_id: str) -> bytes:
    return ROOM_PREFIX + room_id.encode("utf-8")


def _field(room: str, identity: str) -> bytes:
    return encode_field(room, identity).encode("utf-8")


class SharedMembership:
    """The Redis side of several cooperating monitors. ``connection()`` is the participant
    store's Redis connection; ``cluster()`` the job store's :class:`Cluster` (None: this
    instance runs alone, and every method answers as a single instance would)."""

    def __init__(
        self,
        *,
        clock: IReactorTime,
        connection: Callable[[], Any],
        cluster: Callable[[], Any],
        interval: float,
        removal_budget: float,
        op_timeout: float = 2.0,
        sync_timeout: float = 10.0,
    ) -> None:
        self._clock = clock
        self._connection = connection
        self._cluster = cluster
        # Twice the interval: the holder renews every sweep, and a late tick must not
        # let its rooms go to a peer whose sweep happens to come first.
        self._claim_ms = int(max(float(interval), 1.0) * 2000)
        self._removal_ms = int(removal_budget * 1000) + 5000
        self._op_timeout = op_timeout
        self._sync_timeout = sync_timeout
        self._warned = False

    @property
    def active(self) -> bool:
        return self._cluster() is not None

    def _eval(self, script: str, keys: list, args: list) -> Deferred:
        return self._connection().eval(script, keys, args).addTimeout(self._op_timeout, self._clock)

    def _unavailable(self, what: str, failure) -> None:
        if not self._warned:
            self._warned = True
            log.warn("Redis unavailable for {what} ({error}); this instance acts on what it knows",
                     what=what, error=describe(failure))

    def _answered(self, result: Any) -> Any:
        self._warned = False
        return result

    # -- which instance sweeps which room --------------------------------------------

    @inlineCallbacks
    def claim_rooms(self, room_ids: List[str]):
        """The subset of ``room_ids`` this instance sweeps this interval (all of them alone
        or while Redis does not answer)."""
        cluster = self._cluster()
        if cluster is None or not room_ids:
            return list(room_ids)
        mine: List[str] = []
        for start in range(0, len(room_ids), CLAIM_BATCH):
            batch = room_ids[start:start + CLAIM_BATCH]
            args = [cluster.iid, self._claim_ms, cluster.keys.instance(b""), INSTANCES]
            try:
                answer = yield self._eval(CLAIM, [claim_key(r) for r in batch], args)
            except Exception:
                self._unavailable("room claims", Failure())
                mine.extend(batch)
                continue
            self._answered(answer)
            mine.extend(room for room, won in zip(batch, answer or []) if won == 1)
        return mine

    # -- the shared tracked set ---------------------------------------------------------

    @inlineCallbacks
    def snapshot(self):
        """``(participants, states)`` as Redis has them, or None (alone, or Redis failed).
        The states are read first, so a state is never newer than the record it belongs to."""
        if self._cluster() is None:
            return None
        try:
            states = yield self._connection().hgetall(STATE_KEY).addTimeout(self._sync_timeout, self._clock)
            records = yield self._connection().hgetall(PARTICIPANTS_KEY).addTimeout(self._sync_timeout, self._clock)
        except Exception:
            self._unavailable("the shared tracked set", Failure())
            return None
        self._answered(None)
        participants: Dict[Tuple[str, str], Participant] = {}
        for value in (records or {}).values():
            try:
                participant = decode_record(value)
            except ParticipantRecordError:
                continue  # the start-up read logs these
            participants[participant.key] = participant
        by_key = {}
        for key, participant in participants.items():
            state = (states or {}).get(_field(*key))
            if state is not None:
                by_key[key] = state
        stale = [f for f in (states or {}) if _known_key(f) not in participants]
        if stale:
            self._connection().hdel(STATE_KEY, stale).addErrback(lambda _f: None)
        return participants, by_key

    def lookup(self, room: str, identity: str) -> "Deferred[Optional[Participant]]":
        """The record another instance wrote for a participant this one does not track."""
        if self._cluster() is None:
            return succeed(None)
        d = self._connection().hget(PARTICIPANTS_KEY, _field(room, identity)).addTimeout(self._op_timeout, self._clock)

        def got(value: Optional[bytes]) -> Optional[Participant]:
            try:
                return decode_record(value) if value else None
            except ParticipantRecordError:
                return None

        def failed(failure) -> None:
            self._unavailable("a participant lookup", failure)
            return None

        return d.addCallbacks(got, failed)

    def connected(self, room: str, identity: str) -> None:
        """The SFU reports the participant there (a join webhook or a sweep's lookup)."""
        if self._cluster() is None:
            return
        d = self._connection().hset(STATE_KEY, _field(room, identity), CONNECTED).addTimeout(self._op_timeout, self._clock)
        d.addErrback(lambda f: self._unavailable("a participant state", f))

    def left(self, room: str, identity: str) -> "Deferred[Optional[bool]]":
        """``participant_left``: True = record deleted, False = kept (removed by us), None = unknown."""
        if self._cluster() is None:
            return succeed(None)
        d = self._eval(LEFT, [PARTICIPANTS_KEY, STATE_KEY], [_field(room, identity)])

        def failed(failure) -> None:
            self._unavailable("a participant_left", failure)
            return None

        return d.addCallbacks(lambda r: r == 1, failed)

    # -- removal --------------------------------------------------------------------------

    def begin_removal(self, room: str, identity: str) -> "Deferred[bool]":
        """May this instance remove the participant now? (No: done or under way elsewhere.)"""
        cluster = self._cluster()
        if cluster is None:
            return succeed(True)
        field = _field(room, identity)
        d = self._eval(BEGIN_REMOVAL, [STATE_KEY, REMOVING_PREFIX + field], [field, cluster.iid, self._removal_ms])

        def failed(failure) -> bool:
            self._unavailable("a removal", failure)
            return True

        return d.addCallbacks(lambda r: r == 1, failed)

    def end_removal(self, room: str, identity: str, done: bool) -> None:
        cluster = self._cluster()
        if cluster is None:
            return
        field = _field(room, identity)
        d = self._eval(END_REMOVAL, [STATE_KEY, REMOVING_PREFIX + field], [field, cluster.iid, 1 if done else 0])
        d.addErrback(lambda f: self._unavailable("a removal", f))


def _known_key(field: bytes) -> Optional[Tuple[str, str]]:
    try:
        return key_of(field)
    except (ValueError, UnicodeDecodeError, TypeError):
        return None
