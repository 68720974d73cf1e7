"""The delegated-leave state machine (docs/delegated-leave.md#job-state-machine), driven by task.Clock.

Every row of the transition table and the internal action has its own test named
``test_<state>__<signal>__<effect>``; every blank cell is exercised by the
``*__ignores_unlisted_signals`` tests. Random jitter is pinned to 0.5 (wait = nominal).
"""

from __future__ import annotations

from typing import Any, List, Tuple

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.leave.record import JobParams
from rtcauthd.outbound.errors import FailureKind
from rtcauthd.outbound.client import OutboundError
from rtcauthd.leave.jobs import DelayedLeaveJob, JobEnvironment, new_job_id
from rtcauthd.leave.machine import ENTRY_ACTIONS, EXIT_ACTIONS, INTERNAL_ACTIONS, TRANSITIONS, Signal, State
from rtcauthd.matrix.delayed_events import CsApiUnresolvable, Outcome
from rtcauthd.livekit.presence import Presence

S = 1_000_000_000  # ns per second
W, C, D, A, R = (
    State.WaitingForInitialConnect,
    State.Connected,
    State.Disconnected,
    State.Aborted,
    State.Replaced,
)
OK = Outcome.ok(200)
GONE = Outcome.not_found()
FINALISED = Outcome.conflict()
BUSY = Outcome.retry(status=503, detail="HTTP 503")
PENDING = object()  # script entry: leave the call unanswered


def params(timeout_s: float = 10.0, *, room: str = "room-a", identity: str = "ident-a") -> JobParams:
    return JobParams(
        delay_id="syd_test_1",
        delay_timeout_ns=int(timeout_s * S),
        server_name="example.com",
        room=room,
        identity=identity,
    )


class Calls:
    """A scripted one-attempt collaborator: records call times, answers from a script."""

    def __init__(self, clock: Clock, default: Any) -> None:
        self.clock = clock
        self.default = default
        self.script: List[Any] = []
        self.times: List[float] = []
        self.params: List[JobParams] = []
        self.pending: List[Deferred] = []

    def answer(self, *answers: Any) -> "Calls":
        self.script.extend(answers)
        return self

    def __call__(self, p: JobParams) -> Deferred:
        self.times.append(self.clock.seconds())
        self.params.append(p)
        answer = self.script.pop(0) if self.script else self.default
        if answer is PENDING:
            d: Deferred = Deferred()
            self.pending.append(d)
            return d
        if isinstance(answer, BaseException):
            return fail(answer)
        return succeed(answer)


class Harness:
    """A JobEnvironment whose ``done`` behaves like the manager's (retire = cancel)."""

    def __init__(
        self,
        clock: Clock,
        *,
        restart: Any = OK,
        send: Any = OK,
        lookup: Any = PENDING,
        sanity_interval: float = 0.0,
        rnd: float = 0.5,
        cancel_on_done: bool = True,
    ) -> None:
        self.clock = clock
        self.restart = Calls(clock, restart)
        self.send = Calls(clock, send)
        self.lookup = Calls(clock, lookup)
        self.restarted: List[Tuple[DelayedLeaveJob, float]] = []
        self.done: List[Tuple[DelayedLeaveJob, float, State]] = []
        self.cancel_on_done = cancel_on_done
        self.env = JobEnvironment(
            clock=clock,
            restart=self.restart,
            send=self.send,
            lookup_participant=self.lookup,
            restarted=lambda job, at: self.restarted.append((job, at)),
            done=self._done,
            random=lambda: rnd,
            sanity_interval=sanity_interval,
        )

    def _done(self, job: DelayedLeaveJob) -> None:
        self.done.append((job, self.clock.seconds(), job.state))
        if self.cancel_on_done:
            job.cancel()


class JobTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.jobs: List[DelayedLeaveJob] = []

    def tearDown(self) -> None:
        for job in self.jobs:
            job.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def harness(self, **kw: Any) -> Harness:
        return Harness(self.clock, **kw)

    def job(self, h: Harness, timeout_s: float = 10.0, start: bool = True, **kw: Any) -> DelayedLeaveJob:
        job = DelayedLeaveJob(params(timeout_s, **kw), h.env)
        self.jobs.append(job)
        if start:
            job.start()
        return job

    # states reached through the table itself
    def waiting(self, h: Harness, timeout_s: float = 10.0) -> DelayedLeaveJob:
        job = self.job(h, timeout_s)
        self.assertIs(job.state, W)
        return job

    def connected(self, h: Harness, timeout_s: float = 10.0) -> DelayedLeaveJob:
        job = self.waiting(h, timeout_s)
        job.signal(Signal.ParticipantConnected)
        self.assertIs(job.state, C)
        return job

    def connected_or_aborted(self, h: Harness) -> DelayedLeaveJob:
        """Connect, for restart answers that may end the job at once."""
        job = self.waiting(h)
        job.signal(Signal.ParticipantConnected)
        return job

    def disconnected(self, h: Harness) -> DelayedLeaveJob:
        h.send.default = PENDING
        job = self.connected(h)
        job.signal(Signal.ParticipantDisconnectedIntentionally)
        self.assertIs(job.state, D)
        return job

    def aborted(self, h: Harness) -> DelayedLeaveJob:
        job = self.waiting(h)
        job.signal(Signal.ParticipantConnectionAborted)
        self.assertIs(job.state, A)
        return job

    def replaced(self, h: Harness) -> DelayedLeaveJob:
        job = self.waiting(h)
        job.signal(Signal.JobReplaced)
        self.assertIs(job.state, R)
        return job

    def delayed_times(self) -> List[float]:
        return sorted(call.getTime() for call in self.clock.getDelayedCalls())

    def advance_to(self, t: float) -> None:
        """Advance to absolute time ``t``, firing every call due on the way at its own time."""
        while True:
            due = [c.getTime() for c in self.clock.getDelayedCalls() if c.getTime() <= t]
            if not due:
                break
            self.clock.advance(max(min(due) - self.clock.seconds(), 0))
        self.clock.advance(max(t - self.clock.seconds(), 0))


