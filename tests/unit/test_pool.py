"""BoundedConnectionPool: idle bounds, LRU eviction, idle timeouts, queueing, re-checks."""

from __future__ import annotations

from twisted.internet.defer import CancelledError, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.matrix.ipfilter import IPRangeFilter
from rtcauthd.outbound.pool import BoundedConnectionPool, peer_allowed, strangers_pool
from rtcauthd.outbound import pool as pool_module
from twisted.internet.address import IPv4Address


class ClosingTransport(StringTransport):
    """A transport whose close reaches the protocol at once, as a real socket's soon does."""

    def __init__(self, peer: str) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", peer, 8448))
        self.protocol = None

    def loseConnection(self) -> None:
        if not self.disconnecting:
            super().loseConnection()
            self.protocol.connectionLost(Failure(ConnectionDone()))

    abortConnection = loseConnection


class FakeEndpoint:
    """Connects at once (or never, with ``hang``), counting connections."""

    def __init__(self, peer: str = "203.0.113.5") -> None:
        self.peer = peer
        self.connects = 0

    def connect(self, factory):
        self.connects += 1
        protocol = factory.buildProtocol(None)
        transport = ClosingTransport(self.peer)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return succeed(protocol)


def unwrap(connection):
    return getattr(connection, "_clientProtocol", connection)


def got(d):
    """The result of ``d`` if it has one yet (leaving it in place), else None."""
    results = []

    def look(result):
        results.append(result)
        return result

    d.addBoth(look)
    return results[0] if results else None


def hand_back(connection) -> None:
    """What HTTP11ClientProtocol does when a response is complete."""
    connection = unwrap(connection)
    connection._quiescentCallback(connection)


class IdleBounds(SynchronousTestCase):
    def test_ten_thousand_made_up_names_stay_within_the_idle_bound(self):
        clock = Clock()
        pool = strangers_pool(clock, IPRangeFilter())
        endpoint = FakeEndpoint()
        open_connections = []
        for i in range(10_000):
            key = (b"matrix-federation-filtered", f"made-up-{i}.example".encode(), 0)
            connection = got(pool.getConnection(key, endpoint))
            hand_back(connection)
            open_connections.append(unwrap(connection))
            self.assertLessEqual(pool.idle_count, pool_module.STRANGERS_MAX_IDLE)
        still_open = [c for c in open_connections if not c.transport.disconnecting]
        self.assertEqual(len(still_open), pool_module.STRANGERS_MAX_IDLE)
        # the survivors are the most recently used names
        self.assertEqual(still_open, open_connections[-pool_module.STRANGERS_MAX_IDLE :])
        # nothing is kept per name beyond the connections themselves
        self.assertEqual(len(pool._connections), pool_module.STRANGERS_MAX_IDLE)
        self.assertEqual(len(pool._open), pool_module.STRANGERS_MAX_IDLE)
        clock.advance(pool_module.STRANGERS_IDLE_SECONDS)
        self.assertEqual(pool.idle_count, 0)
        self.assertEqual((pool._connections, pool._open, pool._waiting), ({}, {}, {}))
        self.assertTrue(all(c.transport.disconnecting for c in open_connections))

    def test_per_host_idle_cap(self):
        pool = BoundedConnectionPool(Clock(), max_idle=100, max_idle_per_host=2)
        endpoint = FakeEndpoint()
        connections = [got(pool.getConnection("host", endpoint)) for _ in range(5)]
        for connection in connections:
            hand_back(connection)
        self.assertEqual(pool.idle_count, 2)
        self.assertEqual(pool.open_count("host"), 2)

    def test_reuse_opens_nothing(self):
        pool = BoundedConnectionPool(Clock())
        endpoint = FakeEndpoint()
        first = got(pool.getConnection("host", endpoint))
        hand_back(first)
        second = got(pool.getConnection("host", endpoint))
        self.assertIs(unwrap(second), unwrap(first))
        self.assertEqual((endpoint.connects, pool.opened), (1, 1))

    def test_idle_connection_closed_by_the_server_is_forgotten(self):
        pool = BoundedConnectionPool(Clock())
        connection = unwrap(got(pool.getConnection("host", FakeEndpoint())))
        hand_back(connection)
        connection.transport.loseConnection()
        self.assertEqual((pool.idle_count, pool.open_count("host")), (0, 0))


