"""The doctor's network plumbing: --https-port mapping, failure wording, connection tracking, probes."""

from __future__ import annotations

from OpenSSL import SSL
from service_identity import VerificationError
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
    ProbeError,
    Probes,
    explain,
    parse_url,
    simplify,
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


class ExplainTests(SynchronousTestCase):
    def test_wording(self):
        cases = [
            (net_error.ConnectionRefusedError(), "connection refused"),
            (ResponseNeverReceived([Failure(net_error.ConnectionRefusedError())]), "connection refused"),
            (net_error.TCPTimedOutError(), "connection timed out"),
            (net_error.DNSLookupError("example.com"), "the host name does not resolve to an address"),
            (VerificationError([]), "TLS: the certificate does not cover this host name"),
            (SSL.Error([("SSL routines", "", "certificate verify failed")]),
             "TLS: certificate verify failed (not signed by a trusted CA, or expired)"),
            (SSL.Error([("SSL routines", "", "wrong version number")]), "TLS handshake failed (wrong version number)"),
            (OutboundError(FailureKind.TIMEOUT, "GET", "no complete answer within 5 s"), "no complete answer within 5 s"),
            (net_error.ConnectionLost(), "the connection was closed without an answer"),
        ]
        for exception, text in cases:
            self.assertEqual(explain(Failure(exception)), text)

    def test_several_reasons_are_deduplicated(self):
        failure = Failure(ResponseNeverReceived([Failure(net_error.ConnectionRefusedError()),
                                                 Failure(net_error.ConnectionRefusedError())]))
        self.assertEqual(explain(failure), "connection refused")

    def test_simplify_federation_details(self):
        self.assertEqual(
            simplify("ConnectionRefusedError: Connection was refused by other side: 111: Connection refused."),
            "connection refused",
        )
        self.assertEqual(
            simplify("connect: h:1: ConnectionRefusedError: refused; h:2: TCPTimedOutError: timed out"),
            "connect: h:1: connection refused; h:2: connection timed out",
        )
        self.assertEqual(simplify("DNS lookup failed: no results for hostname lookup: x."),
                         "the host name does not resolve to an address")


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


class ProbeTests(SynchronousTestCase):
    def probes(self):
        reactor = MemoryReactorClock()
        proxy = DoctorReactor(reactor, tracker=ConnectionTracker())
        return reactor, Probes(reactor=proxy, clock=reactor, tls_policy=None, timeout=2.0)

    def test_tcp_refused(self):
        reactor, probes = self.probes()
        d = probes.tcp_connect("::1", 443)
        host, port, factory, timeout, _bind = reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("::1", 443, 2.0))
        factory.clientConnectionFailed(None, Failure(net_error.ConnectionRefusedError()))
        failure = self.failureResultOf(d, ProbeError)
        self.assertEqual((failure.value.stage, failure.value.detail), ("connect", "connection refused"))

    def test_tcp_timeout(self):
        reactor, probes = self.probes()
        d = probes.tcp_connect("192.0.2.1", 443)
        reactor.advance(2.0)
        failure = self.failureResultOf(d, ProbeError)
        self.assertEqual(failure.value.detail, "no connection within 2 s")
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_tcp_connected(self):
        reactor, probes = self.probes()
        d = probes.tcp_connect("192.0.2.1", 443)
        factory = reactor.tcpClients[0][2]
        p = factory.buildProtocol(None)
        transport = StringTransport()
        p.makeConnection(transport)
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(transport.disconnecting)
