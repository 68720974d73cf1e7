"""Several instances on one Redis: who drives which job, and how the others find out.

The :class:`Cluster` belongs to the Redis store (it shares its connection) and keeps
this instance's fencing token per job. Every ``renew_interval`` (a third of the lease)
it renews its liveness lease, names its connection, and looks at its peers: a peer
whose liveness key is gone, or whose Redis connection is gone while the key still
lives (Redis knows its clients: a process killed with ``kill -9`` loses its socket at
once), is dead, and its jobs are taken over (``ADOPT``: compare-and-set per job). A live
but slow peer keeps its connection open and so keeps its jobs until its lease expires
(docs/several-instances.md#the-liveness-rule).

Everything that reaches the job table goes through a listener (the
:class:`~rtcauthd.leave.manager.JobManager`): ``job_lost``, ``taken_over`` and
``deliver`` (a webhook routed here from another instance).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Optional

import attr
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from rtcauthd.cluster.lease import InstanceLease
from rtcauthd.cluster.scripts import (
    ADOPT,
    CONNECTED,
    DRAIN,
    DROP,
    FENCE,
    FINISH,
    FORGET,
    INSTANCES,
    KEEP,
    OWNERS,
    PREFIX,
    REGISTER,
    RESTARTED,
    ROUTE,
    ClusterKeys,
)
from rtcauthd.store.model import JOBS_KEY, StoredJob

__all__ = ["Cluster", "ClusterSettings", "TakenJob", "key_of", "owner_of"]

log = Logger()

#: jobs per ADOPT call, so that one script never blocks Redis for long
ADOPT_BATCH = 500


def owner_of(token: Optional[bytes]) -> Optional[bytes]:
    """The instance id in ``b"<fence>|<iid>"``."""
    if not token or b"|" not in token:
        return None
    return token.split(b"|", 1)[1]


def fence_of(token: Optional[bytes]) -> int:
    try:
        return int(token.split(b"|", 1)[0]) if token else 0
    except ValueError:
        return 0


def key_of(field: bytes) -> tuple[str, str]:
    room, identity = json.loads(field.decode("utf-8"))
    return room, identity


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ClusterSettings:
    """RTCAUTH_INSTANCE_NAME and RTCAUTH_JOB_LEASE_SECONDS."""

    name: str
    lease_seconds: float = 10.0


@attr.s(frozen=True, slots=True, auto_attribs=True)
class TakenJob:
    """A job this instance now owns, with what the previous owner left behind."""

    job: StoredJob
    connected: bool  # the participant had connected (a restart had succeeded)
    pending: tuple[str, ...]  # webhook signals kept while no live instance owned it


class Cluster:
    """Leases, takeover and routing for one RedisStore (docs/several-instances.md)."""

    def __init__(
        self,
        *,
        connection: Callable[[], Any],
        clock: IReactorTime,
        iid: bytes,
        name: str,
        db: int,
        lease_seconds: float,
        op_timeout: float,
        decode: Callable[[bytes], StoredJob],
        metrics: Any = None,
    ) -> None:
        self._connection = connection
        self._clock = clock
        self.name = name
        self.keys = ClusterKeys(db)
        self.lease = InstanceLease(
            connection=connection, keys=self.keys, iid=iid, clock=clock,
            lease_seconds=lease_seconds, op_timeout=op_timeout,
        )
        self._op_timeout = op_timeout
        self._decode = decode
        self._metrics = metrics
        self.tokens: dict[bytes, bytes] = {}
        self.listener: Any = None
        self._loop: Optional[LoopingCall] = None
        self._ticking = False
        self._had_lease = False
        self._regaining = False
        self._stopping = False
        self._taking: set[bytes] = set()
        self._unseen_since: dict[bytes, float] = {}  # live-keyed peers without a connection, since
        self.takeovers = 0  # jobs taken over from other (or earlier) instances, for metrics
        self.routed: dict[str, int] = {}  # webhooks handed on, by ROUTE's answer
        if metrics is not None:
            from rtcauthd.cluster.metrics import ClusterCollector

            metrics.registry.register(ClusterCollector(self))

    @property
    def iid(self) -> bytes:
        return self.lease.iid

    @property
    def had_lease(self) -> bool:
        return self._had_lease

    @property
    def renew_interval(self) -> float:
        return self.lease.lease_seconds / 3

    def _eval(self, script: str, keys: list, args: list) -> Deferred:
        return self._connection().eval(script, keys, args).addTimeout(self._op_timeout, self._clock)

    def _command(self, *args: Any) -> Deferred:
        return self._connection().execute_command(*args).addTimeout(self._op_timeout, self._clock)

    # ------------------------------------------------------------------ life cycle

    @inlineCallbacks
    def start(self):
        """Acquire the lease and name the connection; fails if Redis does not answer (or
        refuses scripts: then the caller runs without cooperation)."""
        acquired = yield self.lease.acquire()
        if not acquired:
            raise RuntimeError("instance id already in use")
        self._had_lease = True
        yield self.lease.name_connection()
        log.info(
            "Instance {name} ({iid}) holds its lease ({lease:g} s); jobs are shared with the other "
            "instances on this Redis",
            name=self.name, iid=self.iid.decode(), lease=self.lease.lease_seconds,
        )
        if self._loop is None:
            self._loop = LoopingCall(self.tick)
            self._loop.clock = self._clock
            self._loop.start(self.renew_interval, now=False).addErrback(
                lambda f: log.failure("Lease loop stopped", f)
            )

    def stop_renewing(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def stop(self) -> Deferred:
        """Stop renewing and give the lease up, so the others take over at once."""
        self.stop_renewing()
        self._stopping = True
        if not self.lease.acquired:
            return succeed(None)
        log.info("Handing this instance's jobs over to the other instances")
        return self.lease.release().addErrback(lambda _f: None)

    def tick(self) -> Optional[Deferred]:
        if self._ticking:
            return None  # the last round is still waiting for Redis
        self._ticking = True
        d = self._tick()
        d.addErrback(lambda f: log.debug("Lease round failed: {error}", error=f.getErrorMessage()))

        def done(_: object) -> None:
            self._ticking = False

        return d.addBoth(done)

    @inlineCallbacks
    def _tick(self):
        if not self.lease.acquired:
            if self._had_lease:
                yield self.regain()
            return  # never had one: the store acquires it when Redis answers
        still_ours = yield self.lease.renew()
        if not still_ours:
            yield self.regain()
            return
        yield self.read_inbox(self.iid)
        yield self.scan_peers()

    @inlineCallbacks
    def read_inbox(self, iid: bytes):
        """Signals routed to ``iid`` while it was not listening (reconnecting after a Redis
        restart or failover); for a dead ``iid``, after its jobs were taken over."""
        for _ in range(100):  # bounded: 100 x 100 messages a round at most
            messages = yield self._eval(DRAIN, [PREFIX + b"inbox:" + iid], [100])
            for message in messages or []:
                if iid == self.iid:
                    self.on_message(b"inbox", message)
                else:
                    _kind, _, rest = message.partition(b"\n")
                    signal, _, field = rest.partition(b"\n")
                    if self.listener is not None:
                        self.listener.redeliver(*key_of(field), signal.decode("ascii", "replace"))
            if not messages or len(messages) < 100:
                return

    @inlineCallbacks
    def regain(self):
        """The lease expired while Redis or this process was away: nothing we ran is ours
        any more. Drop every job, get a lease again and take back what nobody else took."""
        if self.lease.acquired is False and not self._regaining:
            self._regaining = True
            log.warn("Lease of instance {iid} was lost; its {count} job(s) are dropped here and taken over afresh",
                     iid=self.iid.decode(), count=len(self.tokens))
            # Jobs whose registration has not landed yet keep running: it supersedes
            # whatever Redis holds when it does, and gives them a token then.
            lost, self.tokens = list(self.tokens), {}
            if self.listener is not None:
                for field in lost:
                    self.listener.job_lost(*key_of(field))
        acquired = yield self.lease.acquire()
        if acquired:
            self._regaining = False
            yield self.lease.name_connection()
            yield self.take_over(self.iid)

    # ------------------------------------------------------------------ peers

    @inlineCallbacks
    def dead_instances(self, candidates: Iterable[bytes], *, at_once: bool = False):
        """Which of ``candidates`` are dead: liveness key gone, or no Redis connection of
        theirs. Outside start-up (``at_once``) a missing connection must still be missing a
        renewal interval later: after a Redis restart or failover everybody reconnects,
        and the slower ones should not lose their jobs to the quicker ones for that."""
        others = sorted({c for c in candidates if c and c != self.iid})
        if not others:
            return set()
        values = yield self._command("MGET", *[self.keys.instance(i) for i in others])
        dead = {i for i, v in zip(others, values) if v != i}
        alive = [i for i in others if i not in dead]
        if alive:
            names = yield self.connected_names()
            if names is not None:
                now = self._clock.seconds()
                unseen = {i for i in alive if b"rtcauthd-" + i not in names}
                for i in list(self._unseen_since):
                    if i not in unseen:
                        del self._unseen_since[i]
                for i in unseen:
                    since = self._unseen_since.setdefault(i, now)
                    if at_once or now - since >= self.renew_interval * 0.9:
                        dead.add(i)
        return dead

    @inlineCallbacks
    def connected_names(self):
        """Names of the clients Redis has now; None if CLIENT LIST is not allowed (then
        only expiry tells a dead instance)."""
        try:
            listing = yield self._command("CLIENT", "LIST", "TYPE", "normal")
        except Exception as e:  # an ACL without CLIENT: fall back to lease expiry
            log.debug("CLIENT LIST refused ({error}); dead instances are found by lease expiry", error=e)
            return None
        names = set()
        for line in (listing or b"").splitlines():
            for part in line.split(b" "):
                if part.startswith(b"name="):
                    names.add(part[5:])
        return names

    @inlineCallbacks
    def scan_peers(self):
        members = yield self._command("SMEMBERS", INSTANCES)
        dead = yield self.dead_instances(members or [])
        for iid in sorted(dead):
            yield self.take_over(iid)

    @inlineCallbacks
    def take_over(self, dead: bytes):
        """Adopt every job whose owner entry still names ``dead``; forget ``dead`` when
        nothing of it is left."""
        if dead in self._taking:
            return
        self._taking.add(dead)
        try:
            fields = yield self._command("SMEMBERS", self.keys.owned(dead))
            fields = list(fields or [])
            taken = []
            for start in range(0, len(fields), ADOPT_BATCH):
                batch = fields[start:start + ADOPT_BATCH]
                tokens = yield self._command("HMGET", OWNERS, *batch)
                pairs = [(f, t) for f, t in zip(batch, tokens) if owner_of(t) == dead]
                stale = [f for f, t in zip(batch, tokens) if owner_of(t) != dead]
                if stale:
                    yield self._command("SREM", self.keys.owned(dead), *stale)
                if pairs:
                    taken += yield self.adopt(pairs)
            if dead != self.iid:
                yield self._eval(FORGET, [INSTANCES, self.keys.owned(dead)], [dead])
            if taken:
                log.info("Took over {count} job(s) of instance {dead}", count=len(taken), dead=dead.decode())
                if self.listener is not None:
                    self.listener.taken_over(taken)
            if dead != self.iid:
                yield self.read_inbox(dead)  # its undelivered signals go to the jobs' new owners
        finally:
            self._taking.discard(dead)

    @inlineCallbacks
    def adopt(self, pairs: list[tuple[bytes, bytes]]):
        """ADOPT ``(field, expected owner token or b"")`` pairs; the TakenJobs we got."""
        taken: list[TakenJob] = []
        for start in range(0, len(pairs), ADOPT_BATCH):
            args: list[bytes] = [self.iid, PREFIX]
            for field, expected in pairs[start:start + ADOPT_BATCH]:
                args += [field, expected or b""]
            rows = yield self._eval(ADOPT, [JOBS_KEY, OWNERS, FENCE, CONNECTED], args)
            for field, token, value, connected, pending in rows or []:
                self.tokens[field] = token
                try:
                    job = self._decode(value)
                except ValueError:
                    continue  # unparsable: left in place for whoever understands it
                taken.append(TakenJob(job, connected == b"1", tuple(p.decode("utf-8", "replace") for p in pending)))
        self.takeovers += len(taken)
        return taken

    @inlineCallbacks
    def adopt_at_start(self, fields: list[bytes]):
        """At start-up (and after a late restore): take every stored job that has no
        owner or a dead one, before the first /healthz 200."""
        owners = yield self._command("HGETALL", OWNERS)
        owner_map = dict(zip(owners[0::2], owners[1::2])) if owners else {}
        dead = yield self.dead_instances((owner_of(t) for t in owner_map.values()), at_once=True)
        pairs = []
        for field in fields:
            token = owner_map.get(field, b"")
            holder = owner_of(token)
            if holder is None or holder in dead:
                pairs.append((field, token))
        taken = yield self.adopt(pairs)
        return taken

    # ------------------------------------------------------------------ fenced writes

    def write(self, kind: str, field: bytes, value: Optional[bytes]) -> Deferred:
        """One queued change of a job record, fenced by this instance's token for it."""
        if kind == "register":
            d = self._eval(REGISTER, [JOBS_KEY, OWNERS, FENCE, CONNECTED],
                           [field, value, self.iid, PREFIX, self.keys.channel_prefix])
            return d.addCallback(self._registered, field)
        if kind == "drop":
            self.tokens.pop(field, None)
            return self._eval(DROP, [JOBS_KEY, OWNERS, FENCE, CONNECTED],
                              [field, PREFIX, self.keys.channel_prefix, self.iid])
        token = self.tokens.get(field)
        if token is None:
            if kind == "restarted":
                self._lost(field)
            return succeed(0)  # not ours (any more): nothing to write
        if kind == "restarted":
            d = self._eval(RESTARTED, [JOBS_KEY, OWNERS, CONNECTED], [field, value, token])
            return d.addCallback(self._checked, field, token)
        self.tokens.pop(field, None)
        return self._eval(FINISH, [JOBS_KEY, OWNERS, CONNECTED], [field, token, PREFIX, self.iid, b""])

    def claim(self, field: bytes) -> "Deferred[int]":
        """Before sending a leave: remove its record if the job and the lease are still
        ours (1); 0 = another instance owns it, -1 = our lease is gone."""
        token = self.tokens.get(field)
        if token is None:
            return succeed(0)
        d = self._eval(FINISH, [JOBS_KEY, OWNERS, CONNECTED], [field, token, PREFIX, self.iid, b"claim"])

        def done(result: Any) -> int:
            result = int(result)
            if result == 1 or self.tokens.get(field) == token:
                self.tokens.pop(field, None)
            return result

        return d.addCallback(done)

    def _registered(self, token: bytes, field: bytes) -> bytes:
        self.tokens[field] = token
        return token

    def _checked(self, result: Any, field: bytes, token: bytes) -> Any:
        if int(result) == 0 and self.tokens.get(field) == token:
            self._lost(field)
        return result

    def _lost(self, field: bytes) -> None:
        self.tokens.pop(field, None)
        log.info("Job record {field} is owned by another instance now; dropping the job here",
                 field=field.decode("utf-8", "replace"))
        if self.listener is not None:
            self.listener.job_lost(*key_of(field))

    # ------------------------------------------------------------------ routing

    def route(self, field: bytes, signal: str) -> "Deferred[str]":
        """A webhook for a job not running here: ``sent`` to its owner, ``kept`` for the next
        owner, ``mine`` or ``none``."""
        d = self._eval(ROUTE, [OWNERS], [field, signal, PREFIX, self.keys.channel_prefix, self.iid])

        def counted(reply: Any) -> str:
            result = reply.decode() if isinstance(reply, bytes) else str(reply)
            self.routed[result] = self.routed.get(result, 0) + 1
            return result

        return d.addCallback(counted)

    def keep(self, field: bytes, signal: str) -> Deferred:
        d = self._eval(KEEP, [PREFIX + b"pending:" + field], [signal])
        return d.addErrback(lambda f: log.debug("Could not keep a signal: {error}", error=f.getErrorMessage()))

    @property
    def channels(self) -> list[bytes]:
        return [self.keys.channel(self.iid), self.keys.broadcast]

    def on_message(self, channel: bytes, message: bytes) -> None:
        kind, _, rest = message.partition(b"\n")
        if kind == b"gone":
            if rest != self.iid and self.lease.acquired and not self._stopping:
                log.info("Instance {iid} handed its jobs over", iid=rest.decode("utf-8", "replace"))
                self.take_over(rest).addErrback(lambda f: log.failure("Taking jobs over failed", f))
            return
        first, _, field = rest.partition(b"\n")
        if kind == b"signal" and self.listener is not None:
            name = first.decode("ascii", "replace")
            if not self.listener.deliver(*key_of(field), name):
                # Redis says the job is ours but it is not running here (yet): we are
                # re-adopting it after a lost lease. Keep the signal for the adoption.
                self.keep(field, name)
        elif kind == b"superseded":
            token = self.tokens.get(field)
            if token is not None and fence_of(token) < int(first or 0):
                self._lost(field)
