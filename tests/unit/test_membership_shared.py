"""Membership enforcement across several instances (docs/membership.md#several-instances):
the room claims and removal guards of membership/shared.py on ``task.Clock`` with a
scripted connection, and what the sweep, the remover and the monitor make of them. The
Lua scripts themselves run against a real Redis in tests/integration/test_membership_instances.py."""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.cluster.scripts import ClusterKeys
from rtcauthd.membership import shared as shared_module
from rtcauthd.membership.monitor import MembershipMonitor
from rtcauthd.membership.record import Participant, encode_field, encode_record
from rtcauthd.membership.removal import Remover
from rtcauthd.membership.shared import CLAIM, CLAIM_BATCH, SharedMembership
from rtcauthd.membership.sweep import MembershipSweep
from rtcauthd.membership.tracker import ParticipantTracker
from tests.unit.test_membership import T0, TTL, RecordingStore
from tests.unit.test_membership_sweep import HS, FakeHomeserver, FakeRooms

IID = b"me#00000000"


class ScriptedRedis:
    """``eval`` and the hash commands; each answer is a Deferred the test fires (or lets time out)."""

    def __init__(self):
        self.calls = []
        self.answer = None  # None: leave the Deferred unfired

    def _call(self, *call):
        d = Deferred()
        self.calls.append(call + (d,))
        if self.answer is not None:
            d.callback(self.answer(*call))
        return d

    def eval(self, script, keys, args):
        return self._call("eval", script, list(keys), list(args))

    def hgetall(self, key):
        return self._call("hgetall", key)

    def hget(self, key, field):
        return self._call("hget", key, field)

    def hset(self, key, field, value):
        return self._call("hset", key, field, value)

    def hdel(self, key, fields):
        return self._call("hdel", key, list(fields))


class SharedCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.redis = ScriptedRedis()
        self.cluster = SimpleNamespace(iid=IID, keys=ClusterKeys(0))
        self.alone = False
        self.shared = SharedMembership(
            clock=self.clock, connection=lambda: self.redis, cluster=lambda: None if self.alone else self.cluster,
            interval=30, removal_budget=60,
        )
        self.events = []
        self.patch(shared_module.log, "observer", self.events.append)


