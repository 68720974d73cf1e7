"""Job persistence in Redis, in lk-jwt-service's exact format (protocol.md §13).

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

txredisapi connects through the global reactor, which is why this module (unlike the
rest of rtcauthd) does not take its connection machinery from the caller.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional
from urllib.parse import parse_qsl, unquote, urlsplit

import attr
import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from rtcauthd.gojson import go_quote
from rtcauthd.metrics import Metrics
from rtcauthd.store.interface import IJobStore
from rtcauthd.store.model import StoredJob, StoredJobError, decode_value, encode_field, encode_value

__all__ = [
    "JOBS_KEY",
    "RedisPingError",
    "RedisStore",
    "RedisTarget",
    "RedisURLError",
    "parse_redis_url",
    "redact_url",
]

log = Logger()

#: the one hash every job lives in (protocol.md §13.2)
JOBS_KEY = b"lk-jwt:jobs"

DEFAULT_PORT = 6379
#: seconds between fresh connections when txredisapi has given up on its own
REBUILD_INTERVAL = 10.0


class RedisURLError(ValueError):
    """``LIVEKIT_REDIS_URL`` cannot be used; the message is upstream's, minus the password."""

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(f"store: invalid Redis URL {go_quote(redact_url(url))}: {detail}")
        self.detail = detail


class RedisPingError(Exception):
    """An explicit PING did not succeed in time."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"store: Redis ping failed: {detail}")
        self.detail = detail


@attr.s(frozen=True, slots=True, auto_attribs=True)
class RedisTarget:
    """Where and how to connect, parsed from a go-redis style URL."""

    transport: str  # "tcp", "tls" or "unix"
    host: str = ""
    port: int = DEFAULT_PORT
    path: str = ""
    db: int = 0
    username: str = ""
    password: str = attr.ib(default="", repr=False)
    skip_verify: bool = False
    redacted: str = ""

    @property
    def address(self) -> str:
        """For log lines; never contains the password."""
        if self.transport == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``xxxxx`` (as Go's ``URL.Redacted``)."""
    scheme_end = url.find("://")
    if scheme_end < 0:
        return url
    start = scheme_end + 3
    end = len(url)
    for stop in "/?#":
        i = url.find(stop, start)
        if i >= 0:
            end = min(end, i)
    at = url.rfind("@", start, end)  # the userinfo ends at the last "@" of the authority
    colon = url.find(":", start, at) if at >= 0 else -1
    if colon < 0:
        return url
    return url[: colon + 1] + "xxxxx" + url[at:]


# go-redis query options: accepted so that upstream URLs keep working; only ``db`` and
# ``skip_verify`` mean anything here (timeouts and pool sizes are rtcauthd's own).
_KNOWN_OPTIONS = frozenset(
    {
        "db",
        "protocol",
        "client_name",
        "max_retries",
        "min_retry_backoff",
        "max_retry_backoff",
        "dial_timeout",
        "read_timeout",
        "write_timeout",
        "pool_fifo",
        "pool_size",
        "pool_timeout",
        "min_idle_conns",
        "max_idle_conns",
        "max_active_conns",
        "conn_max_idle_time",
        "conn_max_lifetime",
        "idle_timeout",
        "idle_check_frequency",
        "max_conn_age",
        "skip_verify",
        "context_timeout_enabled",
        "identity_suffix",
        "unstable_resp3",
        "disable_identity",
    }
)
_ATOI = re.compile(r"[+-]?[0-9]+", re.ASCII)
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def _atoi(text: str) -> Optional[int]:
    return int(text) if _ATOI.fullmatch(text) else None


