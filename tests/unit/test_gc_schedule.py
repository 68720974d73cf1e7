"""Full garbage collections from a timer: only when the counts call for one, at most one per interval."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.gc_schedule import FullCollectionSchedule


class FakeCollector:
    """The parts of ``gc`` the schedule uses, with counts the test sets."""

    def __init__(self) -> None:
        self.thresholds = (700, 10, 10)
        self.counts = [0, 0, 0]
        self.collected: list[int] = []

    def get_count(self):
        return tuple(self.counts)

    def get_threshold(self):
        return self.thresholds

    def set_threshold(self, *thresholds) -> None:
        self.thresholds = thresholds

    def collect(self, generation: int) -> int:
        self.collected.append(generation)
        for g in range(generation + 1):
            self.counts[g] = 0
        return 0


class FullCollectionScheduleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.gc = FakeCollector()
        self.schedule = FullCollectionSchedule(self.clock, collector=self.gc, min_interval=30, check_interval=1)
        self.schedule.start()
        self.addCleanup(self.schedule.stop)

    def test_python_keeps_its_young_collections_but_not_the_full_ones(self) -> None:
        young, middle, full = self.gc.thresholds
        self.assertEqual((young, middle), (700, 10))
        self.assertGreater(full, 10**6)
        self.schedule.stop()
        self.assertEqual(self.gc.thresholds, (700, 10, 10))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_nothing_is_collected_while_the_count_is_below_pythons_own_threshold(self) -> None:
        self.gc.counts = [5000, 50, 10]
        self.clock.pump([1] * 120)
        self.assertEqual(self.gc.collected, [])

    def test_at_most_one_full_collection_per_interval_under_a_flood(self) -> None:
        for _ in range(95):  # 95 s in which the count is always over the threshold
            self.gc.counts[2] = 11
            self.clock.advance(1)
        self.assertEqual(self.gc.collected, [2, 2, 2])  # at 30, 60 and 90 s
        self.assertEqual(self.schedule.collections, 3)

    def test_a_due_collection_waits_for_the_interval_then_runs(self) -> None:
        self.gc.counts[2] = 11
        self.clock.advance(29)
        self.assertEqual(self.gc.collected, [])
        self.clock.advance(1)
        self.assertEqual(self.gc.collected, [2])
