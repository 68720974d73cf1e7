"""MemoryStore: the no-Redis backend keeps the IJobStore contract."""

from __future__ import annotations

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from rtcauthd.leave.record import JobParams
from rtcauthd.store.interface import IJobStore
from rtcauthd.store.memory import MemoryStore
from rtcauthd.store.model import StoredJob


def job(room: str = "room", identity: str = "id", delay_id: str = "d1") -> StoredJob:
    return StoredJob(JobParams(delay_id, 8_000_000_000, "example.com", room, identity), 1785000000.0)


class MemoryStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def messages(self) -> list[str]:
        return [e["log_format"] for e in self.events if e.get("log_namespace") == "rtcauthd.store.memory"]

    def test_provides_interface(self) -> None:
        store = MemoryStore()
        self.assertTrue(verifyObject(IJobStore, store))
        self.assertFalse(store.persistent)

    def test_warns_once_that_jobs_are_not_persistent(self) -> None:
        store = MemoryStore()
        store.put(job())
        store.delete("room", "id")
        self.successResultOf(store.load_all())
        self.assertEqual(
            self.messages(),
            ["LIVEKIT_REDIS_URL not set; jobs are kept in memory only and are lost on restart"],
        )

    def test_put_then_load(self) -> None:
        store = MemoryStore()
        self.assertIsNone(self.successResultOf(store.put(job())))
        self.assertEqual(self.successResultOf(store.load_all()), [job()])

    def test_latest_put_per_key_wins(self) -> None:
        store = MemoryStore()
        store.put(job(delay_id="old"))
        store.put(job(delay_id="new"))
        store.put(job(identity="other"))
        loaded = self.successResultOf(store.load_all())
        self.assertEqual(sorted(j.params.delay_id + "/" + j.params.identity for j in loaded), ["d1/other", "new/id"])

    def test_delete_removes_only_that_key(self) -> None:
        store = MemoryStore()
        store.put(job())
        store.put(job(identity="other"))
        self.assertIsNone(self.successResultOf(store.delete("room", "id")))
        self.assertEqual(self.successResultOf(store.load_all()), [job(identity="other")])

    def test_delete_of_unknown_key_is_fine(self) -> None:
        store = MemoryStore()
        self.assertIsNone(self.successResultOf(store.delete("nope", "nope")))
        self.assertEqual(self.successResultOf(store.load_all()), [])

    def test_load_all_never_calls_on_late(self) -> None:
        store = MemoryStore()
        late: list = []
        self.assertEqual(self.successResultOf(store.load_all(late.append)), [])
        self.assertEqual(late, [])

    def test_load_all_returns_a_snapshot(self) -> None:
        store = MemoryStore()
        store.put(job())
        loaded = self.successResultOf(store.load_all())
        store.delete("room", "id")
        self.assertEqual(loaded, [job()])

    def test_close(self) -> None:
        self.assertIsNone(self.successResultOf(MemoryStore().close()))