class ClaimTests(SharedCase):
    def test_one_script_per_batch_of_rooms_and_only_won_rooms_are_swept(self):
        rooms = [f"!r{n}:x" for n in range(CLAIM_BATCH + 2)]
        self.redis.answer = lambda _op, _script, keys, _args: [1 if n % 2 else 0 for n in range(len(keys))]
        mine = self.successResultOf(self.shared.claim_rooms(rooms))
        self.assertEqual(mine, [r for n, r in enumerate(rooms) if (n % CLAIM_BATCH) % 2])
        first, second = self.redis.calls
        self.assertEqual(first[1], CLAIM)
        self.assertEqual((len(first[2]), len(second[2])), (CLAIM_BATCH, 2))
        self.assertEqual(first[2][0], b"rtcauth:membership:room:!r0:x")
        # the claim outlives one interval (a late tick keeps it); holders are checked for liveness
        self.assertEqual(first[3], [IID, 60_000, b"rtcauth:instance:", b"rtcauth:instances"])

    def test_redis_not_answering_means_this_instance_sweeps_what_it_knows(self):
        d = self.shared.claim_rooms(["!a:x", "!b:x"])
        self.assertNoResult(d)
        self.clock.advance(2.0)
        self.assertEqual(self.successResultOf(d), ["!a:x", "!b:x"])
        self.assertEqual(len([e for e in self.events if e.get("log_level").name == "warn"]), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_alone_every_room_and_no_redis_traffic(self):
        self.alone = True
        self.assertEqual(self.successResultOf(self.shared.claim_rooms(["!a:x"])), ["!a:x"])
        self.assertTrue(self.successResultOf(self.shared.begin_removal("R", "I")))
        self.assertIsNone(self.successResultOf(self.shared.snapshot()))
        self.assertIsNone(self.successResultOf(self.shared.lookup("R", "I")))
        self.shared.connected("R", "I")
        self.shared.end_removal("R", "I", True)
        self.assertEqual(self.redis.calls, [])


class RemovalGuardTests(SharedCase):
    def test_begin_and_end_carry_the_field_the_instance_and_the_budget(self):
        self.redis.answer = lambda *call: 1
        self.assertTrue(self.successResultOf(self.shared.begin_removal("R", "I")))
        field = encode_field("R", "I").encode()
        _op, _script, keys, args, _d = self.redis.calls[0]
        self.assertEqual(keys, [b"rtcauth:membership:state", b"rtcauth:membership:removing:" + field])
        self.assertEqual(args, [field, IID, 65_000])
        self.shared.end_removal("R", "I", True)
        self.assertEqual(self.redis.calls[1][3], [field, IID, 1])

    def test_a_refused_removal_is_not_done_and_a_silent_redis_does_not_block_it(self):
        self.redis.answer = lambda *call: 0
        self.assertFalse(self.successResultOf(self.shared.begin_removal("R", "I")))
        self.redis.answer = None
        d = self.shared.begin_removal("R", "I")
        self.clock.advance(2.0)
        self.assertTrue(self.successResultOf(d))


class SnapshotTests(SharedCase):
    def test_states_are_matched_to_records_and_orphans_are_cleaned(self):
        p = Participant("!r:x", "@u:x", "R", "I", T0)
        field = encode_field("R", "I").encode()
        orphan = encode_field("R", "gone").encode()
        answers = {"rtcauth:membership:state": {field: b"removed", orphan: b"connected"},
                   "lk-jwt:participants": {field: encode_record(p).encode(), b"junk": b"{"}}
        self.redis.answer = lambda op, key, *rest: answers[key.decode()] if op == "hgetall" else 1
        participants, states = self.successResultOf(self.shared.snapshot())
        self.assertEqual(participants, {("R", "I"): p})
        self.assertEqual(states, {("R", "I"): b"removed"})
        self.assertEqual([c[:2] for c in self.redis.calls[:2]],
                         [("hgetall", b"rtcauth:membership:state"), ("hgetall", b"lk-jwt:participants")])
        self.assertEqual(self.redis.calls[2][:3], ("hdel", b"rtcauth:membership:state", [orphan]))


class FakeShared:
    """The SharedMembership interface, scripted."""

    active = True

    def __init__(self):
        self.claimed = None  # None: every room
        self.snap = None
        self.go = True
        self.ended = []
        self.connects = []
        self.found = None
        self.left_answer = None

    def claim_rooms(self, rooms):
        return succeed([r for r in rooms if self.claimed is None or r in self.claimed])

    def snapshot(self):
        return succeed(self.snap)

    def begin_removal(self, room, identity):
        return succeed(self.go)

    def end_removal(self, room, identity, done):
        self.ended.append((room, identity, done))

    def connected(self, room, identity):
        self.connects.append((room, identity))

    def lookup(self, room, identity):
        return succeed(self.found)

    def left(self, room, identity):
        return succeed(self.left_answer)


class SweepWithPeersTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = RecordingStore()
        self.tracker = ParticipantTracker(clock=self.clock, store=self.store, token_ttl=TTL)
        self.hs, self.sfu, self.shared = FakeHomeserver(), FakeRooms(), FakeShared()
        self.remover = Remover(clock=self.clock, rooms=self.sfu, tracker=self.tracker, stop_job=lambda *k: None,
                               random=lambda: 0.5, shared=self.shared)
        self.sweep = self.new_sweep()
        self.monitor = MembershipMonitor(clock=self.clock, tracker=self.tracker, sweep=self.sweep, store=self.store,
                                         interval=30, shared=self.shared)
        self.shared.snap = ({}, {})
        self.successResultOf(self.sweep.tick())  # the first merge after start (see the restart test)

    def new_sweep(self):
        return MembershipSweep(
            clock=self.clock, tracker=self.tracker, remover=self.remover, homeserver=self.hs,
            resolve_cs_api=lambda name: succeed("https://hs"), server_name=HS,
            get_participant=self.sfu.get_participant, interval=30, shared=self.shared,
        )

    def participant(self, name, room="!a:x"):
        return Participant(room, f"@{name}:x", "LK_" + room, "ID_" + name, T0)

    def hook(self, event, p):
        self.monitor.on_webhook(SimpleNamespace(event=event, room_name=p.livekit_room,
                                                participant_identity=p.livekit_identity))

    def test_rooms_of_other_instances_are_neither_looked_up_nor_checked(self):
        mine, theirs = self.participant("alice", "!a:x"), self.participant("bob", "!b:x")
        pending = self.participant("carol", "!b:x")
        self.shared.snap = ({p.key: p for p in (mine, theirs, pending)}, {mine.key: b"connected", theirs.key: b"connected"})
        self.shared.claimed = {"!a:x"}
        self.successResultOf(self.sweep.tick())
        self.assertEqual(len(self.tracker), 3)  # the shared set, merged
        self.assertEqual([c[2] for c in self.hs.calls], ["!a:x"])
        self.assertEqual(self.sfu.of("GetParticipant"), [])  # carol's room is not ours this interval
        self.assertEqual(self.store.ops, [])  # records of other instances are not written again

    def test_a_removal_seen_elsewhere_is_not_repeated_and_a_refused_one_is_not_made(self):
        gone, refused = self.participant("mallory"), self.participant("eve")
        self.shared.snap = ({gone.key: gone, refused.key: refused}, {gone.key: b"removed", refused.key: b"connected"})
        self.hs.joined["!a:x"] = set()
        self.shared.go = False
        self.successResultOf(self.sweep.tick())
        self.assertEqual(self.sfu.of("RemoveParticipant"), [])
        self.assertTrue(self.tracker.get(*refused.key).removed)
        self.shared.go = True
        self.shared.snap = ({gone.key: gone, refused.key: refused}, {gone.key: b"connected"})  # she reconnected
        self.successResultOf(self.sweep.tick())
        self.assertEqual([c[2] for c in self.sfu.of("RemoveParticipant")], ["ID_mallory"])
        self.assertEqual(self.shared.ended, [(*gone.key, True)])

    def test_entries_redis_lacks_turn_pending_are_written_again_and_go_with_their_token(self):
        p = self.participant("alice")
        self.tracker.adopt(p, connected=True)
        self.shared.snap = ({}, {})
        self.shared.claimed = set()  # another instance sweeps the room
        self.successResultOf(self.sweep.tick())
        entry = self.tracker.get(*p.key)
        self.assertFalse(entry.connected)  # left (seen elsewhere) or Redis lost it: the SFU will tell
        self.assertEqual(self.store.ops, [("put", p)])
        self.sweep._unsent_keys = lambda: {p.key}  # a write still queued: kept as it is, not written twice
        self.successResultOf(self.sweep.tick())
        self.assertEqual(len(self.store.ops), 1)
        self.sweep._unsent_keys = set
        self.clock.advance(TTL + 1)
        self.successResultOf(self.sweep.tick())
        self.assertEqual(len(self.tracker), 0)

    def test_a_join_for_a_participant_of_another_instance_is_checked_here(self):
        p = self.participant("mallory")
        self.shared.found = p
        self.hook("participant_joined", p)
        self.assertTrue(self.tracker.get(*p.key).removed)  # tracked, connected, checked, removed
        self.assertEqual(self.shared.connects, [p.key])
        self.assertEqual(self.hs.calls, [("is_joined", "https://hs", "!a:x", "@mallory:x")])
        self.assertEqual([c[2] for c in self.sfu.of("RemoveParticipant")], ["ID_mallory"])
        self.shared.found = None
        self.hook("participant_joined", self.participant("stranger"))
        self.assertEqual(len(self.tracker), 1)

    def test_after_a_restart_connected_from_redis_is_verified_on_the_sfu_first(self):
        sweep = self.new_sweep()  # as after a restart: no merge yet
        gone, there = self.participant("left-while-down"), self.participant("still-there")
        self.shared.snap = ({gone.key: gone, there.key: there}, {gone.key: b"connected", there.key: b"connected"})
        self.sfu.present.add(there.key)
        self.hs.joined["!a:x"] = set()  # neither is joined any more
        self.successResultOf(sweep.tick())
        self.assertEqual(sorted(c[2] for c in self.sfu.of("GetParticipant")), ["ID_left-while-down", "ID_still-there"])
        self.assertEqual([c[2] for c in self.sfu.of("RemoveParticipant")], ["ID_still-there"])

    def test_left_keeps_an_entry_another_instance_removed(self):
        p = self.participant("mallory")
        self.tracker.adopt(p, connected=True)
        self.shared.left_answer = False  # Redis: removed by one of us
        self.hook("participant_left", p)
        entry = self.tracker.get(*p.key)
        self.assertEqual((entry.connected, entry.removed), (False, True))
        self.shared.left_answer = True
        self.hook("participant_left", p)
        self.assertIsNotNone(self.tracker.get(*p.key))  # removed here: still kept for the reconnect
        q = self.participant("alice")
        self.tracker.adopt(q, connected=True)
        self.hook("participant_left", q)
        self.assertIsNone(self.tracker.get(*q.key))