class TableTests(SynchronousTestCase):
    def test_transition_table_is_exactly_the_spec(self) -> None:
        self.assertEqual(
            dict(TRANSITIONS),
            {
                (W, Signal.ParticipantConnected): C,
                (W, Signal.ParticipantLookupSuccessful): C,
                (W, Signal.ParticipantConnectionAborted): A,
                (W, Signal.WaitingStateTimedOut): D,
                (W, Signal.JobReplaced): R,
                (C, Signal.ParticipantDisconnectedIntentionally): D,
                (C, Signal.ParticipantConnectionAborted): D,
                (C, Signal.DelayedEventTimedOut): A,
                (C, Signal.DelayedEventNotFound): A,
                (C, Signal.CsApiUrlNotFound): A,
                (C, Signal.SFUParticipantGone): D,
                (C, Signal.JobReplaced): R,
                (D, Signal.JobReplaced): R,
                (A, Signal.JobReplaced): R,
            },
        )
        self.assertEqual(dict(INTERNAL_ACTIONS), {(C, Signal.DelayedEventReset): "_start_restart"})
        self.assertEqual(set(ENTRY_ACTIONS), {C, D, A})
        self.assertEqual(set(EXIT_ACTIONS), {W, C})
        self.assertFalse(set(TRANSITIONS) & set(INTERNAL_ACTIONS))

    def test_signal_values_are_upstream_names(self) -> None:
        for signal in Signal:
            self.assertEqual(signal.value, signal.name)
        self.assertIs(Signal("ParticipantDisconnectedIntentionally"),
                      Signal.ParticipantDisconnectedIntentionally)

    def test_job_id_shape(self) -> None:
        job_id = new_job_id(1785000000.123456)
        self.assertEqual(len(job_id), 26)
        self.assertTrue(set(job_id) <= set("0123456789ABCDEFGHIJKLMNOPQRSTUV"))
        self.assertNotEqual(new_job_id(1785000000.123456), job_id)  # random half differs
        # The timestamp half sorts with time.
        self.assertLess(new_job_id(1.0)[:12], new_job_id(2.0)[:12])

    def test_non_positive_timeout_rejected(self) -> None:
        h = Harness(Clock())
        for ns in (0, -1):
            p = JobParams("d", ns, "example.com", "r", "i")
            with self.assertRaises(ValueError):
                DelayedLeaveJob(p, h.env)


