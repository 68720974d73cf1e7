"""Membership enforcement's bookkeeping (docs/membership.md#tracking, docs/membership.md#redis-record):
the tracker, the Redis record, the stores and the monitor's webhook and start-up handling."""

from __future__ import annotations

import json

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.livekit.webhooks import WebhookEvent
from rtcauthd.membership.monitor import MembershipMonitor
from rtcauthd.membership.record import (
    PARTICIPANTS_KEY,
    Participant,
    ParticipantRecordError,
    decode_record,
    encode_field,
    encode_record,
)
from rtcauthd.membership.store import MemoryParticipantStore, RedisParticipantStore
from rtcauthd.membership.tracker import ParticipantTracker
from rtcauthd.store.redis_url import parse_redis_url

T0 = 1_785_000_000.0
TTL = 3600


class RecordingStore:
    """The tracker's store: records puts and deletes; ``load_all`` answers ``stored``."""

    def __init__(self, stored=()):
        self.ops = []
        self.stored = list(stored)
        self.flushes = 0
        self.closed = False

    def put(self, participant):
        self.ops.append(("put", participant))

    def delete(self, room, identity):
        self.ops.append(("delete", (room, identity)))

    def flush(self):
        self.flushes += 1

    def load_all(self):
        return succeed(self.stored)

    def close(self):
        self.closed = True
        return succeed(None)


def register(tracker, user="@alice:example.com", room="LK_ROOM", identity="ID_ALICE", matrix_room="!room:example.com"):
    return tracker.register(
        matrix_room_id=matrix_room, matrix_user_id=user, livekit_room=room, livekit_identity=identity
    )


class TrackerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = RecordingStore()
        self.tracker = ParticipantTracker(clock=self.clock, store=self.store, token_ttl=TTL)

    def test_a_minted_token_is_tracked_pending_and_stored(self):
        entry = register(self.tracker)
        self.assertFalse(entry.connected)
        self.assertEqual(self.tracker.pending(), [entry])
        self.assertEqual(self.tracker.connected_by_room(), {})
        self.assertEqual(self.store.ops, [("put", entry.participant)])
        self.assertEqual(entry.participant.registered_at, T0)

    def test_a_reissued_token_keeps_connected_and_refreshes_the_time(self):
        entry = register(self.tracker)
        self.tracker.joined("LK_ROOM", "ID_ALICE")
        self.clock.advance(100)
        again = register(self.tracker)
        self.assertIs(again, entry)
        self.assertTrue(entry.connected)
        self.assertEqual(entry.participant.registered_at, T0 + 100)
        self.assertEqual(len(self.tracker), 1)

    def test_webhooks_connect_and_forget(self):
        entry = register(self.tracker)
        self.assertIs(self.tracker.joined("LK_ROOM", "ID_ALICE"), entry)
        self.assertEqual(self.tracker.connected_by_room(), {"!room:example.com": [entry]})
        self.tracker.left("LK_ROOM", "ID_ALICE")
        self.assertIsNone(self.tracker.get("LK_ROOM", "ID_ALICE"))
        self.assertEqual(self.store.ops[-1], ("delete", ("LK_ROOM", "ID_ALICE")))

    def test_untracked_identities_are_ignored(self):
        self.assertIsNone(self.tracker.joined("LK_ROOM", "ID_NOBODY"))
        self.tracker.left("LK_ROOM", "ID_NOBODY")
        self.tracker.room_finished("LK_ROOM")
        self.assertEqual(self.store.ops, [])

    def test_room_finished_forgets_the_rooms_participants_only(self):
        a = register(self.tracker)
        b = register(self.tracker, user="@bob:example.com", identity="ID_BOB")
        other = register(self.tracker, room="LK_OTHER", identity="ID_CAROL")
        self.assertEqual(self.tracker.room_finished("LK_ROOM"), 2)
        self.assertEqual(list(self.tracker), [other])
        self.assertIn(("delete", a.key), self.store.ops)
        self.assertIn(("delete", b.key), self.store.ops)

    def test_a_removed_participant_is_kept_until_its_token_expires(self):
        entry = register(self.tracker)
        self.tracker.joined(*entry.key)
        self.tracker.mark_removed(entry)
        self.tracker.left(*entry.key)  # the SFU reports the removal
        self.tracker.room_finished("LK_ROOM")
        self.assertIs(self.tracker.get(*entry.key), entry)
        self.assertFalse(entry.connected)
        self.assertFalse(self.tracker.token_expired(entry))
        self.clock.advance(TTL + 1)
        self.assertTrue(self.tracker.token_expired(entry))
        # a new token (the user is a member again) ends the removal
        register(self.tracker)
        self.assertFalse(entry.removed)

    def test_recovered_entries_start_pending_and_never_replace_newer_ones(self):
        mine = register(self.tracker)
        stored_same = Participant("!room:example.com", "@alice:example.com", "LK_ROOM", "ID_ALICE", T0 - 500)
        stored_other = Participant("!room:example.com", "@bob:example.com", "LK_ROOM", "ID_BOB", T0 - 500)
        self.assertEqual(self.tracker.recover([stored_same, stored_other]), 1)
        self.assertIs(self.tracker.get("LK_ROOM", "ID_ALICE"), mine)
        self.assertFalse(self.tracker.get("LK_ROOM", "ID_BOB").connected)


