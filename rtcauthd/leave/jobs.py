"""One delegated MatrixRTC leave (MSC4140) as an explicit, event-driven state machine.

Behaviour must match upstream's FSM exactly (docs/delegated-leave.md#job-state-machine): which disconnects send the
leave, which abort silently, when ``restart`` is called. So the transition table, the
internal actions and the entry/exit actions are plain data (:mod:`rtcauthd.leave.machine`,
where the table is drawn), and :meth:`DelayedLeaveJob._dispatch` is the only code that
changes ``state``. Timers, failed restarts and lookups re-enter the
machine by raising a :class:`Signal`, handled one at a time in arrival order. Two paths act
without a signal because they change no state: a successful ``restart`` re-arms the restart
timer and reports ``restarted`` to the manager, and a finished ``send`` reports ``done``;
:meth:`DelayedLeaveJob.cancel` stops everything from outside.
"""

from __future__ import annotations

import base64
import random as _random
import secrets
import struct
from typing import Callable, Optional, Tuple, Union

import attr
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from rtcauthd.matrix.delayed_events import CsApiUnresolvable, Outcome, OutcomeKind
from rtcauthd.leave.machine import (
    ENTRY_ACTIONS,
    EXIT_ACTIONS,
    INTERNAL_ACTIONS,
    TRANSITIONS,
    Signal,
    State,
)
from rtcauthd.leave.record import NS_PER_SECOND, JobParams, go_duration
from rtcauthd.livekit.presence import Presence
from rtcauthd.leave.retry import RetryLoop

log = Logger()

MAX_WAIT_NS = 3600 * NS_PER_SECOND  # MSC4354 sticky-event lifetime bounds every window
MIN_SEND_WINDOW = 1.0
MAX_SEND_WINDOW = 3600.0


@attr.s(frozen=True, slots=True, auto_attribs=True)
class JobEnvironment:
    """Everything a job talks to; one instance is shared by all jobs of a manager.

    ``restart``/``send`` make ONE HTTP attempt each (CS-API resolution included) and answer
    an :class:`Outcome`, failing with :class:`CsApiUnresolvable` when the homeserver's
    client-server API cannot be found. ``lookup_participant`` answers a :class:`Presence`.
    ``restarted(job, at)`` persists RestartedAt; ``done(job)`` retires the job.
    """

    clock: IReactorTime
    restart: Callable[[JobParams], "Deferred[Outcome]"]
    send: Callable[[JobParams], "Deferred[Outcome]"]
    lookup_participant: Callable[[JobParams], "Deferred[Presence]"]
    restarted: Callable[["DelayedLeaveJob", float], None]
    done: Callable[["DelayedLeaveJob"], None]
    random: Callable[[], float] = _random.random
    sanity_interval: float = 0.0


def new_job_id(now: float) -> str:
    """26-char base32hex log ID: 8-byte µs timestamp + 8 random bytes (never persisted)."""
    raw = struct.pack(">Q", max(int(now * 1_000_000), 0) & (2**64 - 1)) + secrets.token_bytes(8)
    return base64.b32hexencode(raw).decode("ascii").rstrip("=")


def _send_succeeded(outcome: Outcome) -> bool:
    # 404 on send: the event was already sent or cancelled — nothing left to do.
    return outcome.kind is OutcomeKind.OK or outcome.kind is OutcomeKind.NOT_FOUND


def _restart_is_permanent(outcome: Outcome) -> bool:
    # 409: finalised (cancelled or sent) — no later attempt can restart it either.
    return outcome.kind is OutcomeKind.NOT_FOUND or outcome.kind is OutcomeKind.CONFLICT


def _send_is_permanent(outcome: Outcome) -> bool:
    # 409 on send: cancelled meanwhile; retrying cannot send it.
    return outcome.kind is OutcomeKind.CONFLICT


def _presence_outcome(presence: Presence) -> Outcome:
    if presence is Presence.PRESENT:
        return Outcome.ok()
    return Outcome.retry(detail=str(getattr(presence, "name", presence)))