class TransitionTests(JobTestCase):
    """One test per row of the docs/delegated-leave.md#transitions transition table, plus the internal action."""

    def test_waiting_for_initial_connect__participant_connected__to_connected(self) -> None:
        h = self.harness()
        job = self.waiting(h)
        self.clock.advance(2)
        job.signal(Signal.ParticipantConnected)
        self.assertIs(job.state, C)
        self.assertEqual(job.restart_deadline, 12.0)  # entry: now + DelayTimeout
        self.assertEqual(h.restart.times, [2.0])  # entry: first restart immediately
        self.assertEqual(self.delayed_times(), [2.0 + 8.0])  # waiting timer gone, restart timer armed

    def test_waiting_for_initial_connect__participant_lookup_successful__to_connected(self) -> None:
        h = self.harness()
        job = self.waiting(h)
        job.signal(Signal.ParticipantLookupSuccessful)
        self.assertIs(job.state, C)
        self.assertEqual(h.restart.times, [0.0])
        self.assertEqual(self.delayed_times(), [8.0])

    def test_waiting_for_initial_connect__participant_connection_aborted__to_aborted(self) -> None:
        h = self.harness()
        job = self.waiting(h)
        job.signal(Signal.ParticipantConnectionAborted)
        self.assertIs(job.state, A)
        self.assertEqual(h.restart.times, [])
        self.assertEqual(h.send.times, [])  # aborts WITHOUT sending
        self.assertEqual([(j, st) for j, _, st in h.done], [(job, A)])

    def test_waiting_for_initial_connect__waiting_state_timed_out__to_disconnected(self) -> None:
        h = self.harness()
        job = self.waiting(h)
        job.signal(Signal.WaitingStateTimedOut)
        self.assertIs(job.state, D)
        self.assertEqual(h.send.times, [0.0])
        self.assertEqual(h.restart.times, [])
        self.assertEqual([(j, st) for j, _, st in h.done], [(job, D)])

    def test_waiting_for_initial_connect__job_replaced__to_replaced(self) -> None:
        h = self.harness()
        job = self.waiting(h)
        job.signal(Signal.JobReplaced)
        self.assertIs(job.state, R)
        self.assertEqual(h.done, [])
        self.assertEqual(h.send.times, [])
        # Exit action stopped the waiting timer.
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connected__participant_disconnected_intentionally__to_disconnected(self) -> None:
        h = self.harness()
        job = self.connected(h)
        self.clock.advance(3)
        job.signal(Signal.ParticipantDisconnectedIntentionally)
        self.assertIs(job.state, D)
        self.assertEqual(h.send.times, [3.0])
        self.assertEqual([(j, t, st) for j, t, st in h.done], [(job, 3.0, D)])
        self.assertEqual(h.restart.times, [0.0])  # restart timer stopped by the exit action

    def test_connected__participant_connection_aborted__to_disconnected(self) -> None:
        h = self.harness()
        job = self.connected(h)
        job.signal(Signal.ParticipantConnectionAborted)
        self.assertIs(job.state, D)
        self.assertEqual(h.send.times, [0.0])  # once connected, an abort SENDS the leave

    def test_connected__delayed_event_timed_out__to_aborted(self) -> None:
        h = self.harness()
        job = self.connected(h)
        job.signal(Signal.DelayedEventTimedOut)
        self.assertIs(job.state, A)
        self.assertEqual(h.send.times, [])
        self.assertEqual([st for _, _, st in h.done], [A])

    def test_connected__delayed_event_not_found__to_aborted(self) -> None:
        h = self.harness()
        job = self.connected(h)
        job.signal(Signal.DelayedEventNotFound)
        self.assertIs(job.state, A)
        self.assertEqual(h.send.times, [])
        self.assertEqual([st for _, _, st in h.done], [A])

    def test_connected__cs_api_url_not_found__to_aborted(self) -> None:
        h = self.harness()
        job = self.connected(h)
        job.signal(Signal.CsApiUrlNotFound)
        self.assertIs(job.state, A)
        self.assertEqual(h.send.times, [])
        self.assertEqual([st for _, _, st in h.done], [A])

    def test_connected__sfu_participant_gone__to_disconnected(self) -> None:
        h = self.harness()
        job = self.connected(h)
        job.signal(Signal.SFUParticipantGone)
        self.assertIs(job.state, D)
        self.assertEqual(h.send.times, [0.0])

    def test_connected__job_replaced__to_replaced(self) -> None:
        h = self.harness()
        job = self.connected(h)
        job.signal(Signal.JobReplaced)
        self.assertIs(job.state, R)
        self.assertEqual(h.send.times, [])
        self.assertEqual(h.done, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])  # restart timer stopped

    def test_disconnected__job_replaced__to_replaced(self) -> None:
        h = self.harness()
        job = self.disconnected(h)
        job.signal(Signal.JobReplaced)
        self.assertIs(job.state, R)
        self.assertEqual(h.done, [])

    def test_aborted__job_replaced__to_replaced(self) -> None:
        h = self.harness(cancel_on_done=False)  # the manager would have cancelled it
        job = self.aborted(h)
        job.signal(Signal.JobReplaced)
        self.assertIs(job.state, R)
        self.assertEqual(len(h.done), 1)

    def test_connected__delayed_event_reset__internal_restart(self) -> None:
        h = self.harness()
        job = self.connected(h)
        self.clock.advance(1)
        job.signal(Signal.DelayedEventReset)
        self.assertIs(job.state, C)  # internal: no exit/entry actions
        self.assertEqual(h.restart.times, [0.0, 1.0])
        self.assertEqual(job.restart_deadline, 11.0)  # moved by the success
        self.assertEqual(self.delayed_times(), [9.0])  # re-armed, not duplicated
        self.assertEqual([at for _, at in h.restarted], [0.0, 1.0])


