"""The verification gate: bounded fan-out, isolation of full-access homeservers, back-off."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.errors import MatrixError
from rtcauthd.matrix.fanout import BACKOFF_MAX, BACKOFF_MIN, VerificationGate
from rtcauthd.metrics import Metrics
from rtcauthd.outbound.errors import FailureKind, OutboundError

FULL = {"ours.example"}


class Verifier:
    """Hangs every lookup until told; records what was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.pending: list[Deferred] = []
        self.answer = None  # None: hang; else a callable(server_name) -> Deferred

    def userinfo(self, server_name: str, token: str) -> Deferred:
        self.calls.append((server_name, token))
        if self.answer is not None:
            return self.answer(server_name)
        d: Deferred = Deferred()
        self.pending.append(d)
        return d


class GateTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.verifier = Verifier()
        self.metrics = Metrics()
        self.gate = VerificationGate(
            self.verifier,
            clock=self.clock,
            is_full_access=lambda name: name in FULL,
            max_inflight=4,
            max_per_server=2,
            metrics=self.metrics,
        )

    def ask(self, name: str) -> None:
        """A lookup whose outcome this test does not look at."""
        self.gate.userinfo(name, "t").addErrback(lambda _failure: None)

    def refused(self, reason: str) -> float:
        return self.metrics.registry.get_sample_value("rtcauthd_verifications_refused_total", {"reason": reason}) or 0.0

    def assertBusy(self, d: Deferred) -> MatrixError:
        error = self.failureResultOf(d, MatrixError).value
        self.assertEqual((error.status, error.errcode, error.retry_after_ms), (503, "M_UNKNOWN", 1000))
        return error


class CapTests(GateTestCase):
    def test_per_server_cap(self) -> None:
        for _ in range(2):
            self.assertNoResult(self.gate.userinfo("made-up.example", "t"))
        self.assertBusy(self.gate.userinfo("made-up.example", "t"))
        self.assertNoResult(self.gate.userinfo("other.example", "t"))
        self.assertEqual(len(self.verifier.calls), 3)
        self.assertEqual(self.refused("server_busy"), 1.0)

    def test_global_cap_for_strangers_and_release(self) -> None:
        for i in range(4):
            self.gate.userinfo(f"s{i}.example", "t")
        self.assertBusy(self.gate.userinfo("s9.example", "t"))
        self.assertEqual(self.refused("busy"), 1.0)
        self.verifier.pending[0].callback("@a:s0.example")
        self.assertEqual(self.gate.strangers_inflight, 3)
        self.assertNoResult(self.gate.userinfo("s9.example", "t"))

    def test_full_access_has_its_own_budget(self) -> None:
        for i in range(4):
            self.gate.userinfo(f"s{i}.example", "t")
        d = self.gate.userinfo("ours.example", "t")  # strangers are at their cap
        self.assertNoResult(d)
        self.verifier.pending[-1].callback("@me:ours.example")
        self.assertEqual(self.successResultOf(d), "@me:ours.example")
        for _ in range(4):  # no per-server cap for the operator's own server
            self.gate.userinfo("ours.example", "t")
        self.assertBusy(self.gate.userinfo("ours.example", "t"))
        self.assertEqual(self.refused("full_access"), 1.0)

    def test_failures_release_too(self) -> None:
        d = self.gate.userinfo("s.example", "t")
        self.verifier.pending[0].errback(OutboundError(FailureKind.HTTP_STATUS, "status 401", "M_UNKNOWN_TOKEN"))
        self.failureResultOf(d, OutboundError)
        self.assertEqual((self.gate.strangers_inflight, self.gate._per_server), (0, {}))


