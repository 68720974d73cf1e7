"""Wording and kind of transport failures (what the doctor shows and decides by)."""

from __future__ import annotations

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseNeverReceived

from rtcauthd.matrix.federation_agent import _TargetsInTurn
from rtcauthd.matrix.guarded_connect import as_outbound
from rtcauthd.outbound.errors import FailureKind, OutboundError, kind_of, reason


class ReasonTests(SynchronousTestCase):
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
            self.assertEqual(reason(exception), text)

    def test_several_reasons_are_deduplicated(self):
        error = ResponseNeverReceived([Failure(net_error.ConnectionRefusedError()),
                                       Failure(net_error.ConnectionRefusedError())])
        self.assertEqual(reason(error), "connection refused")

    def test_more_wording(self):
        self.assertEqual(reason(net_error.NoRouteError()), "no route to host")
        self.assertEqual(reason(CancelledError()), "cancelled")
        self.assertEqual(reason(RuntimeError("odd")), "RuntimeError: odd")

    def test_reason_defaults_to_detail(self):
        error = OutboundError(FailureKind.CONNECT, "connect", "ConnectionRefusedError: x")
        self.assertEqual(error.reason, "ConnectionRefusedError: x")
        error = OutboundError(FailureKind.CONNECT, "connect", "ConnectionRefusedError: x", reason="connection refused")
        self.assertEqual((error.detail, error.reason), ("ConnectionRefusedError: x", "connection refused"))


class KindTests(SynchronousTestCase):
    def test_kinds(self):
        cases = [
            (net_error.DNSLookupError("x"), FailureKind.RESOLVE),
            (net_error.ConnectionRefusedError(), FailureKind.CONNECT),
            (net_error.NoRouteError(), FailureKind.CONNECT),
            (net_error.ConnectError(), FailureKind.CONNECT),
            (net_error.TCPTimedOutError(), FailureKind.TIMEOUT),
            (net_error.TimeoutError(), FailureKind.TIMEOUT),
            (SSL.Error([]), FailureKind.TLS),
            (VerificationError([]), FailureKind.TLS),
            (net_error.ConnectionDone(), FailureKind.LOST),
            (net_error.ConnectionLost(), FailureKind.LOST),
            (RuntimeError("x"), FailureKind.OTHER),
            (ResponseNeverReceived([Failure(SSL.Error([]))]), FailureKind.TLS),
            (ResponseNeverReceived([Failure(CancelledError())]), FailureKind.OTHER),
            (OutboundError(FailureKind.TIMEOUT, "GET", "late"), FailureKind.TIMEOUT),
        ]
        for exception, kind in cases:
            self.assertEqual(kind_of(exception), kind, exception)


class _Failing:
    def __init__(self, exception) -> None:
        self.exception = exception

    def connect(self, factory) -> Deferred:
        return fail(self.exception)


class FederationReasonTests(SynchronousTestCase):
    """The federation agent words its failures once, where they are classified."""

    def test_one_failure(self):
        refused = net_error.ConnectionRefusedError("Connection was refused by other side: 111: Connection refused.")
        error = as_outbound(Failure(refused))
        self.assertTrue(error.detail.startswith("ConnectionRefusedError: "), error.detail)
        self.assertEqual(error.reason, "connection refused")
        lookup = as_outbound(Failure(net_error.DNSLookupError("no results for hostname lookup: x")))
        self.assertEqual(lookup.detail, "DNS lookup failed: no results for hostname lookup: x.")
        self.assertEqual(lookup.reason, "the host name does not resolve to an address")

    def test_several_targets(self):
        targets = _TargetsInTurn(
            [("h", 1, _Failing(net_error.ConnectionRefusedError("refused"))),
             ("h", 2, _Failing(net_error.TCPTimedOutError("timed out")))],
            factory=None,
        )
        error = self.failureResultOf(targets.result, OutboundError).value
        self.assertEqual(error.kind, FailureKind.CONNECT)
        self.assertEqual(f"{error.step}: {error.reason}", "connect: h:1: connection refused; h:2: connection timed out")
        self.assertIn("h:1: ConnectionRefusedError", error.detail)