class IgnoredSignalTests(JobTestCase):
    """Blank cells of the table: state, timers and collaborators untouched."""

    def check_ignored(self, reach, state: State, **harness_kw: Any) -> None:
        ignored = [
            s for s in Signal if (state, s) not in TRANSITIONS and (state, s) not in INTERNAL_ACTIONS
        ]
        self.assertTrue(ignored)
        for signal in ignored:
            h = self.harness(**harness_kw)
            job = reach(h)
            self.assertIs(job.state, state)
            before = (
                list(h.restart.times),
                list(h.send.times),
                len(h.done),
                len(h.restarted),
                self.delayed_times(),
                job.restart_deadline,
            )
            job.signal(signal)
            after = (
                list(h.restart.times),
                list(h.send.times),
                len(h.done),
                len(h.restarted),
                self.delayed_times(),
                job.restart_deadline,
            )
            self.assertIs(job.state, state, signal)
            self.assertEqual(after, before, signal)
            job.cancel()

    def test_waiting_for_initial_connect__ignores_unlisted_signals(self) -> None:
        self.check_ignored(self.waiting, W)

    def test_waiting_for_initial_connect__participant_disconnected_intentionally__ignored(self) -> None:
        h = self.harness()
        job = self.waiting(h)
        job.signal(Signal.ParticipantDisconnectedIntentionally)
        self.assertIs(job.state, W)
        self.assertEqual(self.delayed_times(), [10.0])  # still waits; the timer will send
        self.advance_to(10.0)
        self.assertIs(job.state, D)
        self.assertEqual(h.send.times, [10.0])

    def test_connected__ignores_unlisted_signals(self) -> None:
        self.check_ignored(self.connected, C)

    def test_connected__duplicate_participant_connected_ignored(self) -> None:
        h = self.harness()
        job = self.connected(h)
        self.clock.advance(1)
        job.signal(Signal.ParticipantConnected)
        self.assertEqual(h.restart.times, [0.0])
        self.assertEqual(job.restart_deadline, 10.0)

    def test_disconnected__ignores_unlisted_signals(self) -> None:
        self.check_ignored(self.disconnected, D)

    def test_aborted__ignores_unlisted_signals(self) -> None:
        self.check_ignored(self.aborted, A, cancel_on_done=False)

    def test_replaced__ignores_every_signal(self) -> None:
        self.check_ignored(self.replaced, R)

    def test_ignored_signal_is_logged_at_debug(self) -> None:
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        h = self.harness()
        job = self.waiting(h)
        job.signal(Signal.SFUParticipantGone)
        ignored = [e for e in events if e.get("log_format", "").startswith("Job {job_id}: ignoring")]
        self.assertEqual(len(ignored), 1)
        self.assertEqual(ignored[0]["log_level"].name, "debug")
        self.assertEqual(ignored[0]["signal"], "SFUParticipantGone")
        self.assertEqual(ignored[0]["state"], "WaitingForInitialConnect")

    def test_cancelled_job_ignores_signals(self) -> None:
        h = self.harness()
        job = self.waiting(h)
        job.cancel()
        job.signal(Signal.ParticipantConnected)
        self.assertIs(job.state, W)
        self.assertEqual(h.restart.times, [])


class DispatchOrderTests(JobTestCase):
    def test_signals_raised_while_handling_are_queued_in_order(self) -> None:
        handled: List[Signal] = []

        class RecordingJob(DelayedLeaveJob):
            def _dispatch(self, signal: Signal) -> None:
                handled.append(signal)
                super()._dispatch(signal)

        h = self.harness(restart=GONE)  # answers synchronously, inside the handling
        job = RecordingJob(params(), h.env)
        self.jobs.append(job)
        job.start()
        job.signal(Signal.ParticipantConnected)
        self.assertEqual(
            handled,
            [Signal.ParticipantConnected, Signal.DelayedEventReset, Signal.DelayedEventNotFound],
        )
        self.assertIs(job.state, A)
        self.assertEqual(h.send.times, [])

    def test_queued_signals_are_handled_first_in_first_out(self) -> None:
        handled: List[Signal] = []

        class RecordingJob(DelayedLeaveJob):
            def _dispatch(self, signal: Signal) -> None:
                handled.append(signal)
                super()._dispatch(signal)

        h = self.harness(cancel_on_done=False)

        def done(j: DelayedLeaveJob) -> None:
            j.signal(Signal.SFUNotAvailable)
            j.signal(Signal.JobReplaced)
            j.signal(Signal.ParticipantConnected)

        object.__setattr__(h.env, "done", done)
        job = RecordingJob(params(), h.env)
        self.jobs.append(job)
        job.start()
        job.signal(Signal.ParticipantConnectionAborted)
        self.assertEqual(
            handled,
            [
                Signal.ParticipantConnectionAborted,
                Signal.SFUNotAvailable,
                Signal.JobReplaced,
                Signal.ParticipantConnected,
            ],
        )
        self.assertIs(job.state, R)

    def test_signal_from_a_callback_waits_for_the_current_one(self) -> None:
        h = self.harness()
        job = self.waiting(h)
        seen: List[State] = []

        def done(j: DelayedLeaveJob) -> None:
            # Raised while WaitingStateTimedOut is still being handled.
            j.signal(Signal.JobReplaced)
            seen.append(j.state)

        object.__setattr__(h.env, "done", done)
        job.signal(Signal.WaitingStateTimedOut)
        self.assertEqual(seen, [D])  # not yet handled at that point
        self.assertIs(job.state, R)  # ...but handled right after


