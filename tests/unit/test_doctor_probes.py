"""The doctor's raw TCP and TLS probes."""

from __future__ import annotations

from twisted.internet import error as net_error
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.doctor.net import ConnectionTracker, DoctorReactor
from rtcauthd.doctor.probes import ProbeError, Probes


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