class BackoffTests(GateTestCase):
    def unreachable(self, name):
        return fail(OutboundError(FailureKind.CONNECT, "connect", "ConnectionRefusedError"))

    def test_unreachable_stranger_costs_one_lookup_per_window(self) -> None:
        self.verifier.answer = self.unreachable
        first = self.failureResultOf(self.gate.userinfo("dead.example", "t"), OutboundError).value
        for _ in range(10):
            again = self.failureResultOf(self.gate.userinfo("dead.example", "t"), OutboundError).value
        self.assertEqual(len(self.verifier.calls), 1)
        self.assertEqual((again.kind, again.step), (first.kind, first.step))
        self.assertIn("remembered", again.detail)
        self.assertEqual(self.refused("backoff"), 10.0)
        self.clock.advance(BACKOFF_MIN + 0.1)
        self.ask("dead.example")
        self.assertEqual(len(self.verifier.calls), 2)
        self.clock.advance(BACKOFF_MIN + 0.1)  # the window doubled
        self.ask("dead.example")
        self.assertEqual(len(self.verifier.calls), 2)
        self.clock.advance(BACKOFF_MIN)
        self.ask("dead.example")
        self.assertEqual(len(self.verifier.calls), 3)

    def test_backoff_is_capped_and_cleared_by_an_answer(self) -> None:
        self.verifier.answer = self.unreachable
        for _ in range(12):
            self.ask("dead.example")
            self.clock.advance(BACKOFF_MAX + 1)
        self.assertEqual(self.gate._backoff["dead.example"].interval, BACKOFF_MAX)
        self.verifier.answer = lambda name: succeed("@a:dead.example")
        self.assertEqual(self.successResultOf(self.gate.userinfo("dead.example", "t")), "@a:dead.example")
        self.assertNotIn("dead.example", self.gate._backoff)

    def test_a_no_answer_is_not_backed_off(self) -> None:
        self.verifier.answer = lambda name: fail(OutboundError(FailureKind.HTTP_STATUS, "status 401", "bad token"))
        for _ in range(3):
            self.failureResultOf(self.gate.userinfo("live.example", "t"), OutboundError)
        self.assertEqual(len(self.verifier.calls), 3)

    def test_full_access_is_never_backed_off(self) -> None:
        self.verifier.answer = self.unreachable
        for _ in range(3):
            self.failureResultOf(self.gate.userinfo("ours.example", "t"), OutboundError)
        self.assertEqual(len(self.verifier.calls), 3)


class ThroughTheDaemonTests(SynchronousTestCase):
    """A full gate is a quick 503 with Retry-After and CORS, never a 401 or a queue."""

    def test_busy_is_503_with_retry_after(self) -> None:
        import json

        from twisted.internet.testing import MemoryReactorClock

        from tests.support.daemon import SiteClient, build_test_daemon

        env = {
            "LIVEKIT_URL": "wss://sfu.example.com",
            "LIVEKIT_KEY": "devkey",
            "LIVEKIT_SECRET": "secret-secret-secret-secret-secret",
            "LIVEKIT_FULL_ACCESS_HOMESERVERS": "ours.example",
            "RTCAUTH_FEDERATION_MAX_INFLIGHT_PER_SERVER": "1",
        }
        daemon = build_test_daemon(env, MemoryReactorClock())
        verifier = Verifier()
        daemon.federation._verifier = verifier  # the gate stays; only the lookups hang
        client = SiteClient(daemon.site)
        body = {
            "room_id": "!r:made-up.example",
            "slot_id": "m.call#ROOM",
            "openid_token": {"access_token": "t", "matrix_server_name": "made-up.example"},
            "member": {"id": "m", "claimed_user_id": "@a:made-up.example", "claimed_device_id": "D"},
        }
        first = client.request("POST", "http://localhost/get_token", body)
        self.assertNoResult(first)
        response, answer = self.successResultOf(client.request("POST", "http://localhost/get_token", body))
        self.assertEqual(response.code, 503)
        self.assertEqual(json.loads(answer), {"errcode": "M_UNKNOWN", "error": "Too many verifications in progress, try again shortly", "retry_after_ms": 1000})
        self.assertEqual(response.headers.getRawHeaders(b"Retry-After"), [b"1"])
        self.assertEqual(response.headers.getRawHeaders(b"Access-Control-Allow-Origin"), [b"*"])
        self.assertEqual(len(verifier.calls), 1)
