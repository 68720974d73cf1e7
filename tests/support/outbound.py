"""Assertions on the one outbound failure type: its class and its kind, together."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from rtcauthd.outbound.errors import FailureKind, OutboundError


def failed_with(case, d: Deferred, kind: FailureKind) -> OutboundError:
    """``d`` has failed with an OutboundError of ``kind``; returns the error."""
    error = case.failureResultOf(d, OutboundError).value
    case.assertIs(error.kind, kind, repr(error))
    return error


def assert_fails_with(case, d: Deferred, kind: FailureKind) -> Deferred:
    """The asynchronous twin of :func:`failed_with` (for tests on a real reactor)."""

    def check(error: OutboundError) -> OutboundError:
        case.assertIs(error.kind, kind, repr(error))
        return error

    return case.assertFailure(d, OutboundError).addCallback(check)