class TimerTests(JobTestCase):
    def test_waiting_timer_boundary(self) -> None:
        h = self.harness()
        job = self.waiting(h, timeout_s=10)
        self.clock.advance(9.999)
        self.assertIs(job.state, W)
        self.assertEqual(h.send.times, [])
        self.clock.advance(0.001)
        self.assertIs(job.state, D)
        self.assertEqual(h.send.times, [10.0])

    def test_waiting_timer_capped_at_one_hour(self) -> None:
        h = self.harness()
        job = self.waiting(h, timeout_s=7200)
        self.clock.advance(3599.999)
        self.assertIs(job.state, W)
        self.clock.advance(0.001)
        self.assertIs(job.state, D)
        self.assertEqual(h.send.times, [3600.0])

    def test_restart_timer_boundary_eighty_percent(self) -> None:
        h = self.harness()
        job = self.connected(h, timeout_s=10)
        self.clock.advance(7.999)
        self.assertEqual(h.restart.times, [0.0])
        self.clock.advance(0.001)
        self.assertEqual(h.restart.times, [0.0, 8.0])
        self.assertIs(job.state, C)

    def test_restart_timer_uses_integer_nanoseconds(self) -> None:
        h = self.harness()
        job = DelayedLeaveJob(
            JobParams("d", 1_000_000_001, "example.com", "r", "i"), h.env
        )
        self.jobs.append(job)
        job.start()
        job.signal(Signal.ParticipantConnected)
        # 1_000_000_001 * 8 // 10 ns = exactly 0.8 s (float 80 % would give 0.8000000008).
        self.assertIn(0.8, self.delayed_times())

    def test_restart_timer_counts_from_the_processed_success(self) -> None:
        h = self.harness()
        h.restart.answer(PENDING)
        job = self.connected(h, timeout_s=10)
        self.clock.advance(0.5)
        h.restart.pending[0].callback(OK)
        self.assertEqual(job.restart_deadline, 10.5)
        self.assertEqual(self.delayed_times(), [8.5])
        self.assertEqual([at for _, at in h.restarted], [0.5])

    def test_restart_cadence_1500ms(self) -> None:
        h = self.harness()
        job = self.connected(h, timeout_s=1.5)
        self.advance_to(3.5)
        self.assertEqual([round(t, 6) for t in h.restart.times], [0.0, 1.2, 2.4])
        self.assertIs(job.state, C)
        self.assertEqual(len(h.restarted), 3)

    def test_deadline_already_passed_times_out(self) -> None:
        h = self.harness()
        job = self.connected(h, timeout_s=10)
        self.clock.advance(20)  # the restart timer (due at 8) runs late, at 20
        self.assertEqual(h.restart.times, [0.0])  # no homeserver call
        self.assertIs(job.state, A)
        self.assertEqual(h.send.times, [])


