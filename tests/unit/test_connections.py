"""Inbound connections: a request deadline for slow clients, and a cap that still answers /healthz."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from rtcauthd.inbound.connections import OVERFLOW_DEADLINE, OverflowProtocol
from rtcauthd.inbound.site import RtcAuthSite
from rtcauthd.metrics import Metrics

PEER = IPv4Address("TCP", "203.0.113.9", 50000)


class Hello(Resource):
    isLeaf = True

    def render(self, request):
        return b"hello"


class Connection:
    """One inbound connection to the site, on an in-memory transport."""

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def close(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.protocol.connectionLost(Failure(ConnectionDone()))


class AbortableTransport(StringTransport):
    aborted = False

    def abortConnection(self):
        self.aborted = True
        self.loseConnection()


class SiteTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.metrics = Metrics()
        self.site = RtcAuthSite(
            Hello(), max_body=1024, reactor=self.reactor, request_timeout=10.0, max_connections=2, metrics=self.metrics
        )

    def connect(self) -> Connection:
        connection = Connection.__new__(Connection)
        connection.protocol = self.site.buildProtocol(PEER)
        connection.transport = AbortableTransport(peerAddress=PEER)
        connection.protocol.makeConnection(connection.transport)
        return connection

    def dropped(self, reason: str) -> float:
        return self.metrics.registry.get_sample_value("rtcauthd_inbound_dropped_total", {"reason": reason}) or 0.0


class DeadlineTests(SiteTestCase):
    def test_trickling_client_is_dropped_at_the_deadline(self) -> None:
        c = self.connect()
        request = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 50
        for byte in request[:20]:
            c.send(bytes([byte]))
            self.reactor.advance(0.45)  # a byte every 0.45 s resets Twisted's idle timeout
        self.assertFalse(c.transport.aborted)
        self.reactor.advance(10 - 20 * 0.45 + 0.01)
        self.assertTrue(c.transport.aborted)
        self.assertEqual(self.dropped("slow"), 1.0)

    def test_a_prompt_request_is_served_and_the_next_one_gets_its_own_deadline(self) -> None:
        c = self.connect()
        self.reactor.advance(9)
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"hello", c.transport.value())
        self.reactor.advance(9.9)  # keep-alive: no request in progress, no deadline
        self.assertFalse(c.transport.aborted)
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n")  # the next request starts...
        self.reactor.advance(10.1)  # ...and never ends
        self.assertTrue(c.transport.aborted)

    def test_silent_connection_is_dropped(self) -> None:
        c = self.connect()
        self.reactor.advance(10.01)
        self.assertTrue(c.transport.aborted)

    def test_zero_turns_the_deadline_off(self) -> None:
        self.site.request_timeout = 0
        c = self.connect()
        self.reactor.advance(30)
        self.assertFalse(c.transport.aborted)


class CapTests(SiteTestCase):
    def test_over_the_cap_healthz_is_answered_the_rest_is_503(self) -> None:
        first, _second = self.connect(), self.connect()
        self.assertEqual(self.site.connections, 2)
        extra = self.connect()
        self.assertIsInstance(extra.protocol, OverflowProtocol)
        extra.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(extra.transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(extra.transport.disconnecting)
        other = self.connect()
        other.send(b"POST /get_token HTTP/1.1\r\n")
        answer = other.transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer)
        self.assertIn(b"Retry-After: 1\r\n", answer)
        self.assertIn(b"Access-Control-Allow-Origin: *\r\n", answer)
        self.assertEqual(self.dropped("over_capacity"), 2.0)
        self.assertEqual(self.site.connections, 2)  # overflow connections are not counted
        first.close()
        self.assertEqual(self.site.connections, 1)
        self.assertNotIsInstance(self.connect().protocol, OverflowProtocol)

    def test_overflow_connection_that_says_nothing_is_aborted(self) -> None:
        self.connect(), self.connect()
        extra = self.connect()
        self.reactor.advance(OVERFLOW_DEADLINE + 0.01)
        self.assertTrue(extra.transport.aborted)
        self.assertEqual(extra.transport.value(), b"")

    def test_overlong_request_line_gets_503(self) -> None:
        self.connect(), self.connect()
        extra = self.connect()
        extra.send(b"GET /" + b"a" * 5000)
        self.assertTrue(extra.transport.value().startswith(b"HTTP/1.1 503"))

    def test_no_cap_when_none(self) -> None:
        self.site.max_connections = None
        for _ in range(50):
            self.assertNotIsInstance(self.connect().protocol, OverflowProtocol)