def parse_redis_url(url: str) -> RedisTarget:
    """Parse ``redis://``, ``rediss://`` or ``unix://`` the way go-redis ``ParseURL`` does.

    ``redis://[[user]:password@]host[:port][/db]``, ``rediss://…`` (TLS),
    ``unix://[[user]:password@]/path?db=N``. Raises :class:`RedisURLError`.
    """
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise RedisURLError(url, f"parse error: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise RedisURLError(url, f"redis: invalid URL scheme: {parts.scheme}")

    username = unquote(parts.username or "")
    password = unquote(parts.password or "")
    query_db: Optional[int] = None
    skip_verify = False
    seen: set[str] = set()
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in _KNOWN_OPTIONS:
            raise RedisURLError(url, f"redis: unexpected option: {name}")
        if name in seen:
            continue  # go-redis reads the first value of each option
        seen.add(name)
        if name == "db" and value != "":
            number = _atoi(value)
            if number is None:
                raise RedisURLError(
                    url, f'redis: invalid database number: strconv.Atoi: parsing "{value}": invalid syntax'
                )
            query_db = number
        elif name == "skip_verify" and value != "":
            if value in _TRUE:
                skip_verify = True
            elif value not in _FALSE:
                raise RedisURLError(url, f'redis: invalid skip_verify boolean value: "{value}"')

    if scheme == "unix":
        if not parts.path.strip():
            raise RedisURLError(url, "redis: empty unix socket path")
        return RedisTarget(
            transport="unix",
            path=unquote(parts.path),
            db=query_db or 0,
            username=username,
            password=password,
            redacted=redact_url(url),
        )

    try:
        port = parts.port
    except ValueError:
        raise RedisURLError(url, "invalid port after host") from None
    host = parts.hostname or "localhost"
    segments = [s for s in parts.path.split("/") if s]
    db = 0
    if len(segments) == 1:
        number = _atoi(segments[0])
        if number is None:
            raise RedisURLError(url, f'redis: invalid database number: "{segments[0]}"')
        db = number
    elif len(segments) > 1:
        raise RedisURLError(url, f"redis: invalid URL path: {parts.path}")
    if query_db is not None:  # ?db= wins over the path, as in go-redis
        db = query_db
    return RedisTarget(
        transport="tls" if scheme == "rediss" else "tcp",
        host=host,
        port=port if port is not None else DEFAULT_PORT,
        db=db,
        username=username,
        password=password,
        skip_verify=skip_verify and scheme == "rediss",
        redacted=redact_url(url),
    )


def _tls_creator(target: RedisTarget, tls_policy: Optional[Any]) -> Any:
    if target.skip_verify:
        from twisted.internet.ssl import CertificateOptions

        log.warn(
            "TLS certificate verification for Redis at {address} is DISABLED (skip_verify in LIVEKIT_REDIS_URL)",
            address=target.address,
        )
        return CertificateOptions(verify=False)
    if tls_policy is None:
        from twisted.web.client import BrowserLikePolicyForHTTPS

        tls_policy = BrowserLikePolicyForHTTPS()
    if IPolicyForHTTPS.providedBy(tls_policy):
        try:
            host = target.host.encode("ascii")
        except UnicodeEncodeError:
            host = target.host.encode("idna")
        return tls_policy.creatorForNetloc(host, target.port)
    return tls_policy  # already a connection creator / context factory


def _connect(target: RedisTarget, *, tls_policy: Optional[Any], reply_timeout: float, connect_timeout: float) -> Any:
    """A lazy, self-reconnecting txredisapi connection (bytes in, bytes out)."""
    common: dict[str, Any] = {
        "dbid": target.db if target.db > 0 else None,  # no SELECT for db 0 (or go-redis' "negative")
        "reconnect": True,
        "charset": None,
        "password": target.password or None,
        "connectTimeout": connect_timeout,
        "replyTimeout": reply_timeout,
        "convertNumbers": False,
    }
    if target.username and target.password:
        common["username"] = target.username
    if target.transport == "unix":
        return txredisapi.lazyUnixConnection(target.path, **common)
    ssl_factory = _tls_creator(target, tls_policy) if target.transport == "tls" else False
    return txredisapi.lazyConnection(target.host, target.port, ssl_context_factory=ssl_factory, **common)


def _describe(failure: Failure) -> str:
    if failure.check(defer.TimeoutError, defer.CancelledError):
        return "no answer in time"
    return failure.getErrorMessage() or failure.type.__name__


def _is_transient(failure: Failure) -> bool:
    """Outage-like failures: the write is kept and retried once Redis is back."""
    if failure.check(txredisapi.ResponseError):
        # A server that answers is up; only a restarting one is worth waiting for.
        return str(failure.value).startswith(("LOADING", "MASTERDOWN", "TRYAGAIN"))
    return True


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
        self._redis = _connection if _connection is not None else self._new_connection()
        self._up = True  # optimistic until an operation says otherwise
        self._closing = False
        self._version = 0
        # field -> (version, value or None for HDEL); removed once that version landed
        self._pending: dict[bytes, tuple[int, Optional[bytes]]] = {}
        self._inflight: dict[bytes, int] = {}
        self._waiters: dict[bytes, list[tuple[int, Deferred]]] = {}
        self._probe_call: Optional[IDelayedCall] = None
        self._probe_d: Optional[Deferred] = None
        self._late: Optional[Callable[[list[StoredJob]], object]] = None
        self._touched: Optional[set[bytes]] = None
        self._restoring = False
        self._drained: list[Deferred] = []

    def _new_connection(self) -> Any:
        # Replies may be as slow as the start-up HGETALL of every job; each operation is
        # still bounded by its own timeout (_bounded).
        return _connect(
            self._target,
            tls_policy=self._tls_policy,
            reply_timeout=max(self._op_timeout, self._restore_wait),
            connect_timeout=self._op_timeout,
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
        return len(self._pending)

    # ------------------------------------------------------------------ IJobStore

    def put(self, job: StoredJob) -> "Deferred[None]":
        field = encode_field(*job.key).encode("utf-8")
        return self._enqueue(field, encode_value(job).encode("utf-8"))

    def delete(self, room: str, identity: str) -> "Deferred[None]":
        return self._enqueue(encode_field(room, identity).encode("utf-8"), None)

    def load_all(self, on_late: Optional[Callable[[list[StoredJob]], object]] = None) -> "Deferred[list[StoredJob]]":
        self._touched = set()
        # A quick PING tells "down" (start without jobs, restore later) from "up but a big
        # hash" (100 000 jobs take seconds to read): only the second waits restore_wait.
        d = self._bounded(self._redis.ping(), self._op_timeout)
        d.addCallback(lambda _: self._bounded(self._redis.hgetall(JOBS_KEY), self._restore_wait))

        def loaded(mapping: dict) -> list[StoredJob]:
            self._touched = None
            self._mark_up()
            return self._decode_all(mapping)

        def failed(failure: Failure) -> list[StoredJob]:
            self._metrics.redis_errors.labels(operation="load").inc()
            if not _is_transient(failure):
                self._touched = None
                log.error(
                    "Could not read stored jobs from Redis at {address}: {error}; starting without them",
                    address=self._target.address,
                    error=_describe(failure),
                )
                return []
            log.warn(
                "Could not read stored jobs from Redis at {address} ({error}); starting without them, "
                "they are restored when Redis is back",
                address=self._target.address,
                error=_describe(failure),
            )
            self._late = on_late
            if on_late is None:
                self._touched = None
            self._went_down(failure)
            return []

        return d.addCallbacks(loaded, failed)

    def close(self) -> "Deferred[None]":
        self._closing = True
        self._stop_probe()
        if self._pending and not self._up:
            # Redis may be back already, before our probe noticed: a fresh connection (the
            # old one may sit in its reconnect backoff), one bounded PING, and if it answers,
            # one bounded chance for the queued changes to land.
            if self._owns_connection:
                self._replace_connection()
            d = self._bounded(self._redis.ping(), self._op_timeout)
            d.addCallbacks(lambda _: self._flush_for_close(), lambda _f: None)
        elif self._up and self._pending:
            d = self._wait_drained()
        else:
            d = succeed(None)

        def disconnect(_: object) -> "Deferred[None]":
            if self._pending:
                log.warn(
                    "{count} job change(s) could not be written to Redis before shutdown",
                    count=len(self._pending),
                )
            self._release_all()
            return defer.maybeDeferred(self._redis.disconnect).addErrback(lambda _f: None)

        return d.addBoth(disconnect).addCallback(lambda _: None)

    def _wait_drained(self) -> "Deferred[None]":
        waiting: Deferred = Deferred()
        self._drained.append(waiting)
        self._check_drained()
        return self._bounded(waiting, self._op_timeout)

    def _flush_for_close(self) -> "Deferred[None]":
        self._up = True
        for field in list(self._pending):
            self._pump(field)
        return self._wait_drained()

    def ping(self) -> "Deferred[None]":
        """PING within ``op_timeout``; fails with :class:`RedisPingError`.

        Upstream treats a failed start-up PING as fatal; rtcauthd only logs it (see module
        docstring), so this is for diagnostics and tests.
        """

        def failed(failure: Failure) -> None:
            raise RedisPingError(_describe(failure))

        return self._bounded(self._redis.ping(), self._op_timeout).addCallbacks(lambda _: None, failed)

    # ------------------------------------------------------------------ writes

    def _enqueue(self, field: bytes, value: Optional[bytes]) -> "Deferred[None]":
        self._version += 1
        version = self._version
        self._pending[field] = (version, value)
        if self._touched is not None:
            self._touched.add(field)
        if not self._up or self._closing:
            return succeed(None)  # queued; written when Redis is back (or lost at shutdown)
        d: Deferred = Deferred()
        self._waiters.setdefault(field, []).append((version, d))
        self._pump(field)
        return d

    def _pump(self, field: bytes) -> None:
        if field in self._inflight or field not in self._pending or not self._up:
            return
        version, value = self._pending[field]
        self._inflight[field] = version
        if value is None:
            command = self._redis.hdel(JOBS_KEY, [field])
        else:
            command = self._redis.hset(JOBS_KEY, field, value)
        self._bounded(command, self._op_timeout).addCallbacks(
            self._written, self._write_failed, callbackArgs=(field, version), errbackArgs=(field, version)
        )

    def _written(self, _result: object, field: bytes, version: int) -> None:
        del self._inflight[field]
        if self._pending.get(field, (None,))[0] == version:
            del self._pending[field]
        self._release(field, version)
        self._pump(field)
        self._check_drained()

    def _write_failed(self, failure: Failure, field: bytes, version: int) -> None:
        del self._inflight[field]
        self._metrics.redis_errors.labels(operation="write").inc()
        if not _is_transient(failure):
            log.error(
                "Redis refused to write job record {field}: {error}",
                field=field.decode("utf-8", "replace"),
                error=_describe(failure),
            )
            if self._pending.get(field, (None,))[0] == version:
                del self._pending[field]
            self._release(field, version)
            self._pump(field)
            self._check_drained()
            return
        self._went_down(failure)

    def _release(self, field: bytes, upto: int) -> None:
        waiters = self._waiters.get(field)
        if not waiters:
            return
        done = [d for v, d in waiters if v <= upto]
        rest = [(v, d) for v, d in waiters if v > upto]
        if rest:
            self._waiters[field] = rest
        else:
            del self._waiters[field]
        for d in done:
            d.callback(None)

    def _release_all(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for entries in waiters.values():
            for _v, d in entries:
                d.callback(None)
        self._check_drained(force=True)

    def _check_drained(self, force: bool = False) -> None:
        if self._drained and (force or not self._pending):
            drained, self._drained = self._drained, []
            for d in drained:
                if not d.called:
                    d.callback(None)

    # ------------------------------------------------------------------ outage handling

    def _went_down(self, failure: Failure) -> None:
        if self._up and not self._closing:
            log.warn(
                "Redis at {address} is unavailable ({error}); job changes are kept in memory and "
                "written when it is back",
                address=self._target.address,
                error=_describe(failure),
            )
        self._up = False
        # Nobody waits on Redis while it is down.
        self._release_all()
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
        if self._late is not None:
            self._late_restore()
        for field in list(self._pending):
            self._pump(field)

    def _mark_up(self) -> None:
        if not self._up:
            self._up = True
            log.info(
                "Redis at {address} is available again; writing {count} pending job change(s)",
                address=self._target.address,
                count=len(self._pending),
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
            jobs = [
                job
                for job in self._decode_all(mapping)
                if encode_field(*job.key).encode("utf-8") not in touched
            ]
            log.info("Restoring {count} job(s) read from Redis after the outage", count=len(jobs))
            if callback is not None and not self._closing:
                try:
                    callback(jobs)
                except Exception:
                    log.failure("Restoring jobs read late from Redis failed")

        def failed(failure: Failure) -> None:
            self._restoring = False
            if not _is_transient(failure):
                log.error("Could not read stored jobs from Redis after the outage: {error}", error=_describe(failure))
                self._late = self._touched = None
                return
            self._went_down(failure)

        d.addCallbacks(loaded, failed)

    # ------------------------------------------------------------------ helpers

    def _bounded(self, d: Deferred, seconds: float) -> Deferred:
        return d.addTimeout(seconds, self._clock)

    def _decode_all(self, mapping: dict) -> list[StoredJob]:
        jobs = []
        for field, value in mapping.items():
            try:
                jobs.append(decode_value(value))
            except StoredJobError as e:
                log.warn(
                    "Skipping unparsable job record {field} in Redis (left in place): {error}",
                    field=field.decode("utf-8", "replace") if isinstance(field, bytes) else str(field),
                    error=str(e),
                )
        return jobs
