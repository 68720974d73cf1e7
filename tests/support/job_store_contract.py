"""What every :class:`~rtcauthd.store.interface.IJobStore` must do, whatever its backend.

Mix :class:`JobStoreContract` into a trial ``TestCase`` and give it ``make_store`` and
``persistent``; the memory store runs it in ``tests.unit``, the Redis store against a real
redis-server in ``tests.integration``. Every job is built by :func:`make_job`, so a change
of the job record is adapted here, in one place.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import gatherResults, inlineCallbacks
from zope.interface.verify import verifyObject

from rtcauthd.store.interface import Claim, IJobStore
from rtcauthd.leave.record import JobParams
from rtcauthd.store.model import StoredJob

#: a time with an exact binary fraction, so every backend can round-trip it
RESTARTED_AT = 1785000000.5


def make_job(
    room: str = "room",
    identity: str = "@alice:example.com:DEVICE",
    delay_id: str = "syd_1",
    *,
    server_name: str = "example.com",
    delay_timeout_ns: int = 8_000_000_000,
    restarted_at: float = RESTARTED_AT,
    owner_user_id: str | None = None,
) -> StoredJob:
    return StoredJob(
        JobParams(delay_id, delay_timeout_ns, server_name, room, identity, owner_user_id), restarted_at
    )


def by_key(jobs: list[StoredJob]) -> dict[tuple[str, str], StoredJob]:
    return {j.key: j for j in jobs}


class JobStoreContract:
    """The tests; subclasses set ``persistent`` and define ``make_store``."""

    #: what the store under test must say in its ``persistent`` attribute
    persistent: bool

    def make_store(self) -> Any:
        """A new store on this test's backend (the same backend on every call)."""
        raise NotImplementedError

    def open_store(self) -> Any:
        store = self.make_store()
        self.addCleanup(store.close)  # type: ignore[attr-defined]
        return store

    def test_provides_the_interface(self) -> None:
        store = self.open_store()
        self.assertTrue(verifyObject(IJobStore, store))
        self.assertIs(store.persistent, self.persistent)

    @inlineCallbacks
    def test_a_new_backend_has_no_jobs(self):
        loaded = yield self.open_store().load_all()
        self.assertEqual(loaded, [])

    @inlineCallbacks
    def test_put_fires_with_none_and_the_job_loads_back_equal(self):
        store = self.open_store()
        result = yield store.put(make_job())
        self.assertIsNone(result)
        loaded = yield store.load_all()
        self.assertEqual(loaded, [make_job()])

    @inlineCallbacks
    def test_put_replaces_every_field_of_the_same_key(self):
        store = self.open_store()
        yield store.put(make_job())
        newer = make_job(
            delay_id="syd_2", server_name="matrix.org", delay_timeout_ns=30_000_000_000, restarted_at=RESTARTED_AT + 60
        )
        yield store.put(newer)
        loaded = yield store.load_all()
        self.assertEqual(loaded, [newer])

    @inlineCallbacks
    def test_the_owner_loads_back_and_a_new_put_can_drop_it(self):
        store = self.open_store()
        owned = make_job(owner_user_id="@alice:example.com")
        yield store.put(owned)
        loaded = yield store.load_all()
        self.assertEqual(loaded, [owned])
        self.assertEqual(loaded[0].params.owner_user_id, "@alice:example.com")
        yield store.put(make_job())
        loaded = yield store.load_all()
        self.assertEqual(loaded, [make_job()])
        self.assertIsNone(loaded[0].params.owner_user_id)

    @inlineCallbacks
    def test_the_key_is_room_and_identity_together(self):
        store = self.open_store()
        jobs = [
            make_job(room="r1", identity="i1", delay_id="a"),
            make_job(room="r1", identity="i2", delay_id="b"),
            make_job(room="r2", identity="i1", delay_id="c"),
        ]
        for job in jobs:
            yield store.put(job)
        loaded = yield store.load_all()
        self.assertEqual(by_key(loaded), by_key(jobs))
        self.assertEqual(len(loaded), 3)

    @inlineCallbacks
    def test_delete_removes_only_that_key(self):
        store = self.open_store()
        yield store.put(make_job(room="r1"))
        yield store.put(make_job(room="r2"))
        result = yield store.delete("r1", make_job().params.identity)
        self.assertIsNone(result)
        loaded = yield store.load_all()
        self.assertEqual(loaded, [make_job(room="r2")])

    @inlineCallbacks
    def test_delete_of_a_missing_key_fires_with_none(self):
        store = self.open_store()
        yield store.put(make_job())
        result = yield store.delete("no-such-room", "nobody")
        self.assertIsNone(result)
        result = yield store.delete(make_job().params.room, "nobody")  # same room, other identity
        self.assertIsNone(result)
        loaded = yield store.load_all()
        self.assertEqual(loaded, [make_job()])

    @inlineCallbacks
    def test_put_after_delete_stores_again(self):
        store = self.open_store()
        yield store.put(make_job())
        yield store.delete(*make_job().key)
        yield store.put(make_job(delay_id="syd_again"))
        loaded = yield store.load_all()
        self.assertEqual(loaded, [make_job(delay_id="syd_again")])

    @inlineCallbacks
    def test_the_latest_of_calls_made_without_waiting_wins(self):
        store = self.open_store()
        key = make_job().key
        calls = [
            store.put(make_job(delay_id="first")),
            store.put(make_job(room="other")),
            store.put(make_job(delay_id="second")),
            store.delete(*key),
            store.put(make_job(delay_id="third")),
            store.put(make_job(room="gone")),
            store.delete("gone", make_job().params.identity),
        ]
        results = yield gatherResults(calls)
        self.assertEqual(results, [None] * len(calls))
        loaded = yield store.load_all()
        self.assertEqual(by_key(loaded), by_key([make_job(delay_id="third"), make_job(room="other")]))
        self.assertEqual(len(loaded), 2)

    @inlineCallbacks
    def test_keys_with_characters_that_need_escaping_round_trip(self):
        store = self.open_store()
        jobs = [
            make_job(room='<r&r> "q" \\ /', identity="é\u2028\u2029\x00", delay_id="a"),
            make_job(room="", identity="", delay_id="b"),
            make_job(room="😀", identity="@bob:例え.jp:DEV", delay_id="c"),
        ]
        for job in jobs:
            yield store.put(job)
        loaded = yield store.load_all()
        self.assertEqual(by_key(loaded), by_key(jobs))
        for job in jobs:
            yield store.delete(*job.key)
        loaded = yield store.load_all()
        self.assertEqual(loaded, [])

    @inlineCallbacks
    def test_many_jobs_all_load(self):
        store = self.open_store()
        jobs = [make_job(room=f"room-{n}", delay_id=f"syd_{n}") for n in range(200)]
        yield gatherResults([store.put(job) for job in jobs])
        loaded = yield store.load_all()
        self.assertEqual(by_key(loaded), by_key(jobs))
        self.assertEqual(len(loaded), len(jobs))

    @inlineCallbacks
    def test_load_all_returns_a_list_that_later_changes_leave_alone(self):
        store = self.open_store()
        yield store.put(make_job())
        loaded = yield store.load_all()
        yield store.delete(*make_job().key)
        yield store.put(make_job(room="later"))
        self.assertIsInstance(loaded, list)
        self.assertEqual(loaded, [make_job()])

    @inlineCallbacks
    def test_load_all_does_not_consume(self):
        store = self.open_store()
        yield store.put(make_job())
        first = yield store.load_all()
        second = yield store.load_all()
        self.assertEqual(first, second)
        self.assertEqual(second, [make_job()])

    @inlineCallbacks
    def test_on_late_is_not_called_when_the_backend_answers(self):
        store = self.open_store()
        yield store.put(make_job())
        late: list = []
        loaded = yield store.load_all(on_late=late.append)
        self.assertEqual(loaded, [make_job()])
        yield store.put(make_job(room="after"))
        yield store.delete(*make_job().key)
        self.assertEqual(late, [])

    @inlineCallbacks
    def test_close_fires_with_none(self):
        store = self.make_store()
        yield store.put(make_job())
        result = yield store.close()
        self.assertIsNone(result)

    @inlineCallbacks
    def test_a_new_store_sees_the_jobs_only_if_persistent(self):
        first = self.make_store()
        yield first.put(make_job())
        yield first.put(make_job(room="deleted"))
        yield first.delete("deleted", make_job().params.identity)
        yield first.close()
        loaded = yield self.open_store().load_all()
        self.assertEqual(loaded, [make_job()] if self.persistent else [])

    @inlineCallbacks
    def test_register_stores_like_put(self):
        store = self.open_store()
        result = yield store.register(make_job())
        self.assertIsNone(result)
        loaded = yield store.load_all()
        self.assertEqual(loaded, [make_job()])

    @inlineCallbacks
    def test_a_granted_send_claim_has_removed_the_record(self):
        store = self.open_store()
        yield store.register(make_job())
        yield store.register(make_job(room="other"))
        claim = yield store.claim_send(*make_job().key)
        self.assertIs(claim, Claim.GRANTED)
        loaded = yield store.load_all()
        self.assertEqual(loaded, [make_job(room="other")])

    @inlineCallbacks
    def test_forwarding_a_signal_for_no_job_answers_none(self):
        store = self.open_store()
        store.set_listener(object())
        result = yield store.forward("room", "nobody", "ParticipantConnected")
        self.assertEqual(result, "none")
