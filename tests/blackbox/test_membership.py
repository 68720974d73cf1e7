"""Black-box tests of membership enforcement (project issue 15; docs/membership.md).

The real daemon in AS mode, a fake homeserver answering ``joined_members`` and
``is_joined`` from its membership tables, and a fake SFU that records ``RemoveParticipant``
and ``DeleteRoom``. Tokens are minted through the proxied C-S route, as Synapse would
forward them; "connected" is a signed ``participant_joined`` webhook plus the SFU saying
the participant is present.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.trial import unittest

from tests.blackbox.fake_homeserver import Answer
from tests.blackbox.harness import lk_hash
from tests.blackbox.test_appservice import AS_TOKEN, CS, ROOM_ID, SLOT_ID, DelegationCase

PARTICIPANTS_KEY = "lk-jwt:participants"
ROOM = lk_hash(ROOM_ID, SLOT_ID)


class MembershipCase(DelegationCase):
    @defer.inlineCallbacks
    def start_checking(self, interval: int = 1, **extra):
        self.hs.join(ROOM_ID, self.hs.server_name)
        yield self.start(LIVEKIT_MEMBERSHIP_CHECK_INTERVAL_SECONDS=str(interval), **extra)

    @defer.inlineCallbacks
    def connect(self, name: str, *, member_id: str | None = None):
        """``name`` is joined, gets a token through the C-S route and connects to the SFU."""
        user = self.user(name)
        member_id = member_id or f"member-{name}"
        self.hs.join(ROOM_ID, user)
        result = yield self.proxied(CS + "/get_token", self.cs_body(member_id=member_id), identity=user)
        self.assert_jwt_answer(result)
        identity = lk_hash(user, member_id)
        self.lk.set_present(ROOM, identity)
        yield self.webhook("participant_joined", ROOM, identity)
        return user, identity

    def removed(self, identity):
        return [c for c in self.lk.removals(ROOM, identity) if c.found]

    def describe(self) -> str:
        calls = [(c.kind, c.subject, c.status) for c in self.hs.appservice_calls]
        removals = [(c.method, c.room, c.identity, c.found) for c in self.lk.removal_requests]
        return f"homeserver: {calls}\nSFU removals: {removals}\n{self.daemon_logs()}"


class RemovalTests(MembershipCase, unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_leaver_is_removed_within_an_interval_a_member_is_untouched(self):
        yield self.start_checking(interval=1)
        alice, alice_id = yield self.connect("alice")
        bob, bob_id = yield self.connect("bob")
        # bob's client hands its delayed leave over: it must be stopped, not sent
        self.hs.schedule_delayed_event("syd_bob", user_id=bob, room_id=ROOM_ID, delay_ms=3_600_000)
        result = yield self.proxied(CS + "/delegate_delayed_leave",
                                    self.cs_body(member_id="member-bob", delay_id="syd_bob"), identity=bob)
        self.assertEqual(result.code, 200, self.describe())
        # (the job finds bob present with GetParticipant)
        yield self.wait_for(lambda: self.hs.restarts("syd_bob"), "the job to restart bob's delayed leave")

        self.hs.leave(ROOM_ID, bob)
        [removal] = yield self.wait_for(lambda: self.removed(bob_id), "bob's removal")
        self.assertEqual(self.lk.removals(ROOM, alice_id), [])
        # one joined_members per sweep for the one Matrix room, with the as_token, no masquerade
        checks = self.hs.as_calls("joined_members")
        self.assertTrue(checks, self.describe())
        for check in checks:
            self.assertEqual((check.subject, check.bearer, check.request.query), (ROOM_ID, AS_TOKEN, {}))
        # the SFU reports the removal; the job was stopped first, so no leave is sent for bob
        yield self.webhook("participant_left", ROOM, bob_id, "PARTICIPANT_REMOVED")
        sweeps = len(self.hs.as_calls("joined_members"))
        yield self.wait_for(lambda: len(self.hs.as_calls("joined_members")) >= sweeps + 2, "two more sweeps")
        self.assertEqual(self.hs.sends("syd_bob"), [])
        self.assertEqual(len(self.removed(bob_id)), 1)  # not repeated
        self.assertEqual(self.lk.removals(ROOM, alice_id), [])
        self.assertIn(f"Removing {bob} ({bob_id}) from LiveKit room {ROOM}", self.daemon.output)
        self.assertNotIn(AS_TOKEN, self.daemon.output)

    @defer.inlineCallbacks
    def test_a_rejoin_webhook_is_checked_at_once(self):
        yield self.start_checking(interval=3600)  # no sweep during the test: only the join check acts
        bob, bob_id = yield self.connect("bob")
        # one is_joined when the token is minted, one more for the join webhook
        yield self.wait_for(lambda: len(self.hs.as_calls("is_joined")) >= 2, "the check on join")
        self.assertEqual(self.lk.removal_requests, [])  # still a member
        self.hs.leave(ROOM_ID, bob)  # e.g. kicked; the client reconnects with its old token
        yield self.webhook("participant_joined", ROOM, bob_id)
        yield self.wait_for(lambda: self.removed(bob_id), "bob's removal after the re-join")
        # and once more: LiveKit does not revoke the token, so a second reconnect is caught too
        yield self.webhook("participant_left", ROOM, bob_id, "PARTICIPANT_REMOVED")
        self.lk.set_present(ROOM, bob_id)
        yield self.webhook("participant_joined", ROOM, bob_id)
        yield self.wait_for(lambda: len(self.removed(bob_id)) == 2, "the second removal")
        self.assertEqual(self.hs.as_calls("joined_members"), [])

    @defer.inlineCallbacks
    def test_a_homeserver_that_left_the_room_gets_its_livekit_rooms_deleted(self):
        yield self.start_checking(interval=1)
        yield self.connect("alice")
        self.hs.left_rooms.add(ROOM_ID)
        self.hs.leave(ROOM_ID, self.hs.server_name)
        yield self.wait_for(lambda: self.lk.deleted_rooms, "DeleteRoom")
        self.assertEqual(self.lk.deleted_rooms, [ROOM])
        [confirm] = [c for c in self.hs.as_calls("is_joined") if c.request.query.get("server_name")]
        self.assertEqual(confirm.request.query, {"server_name": [self.hs.server_name]})

    @defer.inlineCallbacks
    def test_a_403_while_this_server_is_joined_removes_nobody(self):
        yield self.start_checking(interval=1)
        _alice, alice_id = yield self.connect("alice")
        self.hs.left_rooms.add(ROOM_ID)  # the namespace does not cover the room's users
        yield self.daemon.wait_for_line("application service's user namespace must cover", timeout=8)
        self.assertEqual(self.lk.removal_requests, [])


class FailOpenTests(MembershipCase, unittest.TestCase):
    @defer.inlineCallbacks
    def check_outage(self, break_homeserver):
        yield self.start_checking(interval=1)
        alice, alice_id = yield self.connect("alice")
        yield self.wait_for(lambda: self.hs.as_calls("joined_members"), "a first sweep")
        self.hs.leave(ROOM_ID, alice)  # would be removed, if the homeserver could say so
        mark = self.daemon.mark()
        break_homeserver()
        for _ in range(2):
            yield self.daemon.wait_for_line("nobody is removed", since=mark, timeout=45)
            mark = self.daemon.mark()
        self.assertEqual(self.lk.removal_requests, [])

    def test_errors_remove_nobody(self):
        return self.check_outage(lambda: setattr(self.hs, "joined_members_answer",
                                                 Answer.json(502, {"errcode": "M_UNKNOWN", "error": "bad gateway"})))

    def test_a_stopped_homeserver_removes_nobody(self):
        return self.check_outage(self.hs.stop)


class RestartTests(MembershipCase, unittest.TestCase):
    @defer.inlineCallbacks
    def test_the_tracked_set_survives_a_restart_and_is_verified_first(self):
        yield self.start_checking(interval=3600, redis=True)
        bob, bob_id = yield self.connect("bob")
        records = yield self.redis.hgetall(PARTICIPANTS_KEY)
        field = json.dumps([ROOM, bob_id], separators=(",", ":")).encode()
        self.assertEqual(list(records), [field])
        value = json.loads(records[field])
        self.assertEqual(list(value), ["matrix_room_id", "matrix_user_id", "livekit_room", "livekit_identity",
                                       "registered_at"])
        self.assertEqual(value["matrix_room_id"], ROOM_ID)
        self.assertEqual(value["matrix_user_id"], bob)
        self.assertRegex(value["registered_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
        yield self.daemon.stop()
        self.hs.leave(ROOM_ID, bob)  # while the daemon was away
        yield self.daemon.restart()
        # the first sweep runs at once: GetParticipant (present), then joined_members, then removal
        yield self.wait_for(lambda: self.removed(bob_id), "bob's removal after the restart")
        self.assertTrue(self.lk.lookups(ROOM, bob_id))


class StartupTests(MembershipCase, unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_bad_interval_is_fatal(self):
        env = self.as_env(LIVEKIT_MEMBERSHIP_CHECK_INTERVAL_SECONDS="30s")
        daemon = self.make_daemon(env)
        code, output = yield daemon.run_to_exit()
        self.assertEqual(code, 1, output)
        self.assertIn('LIVEKIT_MEMBERSHIP_CHECK_INTERVAL_SECONDS must be a non-negative integer, got "30s"', output)
