"""The docs/delegated-leave.md#retry-policy retry policy, driven by a task.Clock."""

from __future__ import annotations

from typing import List

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.outbound.errors import FailureKind
from rtcauthd.outbound.client import OutboundError
from rtcauthd.matrix.delayed_events import CsApiUnresolvable, Outcome, OutcomeKind
from rtcauthd.leave.retry import jittered, next_interval, retry_with_backoff

TRANSIENT = Outcome.retry(status=503, detail="HTTP 503")
OK = Outcome.ok(200)
NOT_FOUND = Outcome.not_found()


class ScriptedAttempts:
    """Answers attempts from a script; ``None`` entries stay pending for the test to fire."""

    def __init__(self, clock: Clock, script: list, default=TRANSIENT) -> None:
        self.clock = clock
        self.script = list(script)
        self.default = default
        self.times: List[float] = []
        self.pending: List[Deferred] = []

    def __call__(self) -> Deferred:
        self.times.append(self.clock.seconds())
        answer = self.script.pop(0) if self.script else self.default
        if answer is None:
            d: Deferred = Deferred()
            self.pending.append(d)
            return d
        if isinstance(answer, BaseException):
            return fail(answer)
        return succeed(answer)


class RetryTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def tearDown(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def retry(self, attempts, budget: float, rnd: float = 0.5, **kw) -> Deferred:
        return retry_with_backoff(self.clock, attempts, budget, random=lambda: rnd, **kw)

    def run_out(self) -> None:
        """Advance exactly to each pending call until none is left."""
        while self.clock.getDelayedCalls():
            due = min(call.getTime() for call in self.clock.getDelayedCalls())
            self.clock.advance(max(due - self.clock.seconds(), 0))


class IntervalTests(SynchronousTestCase):
    def test_nominal_sequence(self) -> None:
        current, seen = 1.0, []
        for _ in range(14):
            seen.append(round(current, 4))
            current = next_interval(current)
        self.assertEqual(
            seen,
            [1.0, 1.5, 2.25, 3.375, 5.0625, 7.5938, 11.3906, 17.0859, 25.6289, 38.4434,
             57.665, 60.0, 60.0, 60.0],
        )

    def test_jitter_bounds(self) -> None:
        self.assertEqual(jittered(2.0, 0.0), 1.0)
        self.assertEqual(jittered(2.0, 0.5), 2.0)
        self.assertAlmostEqual(jittered(2.0, 0.999999), 3.0, places=5)
        self.assertAlmostEqual(jittered(60.0, 0.999999), 90.0, places=3)


class RetryTests(RetryTestCase):
    def test_success_first_time(self) -> None:
        attempts = ScriptedAttempts(self.clock, [OK])
        d = self.retry(attempts, 10.0)
        self.assertIs(self.successResultOf(d), OK)
        self.assertEqual(attempts.times, [0.0])

    def test_attempt_times_follow_backoff(self) -> None:
        attempts = ScriptedAttempts(self.clock, [TRANSIENT] * 5 + [OK])
        d = self.retry(attempts, 1000.0)
        self.clock.advance(0.999)
        self.assertEqual(attempts.times, [0.0])
        self.clock.advance(0.001)
        self.assertEqual(attempts.times, [0.0, 1.0])
        self.run_out()
        self.assertIs(self.successResultOf(d), OK)
        gaps = [round(b - a, 4) for a, b in zip(attempts.times, attempts.times[1:])]
        self.assertEqual(gaps, [1.0, 1.5, 2.25, 3.375, 5.0625])

    def test_jitter_uses_injected_random(self) -> None:
        attempts = ScriptedAttempts(self.clock, [TRANSIENT, OK])
        d = self.retry(attempts, 100.0, rnd=0.0)
        self.clock.advance(0.5)
        self.assertEqual(attempts.times, [0.0, 0.5])
        self.successResultOf(d)

    def test_budget_one_second_allows_two_attempts_when_wait_fits(self) -> None:
        attempts = ScriptedAttempts(self.clock, [])
        d = self.retry(attempts, 1.0, rnd=0.5)  # first wait exactly 1.0: 0 + 1.0 is not > 1.0
        self.clock.advance(1.0)
        self.assertIs(self.successResultOf(d), TRANSIENT)
        self.assertEqual(attempts.times, [0.0, 1.0])

    def test_budget_one_second_single_attempt_when_wait_overshoots(self) -> None:
        attempts = ScriptedAttempts(self.clock, [])
        d = self.retry(attempts, 1.0, rnd=0.6)  # wait 1.1 > 1.0: give up without sleeping
        self.assertIs(self.successResultOf(d), TRANSIENT)
        self.assertEqual(attempts.times, [0.0])

    def test_elapsed_includes_attempt_duration(self) -> None:
        attempts = ScriptedAttempts(self.clock, [None])
        d = self.retry(attempts, 1.5)
        self.clock.advance(0.6)
        attempts.pending[0].callback(TRANSIENT)  # elapsed 0.6 + wait 1.0 > 1.5
        self.assertIs(self.successResultOf(d), TRANSIENT)
        self.assertEqual(attempts.times, [0.0])

    def test_exhaustion_returns_last_outcome(self) -> None:
        last = Outcome.retry(status=502, detail="HTTP 502")
        attempts = ScriptedAttempts(self.clock, [TRANSIENT, TRANSIENT, last], default=OK)
        d = self.retry(attempts, 3.0)  # 0, 1.0, 2.5; next wait 2.25 would end at 4.75
        self.run_out()
        self.assertIs(self.successResultOf(d), last)
        self.assertEqual(attempts.times, [0.0, 1.0, 2.5])

    def test_retry_after_hint_replaces_wait_and_resets_interval(self) -> None:
        hint = Outcome.retry(5.0, status=429)
        attempts = ScriptedAttempts(self.clock, [TRANSIENT, TRANSIENT, hint, TRANSIENT, OK])
        d = self.retry(attempts, 1000.0)
        self.clock.pump([1.0, 1.5])
        self.assertEqual(attempts.times, [0.0, 1.0, 2.5])
        self.clock.advance(4.999)
        self.assertEqual(len(attempts.times), 3)
        self.clock.advance(0.001)
        self.assertEqual(attempts.times[-1], 7.5)
        self.clock.advance(1.0)  # interval back to 1 s after the hint
        self.assertEqual(attempts.times[-1], 8.5)
        self.assertIs(self.successResultOf(d), OK)

    def test_zero_hint_retries_immediately(self) -> None:
        attempts = ScriptedAttempts(self.clock, [Outcome.retry(0.0, status=429), OK])
        d = self.retry(attempts, 1.0)
        self.assertNoResult(d)
        self.clock.advance(0)
        self.assertEqual(attempts.times, [0.0, 0.0])
        self.successResultOf(d)

    def test_hint_beyond_budget_gives_up_at_once(self) -> None:
        hint = Outcome.retry(30.0, status=429)
        attempts = ScriptedAttempts(self.clock, [hint], default=OK)
        d = self.retry(attempts, 20.0)
        self.assertIs(self.successResultOf(d), hint)
        self.assertEqual(attempts.times, [0.0])

    def test_permanent_outcome_stops(self) -> None:
        attempts = ScriptedAttempts(self.clock, [NOT_FOUND], default=OK)
        d = self.retry(attempts, 100.0, is_permanent=lambda o: o.kind is OutcomeKind.NOT_FOUND)
        self.assertIs(self.successResultOf(d), NOT_FOUND)
        self.assertEqual(attempts.times, [0.0])

    def test_not_found_is_transient_by_default(self) -> None:
        attempts = ScriptedAttempts(self.clock, [NOT_FOUND, OK])
        d = self.retry(attempts, 100.0)
        self.clock.advance(1.0)
        self.assertIs(self.successResultOf(d), OK)

    def test_custom_success_predicate(self) -> None:
        attempts = ScriptedAttempts(self.clock, [NOT_FOUND])
        d = self.retry(attempts, 100.0, is_success=lambda o: o.kind is not OutcomeKind.RETRY)
        self.assertIs(self.successResultOf(d), NOT_FOUND)

    def test_permanent_error_fails_at_once(self) -> None:
        attempts = ScriptedAttempts(self.clock, [CsApiUnresolvable("example.org")], default=OK)
        d = self.retry(attempts, 100.0, permanent_errors=(CsApiUnresolvable,))
        self.failureResultOf(d, CsApiUnresolvable)
        self.assertEqual(attempts.times, [0.0])

    def test_transport_error_is_transient(self) -> None:
        attempts = ScriptedAttempts(self.clock, [OutboundError(FailureKind.CONNECT, "connect", "refused")] * 3)
        d = self.retry(attempts, 2.0, permanent_errors=(CsApiUnresolvable,))
        self.clock.advance(1.0)
        result = self.successResultOf(d)
        self.assertEqual(result.kind, OutcomeKind.RETRY)
        self.assertEqual(result.detail, "connect: refused")
        self.assertEqual(attempts.times, [0.0, 1.0])

    def test_unexpected_exception_is_logged_and_transient(self) -> None:
        calls = []

        def attempt():
            calls.append(self.clock.seconds())
            if len(calls) == 1:
                raise ZeroDivisionError("boom")
            return succeed(OK)

        d = self.retry(attempt, 10.0)
        self.clock.advance(1.0)
        self.assertIs(self.successResultOf(d), OK)
        self.assertEqual(calls, [0.0, 1.0])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_cancel_during_sleep_stops_everything(self) -> None:
        attempts = ScriptedAttempts(self.clock, [], default=TRANSIENT)
        d = self.retry(attempts, 100.0)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual(attempts.times, [0.0])

    def test_cancel_during_attempt_ignores_late_answer(self) -> None:
        attempts = ScriptedAttempts(self.clock, [None])
        d = self.retry(attempts, 100.0)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        attempts.pending[0].callback(TRANSIENT)  # late answer: no new attempt, no timer
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(attempts.times, [0.0])

    def test_cancel_during_attempt_swallows_late_failure(self) -> None:
        attempts = ScriptedAttempts(self.clock, [None])
        d = self.retry(attempts, 100.0)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        attempts.pending[0].errback(OutboundError(FailureKind.LOST, "read body", "connection lost"))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_cancel_after_result_is_harmless(self) -> None:
        attempts = ScriptedAttempts(self.clock, [OK])
        d = self.retry(attempts, 100.0)
        d.cancel()
        self.assertIs(self.successResultOf(d), OK)

    def test_sixty_second_cap(self) -> None:
        attempts = ScriptedAttempts(self.clock, [])
        d = self.retry(attempts, 400.0)
        self.run_out()
        gaps = [round(b - a, 4) for a, b in zip(attempts.times, attempts.times[1:])]
        self.assertEqual(
            gaps,
            [1.0, 1.5, 2.25, 3.375, 5.0625, 7.5938, 11.3906, 17.0859, 25.6289, 38.4434,
             57.665, 60.0, 60.0, 60.0],
        )
        self.assertEqual(round(attempts.times[-1], 4), 350.9951)  # +60 would pass 400
        self.successResultOf(d)