class RestartProcedureTests(JobTestCase):
    def test_404_on_first_restart_aborts_without_send(self) -> None:
        h = self.harness(restart=GONE)
        job = self.waiting(h)
        job.signal(Signal.ParticipantConnected)
        self.assertIs(job.state, A)
        self.assertEqual(h.restart.times, [0.0])
        self.assertEqual(h.send.times, [])
        self.assertEqual(h.restarted, [])
        self.assertEqual([st for _, _, st in h.done], [A])

    def test_404_on_later_restart_aborts_without_send(self) -> None:
        h = self.harness()
        h.restart.answer(OK, GONE)
        job = self.connected(h, timeout_s=1)
        self.advance_to(0.8)
        self.assertEqual(h.restart.times, [0.0, 0.8])
        self.assertIs(job.state, A)
        self.assertEqual(h.send.times, [])

    def test_409_on_restart_is_final_and_aborts_without_send(self) -> None:
        h = self.harness()
        h.restart.answer(OK, FINALISED)
        job = self.connected(h, timeout_s=1)
        self.advance_to(0.8)
        self.assertEqual(h.restart.times, [0.0, 0.8])
        self.assertIs(job.state, A)
        self.assertEqual(h.send.times, [])
        self.assertEqual([(t, st) for _, t, st in h.done], [(0.8, A)])
        self.clock.advance(100)
        self.assertEqual(h.restart.times, [0.0, 0.8])

    def test_429_retry_after_honoured(self) -> None:
        h = self.harness()
        h.restart.answer(Outcome.retry(3.0, status=429), OK)
        job = self.connected(h, timeout_s=10)
        self.clock.advance(2.999)
        self.assertEqual(h.restart.times, [0.0])
        self.clock.advance(0.001)
        self.assertEqual(h.restart.times, [0.0, 3.0])
        self.assertEqual(job.restart_deadline, 13.0)
        self.assertEqual([at for _, at in h.restarted], [3.0])

    def test_429_hint_beyond_remaining_budget_times_out(self) -> None:
        h = self.harness()
        h.restart.answer(Outcome.retry(30.0, status=429))
        job = self.connected_or_aborted(h)
        self.assertIs(job.state, A)
        self.assertEqual(h.restart.times, [0.0])
        self.assertEqual(h.send.times, [])

    def test_budget_exhaustion_times_out_to_aborted(self) -> None:
        h = self.harness(restart=BUSY)
        job = self.connected(h, timeout_s=1.5)
        self.assertEqual(h.restart.times, [0.0])
        self.clock.advance(1.0)  # 0 + 1.0 fits in 1.5; 1.0 + 1.5 does not
        self.assertEqual(h.restart.times, [0.0, 1.0])
        self.assertIs(job.state, A)
        self.assertEqual(h.send.times, [])
        self.assertEqual([(t, st) for _, t, st in h.done], [(1.0, A)])

    def test_transport_errors_are_retried(self) -> None:
        h = self.harness()
        h.restart.answer(OutboundError(FailureKind.CONNECT, "connect", "refused"), OK)
        job = self.connected(h)
        self.clock.advance(1.0)
        self.assertEqual(h.restart.times, [0.0, 1.0])
        self.assertIs(job.state, C)
        self.assertEqual(job.restart_deadline, 11.0)

    def test_unresolvable_cs_api_aborts(self) -> None:
        h = self.harness(restart=CsApiUnresolvable("example.com"))
        job = self.connected_or_aborted(h)
        self.assertIs(job.state, A)
        self.assertEqual(h.restart.times, [0.0])
        self.assertEqual(h.send.times, [])

    def test_late_success_after_leaving_connected_persists_but_arms_nothing(self) -> None:
        h = self.harness(send=PENDING)
        h.restart.answer(PENDING)
        job = self.connected(h)
        job.signal(Signal.ParticipantDisconnectedIntentionally)
        self.assertIs(job.state, D)
        self.clock.advance(0.5)
        h.restart.pending[0].callback(OK)
        self.assertEqual([at for _, at in h.restarted], [0.5])
        self.assertEqual(job.restart_deadline, 10.0)  # unchanged
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no restart timer

    def test_late_failure_after_leaving_connected_is_ignored(self) -> None:
        h = self.harness(send=PENDING)
        h.restart.answer(PENDING)
        job = self.connected(h)
        job.signal(Signal.ParticipantConnectionAborted)
        h.restart.pending[0].callback(GONE)
        self.assertIs(job.state, D)
        self.assertEqual(h.done, [])

    def test_at_most_one_restart_in_flight(self) -> None:
        h = self.harness()
        h.restart.answer(PENDING)
        job = self.connected(h)
        job.signal(Signal.DelayedEventReset)
        self.assertEqual(h.restart.times, [0.0])
        h.restart.pending[0].callback(OK)
        self.assertEqual(self.delayed_times(), [8.0])

    def test_restart_calls_carry_the_params(self) -> None:
        h = self.harness()
        job = self.connected(h)
        self.assertEqual(h.restart.params, [job.params])


