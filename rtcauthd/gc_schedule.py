"""Full garbage collections between reactor turns, at most one every 30 s.

Python runs a full (generation 2) collection whenever enough younger collections have
happened, which under a burst of requests means in the middle of handling it. A full
collection walks every tracked object — start-up's hundred thousand plus those of a few
thousand in-flight requests — and was the longest ``/healthz`` stall measured by
``bench/bench_abuse.py`` (100-160 ms on a loaded machine). So once serving, rtcauthd
freezes start-up's objects out of the collector's sight (``gc.freeze``), leaves Python's
small young-generation collections as they are, and runs the full ones itself: when the
counts call for one, only between reactor turns, and at most once per ``MIN_INTERVAL``.
Cyclic garbage that reached the oldest generation then lives up to 30 s longer.
(Synapse schedules its collections the same way, for the same reason.)
"""

from __future__ import annotations

import gc
from typing import Optional

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

#: How often the counts are looked at (seconds).
CHECK_INTERVAL = 1.0
#: The least time between two full collections (seconds).
MIN_INTERVAL = 30.0
#: A threshold Python's automatic full collection never reaches.
_NEVER = 2**30


class FullCollectionSchedule:
    """Runs generation-2 collections from a timer on ``clock`` instead of whenever Python would.

    ``collector`` is the ``gc`` module by default (a stand-in in tests); it needs
    ``get_count``, ``get_threshold``, ``set_threshold`` and ``collect``.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        collector=gc,
        min_interval: float = MIN_INTERVAL,
        check_interval: float = CHECK_INTERVAL,
    ) -> None:
        self._clock = clock
        self._gc = collector
        self._min_interval = min_interval
        self._check_interval = check_interval
        self._thresholds: Optional[tuple] = None
        self._last = clock.seconds()
        self._loop: Optional[LoopingCall] = None
        self.collections = 0

    def start(self) -> None:
        """Stop Python's automatic full collections and check the counts from the timer."""
        self._thresholds = tuple(self._gc.get_threshold())
        young, middle = self._thresholds[0], self._thresholds[1]
        self._gc.set_threshold(young, middle, _NEVER)
        self._loop = LoopingCall(self.check)
        self._loop.clock = self._clock
        self._loop.start(self._check_interval, now=False)

    def stop(self) -> None:
        """Back to Python's own schedule (on shutdown, and in tests)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._thresholds is not None:
            self._gc.set_threshold(*self._thresholds)
            self._thresholds = None

    def check(self) -> None:
        """A full collection if Python would have run one by now and the interval has passed."""
        if self._thresholds is None:
            return
        due = self._gc.get_count()[2] > self._thresholds[2]
        now = self._clock.seconds()
        if due and now - self._last >= self._min_interval:
            self._gc.collect(2)
            self._last = now
            self.collections += 1


def tune_for_serving(reactor) -> FullCollectionSchedule:
    """Once serving: freeze what start-up made, then schedule full collections until shutdown.

    Start-up objects (modules, settings, restored jobs) never become garbage, yet every
    full collection would walk them; ``gc.freeze`` (Python 3.7+) moves them out of sight.
    """
    gc.collect()
    gc.freeze()
    schedule = FullCollectionSchedule(reactor)
    schedule.start()
    reactor.addSystemEventTrigger("before", "shutdown", schedule.stop)
    return schedule