class RecordTests(SynchronousTestCase):
    PARTICIPANT = Participant(
        matrix_room_id="!room:example.com",
        matrix_user_id="@alice:example.com",
        livekit_room="O8437W3+jmzMVjoIP3tNwbm+XxHQk2iKpOA7aqw3qSc",
        livekit_identity="M3VnsLXrkbxIDINXO64u8PZzFyD9ZYFiQULR2dshWYs",
        registered_at=1_764_584_130.5,
    )

    def test_value_format(self):
        self.assertEqual(
            encode_record(self.PARTICIPANT),
            '{"matrix_room_id":"!room:example.com","matrix_user_id":"@alice:example.com",'
            '"livekit_room":"O8437W3+jmzMVjoIP3tNwbm+XxHQk2iKpOA7aqw3qSc",'
            '"livekit_identity":"M3VnsLXrkbxIDINXO64u8PZzFyD9ZYFiQULR2dshWYs",'
            '"registered_at":"2025-12-01T10:15:30.5Z"}',
        )
        self.assertEqual(PARTICIPANTS_KEY, b"lk-jwt:participants")

    def test_field_is_the_job_field(self):
        self.assertEqual(encode_field("a<b", 'i"d'), '["a<b","i\\"d"]')

    def test_round_trip_and_other_writers(self):
        self.assertEqual(decode_record(encode_record(self.PARTICIPANT).encode()), self.PARTICIPANT)
        # upstream's chrono writes nanoseconds and may order members differently
        other = json.dumps({"registered_at": "2025-12-01T10:15:30.500000000Z", "livekit_identity": "I",
                            "livekit_room": "R", "matrix_user_id": "@u:x", "matrix_room_id": "!r:x", "extra": 1})
        self.assertEqual(decode_record(other), Participant("!r:x", "@u:x", "R", "I", 1_764_584_130.5))

    def test_unparsable_values(self):
        good = json.loads(encode_record(self.PARTICIPANT))
        bad = [b"\xff", "null", "[]", "{}", json.dumps({**good, "matrix_user_id": 5}),
               json.dumps({**good, "livekit_room": ""}), json.dumps({**good, "registered_at": "yesterday"})]
        for value in bad:
            self.assertRaises(ParticipantRecordError, decode_record, value)


class FakeRedis:
    """What RedisParticipantStore uses of a txredisapi connection; answers are Deferreds the test fires."""

    def __init__(self):
        self.commands = []
        self.hash = {}

    def hset(self, key, field, value):
        d = Deferred()
        self.commands.append(("hset", key, field, value, d))
        return d

    def hdel(self, key, fields):
        d = Deferred()
        self.commands.append(("hdel", key, fields[0], None, d))
        return d

    def hgetall(self, key):
        return succeed(dict(self.hash))

    def disconnect(self):
        return succeed(None)


class RedisStoreTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.redis = FakeRedis()
        self.store = RedisParticipantStore(parse_redis_url("redis://127.0.0.1:1"), clock=self.clock, _connection=self.redis)
        self.participant = RecordTests.PARTICIPANT

    def test_writes_and_deletes_the_hash(self):
        self.store.put(self.participant)
        op, key, field, value, d = self.redis.commands[0]
        self.assertEqual((op, key, field), ("hset", PARTICIPANTS_KEY, encode_field(*self.participant.key).encode()))
        self.assertEqual(value, encode_record(self.participant).encode())
        d.callback(1)
        self.store.delete(*self.participant.key)
        self.assertEqual(self.redis.commands[1][0], "hdel")

    def test_an_outage_keeps_the_latest_change_for_the_next_flush(self):
        self.store.put(self.participant)
        self.clock.advance(2.0)  # no answer: timed out
        self.assertEqual(self.store.pending_count, 1)
        self.store.delete(*self.participant.key)  # while down: queued, not sent
        self.assertEqual(len(self.redis.commands), 1)
        self.store.flush()
        self.assertEqual([c[0] for c in self.redis.commands], ["hset", "hdel"])
        self.redis.commands[1][4].callback(1)
        self.assertEqual(self.store.pending_count, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_load_skips_unparsable_records_and_fails_open(self):
        self.redis.hash = {b"f1": encode_record(self.participant).encode(), b"f2": b"{"}
        self.assertEqual(self.successResultOf(self.store.load_all()), [self.participant])
        self.redis.hgetall = lambda key: fail(ConnectionError("refused"))
        self.assertEqual(self.successResultOf(self.store.load_all()), [])

    def test_memory_store_keeps_nothing(self):
        memory = MemoryParticipantStore()
        memory.put(self.participant)
        self.assertEqual(self.successResultOf(memory.load_all()), [])


class FakeSweep:
    def __init__(self):
        self.ticks = 0
        self.checked = []

    def tick(self):
        self.ticks += 1

    def check_now(self, entry):
        self.checked.append(entry)


def event(kind, room="LK_ROOM", identity="ID_ALICE"):
    return WebhookEvent(event=kind, room_name=room, participant_identity=identity, disconnect_reason=0, id="EV")


class MonitorTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.sweep = FakeSweep()

    def monitor(self, stored=()):
        self.store = RecordingStore(stored)
        tracker = ParticipantTracker(clock=self.clock, store=self.store, token_ttl=TTL)
        return MembershipMonitor(clock=self.clock, tracker=tracker, sweep=self.sweep, store=self.store, interval=30)

    def test_joined_webhook_checks_at_once(self):
        monitor = self.monitor()
        monitor.register(matrix_room_id="!r:x", matrix_user_id="@alice:x", livekit_room="LK_ROOM", livekit_identity="ID_ALICE")
        monitor.on_webhook(event("participant_joined", identity="ID_OTHER"))
        self.assertEqual(self.sweep.checked, [])
        monitor.on_webhook(event("participant_joined"))
        [entry] = self.sweep.checked
        self.assertTrue(entry.connected)
        monitor.on_webhook(event("track_published"))
        monitor.on_webhook(event("participant_left"))
        self.assertEqual(len(monitor.tracker), 0)

    def test_first_sweep_after_one_interval_without_recovered_entries(self):
        monitor = self.monitor()
        self.assertEqual(self.successResultOf(monitor.start()), 0)
        self.assertEqual(self.sweep.ticks, 0)
        self.clock.advance(29.9)
        self.assertEqual(self.sweep.ticks, 0)
        self.clock.advance(0.1)
        self.assertEqual((self.sweep.ticks, self.store.flushes), (1, 1))
        self.successResultOf(monitor.stop())
        self.assertTrue(self.store.closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_recovered_entries_are_swept_at_once(self):
        stored = [Participant("!r:x", "@alice:x", "LK_ROOM", "ID_ALICE", T0 - 10)]
        monitor = self.monitor(stored)
        self.assertEqual(self.successResultOf(monitor.start()), 1)
        self.assertEqual(self.sweep.ticks, 1)
        self.assertFalse(monitor.tracker.get("LK_ROOM", "ID_ALICE").connected)
        self.successResultOf(monitor.stop())
