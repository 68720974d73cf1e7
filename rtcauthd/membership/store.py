"""Where the tracked participants are kept across restarts (docs/membership.md#redis-record).

The tracker lives in memory; Redis only lets a restarted daemon pick the set up again, so
writing is best-effort: every change is recorded in a :class:`WriteQueue` (the latest
change per participant wins) and sent at once while Redis answers. A change that cannot be
written stays queued and is sent again at the next sweep, which thus doubles as the
outage probe; the outage and the recovery are logged once each. Nothing here ever fails a
token request or a sweep. It has its own connection because the job store's is tied to
the ``lk-jwt:jobs`` hash, to the same target (Sentinels included); with several instances
that connection also carries the keys of membership/shared.py.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from rtcauthd.membership.record import (
    PARTICIPANTS_KEY,
    Participant,
    ParticipantRecordError,
    decode_record,
    encode_field,
    encode_record,
)
from rtcauthd.cluster.coordinator import key_of
from rtcauthd.store.redis_connection import connect, decode_hash, describe, is_transient, sentinel_manager
from rtcauthd.store.redis_url import RedisTarget, parse_redis_url
from rtcauthd.store.write_queue import WriteQueue

__all__ = ["MemoryParticipantStore", "RedisParticipantStore"]

log = Logger()


class MemoryParticipantStore:
    """No persistence: a restart forgets the tracked set (the next tokens rebuild it)."""

    persistent = False

    def put(self, participant: Participant) -> None:
        pass

    def delete(self, room: str, identity: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def unsent_keys(self) -> set:
        return set()

    def load_all(self) -> "Deferred[list[Participant]]":
        return succeed([])

    def close(self) -> "Deferred[None]":
        return succeed(None)


class RedisParticipantStore:
    """The hash ``lk-jwt:participants``; writes are queued and retried, never waited for."""

    persistent = True

    def __init__(
        self,
        target: RedisTarget,
        *,
        clock: IReactorTime,
        tls_policy: Optional[Any] = None,
        op_timeout: float = 2.0,
        load_timeout: float = 10.0,
        _connection: Optional[Any] = None,
    ) -> None:
        # The same target as the job store, Sentinels included (tap.redis_target).
        self._clock = clock
        self._address = target.address
        self._op_timeout = op_timeout
        self._load_timeout = load_timeout
        self._sentinel = sentinel_manager(target) if _connection is None else None
        self._redis = _connection if _connection is not None else connect(
            target, tls_policy=tls_policy, reply_timeout=max(op_timeout, load_timeout), connect_timeout=op_timeout,
            sentinel=self._sentinel,
        )
        self._queue = WriteQueue()
        self._up = True
        self._closing = False

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> "RedisParticipantStore":
        return cls(parse_redis_url(url), **kwargs)

    @property
    def pending_count(self) -> int:
        return len(self._queue)

    @property
    def connection(self) -> Any:
        """The connection, for the several-instances keys beside the record (membership/shared.py)."""
        return self._redis

    def unsent_keys(self) -> set:
        """(room, identity) of every record change not yet written (kept through a merge)."""
        keys = set()
        for field in self._queue.fields():
            try:
                keys.add(key_of(field))
            except (ValueError, UnicodeDecodeError, TypeError):
                pass
        return keys

    def put(self, participant: Participant) -> None:
        field = encode_field(*participant.key).encode("utf-8")
        self._record(field, encode_record(participant).encode("utf-8"))

    def delete(self, room: str, identity: str) -> None:
        self._record(encode_field(room, identity).encode("utf-8"), None)

    def flush(self) -> None:
        """Send what is still queued (after an outage); one write per participant at a time."""
        if self._closing:
            return
        self._up = True
        for field in self._queue.fields():
            self._send(field)

    def _record(self, field: bytes, value: Optional[bytes]) -> None:
        self._queue.record(field, value)
        if self._up and not self._closing:
            self._send(field)

    def _send(self, field: bytes) -> None:
        write = self._queue.take(field)
        if write is None:
            return
        version, value = write
        command = self._redis.hset(PARTICIPANTS_KEY, field, value) if value is not None else (
            self._redis.hdel(PARTICIPANTS_KEY, [field])
        )
        command.addTimeout(self._op_timeout, self._clock).addCallbacks(
            self._written, self._failed, callbackArgs=(field, version), errbackArgs=(field, version)
        )

    def _written(self, _result: object, field: bytes, version: int) -> None:
        self._queue.settled(field, version)
        if self._up and not self._closing:
            self._send(field)  # a newer change recorded meanwhile

    def _failed(self, failure: Failure, field: bytes, version: int) -> None:
        if not is_transient(failure):
            log.error(
                "Redis refused the participant record {field}: {error}",
                field=field.decode("utf-8", "replace"),
                error=describe(failure),
            )
            self._queue.settled(field, version)
            return
        self._queue.failed(field)
        if self._up and not self._closing:
            log.warn(
                "Redis at {address} is unavailable ({error}); tracked participants are written at a later sweep",
                address=self._address,
                error=describe(failure),
            )
        self._up = False

    def load_all(self) -> "Deferred[list[Participant]]":
        """Every readable record; Redis down or slow means starting with none (logged)."""
        d = self._redis.hgetall(PARTICIPANTS_KEY).addTimeout(self._load_timeout, self._clock)

        def loaded(mapping: dict) -> list[Participant]:
            decoded = decode_hash(mapping, decode_record, ParticipantRecordError, "participant record", log)
            return [participant for _, participant in decoded]

        def failed(failure: Failure) -> list[Participant]:
            log.warn(
                "Could not read tracked participants from Redis at {address} ({error}); starting without them",
                address=self._address,
                error=describe(failure),
            )
            return []

        return d.addCallbacks(loaded, failed)

    def close(self) -> "Deferred[None]":
        self._closing = True
        pending = len(self._queue)
        if pending:
            log.info("{count} participant record change(s) not written to Redis at shutdown", count=pending)
        self._queue.release_all()
        d = maybeDeferred(self._redis.disconnect).addBoth(lambda _: None)
        if self._sentinel is not None:
            d.addCallback(lambda _: maybeDeferred(self._sentinel.disconnect)).addBoth(lambda _: None)
        return d