class SendProcedureTests(JobTestCase):
    def test_404_on_send_is_success(self) -> None:
        h = self.harness(send=GONE)
        job = self.connected(h)
        job.signal(Signal.ParticipantDisconnectedIntentionally)
        self.assertEqual(h.send.times, [0.0])  # exactly one send
        self.assertEqual([st for _, _, st in h.done], [D])
        self.clock.advance(100)
        self.assertEqual(h.send.times, [0.0])

    def test_409_on_send_is_final(self) -> None:
        h = self.harness(send=FINALISED)
        job = self.connected(h)
        job.signal(Signal.ParticipantDisconnectedIntentionally)
        self.assertEqual(h.send.times, [0.0])  # not retried within the window
        self.assertEqual([st for _, _, st in h.done], [D])
        self.clock.advance(100)
        self.assertEqual(h.send.times, [0.0])

    def test_never_connected_window_is_one_second(self) -> None:
        h = self.harness(send=BUSY)
        self.waiting(h, timeout_s=1)
        self.advance_to(1.0)
        self.assertEqual(h.send.times, [1.0])
        self.clock.advance(1.0)  # first backoff (1.0) still fits the 1 s window
        self.assertEqual(h.send.times, [1.0, 2.0])
        self.assertEqual([t for _, t, _ in h.done], [2.0])

    def test_never_connected_single_attempt_when_backoff_overshoots(self) -> None:
        h = self.harness(send=BUSY, rnd=0.7)  # first wait 1.2 s > 1 s window
        self.waiting(h, timeout_s=1)
        self.advance_to(1.0)
        self.assertEqual(h.send.times, [1.0])
        self.assertEqual([t for _, t, _ in h.done], [1.0])

    def test_window_clamped_up_to_one_second(self) -> None:
        h = self.harness(send=BUSY)
        job = self.connected(h, timeout_s=10)
        self.clock.advance(7.9)  # before the restart timer; deadline 10 → 0.1 s left
        job.signal(Signal.ParticipantDisconnectedIntentionally)
        self.clock.advance(1.0)
        self.assertEqual([round(t, 6) for t in h.send.times], [7.9, 8.9])
        self.assertEqual(len(h.done), 1)

    def test_window_is_time_left_until_deadline(self) -> None:
        h = self.harness(send=BUSY)
        job = self.connected(h, timeout_s=10)
        job.signal(Signal.ParticipantDisconnectedIntentionally)  # window 10 s
        self.advance_to(100)
        # 8.125 + 5.0625 would pass the 10 s window: give up there.
        self.assertEqual(h.send.times, [0.0, 1.0, 2.5, 4.75, 8.125])
        self.assertEqual([t for _, t, _ in h.done], [8.125])

    def test_window_clamped_down_to_one_hour(self) -> None:
        h = self.harness(send=BUSY)
        job = self.connected(h, timeout_s=3 * 3600)
        self.clock.advance(1)
        job.signal(Signal.ParticipantDisconnectedIntentionally)
        self.advance_to(20000)
        (done_at,) = [t for _, t, _ in h.done]
        self.assertGreater(done_at, 1 + 3540)
        self.assertLessEqual(done_at, 1 + 3600)
        self.assertEqual(h.send.times[-1], done_at)

    def test_done_only_after_send_finished(self) -> None:
        h = self.harness(send=PENDING)
        job = self.connected(h)
        job.signal(Signal.ParticipantDisconnectedIntentionally)
        self.clock.advance(3)
        self.assertEqual(h.done, [])
        h.send.pending[0].callback(OK)
        self.assertEqual([(t, st) for _, t, st in h.done], [(3.0, D)])

    def test_unresolvable_cs_api_ends_without_sending(self) -> None:
        h = self.harness(send=CsApiUnresolvable("example.com"))
        self.waiting(h, timeout_s=1)
        self.advance_to(1.0)
        self.assertEqual(h.send.times, [1.0])
        self.assertEqual([t for _, t, _ in h.done], [1.0])
        self.clock.advance(10)
        self.assertEqual(h.send.times, [1.0])

    def test_cancel_mid_send_abandons_it(self) -> None:
        h = self.harness(send=BUSY)
        job = self.connected(h)
        job.signal(Signal.ParticipantDisconnectedIntentionally)
        h.send.answer(PENDING)
        self.clock.advance(1.0)  # second attempt in flight
        job.cancel()
        h.send.pending[0].callback(OK)  # late success: nobody acts on it
        self.clock.advance(100)
        self.assertEqual(h.send.times, [0.0, 1.0])
        self.assertEqual(h.done, [])