class Queueing(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = BoundedConnectionPool(self.clock, max_open_per_host=2, max_waiting_per_host=3)
        self.endpoint = FakeEndpoint()

    def test_requests_over_the_bound_wait_for_a_pooled_connection(self):
        a = got(self.pool.getConnection("host", self.endpoint))
        got(self.pool.getConnection("host", self.endpoint))
        waiting = self.pool.getConnection("host", self.endpoint)
        self.assertIsNone(got(waiting))
        hand_back(a)
        self.assertIsNone(got(waiting))  # handed over on the next turn, not inside the callback
        self.clock.advance(0)
        self.assertIs(unwrap(got(waiting)), unwrap(a))
        self.assertEqual(self.endpoint.connects, 2)

    def test_a_lost_connection_lets_a_waiting_request_open_one(self):
        a = unwrap(got(self.pool.getConnection("host", self.endpoint)))
        got(self.pool.getConnection("host", self.endpoint))
        waiting = self.pool.getConnection("host", self.endpoint)
        a.transport.loseConnection()
        self.clock.advance(0)
        self.assertIsNotNone(got(waiting))
        self.assertEqual(self.endpoint.connects, 3)

    def test_cancelled_wait_leaves_the_queue(self):
        a = got(self.pool.getConnection("host", self.endpoint))
        got(self.pool.getConnection("host", self.endpoint))
        waiting = self.pool.getConnection("host", self.endpoint)
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual(self.pool._waiting, {})
        hand_back(a)
        self.clock.advance(0)
        self.assertEqual(self.pool.idle_count, 1)

    def test_past_the_queue_bound_a_connection_is_opened(self):
        for _ in range(2):
            got(self.pool.getConnection("host", self.endpoint))
        for _ in range(3):
            self.pool.getConnection("host", self.endpoint)
        self.assertIsNotNone(got(self.pool.getConnection("host", self.endpoint)))
        self.assertEqual(self.endpoint.connects, 3)


class PeerCheckOnReuse(SynchronousTestCase):
    def test_pooled_connection_to_a_now_blocked_address_is_dropped(self):
        allowed = {"203.0.113.5"}

        class Filter:
            def check(self, ip):
                return None if ip in allowed else "test rule"

        pool = strangers_pool(Clock(), Filter())
        endpoint = FakeEndpoint("203.0.113.5")
        first = unwrap(got(pool.getConnection("host", endpoint)))
        hand_back(first)
        allowed.clear()
        second = unwrap(got(pool.getConnection("host", endpoint)))
        self.assertIsNot(second, first)
        self.assertTrue(first.transport.disconnecting)
        self.assertEqual(endpoint.connects, 2)

    def test_peer_allowed_reads_the_connected_address(self):
        pool = BoundedConnectionPool(Clock())
        connection = unwrap(got(pool.getConnection("host", FakeEndpoint("127.0.0.1"))))
        self.assertFalse(peer_allowed(connection, IPRangeFilter()))
        self.assertTrue(peer_allowed(connection, IPRangeFilter(allowlist=["127.0.0.0/8"])))


class EndpointReuse(SynchronousTestCase):
    def test_one_endpoint_per_scheme_host_and_port(self):
        from twisted.web.client import URI

        from rtcauthd.outbound.pool import ReusedEndpoints

        built = []

        class Factory:
            def endpointForURI(self, uri):
                if uri.scheme != b"https":
                    raise ValueError("scheme")
                built.append(uri.host)
                return object()

        endpoints = ReusedEndpoints(Factory(), size=2)
        first = endpoints.endpointForURI(URI.fromBytes(b"https://a.example/x?token=1"))
        self.assertIs(endpoints.endpointForURI(URI.fromBytes(b"https://a.example/y?token=2")), first)
        self.assertIsNot(endpoints.endpointForURI(URI.fromBytes(b"https://a.example:8448/")), first)
        self.assertRaises(ValueError, endpoints.endpointForURI, URI.fromBytes(b"http://a.example/"))
        endpoints.endpointForURI(URI.fromBytes(b"https://b.example/"))  # over the size: starts over
        self.assertEqual(len(endpoints._endpoints), 1)
        self.assertEqual(built, [b"a.example", b"a.example", b"b.example"])
