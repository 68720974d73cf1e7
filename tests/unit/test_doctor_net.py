"""The doctor's network plumbing: --https-port mapping, failure wording, connection tracking, probes."""

from __future__ import annotations

from twisted.internet import error as net_error
from twisted.internet.defer import fail, succeed
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseNeverReceived

from rtcauthd.doctor.net import (
    ConnectionTracker,
    DoctorReactor,
    ExplainingAgent,
    PortMappingAgent,
    parse_url,
    with_https_port,
)
from rtcauthd.outbound.client import OutboundError
from rtcauthd.outbound.errors import FailureKind


class HTTPSPortTests(SynchronousTestCase):
    def test_adds_the_port_where_none_is_given(self):
        self.assertEqual(with_https_port(b"https://example.com/x?a=b", 8443), b"https://example.com:8443/x?a=b")
        self.assertEqual(with_https_port(b"https://example.com", 8443), b"https://example.com:8443")
        self.assertEqual(with_https_port(b"https://example.com?x=1:2", 8443), b"https://example.com:8443?x=1:2")
        self.assertEqual(with_https_port(b"https://[::1]/healthz", 8443), b"https://[::1]:8443/healthz")
        self.assertEqual(with_https_port(b"wss://sfu.example.com", 8443), b"wss://sfu.example.com:8443")

    def test_leaves_the_rest_alone(self):
        for url in (
            b"https://example.com:9000/x",
            b"https://[::1]:9000/x",
            b"http://example.com/x",
            b"matrix-federation://example.com/x",
        ):
            self.assertEqual(with_https_port(url, 8443), url)
        self.assertEqual(with_https_port(b"https://example.com/x", 443), b"https://example.com/x")


class ParseURLTests(SynchronousTestCase):
    def test_parts(self):
        url = parse_url("https://[2001:db8::1]:8443/livekit/jwt?x=1")
        self.assertEqual((url.scheme, url.host, url.port, url.path), ("https", "2001:db8::1", 8443, "/livekit/jwt?x=1"))
        self.assertEqual(url.bracketed_host, "[2001:db8::1]")
        self.assertEqual(url.origin(), "https://[2001:db8::1]:8443")
        self.assertEqual(parse_url("wss://sfu.example.com").port_or(8443), 8443)
        self.assertEqual(parse_url("WS://sfu").port_or(8443), 80)

    def test_rejects(self):
        for url in ("/relative", "https://", "https://h:99999/"):
            with self.assertRaises(ValueError):
                parse_url(url)


class RecordingAgent:
    def __init__(self, result) -> None:
        self.result = result
        self.urls = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        self.urls.append(uri)
        return self.result


class AgentTests(SynchronousTestCase):
    def test_port_mapping(self):
        inner = RecordingAgent(succeed("response"))
        self.assertEqual(self.successResultOf(PortMappingAgent(inner, 8443).request(b"GET", b"https://h/x")), "response")
        self.assertEqual(inner.urls, [b"https://h:8443/x"])

    def test_transport_failures_become_outbound_errors(self):
        agent = ExplainingAgent(RecordingAgent(fail(ResponseNeverReceived([Failure(net_error.ConnectionRefusedError())]))))
        failure = self.failureResultOf(agent.request(b"GET", b"https://h/"), OutboundError)
        self.assertEqual((failure.value.step, failure.value.detail), ("connect", "connection refused"))
        self.assertEqual((failure.value.kind, failure.value.reason), (FailureKind.CONNECT, "connection refused"))

    def test_outbound_errors_pass_unchanged(self):
        original = OutboundError(FailureKind.TIMEOUT, "GET", "no complete answer within 1 s")
        failure = self.failureResultOf(ExplainingAgent(RecordingAgent(fail(original))).request(b"GET", b"https://h/"))
        self.assertIs(failure.value, original)


class TrackerTests(SynchronousTestCase):
    def connect(self, tracker: ConnectionTracker):
        factory = tracker.wrap(ClientFactory.forProtocol(Protocol))
        p = factory.buildProtocol(None)
        transport = StringTransport()
        p.makeConnection(transport)
        return p, transport

    def test_close_all_aborts_and_waits_for_connection_lost(self):
        clock = Clock()
        tracker = ConnectionTracker()
        p, transport = self.connect(tracker)
        self.assertEqual(tracker.open_count, 1)
        closed = tracker.close_all(clock)
        self.assertTrue(transport.disconnecting)
        self.assertNoResult(closed)
        p.connectionLost(Failure(net_error.ConnectionAborted()))
        self.successResultOf(closed)
        self.assertEqual(tracker.open_count, 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_close_all_gives_up_after_the_grace_period(self):
        clock = Clock()
        tracker = ConnectionTracker()
        self.connect(tracker)
        closed = tracker.close_all(clock, grace=1.0)
        clock.advance(0.9)
        self.assertNoResult(closed)
        clock.advance(0.1)
        self.successResultOf(closed)

    def test_nothing_open(self):
        self.successResultOf(ConnectionTracker().close_all(Clock()))


class DoctorReactorTests(SynchronousTestCase):
    def test_wraps_connections_and_overrides_the_resolver(self):
        memory = MemoryReactorClock()
        tracker = ConnectionTracker()
        resolver = object()
        proxy = DoctorReactor(memory, tracker=tracker, name_resolver=resolver)
        self.assertIs(proxy.nameResolver, resolver)
        self.assertIs(DoctorReactor(memory, tracker=tracker).nameResolver, memory.nameResolver)
        factory = ClientFactory.forProtocol(Protocol)
        proxy.connectTCP("192.0.2.1", 443, factory, timeout=3)
        host, port, wrapped, timeout, _bind = memory.tcpClients[0]
        self.assertEqual((host, port, timeout), ("192.0.2.1", 443, 3))
        self.assertIs(wrapped.wrappedFactory, factory)
        self.assertEqual(proxy.seconds(), memory.seconds())
