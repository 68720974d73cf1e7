"""WriteQueue: latest operation per field wins, one write in flight per field, waiters fire once settled."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.store.write_queue import WriteQueue


class WriteQueueTests(SynchronousTestCase):
    def test_latest_operation_per_field_is_what_gets_sent(self) -> None:
        q = WriteQueue()
        q.record(b"f", b"old")
        v2 = q.record(b"f", None)
        q.record(b"g", b"other")
        self.assertEqual(len(q), 2)
        self.assertEqual(q.take(b"f"), (v2, None))
        self.assertEqual(sorted(q.fields()), [b"f", b"g"])

    def test_one_write_in_flight_per_field(self) -> None:
        q = WriteQueue()
        v1 = q.record(b"f", b"one")
        self.assertEqual(q.take(b"f"), (v1, b"one"))
        v2 = q.record(b"f", b"two")
        self.assertIsNone(q.take(b"f"))  # the first is still in flight
        q.settled(b"f", v1)
        self.assertEqual(len(q), 1)  # the newer version stays pending
        self.assertEqual(q.take(b"f"), (v2, b"two"))
        q.settled(b"f", v2)
        self.assertEqual(len(q), 0)
        self.assertIsNone(q.take(b"f"))

    def test_waiters_fire_once_their_version_or_a_newer_one_settled(self) -> None:
        q = WriteQueue()
        v1 = q.record(b"f", b"one")
        d1 = q.wait_for(b"f", v1)
        q.take(b"f")
        v2 = q.record(b"f", b"two")
        d2 = q.wait_for(b"f", v2)
        q.settled(b"f", v1)
        self.assertIsNone(self.successResultOf(d1))
        self.assertNoResult(d2)
        q.take(b"f")
        q.settled(b"f", v2)
        self.assertIsNone(self.successResultOf(d2))

    def test_a_failed_write_stays_pending_and_can_be_taken_again(self) -> None:
        q = WriteQueue()
        v1 = q.record(b"f", b"one")
        d = q.wait_for(b"f", v1)
        q.take(b"f")
        q.failed(b"f")
        self.assertNoResult(d)
        self.assertEqual(q.take(b"f"), (v1, b"one"))

    def test_release_all_fires_every_waiter_and_drain_watcher(self) -> None:
        q = WriteQueue()
        d = q.wait_for(b"f", q.record(b"f", b"one"))
        drained = q.when_drained()
        self.assertNoResult(drained)
        q.release_all()
        self.assertIsNone(self.successResultOf(d))
        self.assertIsNone(self.successResultOf(drained))
        self.assertEqual(len(q), 1)  # still pending: release_all only stops the waiting

    def test_drained_fires_when_nothing_is_pending(self) -> None:
        q = WriteQueue()
        self.assertIsNone(self.successResultOf(q.when_drained()))
        v = q.record(b"f", b"one")
        drained = q.when_drained()
        q.take(b"f")
        self.assertNoResult(drained)
        q.settled(b"f", v)
        self.assertIsNone(self.successResultOf(drained))


class NewestTests(SynchronousTestCase):
    def test_newest_is_the_latest_recorded_value_until_it_settles(self) -> None:
        q = WriteQueue()
        self.assertIsNone(q.newest(b"f"))
        v1 = q.record(b"f", ("register", b"1"))
        q.take(b"f")  # in flight: still the newest until it settles
        self.assertEqual(q.newest(b"f"), ("register", b"1"))
        q.record(b"f", ("restarted", b"2"))
        self.assertEqual(q.newest(b"f"), ("restarted", b"2"))
        q.settled(b"f", v1)
        self.assertEqual(q.newest(b"f"), ("restarted", b"2"))