class LookupTests(JobTestCase):
    def test_phase1_queries_immediately_and_backs_off(self) -> None:
        h = self.harness(lookup=Presence.ABSENT)
        job = self.waiting(h, timeout_s=30)
        self.assertEqual(h.lookup.times, [0.0])
        self.advance_to(10)
        self.assertEqual(h.lookup.times, [0.0, 1.0, 2.5, 4.75, 8.125])
        self.assertIs(job.state, W)

    def test_phase1_success_connects(self) -> None:
        h = self.harness()
        h.lookup.answer(Presence.UNKNOWN, Presence.ABSENT, Presence.PRESENT)
        job = self.waiting(h)
        self.advance_to(2.5)
        self.assertEqual(h.lookup.times, [0.0, 1.0, 2.5])
        self.assertIs(job.state, C)
        self.assertEqual(h.restart.times, [2.5])

    def test_phase1_errors_count_as_unknown(self) -> None:
        h = self.harness()
        h.lookup.answer(OutboundError(FailureKind.TIMEOUT, "GetParticipant", "timeout"), Presence.PRESENT)
        job = self.waiting(h)
        self.clock.advance(1.0)
        self.assertIs(job.state, C)

    def test_phase1_gives_up_silently_within_budget(self) -> None:
        h = self.harness(lookup=Presence.ABSENT)
        job = self.waiting(h, timeout_s=2)
        self.advance_to(1.999)
        self.assertEqual(h.lookup.times, [0.0, 1.0])  # 1.0 + 1.5 > 2: stop
        self.assertIs(job.state, W)
        self.assertEqual(self.delayed_times(), [2.0])  # only the waiting timer is left
        self.advance_to(2.0)
        self.assertIs(job.state, D)

    def test_phase1_budget_capped_at_one_hour(self) -> None:
        h = self.harness(lookup=Presence.ABSENT)
        self.waiting(h, timeout_s=3 * 3600)
        self.advance_to(3 * 3600 - 1)
        self.assertLessEqual(h.lookup.times[-1], 3600.0)
        self.assertGreater(h.lookup.times[-1], 3600.0 - 60)

    def test_phase1_late_success_after_webhook_is_ignored_but_starts_phase2(self) -> None:
        h = self.harness(sanity_interval=5)
        h.lookup.answer(PENDING)
        job = self.waiting(h)
        job.signal(Signal.ParticipantConnected)
        self.clock.advance(1)
        h.lookup.pending[0].callback(Presence.PRESENT)
        self.assertIs(job.state, C)
        self.assertEqual(h.restart.times, [0.0])  # no second connect
        self.assertIn(6.0, self.delayed_times())  # sanity check one interval later

    def test_phase2_sanity_check(self) -> None:
        h = self.harness(sanity_interval=5, send=PENDING)
        h.lookup.answer(Presence.PRESENT, Presence.PRESENT, Presence.UNKNOWN,
                        OutboundError(FailureKind.OTHER, "x", "y"), Presence.ABSENT)
        job = self.job(h, timeout_s=60)
        self.assertIs(job.state, C)
        self.advance_to(4.999)
        self.assertEqual(h.lookup.times, [0.0])
        self.advance_to(5.0)
        self.assertEqual(h.lookup.times, [0.0, 5.0])
        self.advance_to(19.999)
        self.assertIs(job.state, C)
        self.advance_to(20.0)
        self.assertEqual(h.lookup.times, [0.0, 5.0, 10.0, 15.0, 20.0])
        self.assertIs(job.state, D)
        self.assertEqual(h.send.times, [20.0])
        self.assertEqual(len(self.flushLoggedErrors(OutboundError)), 1)
        self.advance_to(200.0)
        self.assertEqual(len(h.lookup.times), 5)  # gone was emitted once; checking stopped

    def test_phase2_absent_emits_gone_once(self) -> None:
        handled: List[Signal] = []

        class RecordingJob(DelayedLeaveJob):
            def _dispatch(self, signal: Signal) -> None:
                handled.append(signal)
                super()._dispatch(signal)

        h = self.harness(sanity_interval=1, lookup=Presence.ABSENT, send=PENDING)
        h.lookup.answer(Presence.PRESENT)
        job = RecordingJob(params(), h.env)
        self.jobs.append(job)
        job.start()
        self.advance_to(9.0)
        self.assertEqual(handled.count(Signal.SFUParticipantGone), 1)
        self.assertEqual(h.lookup.times, [0.0, 1.0])

    def test_phase2_off_when_interval_zero(self) -> None:
        h = self.harness(lookup=Presence.PRESENT)
        job = self.job(h)
        self.assertIs(job.state, C)
        self.assertEqual(self.delayed_times(), [8.0])  # restart timer only
        self.assertEqual(h.lookup.times, [0.0])


class CancelTests(JobTestCase):
    def assertQuiet(self, h: Harness) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])
        counts = (len(h.restart.times), len(h.send.times), len(h.lookup.times), len(h.done))
        self.clock.advance(10_000)
        self.assertEqual(
            (len(h.restart.times), len(h.send.times), len(h.lookup.times), len(h.done)), counts
        )

    def test_cancel_waiting_with_lookup_backoff(self) -> None:
        h = self.harness(lookup=Presence.ABSENT)
        job = self.waiting(h)
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        job.cancel()
        self.assertQuiet(h)

    def test_cancel_connected_with_restart_and_sanity_timers(self) -> None:
        h = self.harness(lookup=Presence.PRESENT, sanity_interval=3)
        job = self.job(h)
        self.assertEqual(self.delayed_times(), [3.0, 8.0])
        job.cancel()
        self.assertQuiet(h)

    def test_cancel_during_restart_backoff(self) -> None:
        h = self.harness(restart=BUSY)
        job = self.connected(h)
        job.cancel()
        self.assertQuiet(h)

    def test_cancel_during_in_flight_sanity_check(self) -> None:
        h = self.harness(sanity_interval=1)
        h.lookup.answer(Presence.PRESENT, PENDING)
        job = self.job(h)
        self.advance_to(1.0)
        job.cancel()
        h.lookup.pending[0].callback(Presence.ABSENT)
        self.assertIs(job.state, C)
        self.assertQuiet(h)

    def test_replaced_job_ignores_late_restart_success(self) -> None:
        h = self.harness()
        h.restart.answer(PENDING)
        job = self.connected(h)
        job.signal(Signal.JobReplaced)
        job.cancel()
        h.restart.pending[0].callback(OK)
        self.assertEqual(h.restarted, [])
        self.assertQuiet(h)

    def test_done_job_leaves_no_delayed_calls(self) -> None:
        h = self.harness(lookup=Presence.ABSENT, sanity_interval=1, send=GONE)
        job = self.connected(h)
        job.signal(Signal.ParticipantConnectionAborted)
        self.assertTrue(job.cancelled)
        self.assertQuiet(h)


class MemoryTests(SynchronousTestCase):
    def test_jobs_have_no_instance_dict(self) -> None:
        h = Harness(Clock())
        job = DelayedLeaveJob(params(), h.env)
        self.assertFalse(hasattr(job, "__dict__"))
