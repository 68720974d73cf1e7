"""A keep-alive connection pool with hard bounds, safe for hosts anyone can name.

Why not Twisted's ``HTTPConnectionPool`` as it is: it caps idle connections per host
only (so 10 000 made-up server names could park 10 000 descriptors), has one idle
timeout, and opens a new connection for every request that finds no idle one (so
under concurrency it churns connections instead of reusing them). This subclass keeps
its interface (``getConnection`` for ``Agent``, the quiescent hand-back, retry of an
idempotent request on a connection the server had closed) and adds:

- a cap on idle connections in total, least-recently-used evicted first, besides the
  per-host cap;
- optionally a cap on open connections per host: a request that finds none idle and
  the cap reached waits in a bounded queue for the next one handed back (the caller's
  own timeout still bounds the wait); past the queue bound it opens one anyway;
- an optional ``admit(connection)`` check before an idle connection is reused (the
  federation pools re-check the connected peer address against the SSRF filter);
- ``opened``: how many connections it has ever opened, for metrics and benchmarks.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Callable, Hashable, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.web.client import URI, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from rtcauthd.twisted_private import TrackedClientFactory, retrying_connection

log = Logger()


class BoundedConnectionPool(HTTPConnectionPool):
    """See the module docstring; ``persistent`` is always on."""

    def __init__(
        self,
        reactor,
        *,
        max_idle: int = 256,
        max_idle_per_host: int = 8,
        idle_seconds: float = 120.0,
        max_open_per_host: Optional[int] = None,
        max_waiting_per_host: int = 1024,
        admit: Optional[Callable[[object], bool]] = None,
    ) -> None:
        super().__init__(reactor, persistent=True)
        self.maxPersistentPerHost = max_idle_per_host
        self.cachedConnectionTimeout = idle_seconds
        self.max_idle = max_idle
        self.max_open_per_host = max_open_per_host
        self.max_waiting_per_host = max_waiting_per_host
        self._admit = admit
        #: Every idle connection, least recently used first (value: its key).
        self._idle: "OrderedDict[object, Hashable]" = OrderedDict()
        self._open: dict[Hashable, int] = {}
        self._waiting: dict[Hashable, deque] = {}
        self._drain_call = None
        self.opened = 0

    # -- figures ---------------------------------------------------------------------

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def open_count(self, key: Hashable) -> int:
        return self._open.get(key, 0)

    # -- HTTPConnectionPool ----------------------------------------------------------------

    def getConnection(self, key: Hashable, endpoint) -> Deferred:
        connection = self._take_idle(key)
        if connection is not None:
            return succeed(retrying_connection(connection, lambda: self._newConnection(key, endpoint)))
        limit = self.max_open_per_host
        if limit is not None and self._open.get(key, 0) >= limit:
            queue = self._waiting.setdefault(key, deque())
            if len(queue) < self.max_waiting_per_host:
                return self._wait(key, endpoint, queue)
        return self._newConnection(key, endpoint)

    def _newConnection(self, key: Hashable, endpoint) -> Deferred:
        self._open[key] = self._open.get(key, 0) + 1
        self.opened += 1

        def quiescent(connection) -> None:
            self._putConnection(key, connection)

        def lost(connection) -> None:
            self._lost(key, connection)

        def failed(failure):
            self._lost(key, None)
            return failure

        factory = TrackedClientFactory(quiescent, repr(endpoint), lost)
        return endpoint.connect(factory).addErrback(failed)

    def _putConnection(self, key: Hashable, connection) -> None:
        if connection.state != "QUIESCENT":
            return  # Twisted's pool logs a BUG here; the connection is closing anyway
        idle = self._connections.setdefault(key, [])
        waiting = self._waiting.get(key)
        if not waiting:
            if len(idle) >= self.maxPersistentPerHost:
                self._close_idle(key, idle[0])
            if len(self._idle) >= self.max_idle:
                oldest, oldest_key = next(iter(self._idle.items()))
                self._close_idle(oldest_key, oldest)
        idle.append(connection)
        self._idle[connection] = key
        self._timeouts[connection] = self._reactor.callLater(
            self.cachedConnectionTimeout, self._close_idle, key, connection
        )
        if waiting:
            # Not synchronously: Twisted finishes the previous response on this
            # connection after the quiescent callback returns.
            self._schedule_drain()

    def _removeConnection(self, key: Hashable, connection) -> None:
        self._close_idle(key, connection)

    def closeCachedConnections(self) -> Deferred:
        for queue in self._waiting.values():
            for waiter, _endpoint in list(queue):
                waiter.cancel()
        self._waiting = {}
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        self._drain_call = None
        self._idle = OrderedDict()
        return super().closeCachedConnections()

    # -- internals ---------------------------------------------------------------------

    def _take_idle(self, key: Hashable):
        idle = self._connections.get(key)
        while idle:
            connection = idle.pop()  # most recently used: the others may idle out
            if not idle:
                del self._connections[key]  # no empty entry per name ever seen
            self._forget_idle(connection)
            if connection.state != "QUIESCENT":
                continue
            if self._admit is not None and not self._admit(connection):
                connection.transport.loseConnection()
                continue
            return connection
        return None

    def _forget_idle(self, connection) -> None:
        self._idle.pop(connection, None)
        timeout = self._timeouts.pop(connection, None)
        if timeout is not None and timeout.active():
            timeout.cancel()

    def _unpool(self, key: Hashable, connection) -> None:
        idle = self._connections.get(key)
        if idle and connection in idle:
            idle.remove(connection)
            if not idle:
                del self._connections[key]
        self._forget_idle(connection)

    def _close_idle(self, key: Hashable, connection) -> None:
        self._unpool(key, connection)
        if connection.transport is not None:
            connection.transport.loseConnection()

    def _lost(self, key: Hashable, connection) -> None:
        left = self._open.get(key, 1) - 1
        if left > 0:
            self._open[key] = left
        else:
            self._open.pop(key, None)
        if connection is not None and connection in self._idle:
            self._unpool(key, connection)
        if self._waiting.get(key):
            self._schedule_drain()

    def _wait(self, key: Hashable, endpoint, queue: deque) -> Deferred:
        entry: list = []

        def cancel(waiter: Deferred) -> None:
            if entry and entry[0] in queue:
                queue.remove(entry[0])
                if not queue and self._waiting.get(key) is queue:
                    del self._waiting[key]

        waiter: Deferred = Deferred(cancel)
        entry.append((waiter, endpoint))
        queue.append(entry[0])
        return waiter

    def _schedule_drain(self) -> None:
        if self._drain_call is None or not self._drain_call.active():
            self._drain_call = self._reactor.callLater(0, self._drain)

    def _drain(self) -> None:
        self._drain_call = None
        limit = self.max_open_per_host
        for key in list(self._waiting):
            queue = self._waiting[key]
            while queue:
                connection = self._take_idle(key)
                waiter, endpoint = queue[0]
                if connection is not None:
                    queue.popleft()
                    waiter.callback(retrying_connection(connection, lambda e=endpoint: self._newConnection(key, e)))
                    continue
                if limit is not None and self._open.get(key, 0) >= limit:
                    break
                queue.popleft()
                self._connect_for(key, endpoint, waiter)
            if not queue:
                del self._waiting[key]

    def _connect_for(self, key: Hashable, endpoint, waiter: Deferred) -> None:
        """A new connection for a queued request; kept in the pool if it gave up meanwhile."""

        def connected(connection) -> None:
            if waiter.called:
                self._putConnection(key, connection)
            else:
                waiter.callback(connection)

        def failed(failure) -> None:
            if not waiter.called:
                waiter.errback(failure)

        self._newConnection(key, endpoint).addCallbacks(connected, failed)


#: Endpoints kept per agent before the memo starts over (hosts can be attacker-chosen).
ENDPOINT_CACHE_SIZE = 1024


@implementer(IAgentEndpointFactory)
class ReusedEndpoints:
    """Wraps an endpoint factory so each ``(scheme, host, port)`` gets one endpoint.

    ``Agent`` asks its factory for an endpoint on every request, even when a pooled
    connection serves it, and a ``HostnameEndpoint`` with its TLS wrapper (IDNA encoding
    included) costs more to build than a pooled request costs to send. Endpoints hold
    no per-connection state, so one can serve every connection to its host.
    """

    def __init__(self, factory, size: int = ENDPOINT_CACHE_SIZE) -> None:
        self._factory = factory
        self._size = size
        self._endpoints: dict = {}

    def endpointForURI(self, uri: URI):
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._factory.endpointForURI(uri)
            if len(self._endpoints) >= self._size:
                self._endpoints.clear()
            self._endpoints[key] = endpoint
        return endpoint


#: Homeservers in the full-access list and LiveKit: few hosts the operator chose, many
#: users each. Enough open connections per host to keep one core busy; more requests queue.
FULL_ACCESS_MAX_IDLE = 512
FULL_ACCESS_PER_HOST = 64
FULL_ACCESS_IDLE_SECONDS = 120.0
FULL_ACCESS_MAX_WAITING = 4096
#: Every other homeserver: names anyone can make up, so few idle connections each, a
#: hard total and a short idle time (a federated participant's client asks for a
#: token, then again on reconnect or room change).
STRANGERS_MAX_IDLE = 256
#: Default per host: RTCAUTH_FEDERATION_MAX_INFLIGHT_PER_SERVER's default, since that many
#: verifications of one name can be in flight at once, each on a connection of its own.
STRANGERS_PER_HOST = 8
STRANGERS_IDLE_SECONDS = 15.0
STRANGERS_MAX_WAITING = 64


def full_access_pool(reactor) -> BoundedConnectionPool:
    """The pool for operator-chosen hosts (full-access homeservers, LiveKit)."""
    return BoundedConnectionPool(
        reactor,
        max_idle=FULL_ACCESS_MAX_IDLE,
        max_idle_per_host=FULL_ACCESS_PER_HOST,
        idle_seconds=FULL_ACCESS_IDLE_SECONDS,
        max_open_per_host=FULL_ACCESS_PER_HOST,
        max_waiting_per_host=FULL_ACCESS_MAX_WAITING,
    )


def strangers_pool(reactor, ip_filter, *, per_host: int = STRANGERS_PER_HOST) -> BoundedConnectionPool:
    """The pool for homeservers outside the full-access list.

    ``per_host`` bounds both idle and open connections to one host (names delegating to
    one host share them; over it, requests wait briefly).

    Before an idle connection is reused, the address it is connected to is checked
    against ``ip_filter`` (an IPRangeFilter) again: the SSRF guard holds for every
    request, not only for the one that opened the connection.
    """
    return BoundedConnectionPool(
        reactor,
        max_idle=STRANGERS_MAX_IDLE,
        max_idle_per_host=per_host,
        idle_seconds=STRANGERS_IDLE_SECONDS,
        max_open_per_host=per_host,
        max_waiting_per_host=STRANGERS_MAX_WAITING,
        admit=lambda connection: peer_allowed(connection, ip_filter),
    )


def peer_allowed(connection, ip_filter) -> bool:
    """Whether the peer address of a pooled connection passes ``ip_filter``."""
    transport = getattr(connection, "transport", None)
    host = getattr(transport.getPeer(), "host", None) if transport is not None else None
    if not isinstance(host, str):
        return False
    rule = ip_filter.check(host)
    if rule is not None:
        log.warn("Dropping a pooled connection to {address}: blocked by {rule}", address=host, rule=rule)
        return False
    return True
