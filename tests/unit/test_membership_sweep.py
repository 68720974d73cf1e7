"""The membership sweep, the check on join and removal (docs/membership.md#sweep,
docs/membership.md#removal), on ``task.Clock`` with scripted homeserver and SFU fakes."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.livekit.presence import Presence
from rtcauthd.membership import removal as removal_module, sweep as sweep_module
from rtcauthd.membership.removal import Remover
from rtcauthd.membership.sweep import MembershipSweep
from rtcauthd.membership.tracker import ParticipantTracker
from rtcauthd.metrics import Metrics
from rtcauthd.outbound.errors import FailureKind, OutboundError
from tests.unit.test_membership import T0, TTL, RecordingStore

HS = "example.com"
BASE = "https://hs.example.com"
ROOM = "!room:example.com"


def http_error(status: int, code: str = "M_FORBIDDEN") -> OutboundError:
    return OutboundError(FailureKind.HTTP_STATUS, "joined_members", f"HTTP {status}", status=status, code=code)


class FakeHomeserver:
    """``joined[room]``: a set of user IDs or an exception; ``server_joined[room]``: bool or exception.
    With ``hang`` every call waits on a Deferred in ``waiting``."""

    def __init__(self):
        self.joined = {}
        self.server_joined = {}
        self.calls = []
        self.hang = False
        self.waiting = []

    def _answer(self, value):
        if self.hang:
            d = Deferred()
            self.waiting.append(d)
            return d
        if isinstance(value, Exception):
            return fail(value)
        return succeed(value)

    def joined_members(self, base_url, room_id):
        self.calls.append(("joined_members", base_url, room_id))
        return self._answer(self.joined.get(room_id, set()))

    def is_joined(self, base_url, room_id, *, mxid=None, server_name=None):
        self.calls.append(("is_joined", base_url, room_id, mxid or server_name))
        if server_name is not None:
            return self._answer(self.server_joined.get(room_id, True))
        value = self.joined.get(room_id, set())
        return self._answer(value if isinstance(value, Exception) else mxid in value)


class FakeRooms:
    """The SFU: ``present`` identities; ``answers[method]`` a list of exceptions / results used first."""

    def __init__(self):
        self.present = set()
        self.calls = []
        self.answers = {"RemoveParticipant": [], "DeleteRoom": []}

    def get_participant(self, room, identity):
        self.calls.append(("GetParticipant", room, identity))
        return succeed(Presence.PRESENT if (room, identity) in self.present else Presence.ABSENT)

    def _scripted(self, method, default):
        script = self.answers[method]
        value = script.pop(0) if script else default
        return fail(value) if isinstance(value, Exception) else succeed(value)

    def remove_participant(self, room, identity):
        self.calls.append(("RemoveParticipant", room, identity))
        found = (room, identity) in self.present
        self.present.discard((room, identity))
        return self._scripted("RemoveParticipant", found)

    def delete_room(self, room):
        self.calls.append(("DeleteRoom", room))
        return self._scripted("DeleteRoom", True)

    def of(self, method):
        return [c for c in self.calls if c[0] == method]


class SweepCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = RecordingStore()
        self.tracker = ParticipantTracker(clock=self.clock, store=self.store, token_ttl=TTL)
        self.hs = FakeHomeserver()
        self.rooms = FakeRooms()
        self.stopped_jobs = []
        self.events = []
        self.patch(sweep_module.log, "observer", self.events.append)
        self.patch(removal_module.log, "observer", self.events.append)
        self.resolve = lambda server_name: succeed(BASE)
        self.metrics = Metrics()
        self.remover = Remover(
            clock=self.clock, rooms=self.rooms, tracker=self.tracker,
            stop_job=lambda room, identity: self.stopped_jobs.append((room, identity) + (len(self.rooms.calls),)),
            random=lambda: 0.5, metrics=self.metrics,
        )
        self.sweep = MembershipSweep(
            clock=self.clock, tracker=self.tracker, remover=self.remover, homeserver=self.hs,
            resolve_cs_api=lambda name: self.resolve(name), server_name=HS,
            get_participant=self.rooms.get_participant, interval=30, metrics=self.metrics,
        )
        self.addCleanup(lambda: self.assertEqual(self.clock.getDelayedCalls(), []))

    def connected(self, name, *, room=ROOM, lk_room="LK_ROOM", server=HS):
        user = f"@{name}:{server}"
        identity = f"ID_{name}"
        entry = self.tracker.register(matrix_room_id=room, matrix_user_id=user, livekit_room=lk_room,
                                      livekit_identity=identity)
        self.tracker.joined(lk_room, identity)
        self.rooms.present.add((lk_room, identity))
        return entry

    def run_sweep(self):
        d = self.sweep.tick()
        self.assertIsNotNone(d)
        self.successResultOf(d)

    def count(self, name, **labels):
        return self.metrics.registry.get_sample_value(name, labels) or 0

    def messages(self):
        return [e["log_format"] for e in self.events]

    def hs_calls(self, kind):
        return [c for c in self.hs.calls if c[0] == kind]


class RemovalTests(SweepCase):
    def test_connected_non_members_are_removed_members_untouched(self):
        alice = self.connected("alice")
        bob = self.connected("bob")
        self.hs.joined[ROOM] = {alice.participant.matrix_user_id}
        self.run_sweep()
        self.assertEqual(self.rooms.of("RemoveParticipant"), [("RemoveParticipant", "LK_ROOM", "ID_bob")])
        # the delegated leave is stopped before RemoveParticipant is sent
        self.assertEqual(self.stopped_jobs, [("LK_ROOM", "ID_bob", 0)])
        self.assertTrue(bob.removed)
        self.assertFalse(bob.connected)
        self.assertTrue(alice.connected)
        self.assertEqual(self.count("rtcauthd_membership_removals_total", action="remove_participant", outcome="done"), 1)
        self.assertEqual(self.count("rtcauthd_membership_checks_total", kind="sweep", outcome="ok"), 1)
        # next sweep: bob is pending (SFU says absent), alice still a member: nothing more
        self.run_sweep()
        self.assertEqual(len(self.rooms.of("RemoveParticipant")), 1)

    def test_pending_participants_are_never_removed(self):
        pending = self.tracker.register(matrix_room_id=ROOM, matrix_user_id="@p:example.com",
                                        livekit_room="LK_ROOM", livekit_identity="ID_p")
        self.run_sweep()
        self.assertEqual(self.rooms.of("RemoveParticipant"), [])
        self.assertEqual(self.hs_calls("joined_members"), [])  # no connected participant: no request
        self.assertIs(self.tracker.get(*pending.key), pending)

    def test_one_homeserver_request_per_matrix_room(self):
        for name in ("a", "b", "c"):
            self.connected(name, lk_room="LK_1")
        self.connected("d", lk_room="LK_2")  # another slot of the same Matrix room
        self.connected("e", room="!other:example.com", lk_room="LK_3")
        self.hs.joined = {ROOM: {f"@{n}:{HS}" for n in "abcd"}, "!other:example.com": {f"@e:{HS}"}}
        self.run_sweep()
        self.assertEqual(sorted(c[2] for c in self.hs_calls("joined_members")), ["!other:example.com", ROOM])
        self.assertEqual(self.hs_calls("joined_members")[0][1], BASE)
        self.assertEqual(self.rooms.of("RemoveParticipant"), [])

    def test_not_found_counts_as_removed(self):
        bob = self.connected("bob")
        self.rooms.present.clear()
        self.run_sweep()  # the SFU no longer has bob: RemoveParticipant answers not_found
        self.assertEqual(len(self.rooms.of("RemoveParticipant")), 1)
        self.assertTrue(bob.removed)

    def test_failed_removals_are_retried_for_a_minute_then_left_to_the_next_sweep(self):
        bob = self.connected("bob")
        busy = OutboundError(FailureKind.HTTP_STATUS, "RemoveParticipant", "HTTP 503", status=503, code="unavailable")
        self.rooms.answers["RemoveParticipant"] = [busy] * 100
        self.run_sweep()
        for _ in range(120):
            self.clock.advance(1)
        # back-off 1 s, x1.5 (no jitter here): attempts at 0, 1, 2.5, 4.75, ... 49.3 s, then
        # the next wait would pass the minute
        self.assertEqual(len(self.rooms.of("RemoveParticipant")), 9)
        self.assertTrue(bob.connected and not bob.removed)
        self.assertIn("Could not remove {user_id} from LiveKit room {room} ({error}); the next sweep tries again",
                      self.messages())
        self.rooms.answers["RemoveParticipant"] = []
        self.run_sweep()
        self.assertTrue(bob.removed)

    def test_a_removal_in_progress_is_not_repeated(self):
        self.connected("bob")
        busy = OutboundError(FailureKind.CONNECT, "RemoveParticipant", "refused")
        self.rooms.answers["RemoveParticipant"] = [busy]
        self.run_sweep()
        self.assertEqual(len(self.rooms.of("RemoveParticipant")), 1)
        self.run_sweep()  # the retry is still waiting: no second removal
        self.assertEqual(len(self.rooms.of("RemoveParticipant")), 1)
        self.clock.advance(2)
        self.assertEqual(len(self.rooms.of("RemoveParticipant")), 2)


class PendingTests(SweepCase):
    def pending(self, name):
        return self.tracker.register(matrix_room_id=ROOM, matrix_user_id=f"@{name}:{HS}",
                                     livekit_room="LK_ROOM", livekit_identity=f"ID_{name}")

    def test_present_becomes_connected_and_is_checked(self):
        entry = self.pending("bob")
        self.rooms.present.add(entry.key)
        self.run_sweep()
        self.assertTrue(entry.removed)  # connected, then found not joined, in the same sweep
        self.assertEqual(self.rooms.of("GetParticipant"), [("GetParticipant", "LK_ROOM", "ID_bob")])

    def test_absent_is_forgotten_only_once_its_token_expired(self):
        entry = self.pending("bob")
        self.run_sweep()
        self.assertIs(self.tracker.get(*entry.key), entry)
        self.clock.advance(TTL + 1)
        self.run_sweep()
        self.assertIsNone(self.tracker.get(*entry.key))
        self.assertEqual(self.store.ops[-1], ("delete", entry.key))

    def test_unknown_presence_changes_nothing(self):
        entry = self.pending("bob")
        self.clock.advance(TTL + 1)
        self.rooms.get_participant = lambda room, identity: succeed(Presence.UNKNOWN)
        self.sweep._get_participant = self.rooms.get_participant
        self.run_sweep()
        self.assertIs(self.tracker.get(*entry.key), entry)
        self.assertFalse(entry.connected)


class FailOpenTests(SweepCase):
    def test_every_failure_but_the_403_removes_nobody(self):
        bob = self.connected("bob")
        failures = [
            http_error(500, "M_UNKNOWN"),
            http_error(404, "M_NOT_FOUND"),
            http_error(429, "M_LIMIT_EXCEEDED"),
            OutboundError(FailureKind.TIMEOUT, "joined_members", "no complete answer within 30 s"),
            OutboundError(FailureKind.CONNECT, "joined_members", "Connection refused"),
            OutboundError(FailureKind.BAD_BODY, "joined_members", "answer has no joined object"),
            ValueError("surprise"),
        ]
        for failure in failures:
            self.hs.joined[ROOM] = failure
            self.run_sweep()
        self.assertEqual(self.rooms.of("RemoveParticipant") + self.rooms.of("DeleteRoom"), [])
        self.assertEqual(self.hs_calls("is_joined"), [])
        self.assertTrue(bob.connected)
        self.assertEqual(self.messages().count("Membership check of {room_id} failed ({error}); nobody is removed"),
                         len(failures))
        self.assertEqual(self.count("rtcauthd_membership_checks_total", kind="sweep", outcome="failed"), len(failures))

    def test_unresolvable_client_api_means_no_checks(self):
        self.connected("bob")
        self.resolve = lambda name: fail(OutboundError(FailureKind.DNS, "well-known", "no such host"))
        self.run_sweep()
        self.assertEqual(self.hs.calls, [])
        self.assertEqual(self.rooms.of("RemoveParticipant"), [])


class HomeserverLeftTests(SweepCase):
    def setUp(self):
        SweepCase.setUp(self)
        self.alice = self.connected("alice", lk_room="LK_1")
        self.bob = self.connected("bob", lk_room="LK_2")
        self.pending = self.tracker.register(matrix_room_id=ROOM, matrix_user_id="@p:example.com",
                                             livekit_room="LK_3", livekit_identity="ID_p")
        self.other = self.connected("carol", room="!other:example.com", lk_room="LK_9")
        self.hs.joined = {ROOM: http_error(403), "!other:example.com": {"@carol:example.com"}}

    def test_confirmed_by_is_joined_the_rooms_are_deleted(self):
        self.hs.server_joined[ROOM] = False
        self.run_sweep()
        self.assertIn(("is_joined", BASE, ROOM, HS), self.hs.calls)
        self.assertEqual(sorted(self.rooms.of("DeleteRoom")), [("DeleteRoom", "LK_1"), ("DeleteRoom", "LK_2"),
                                                               ("DeleteRoom", "LK_3")])
        self.assertEqual([e.key for e in self.tracker], [self.other.key])
        self.assertEqual(self.rooms.of("RemoveParticipant"), [])
        self.assertEqual(sorted(j[:2] for j in self.stopped_jobs),
                         [("LK_1", "ID_alice"), ("LK_2", "ID_bob"), ("LK_3", "ID_p")])

    def test_still_joined_is_a_namespace_problem_and_changes_nothing(self):
        self.hs.server_joined[ROOM] = True
        self.run_sweep()
        self.assertEqual(self.rooms.of("DeleteRoom") + self.rooms.of("RemoveParticipant"), [])
        self.assertEqual(len(self.tracker), 4)
        [error] = [e for e in self.events if e["log_level"].name == "error"]
        self.assertIn("namespace", error["log_format"])

    def test_is_joined_failing_changes_nothing(self):
        self.hs.server_joined[ROOM] = OutboundError(FailureKind.TIMEOUT, "is_joined", "no answer")
        self.run_sweep()
        self.assertEqual(self.rooms.of("DeleteRoom") + self.rooms.of("RemoveParticipant"), [])
        self.assertEqual(len(self.tracker), 4)


class BoundsTests(SweepCase):
    def test_at_most_eight_requests_in_flight(self):
        for i in range(20):
            self.connected(f"u{i}", room=f"!r{i}:example.com", lk_room=f"LK_{i}")
        self.hs.hang = True
        d = self.sweep.tick()
        self.assertEqual(len(self.hs.waiting), 8)
        for _ in range(12):
            self.hs.waiting.pop(0).callback({"@nobody:example.com"})
            self.assertLessEqual(len([w for w in self.hs.waiting if not w.called]), 8)
        self.hs.hang = False
        for waiting in self.hs.waiting:
            waiting.callback(set())
        self.successResultOf(d)
        self.assertEqual(len(self.hs_calls("joined_members")), 20)
        self.clock.advance(120)  # let the removals' bookkeeping settle

    def test_an_overlapping_sweep_is_skipped_with_a_warning(self):
        self.connected("bob")
        self.hs.hang = True
        first = self.sweep.tick()
        self.assertIsNone(self.sweep.tick())
        self.assertIn("Membership sweep skipped: the previous one is still running", self.messages())
        self.hs.waiting[0].callback({"@bob:example.com"})
        self.successResultOf(first)
        self.assertFalse(self.sweep.running)

    def test_rooms_not_reached_within_the_interval_come_first_next_time(self):
        for i in range(10):
            self.connected(f"u{i}", room=f"!r{i}:example.com", lk_room=f"LK_{i}")
            self.hs.joined[f"!r{i}:example.com"] = {f"@u{i}:example.com"}
        self.hs.hang = True
        d = self.sweep.tick()
        first_eight = [c[2] for c in self.hs_calls("joined_members")]
        self.clock.advance(31)  # the sweep budget (one interval) is over
        self.hs.hang = False
        for waiting in list(self.hs.waiting):
            waiting.callback({f"@u{i}:example.com" for i in range(10)})
        self.successResultOf(d)
        self.assertEqual(len(self.hs_calls("joined_members")), 8)
        self.assertIn("Membership sweep: {count} room(s) not checked within {budget:g} s; they come first next time",
                      self.messages())
        self.hs.calls.clear()
        self.run_sweep()
        later = [c[2] for c in self.hs_calls("joined_members")]
        self.assertEqual(set(later[:2]), {f"!r{i}:example.com" for i in range(10)} - set(first_eight))


class CheckOnJoinTests(SweepCase):
    def test_a_non_member_is_removed_at_once(self):
        bob = self.connected("bob")
        self.successResultOf(self.sweep.check_now(bob))
        self.assertEqual(self.hs.calls, [("is_joined", BASE, ROOM, "@bob:example.com")])
        self.assertEqual(self.rooms.of("RemoveParticipant"), [("RemoveParticipant", "LK_ROOM", "ID_bob")])

    def test_a_member_is_left_alone(self):
        bob = self.connected("bob")
        self.hs.joined[ROOM] = {"@bob:example.com"}
        self.successResultOf(self.sweep.check_now(bob))
        self.assertEqual(self.rooms.of("RemoveParticipant"), [])

    def test_failures_fail_open(self):
        bob = self.connected("bob")
        self.hs.joined[ROOM] = http_error(403)
        self.successResultOf(self.sweep.check_now(bob))
        self.resolve = lambda name: fail(OutboundError(FailureKind.DNS, "well-known", "no such host"))
        self.successResultOf(self.sweep.check_now(bob))
        self.assertEqual(self.rooms.of("RemoveParticipant") + self.rooms.of("DeleteRoom"), [])
        self.assertTrue(bob.connected)

    def test_a_slow_sweep_does_not_delay_it(self):
        for i in range(10):
            self.connected(f"u{i}", room=f"!r{i}:example.com", lk_room=f"LK_{i}")
        self.hs.hang = True
        sweeping = self.sweep.tick()
        bob = self.connected("bob")
        checking = self.sweep.check_now(bob)
        self.assertEqual(len(self.hs.waiting), 9)  # eight for the sweep, one for the join
        self.hs.waiting.pop().callback(False)
        self.successResultOf(checking)
        self.assertEqual(self.rooms.of("RemoveParticipant"), [("RemoveParticipant", "LK_ROOM", "ID_bob")])
        self.hs.hang = False
        for waiting in self.hs.waiting:
            waiting.callback({f"@u{i}:example.com" for i in range(10)})
        self.successResultOf(sweeping)
