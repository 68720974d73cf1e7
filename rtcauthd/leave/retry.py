"""The retry policy of docs/delegated-leave.md#retry-policy, driven only by the injected clock.

Upstream uses cenkalti/backoff v5 (initial 1 s, ×1.5, jitter ±50 %, cap 60 s, budget =
maximum elapsed time). The timing is part of the observable behaviour (how many
``restart``/``send`` requests a homeserver sees, and when), so it is reproduced exactly:
a retry is abandoned *before* sleeping when elapsed + next wait would exceed the budget,
and a server retry-after hint replaces the wait and resets the interval to 1 s.
"""

from __future__ import annotations

import random as _random
from typing import Callable, Optional, Tuple, Type, Union

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from rtcauthd.outbound.errors import OutboundError, describe
from rtcauthd.matrix.delayed_events import Outcome, OutcomeKind

log = Logger()

INITIAL_INTERVAL = 1.0
MULTIPLIER = 1.5
RANDOMIZATION_FACTOR = 0.5
MAX_INTERVAL = 60.0


def _is_ok(outcome: Outcome) -> bool:
    return outcome.kind is OutcomeKind.OK


def _never(outcome: Outcome) -> bool:
    return False


def next_interval(current: float) -> float:
    """The un-jittered interval that follows ``current`` (grows ×1.5, capped at 60 s)."""
    return MAX_INTERVAL if current >= MAX_INTERVAL / MULTIPLIER else current * MULTIPLIER


def jittered(current: float, rnd: float) -> float:
    """uniform(current × 0.5, current × 1.5) given ``rnd`` in [0, 1)."""
    delta = RANDOMIZATION_FACTOR * current
    return (current - delta) + rnd * (2 * delta)


class RetryLoop:
    """One running retry loop, reporting once to ``on_done`` with an Outcome or a Failure.

    A callback rather than a Deferred because every idle delegated-leave job holds one of
    these (the participant lookup) and a Deferred with its callback chain costs several
    hundred bytes; :func:`retry_with_backoff` is the Deferred-returning wrapper.
    """

    __slots__ = (
        "_clock",
        "_attempt",
        "_budget",
        "_random",
        "_is_success",
        "_is_permanent",
        "_permanent_errors",
        "_on_done",
        "_start",
        "_current",
        "_timer",
        "_finished",
    )

    def __init__(
        self,
        clock: IReactorTime,
        attempt: Callable[[], "Deferred[Outcome]"],
        budget: float,
        on_done: Callable[[Union[Outcome, Failure]], object],
        *,
        random: Callable[[], float] = _random.random,
        is_success: Callable[[Outcome], bool] = _is_ok,
        is_permanent: Callable[[Outcome], bool] = _never,
        permanent_errors: Tuple[Type[BaseException], ...] = (),
    ) -> None:
        self._clock = clock
        self._attempt = attempt
        self._budget = budget
        self._random = random
        self._is_success = is_success
        self._is_permanent = is_permanent
        self._permanent_errors = permanent_errors
        self._on_done: Optional[Callable[[Union[Outcome, Failure]], object]] = on_done
        self._start = clock.seconds()
        self._current = INITIAL_INTERVAL
        self._timer: Optional[IDelayedCall] = None
        self._finished = False

    @property
    def active(self) -> bool:
        return not self._finished

    def start(self) -> "RetryLoop":
        """Make the first attempt now (its answer may arrive synchronously)."""
        self._run_attempt()
        return self

    def cancel(self) -> None:
        """No further attempts and no pending sleep; ``on_done`` is never called.

        An attempt already in flight is left to finish on its own (its request may be on
        the wire); its answer is ignored.
        """
        self._finished = True
        self._on_done = None
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _run_attempt(self) -> None:
        self._timer = None
        if self._finished:
            return
        try:
            d = self._attempt()
        except Exception:
            d = fail()
        d.addCallbacks(self._answered, self._failed)

    def _answered(self, outcome: Outcome) -> None:
        if self._finished:
            return
        if self._is_success(outcome) or self._is_permanent(outcome):
            self._finish(outcome)
            return
        self._schedule(outcome)

    def _failed(self, failure: Failure) -> None:
        if self._finished:
            return
        if self._permanent_errors and failure.check(*self._permanent_errors):
            self._finish(failure)
            return
        if not failure.check(OutboundError):
            log.failure("Unexpected error from a retried call; treating it as transient", failure)
        self._schedule(Outcome.retry(detail=describe(failure)))

    def _schedule(self, last: Outcome) -> None:
        elapsed = self._clock.seconds() - self._start
        wait = jittered(self._current, self._random())
        self._current = next_interval(self._current)
        if last.retry_after is not None:
            wait = last.retry_after
            self._current = INITIAL_INTERVAL
        if elapsed + wait > self._budget:
            self._finish(last)  # give up now rather than sleep past the budget
            return
        self._timer = self._clock.callLater(wait, self._run_attempt)

    def _finish(self, result: Union[Outcome, Failure]) -> None:
        self._finished = True
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done(result)


def retry_with_backoff(
    clock: IReactorTime,
    attempt: Callable[[], "Deferred[Outcome]"],
    budget: float,
    *,
    random: Callable[[], float] = _random.random,
    is_success: Callable[[Outcome], bool] = _is_ok,
    is_permanent: Callable[[Outcome], bool] = _never,
    permanent_errors: Tuple[Type[BaseException], ...] = (),
) -> "Deferred[Outcome]":
    """Call ``attempt`` now and again under docs/delegated-leave.md#retry-policy until success, a permanent answer, or the budget.

    Fires with the successful or permanent Outcome, or — when the budget (seconds, counted
    from now) would be exceeded by the next wait — with the last transient Outcome.
    ``attempt`` failures of a ``permanent_errors`` type fail the result at once; any other
    failure counts as a transient error. Cancelling the result stops the loop: no further
    attempts, no pending timers (the Deferred then fails with CancelledError).
    """
    loop: Optional[RetryLoop] = None

    def cancel(_d: Deferred) -> None:
        if loop is not None:
            loop.cancel()

    result: Deferred = Deferred(cancel)

    def done(outcome: Union[Outcome, Failure]) -> None:
        if isinstance(outcome, Failure):
            result.errback(outcome)
        else:
            result.callback(outcome)

    loop = RetryLoop(
        clock,
        attempt,
        budget,
        done,
        random=random,
        is_success=is_success,
        is_permanent=is_permanent,
        permanent_errors=permanent_errors,
    )
    loop.start()
    return result
