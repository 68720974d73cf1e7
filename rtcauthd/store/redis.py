"""Job persistence in Redis, in lk-jwt-service's exact format (docs/redis-format.md).

One hash ``lk-jwt:jobs``; only PING, HSET, HDEL and HGETALL over RESP2, so that the Go
service, its black-box fake Redis and rtcauthd can share the data. No SELECT for db 0.

Availability rule (deliberately different from upstream, which exits when the start-up
PING fails): Redis being down at start or going away later never crashes the daemon nor
blocks token requests for long. Every write is recorded in a pending table (latest
operation per field wins) before it is sent; a write that cannot be sent within
``op_timeout`` stays pending, the outage is logged once, and a probe waits for Redis to
come back, then everything pending is written and the recovery is logged once. Callers
of ``put``/``delete`` get a Deferred that fires when the write landed or was queued, and
never fails because of Redis.

Start-up restore: ``load_all`` first PINGs (``op_timeout``); a Redis that answers then
gets up to ``restore_wait`` seconds (default 30: 100 000 jobs take ~6 s to read and
resume) for HGETALL. If Redis does not answer in time the daemon starts with no jobs, and once Redis
is back the records are read and handed to the ``on_late`` callback, minus the jobs this
process has written or deleted in the meantime (its state is newer).

URL parsing lives in :mod:`rtcauthd.store.redis_url`, the connection and its failure
classes in :mod:`rtcauthd.store.redis_connection`, the pending-write bookkeeping in
:mod:`rtcauthd.store.write_queue`; this module holds the outage logic that drives them.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rtcauthd.cluster.coordinator import Cluster, ClusterSettings, TakenJob
from rtcauthd.cluster.lease import instance_id
from rtcauthd.metrics import Metrics
from rtcauthd.store.interface import Claim, IJobStore
from rtcauthd.store.model import JOBS_KEY, StoredJob, StoredJobError, decode_value, encode_field, encode_value
from rtcauthd.store.redis_connection import (
    connect,
    decode_hash,
    describe,
    is_transient,
    outbound_error,
    sentinel_manager,
    subscribe,
)
from rtcauthd.store.redis_url import RedisTarget, parse_redis_url
from rtcauthd.store.write_queue import WriteQueue

__all__ = ["JOBS_KEY", "PING_STEP", "REBUILD_INTERVAL", "ClusterSettings", "RedisStore"]

log = Logger()


#: seconds between fresh connections when txredisapi has given up on its own
REBUILD_INTERVAL = 10.0
#: the ``step`` of the OutboundError that a failed :meth:`RedisStore.ping` raises
PING_STEP = "Redis PING"


@implementer(IJobStore)
class RedisStore:
    """:class:`IJobStore` on a Redis hash, tolerant of Redis outages."""

    persistent = True

    def __init__(
        self,
        target: RedisTarget,
        *,
        clock: Optional[IReactorTime] = None,
        tls_policy: Optional[Any] = None,
        op_timeout: float = 2.0,
        restore_wait: float = 30.0,
        retry_interval: float = 1.0,
        metrics: Optional[Metrics] = None,
        cluster: Optional[ClusterSettings] = None,
        _connection: Optional[Any] = None,
    ) -> None:
        self._metrics = metrics if metrics is not None else Metrics()
        if clock is None:
            from twisted.internet import reactor as clock  # txredisapi uses it anyway
        self._clock = clock
        self._target = target
        self._op_timeout = op_timeout
        self._restore_wait = restore_wait
        self._retry_interval = retry_interval
        self._tls_policy = tls_policy
        self._owns_connection = _connection is None
        self._next_rebuild = 0.0
        self._sentinel = sentinel_manager(target) if _connection is None else None
        self._iid = instance_id(cluster.name) if cluster is not None else None
        self._redis = _connection if _connection is not None else self._new_connection()
        self._up = True  # optimistic until an operation says otherwise
        self._closing = False
        self._queue = WriteQueue()
        self._probe_call: Optional[IDelayedCall] = None
        self._probe_d: Optional[Deferred] = None
        self._late: Optional[Callable[[list[StoredJob]], object]] = None
        self._touched: Optional[set[bytes]] = None
        self._restoring = False
        self._cluster: Optional[Cluster] = None
        self._subscriber: Optional[Any] = None
        self._listener: Any = None
        if cluster is not None:
            self._cluster = Cluster(
                connection=lambda: self._redis,
                clock=self._clock,
                iid=self._iid,
                name=cluster.name,
                db=max(target.db, 0),
                lease_seconds=cluster.lease_seconds,
                op_timeout=op_timeout,
                decode=decode_value,
                metrics=self._metrics,
            )

    def _new_connection(self) -> Any:
        # Replies may be as slow as the start-up HGETALL of every job; each operation is
        # still bounded by its own timeout (_bounded).
        return connect(
            self._target,
            tls_policy=self._tls_policy,
            reply_timeout=max(self._op_timeout, self._restore_wait),
            connect_timeout=self._op_timeout,
            sentinel=self._sentinel,
            client_name=None if self._iid is None else b"rtcauthd-" + self._iid,
        )

    def _replace_connection(self) -> None:
        old, self._redis = self._redis, self._new_connection()
        defer.maybeDeferred(old.disconnect).addErrback(lambda _f: None)

    def _rebuild_if_given_up(self) -> None:
        """txredisapi stops reconnecting for good when AUTH or SELECT fails on a new
        connection — even if the connection merely dropped, e.g. behind a proxy while Redis
        restarts — and its reconnect backoff can be long. So while Redis stays unreachable,
        start a fresh connection every REBUILD_INTERVAL seconds (a wrong password does not
        spin faster than that)."""
        if not self._owns_connection:
            return
        now = self._clock.seconds()
        if now < self._next_rebuild:
            return
        if self._next_rebuild:  # not on the first failed probe of an outage
            log.info("Reconnecting to Redis at {address} from scratch", address=self._target.address)
            self._replace_connection()
        self._next_rebuild = now + REBUILD_INTERVAL

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> "RedisStore":
        """Parse ``LIVEKIT_REDIS_URL`` (RedisURLError if invalid) and start connecting."""
        return cls(parse_redis_url(url), **kwargs)

    @property
    def available(self) -> bool:
        """False while an outage is known; pending writes then wait for the probe."""
        return self._up

    @property
    def pending_count(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------ IJobStore

    def put(self, job: StoredJob) -> "Deferred[None]":
        field = encode_field(*job.key).encode("utf-8")
        value = encode_value(job).encode("utf-8")
        if self._cluster is None:
            return self._enqueue(field, value)
        return self._enqueue_op(field, "restarted", value)

    def register(self, job: StoredJob) -> "Deferred[None]":
        if self._cluster is None:
            return self.put(job)
        return self._enqueue_op(field_of(job), "register", encode_value(job).encode("utf-8"))

    def delete(self, room: str, identity: str) -> "Deferred[None]":
        field = encode_field(room, identity).encode("utf-8")
        if self._cluster is None:
            return self._enqueue(field, None)
        return self._enqueue_op(field, "finish", None)

    def claim_send(self, room: str, identity: str) -> "Deferred[Claim]":
        field = encode_field(room, identity).encode("utf-8")
        if self._cluster is None:
            # The only instance: the record goes before the leave does (landed, or queued
            # while Redis is away), so a restart never sends it again.
            return self._enqueue(field, None).addCallback(lambda _: Claim.GRANTED)
        if not self._up or self._closing:
            return succeed(self._claim_offline(field))
        version = self._queue.version_of(field)
        d = self._queue.wait_for(field, version) if version is not None else succeed(None)
        self._pump(field)

        def now(_: object) -> Any:
            if not self._up or self._cluster is None:
                return self._claim_offline(field)
            return self._cluster.claim(field).addCallbacks(
                lambda r: Claim.GRANTED if r == 1 else Claim.LOST, self._claim_failed, errbackArgs=(field,)
            )

        return d.addCallback(now)

    def _claim_failed(self, failure: Failure, field: bytes) -> Claim:
        self._metrics.redis_errors.labels(operation="claim").inc()
        if not is_transient(failure):
            log.error("Redis refused the send claim for {field}: {error}", field=field.decode("utf-8", "replace"),
                      error=describe(failure))
            return Claim.UNAVAILABLE
        self._went_down(failure)
        return self._claim_offline(field)

    def _claim_offline(self, field: bytes) -> Claim:
        """Redis is unreachable: the leave may go only while our own view of the lease says
        nobody can have taken the job over; its record's removal is queued. (A crash before
        that lands is the one way a leave is sent twice: docs/several-instances.md#exactly-once.)"""
        cluster = self._cluster
        if cluster is None:
            self._enqueue(field, None)
            return Claim.GRANTED
        if cluster.lease.holds() and field in cluster.tokens:
            self._enqueue_op(field, "finish", None)
            return Claim.GRANTED
        return Claim.UNAVAILABLE

    def forward(self, room: str, identity: str, signal: str) -> "Deferred[str]":
        """Hand a webhook signal to the instance that runs the job (docs/several-instances.md#routing)."""
        if self._cluster is None:
            return succeed("none")
        field = encode_field(room, identity).encode("utf-8")  # tried even in an outage: it may be over
        return self._cluster.route(field, signal).addErrback(lambda _f: "unavailable")

    def keep_signal(self, room: str, identity: str, signal: str) -> None:
        """Keep a signal for a job this instance is about to adopt (docs/several-instances.md#routing)."""
        if self._cluster is not None:
            self._cluster.keep(encode_field(room, identity).encode("utf-8"), signal)

    def set_listener(self, listener: Any) -> None:
        if self._cluster is not None:
            self._cluster.listener = listener
        self._listener = listener

    @property
    def cluster(self) -> Optional[Cluster]:
        return self._cluster

    def load_all(self, on_late: Optional[Callable[[list[StoredJob]], object]] = None) -> "Deferred[list[StoredJob]]":
        self._touched = set()
        # A quick PING tells "down" (start without jobs, restore later) from "up but a big
        # hash" (100 000 jobs take seconds to read): only the second waits restore_wait.
        d = self._bounded(self._redis.ping(), self._op_timeout)
        d.addCallback(lambda _: self._start_cluster())
        d.addCallback(lambda _: self._bounded(self._redis.hgetall(JOBS_KEY), self._restore_wait))

        def loaded(mapping: dict) -> Any:
            self._touched = None
            self._mark_up()
            return self._adopt(self._decode_all(mapping))

        def failed(failure: Failure) -> list[StoredJob]:
            self._metrics.redis_errors.labels(operation="load").inc()
            if not is_transient(failure):
                self._touched = None
                log.error(
                    "Could not read stored jobs from Redis at {address}: {error}; starting without them",
                    address=self._target.address,
                    error=describe(failure),
                )
                return []
            log.warn(
                "Could not read stored jobs from Redis at {address} ({error}); starting without them, "
                "they are restored when Redis is back",
                address=self._target.address,
                error=describe(failure),
            )
            self._late = on_late
            if on_late is None:
                self._touched = None
            self._went_down(failure)
            return []

        return d.addCallbacks(loaded, failed)

    # ------------------------------------------------------------------ several instances

    def _start_cluster(self) -> "Deferred[None]":
        """Take this instance's lease (and listen for its messages) before reading any job."""
        cluster = self._cluster
        if cluster is None or cluster.lease.acquired:
            return succeed(None)

        def refused(failure: Failure) -> None:
            if is_transient(failure):
                return failure
            log.warn(
                "Redis at {address} refused the commands instances share jobs with ({error}); "
                "this instance runs as if it were the only one",
                address=self._target.address, error=describe(failure),
            )
            self._cluster = None
            return None

        def listen(_: object) -> None:
            if self._cluster is not None and self._subscriber is None and self._owns_connection:
                self._subscriber = subscribe(
                    self._target, self._cluster.channels, self._cluster.on_message,
                    tls_policy=self._tls_policy, connect_timeout=self._op_timeout, sentinel=self._sentinel,
                )

        return cluster.start().addErrback(refused).addCallback(listen)

    def _adopt(self, decoded: list[tuple[bytes, StoredJob]]) -> Any:
        """Only the jobs this instance now owns are resumed; their kept signals follow."""
        if self._cluster is None:
            return [job for _field, job in decoded]

        def started(taken: list[TakenJob]) -> list[StoredJob]:
            if any(t.pending for t in taken):
                self._clock.callLater(0, self._deliver_pending, taken)
            return [t.job for t in taken]

        return self._cluster.adopt_at_start([field for field, _job in decoded]).addCallback(started)

    def _deliver_pending(self, taken: list[TakenJob]) -> None:
        listener = self._listener
        if listener is None:
            return
        for t in taken:
            for signal in t.pending:
                listener.deliver(t.job.params.room, t.job.params.identity, signal)

    def _enqueue_op(self, field: bytes, kind: str, value: Optional[bytes]) -> "Deferred[None]":
        # A registration that has not landed (queued, or in flight and maybe lost) must
        # still take the job over: what replaces it in the queue registers again.
        before = self._queue.newest(field)
        if isinstance(before, tuple) and before[0] in ("register", "drop"):
            kind = {"restarted": "register", "finish": "drop"}.get(kind, kind)
        return self._enqueue(field, (kind, value))

    def close(self) -> "Deferred[None]":
        self._closing = True
        self._stop_probe()
        if self._queue and not self._up:
            # Redis may be back already, before our probe noticed: a fresh connection (the
            # old one may sit in its reconnect backoff), one bounded PING, and if it answers,
            # one bounded chance for the queued changes to land.
            if self._owns_connection:
                self._replace_connection()
            d = self._bounded(self._redis.ping(), self._op_timeout)
            d.addCallbacks(lambda _: self._flush_for_close(), lambda _f: None)
        elif self._up and self._queue:
            d = self._wait_drained()
        else:
            d = succeed(None)

        def release(_: object) -> Any:
            if self._cluster is not None:
                return self._cluster.stop()
            return None

        d.addBoth(release)

        def disconnect(_: object) -> "Deferred[None]":
            if self._subscriber is not None:
                subscriber, self._subscriber = self._subscriber, None
                defer.maybeDeferred(subscriber.disconnect).addErrback(lambda _f: None)
            if self._queue:
                log.warn(
                    "{count} job change(s) could not be written to Redis before shutdown",
                    count=len(self._queue),
                )
            self._queue.release_all()
            closing = [defer.maybeDeferred(self._redis.disconnect)]
            if self._sentinel is not None:
                closing.append(defer.maybeDeferred(self._sentinel.disconnect))
            return defer.gatherResults(closing, consumeErrors=True).addErrback(lambda _f: None)

        return d.addBoth(disconnect).addCallback(lambda _: None)

    def _wait_drained(self) -> "Deferred[None]":
        return self._bounded(self._queue.when_drained(), self._op_timeout)

    def _flush_for_close(self) -> "Deferred[None]":
        self._up = True
        for field in self._queue.fields():
            self._pump(field)
        return self._wait_drained()

    def ping(self) -> "Deferred[None]":
        """PING within ``op_timeout``; fails with an
        :class:`~rtcauthd.outbound.errors.OutboundError` (TIMEOUT, CONNECT or OTHER).

        Upstream treats a failed start-up PING as fatal; rtcauthd only logs it (see module
        docstring), so this is for diagnostics and tests.
        """

        def failed(failure: Failure) -> None:
            raise outbound_error(failure, PING_STEP)

        return self._bounded(self._redis.ping(), self._op_timeout).addCallbacks(lambda _: None, failed)

    # ------------------------------------------------------------------ writes

    def _enqueue(self, field: bytes, value: Optional[bytes]) -> "Deferred[None]":
        version = self._queue.record(field, value)
        if self._touched is not None:
            self._touched.add(field)
        if not self._up or self._closing:
            return succeed(None)  # queued; written when Redis is back (or lost at shutdown)
        d = self._queue.wait_for(field, version)
        self._pump(field)
        return d

    def _pump(self, field: bytes) -> None:
        if not self._up:
            return
        write = self._queue.take(field)
        if write is None:
            return
        version, value = write
        if isinstance(value, tuple):
            kind, payload = value
            if self._cluster is not None:
                command = self._cluster.write(kind, field, payload)
            elif kind in ("finish", "drop"):
                command = self._redis.hdel(JOBS_KEY, [field])
            else:
                command = self._redis.hset(JOBS_KEY, field, payload)
        elif value is None:
            command = self._redis.hdel(JOBS_KEY, [field])
        else:
            command = self._redis.hset(JOBS_KEY, field, value)
        self._bounded(command, self._op_timeout).addCallbacks(
            self._written, self._write_failed, callbackArgs=(field, version), errbackArgs=(field, version)
        )

    def _written(self, _result: object, field: bytes, version: int) -> None:
        # landed, or (from _write_failed) refused for good: either way done with
        self._queue.settled(field, version)
        self._pump(field)

    def _write_failed(self, failure: Failure, field: bytes, version: int) -> None:
        self._metrics.redis_errors.labels(operation="write").inc()
        if not is_transient(failure):
            log.error(
                "Redis refused to write job record {field}: {error}",
                field=field.decode("utf-8", "replace"),
                error=describe(failure),
            )
            self._written(None, field, version)
            return
        self._queue.failed(field)
        self._went_down(failure)

    # ------------------------------------------------------------------ outage handling

    def _went_down(self, failure: Failure) -> None:
        if self._up and not self._closing:
            log.warn(
                "Redis at {address} is unavailable ({error}); job changes are kept in memory and "
                "written when it is back",
                address=self._target.address,
                error=describe(failure),
            )
        self._up = False
        # Nobody waits on Redis while it is down.
        self._queue.release_all()
        self._schedule_probe(0)

    def _schedule_probe(self, delay: Optional[float]) -> None:
        if self._closing or self._probe_d is not None or self._probe_call is not None:
            return
        self._probe_call = self._clock.callLater(
            self._retry_interval if delay is None else delay, self._probe
        )

    def _probe(self) -> None:
        # Waits for txredisapi to reconnect (it backs off by itself); once connected the
        # PING is bounded by the reply timeout.
        self._probe_call = None
        d = self._probe_d = self._bounded(self._redis.ping(), max(self._op_timeout, 2 * self._retry_interval))

        def ok(_: object) -> None:
            self._probe_d = None
            self._next_rebuild = 0.0
            self._came_back()

        def failed(failure: Failure) -> None:
            if self._probe_d is not d:
                return  # cancelled by _stop_probe
            self._probe_d = None
            self._rebuild_if_given_up()
            self._schedule_probe(self._retry_interval)

        d.addCallbacks(ok, failed)

    def _stop_probe(self) -> None:
        if self._probe_call is not None:
            self._probe_call.cancel()
            self._probe_call = None
        if self._probe_d is not None:
            probe, self._probe_d = self._probe_d, None
            probe.cancel()

    def _came_back(self) -> None:
        if self._closing:
            return
        self._mark_up()
        cluster = self._cluster
        if cluster is not None and not cluster.lease.acquired and not cluster.had_lease:
            # Down since start-up: take the lease before anything is written or restored.
            self._start_cluster().addCallbacks(lambda _: self._resume_writes(), self._went_down)
            return
        if cluster is not None:
            cluster.lease.name_connection().addErrback(lambda _f: None)  # a new connection: say who we are
        self._resume_writes()

    def _resume_writes(self) -> None:
        if self._late is not None:
            self._late_restore()
        for field in self._queue.fields():
            self._pump(field)

    def _mark_up(self) -> None:
        if not self._up:
            self._up = True
            log.info(
                "Redis at {address} is available again; writing {count} pending job change(s)",
                address=self._target.address,
                count=len(self._queue),
            )

    def _late_restore(self) -> None:
        if self._restoring:
            return
        self._restoring = True
        d = self._bounded(self._redis.hgetall(JOBS_KEY), self._restore_wait)

        def loaded(mapping: dict) -> None:
            self._restoring = False
            callback, self._late = self._late, None
            touched, self._touched = self._touched or set(), None
            fresh = [(field, job) for field, job in self._decode_all(mapping) if field not in touched]
            return defer.maybeDeferred(self._adopt, fresh).addCallback(restore, callback)

        def restore(jobs: list[StoredJob], callback: Any) -> None:
            log.info("Restoring {count} job(s) read from Redis after the outage", count=len(jobs))
            if callback is not None and not self._closing:
                try:
                    callback(jobs)
                except Exception:
                    log.failure("Restoring jobs read late from Redis failed")

        def failed(failure: Failure) -> None:
            self._restoring = False
            if not is_transient(failure):
                log.error("Could not read stored jobs from Redis after the outage: {error}", error=describe(failure))
                self._late = self._touched = None
                return
            self._went_down(failure)

        d.addCallbacks(loaded, failed).addErrback(lambda f: log.failure("Restoring jobs read late from Redis failed", f))

    # ------------------------------------------------------------------ helpers

    def _bounded(self, d: Deferred, seconds: float) -> Deferred:
        return d.addTimeout(seconds, self._clock)

    def _decode_all(self, mapping: dict) -> list[tuple[bytes, StoredJob]]:
        return decode_hash(mapping, decode_value, StoredJobError, "job record", log)


def field_of(job: StoredJob) -> bytes:
    return encode_field(*job.key).encode("utf-8")