class DelayedLeaveJob:
    """The state machine (docs/delegated-leave.md#job-state-machine) for one (room, identity)."""

    __slots__ = (
        "params",
        "job_id",
        "state",
        "_env",
        "_restart_deadline",
        "_waiting_timer",
        "_restart_timer",
        "_sanity_timer",
        "_lookup_retry",
        "_restart_retry",
        "_send_retry",
        "_queue",
        "_cancelled",
        "__weakref__",
    )

    def __init__(self, params: JobParams, env: JobEnvironment, *, job_id: Optional[str] = None) -> None:
        if params.delay_timeout_ns <= 0:
            # The message is the Go duration text upstream puts after
            # "invalid delay timeout for delayed event job: ".
            raise ValueError(go_duration(params.delay_timeout_ns))
        self.params = params
        self._env = env
        self.job_id = job_id if job_id is not None else new_job_id(env.clock.seconds())
        self.state = State.WaitingForInitialConnect
        self._restart_deadline: Optional[float] = None
        self._waiting_timer: Optional[IDelayedCall] = None
        self._restart_timer: Optional[IDelayedCall] = None
        self._sanity_timer: Optional[IDelayedCall] = None
        self._lookup_retry: Optional[RetryLoop] = None
        self._restart_retry: Optional[RetryLoop] = None
        self._send_retry: Optional[RetryLoop] = None
        # None when idle; a list while signals are being handled (later ones queue there).
        self._queue: Optional[list] = None
        self._cancelled = False

    def __repr__(self) -> str:
        return f"<DelayedLeaveJob {self.job_id} {self.state.value} room={self.params.room!r}>"

    @property
    def key(self) -> Tuple[str, str]:
        return self.params.key

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def restart_deadline(self) -> Optional[float]:
        """Clock time at which the homeserver would fire the event itself (None before connect)."""
        return self._restart_deadline

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Arm the waiting timer and start the participant lookup (first query now)."""
        if self._cancelled:
            return
        clock = self._env.clock
        wait_ns = min(MAX_WAIT_NS, self.params.delay_timeout_ns)
        self._waiting_timer = clock.callLater(wait_ns / NS_PER_SECOND, self._waiting_timer_fired)
        self._start_lookup()

    def cancel(self) -> None:
        """Stop for good (replacement, retirement, shutdown): no timer, retry or lookup acts again.

        An HTTP attempt already in flight may still complete; its result is ignored.
        """
        if self._cancelled:
            return
        self._cancelled = True
        self._queue = None
        for timer in (self._waiting_timer, self._restart_timer, self._sanity_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._waiting_timer = self._restart_timer = self._sanity_timer = None
        retries = (self._lookup_retry, self._restart_retry, self._send_retry)
        self._lookup_retry = self._restart_retry = self._send_retry = None
        for loop in retries:
            if loop is not None:
                loop.cancel()

    # -- dispatch ----------------------------------------------------------------------

    def signal(self, signal: Signal) -> None:
        """Feed one event; handled now, or after the one currently being handled."""
        if self._cancelled:
            log.debug(
                "Job {job_id}: ignoring {signal} after cancellation",
                job_id=self.job_id,
                signal=signal.value,
            )
            return
        if self._queue is not None:
            self._queue.append(signal)
            return
        queue = self._queue = [signal]
        try:
            while queue and not self._cancelled:
                self._dispatch(queue.pop(0))
        finally:
            if self._queue is queue:
                self._queue = None

    def _dispatch(self, signal: Signal) -> None:
        state = self.state
        action = INTERNAL_ACTIONS.get((state, signal))
        if action is not None:
            log.debug(
                "Job {job_id}: {signal} in {state}: internal action {action}",
                job_id=self.job_id,
                signal=signal.value,
                state=state.value,
                action=action,
            )
            getattr(self, action)()
            return
        target = TRANSITIONS.get((state, signal))
        if target is None:
            log.debug(
                "Job {job_id}: ignoring {signal} in {state}",
                job_id=self.job_id,
                signal=signal.value,
                state=state.value,
            )
            return
        log.info(
            "Job {job_id} for {room}/{identity}: {old} -> {new} on {signal}",
            job_id=self.job_id,
            room=self.params.room,
            identity=self.params.identity,
            old=state.value,
            new=target.value,
            signal=signal.value,
        )
        exit_action = EXIT_ACTIONS.get(state)
        if exit_action is not None:
            getattr(self, exit_action)()
        self.state = target
        entry_action = ENTRY_ACTIONS.get(target)
        if entry_action is not None:
            getattr(self, entry_action)()

    # -- entry / exit actions ------------------------------------------------------------

    def _enter_connected(self) -> None:
        # The client may have scheduled the event any time ago: restart right away.
        self._restart_deadline = self._env.clock.seconds() + self._timeout_seconds()
        self.signal(Signal.DelayedEventReset)

    def _enter_disconnected(self) -> None:
        self._start_send()

    def _enter_aborted(self) -> None:
        self._env.done(self)

    def _exit_waiting(self) -> None:
        timer, self._waiting_timer = self._waiting_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _exit_connected(self) -> None:
        timer, self._restart_timer = self._restart_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    # -- timers --------------------------------------------------------------------------

    def _timeout_seconds(self) -> float:
        return self.params.delay_timeout_ns / NS_PER_SECOND

    def _waiting_timer_fired(self) -> None:
        self._waiting_timer = None
        self.signal(Signal.WaitingStateTimedOut)

    def _restart_timer_fired(self) -> None:
        self._restart_timer = None
        self.signal(Signal.DelayedEventReset)

    # -- restart procedure (docs/delegated-leave.md#restart-procedure) ---------------------------------------------------------

    def _start_restart(self) -> None:
        if self._restart_retry is not None:
            log.debug("Job {job_id}: restart already in flight", job_id=self.job_id)
            return
        assert self._restart_deadline is not None
        remaining = self._restart_deadline - self._env.clock.seconds()
        if remaining <= 0:
            self.signal(Signal.DelayedEventTimedOut)
            return
        self._restart_retry = RetryLoop(
            self._env.clock,
            self._call_restart,
            remaining,
            self._restart_done,
            random=self._env.random,
            is_permanent=_restart_is_permanent,
            permanent_errors=(CsApiUnresolvable,),
        )
        self._restart_retry.start()

    def _call_restart(self) -> "Deferred[Outcome]":
        return maybeDeferred(self._env.restart, self.params)

    def _restart_done(self, outcome: Union[Outcome, Failure]) -> None:
        self._restart_retry = None
        if self._cancelled:
            return
        if isinstance(outcome, Failure):
            self._restart_failed(outcome)
        elif outcome.kind is OutcomeKind.OK:
            at = self._env.clock.seconds()
            self._env.restarted(self, at)
            if self._cancelled or self.state is not State.Connected:
                return  # late success: persisted, but no longer drives any timer
            self._restart_deadline = at + self._timeout_seconds()
            if self._restart_timer is not None and self._restart_timer.active():
                self._restart_timer.cancel()
            delay_ns = self.params.delay_timeout_ns * 8 // 10
            self._restart_timer = self._env.clock.callLater(
                delay_ns / NS_PER_SECOND, self._restart_timer_fired
            )
        elif outcome.kind is OutcomeKind.NOT_FOUND:
            log.info(
                "Job {job_id}: homeserver no longer knows the delayed event", job_id=self.job_id
            )
            self.signal(Signal.DelayedEventNotFound)
        elif outcome.kind is OutcomeKind.CONFLICT:
            log.info(
                "Job {job_id}: the delayed event is already finalised (409)", job_id=self.job_id
            )
            self.signal(Signal.DelayedEventNotFound)
        else:
            log.warn(
                "Job {job_id}: restarting the delayed event failed: {detail}",
                job_id=self.job_id,
                detail=outcome.detail,
            )
            self.signal(Signal.DelayedEventTimedOut)

    def _restart_failed(self, failure: Failure) -> None:
        if failure.check(CsApiUnresolvable):
            log.warn(
                "Job {job_id}: cannot resolve the client-server API of {server_name}",
                job_id=self.job_id,
                server_name=self.params.server_name,
            )
            self.signal(Signal.CsApiUrlNotFound)
            return
        log.failure("Job {job_id}: restart failed", failure, job_id=self.job_id)
        self.signal(Signal.DelayedEventTimedOut)

    # -- send procedure (docs/delegated-leave.md#send-procedure) -----------------------------------------------------------

    def _send_window(self) -> float:
        if self._restart_deadline is None:
            return MIN_SEND_WINDOW
        left = self._restart_deadline - self._env.clock.seconds()
        return min(max(left, MIN_SEND_WINDOW), MAX_SEND_WINDOW)

    def _start_send(self) -> None:
        self._send_retry = RetryLoop(
            self._env.clock,
            self._call_send,
            self._send_window(),
            self._send_done,
            random=self._env.random,
            is_success=_send_succeeded,
            is_permanent=_send_is_permanent,
            permanent_errors=(CsApiUnresolvable,),
        )
        self._send_retry.start()

    def _call_send(self) -> "Deferred[Outcome]":
        return maybeDeferred(self._env.send, self.params)

    def _send_done(self, outcome: Union[Outcome, Failure]) -> None:
        self._send_retry = None
        if self._cancelled:
            return
        if isinstance(outcome, Failure):
            self._send_failed(outcome)
        elif outcome.kind is OutcomeKind.OK:
            log.info("Job {job_id}: leave event sent", job_id=self.job_id)
        elif outcome.kind is OutcomeKind.NOT_FOUND:
            log.info("Job {job_id}: leave event was already sent or cancelled", job_id=self.job_id)
        elif outcome.kind is OutcomeKind.CONFLICT:
            log.info(
                "Job {job_id}: leave event not sent, it was cancelled (409)", job_id=self.job_id
            )
        else:
            log.warn(
                "Job {job_id}: giving up sending the leave event: {detail}",
                job_id=self.job_id,
                detail=outcome.detail,
            )
        self._env.done(self)

    def _send_failed(self, failure: Failure) -> None:
        if failure.check(CsApiUnresolvable):
            log.warn(
                "Job {job_id}: cannot resolve the client-server API of {server_name}; "
                "leave event not sent",
                job_id=self.job_id,
                server_name=self.params.server_name,
            )
        else:
            log.failure("Job {job_id}: send failed", failure, job_id=self.job_id)

    # -- participant lookup (docs/delegated-leave.md#participant-lookup) -------------------------------------------------------

    def _start_lookup(self) -> None:
        budget = min(MAX_WAIT_NS, self.params.delay_timeout_ns) / NS_PER_SECOND
        self._lookup_retry = RetryLoop(
            self._env.clock, self._call_lookup, budget, self._lookup_done, random=self._env.random
        )
        self._lookup_retry.start()

    def _call_lookup(self) -> "Deferred[Outcome]":
        return maybeDeferred(self._env.lookup_participant, self.params).addCallback(
            _presence_outcome
        )

    def _lookup_done(self, outcome: Union[Outcome, Failure]) -> None:
        self._lookup_retry = None
        if self._cancelled:
            return
        if isinstance(outcome, Failure):  # cannot happen: no permanent errors here
            log.failure("Job {job_id}: participant lookup failed", outcome, job_id=self.job_id)
            return
        if outcome.kind is not OutcomeKind.OK:
            log.debug(
                "Job {job_id}: participant not seen on the SFU within the lookup window",
                job_id=self.job_id,
            )
            return
        self.signal(Signal.ParticipantLookupSuccessful)
        if not self._cancelled and self._env.sanity_interval > 0:
            self._arm_sanity_check()

    def _arm_sanity_check(self) -> None:
        self._sanity_timer = self._env.clock.callLater(
            self._env.sanity_interval, self._sanity_check
        )

    def _sanity_check(self) -> None:
        self._sanity_timer = None
        if self._cancelled:
            return
        maybeDeferred(self._env.lookup_participant, self.params).addCallbacks(
            self._sanity_answer, self._sanity_error
        )

    def _sanity_answer(self, presence: Presence) -> None:
        if self._cancelled:
            return
        if presence is Presence.ABSENT:
            log.info(
                "Job {job_id}: the SFU no longer knows {identity}",
                job_id=self.job_id,
                identity=self.params.identity,
            )
            self.signal(Signal.SFUParticipantGone)
            return
        if presence is not Presence.PRESENT:
            log.info("Job {job_id}: sanity check inconclusive", job_id=self.job_id)
        self._arm_sanity_check()

    def _sanity_error(self, failure: Failure) -> None:
        if self._cancelled:
            return
        log.failure("Job {job_id}: sanity check failed", failure, job_id=self.job_id)
        self._arm_sanity_check()
