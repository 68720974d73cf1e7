"""How Redis failures are named: the kind of a failed ping, and what counts as an outage."""

from __future__ import annotations

import txredisapi
from twisted.internet import defer, error
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.outbound.errors import FailureKind, OutboundError
from rtcauthd.store.redis_connection import describe, failure_kind, is_transient, outbound_error


class FailureKindTests(SynchronousTestCase):
    def test_no_answer_in_time_is_timeout(self) -> None:
        for exc in (defer.TimeoutError(), defer.CancelledError(), txredisapi.TimeoutError("x"), error.TimeoutError()):
            with self.subTest(exc=exc):
                self.assertIs(failure_kind(Failure(exc)), FailureKind.TIMEOUT)

    def test_refused_or_lost_connection_is_connect(self) -> None:
        for exc in (
            txredisapi.ConnectionError("Not connected"),
            txredisapi.ConnectionError("Lost connection"),
            error.ConnectionRefusedError(),
            error.ConnectionLost(),
            error.ConnectionDone(),
        ):
            with self.subTest(exc=exc):
                self.assertIs(failure_kind(Failure(exc)), FailureKind.CONNECT)

    def test_anything_else_is_other(self) -> None:
        for exc in (txredisapi.ResponseError("NOAUTH Authentication required."), ValueError("bad"), RuntimeError()):
            with self.subTest(exc=exc):
                self.assertIs(failure_kind(Failure(exc)), FailureKind.OTHER)

    def test_outbound_error_carries_kind_step_and_the_log_text(self) -> None:
        e = outbound_error(Failure(defer.TimeoutError()), "Redis PING")
        self.assertIsInstance(e, OutboundError)
        self.assertEqual((e.kind, e.step, e.detail), (FailureKind.TIMEOUT, "Redis PING", "no answer in time"))
        e = outbound_error(Failure(txredisapi.ConnectionError("Lost connection")), "Redis PING")
        self.assertEqual((e.kind, e.detail), (FailureKind.CONNECT, "Lost connection"))
        self.assertEqual(str(e), "Redis PING: Lost connection")

    def test_describe_without_message_names_the_type(self) -> None:
        self.assertEqual(describe(Failure(RuntimeError())), "RuntimeError")


class TransientTests(SynchronousTestCase):
    def test_only_a_restarting_server_is_waited_for_among_answers(self) -> None:
        for reply in ("LOADING Redis is loading", "MASTERDOWN Link down", "TRYAGAIN later"):
            with self.subTest(reply=reply):
                self.assertTrue(is_transient(Failure(txredisapi.ResponseError(reply))))
        self.assertFalse(is_transient(Failure(txredisapi.ResponseError("WRONGTYPE Operation"))))

    def test_no_answer_is_an_outage(self) -> None:
        self.assertTrue(is_transient(Failure(defer.TimeoutError())))
        self.assertTrue(is_transient(Failure(txredisapi.ConnectionError("Not connected"))))
