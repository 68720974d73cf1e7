"""End to end: membership enforcement behind a real Synapse 1.163.2 (issue 15; docs/membership.md).

Users get their tokens through Synapse's proxy (the C-S ``get_token`` route), are
"connected" on the fake SFU (present there, plus a signed ``participant_joined``), and then
leave or are banned from the Matrix room through Synapse's client-server API. The daemon
asks Synapse itself who is joined, with the registration's as_token (its namespace covers
every local user, so Synapse serves ``joined_members`` to it).
"""

from __future__ import annotations

from urllib.parse import quote

from twisted.internet import defer, reactor

from tests.e2e.test_appservice import AppServiceCase, v07_hash
from tests.e2e.test_synapse import SLOT_ID

INTERVAL = 2
#: one interval, plus a sweep's own requests and the polling step
REMOVAL_DEADLINE = 3 * INTERVAL + 5.0


class MembershipTests(AppServiceCase):
    interval = INTERVAL

    @defer.inlineCallbacks
    def setUp(self):
        self.skip_if_as_routes_missing()
        yield AppServiceCase.setUp(self)
        self.daemon = yield self.as_daemon(
            self.full, LIVEKIT_MEMBERSHIP_CHECK_INTERVAL_SECONDS=str(self.interval)).start()
        yield self.require_as_routes(self.daemon, self.full)

    @defer.inlineCallbacks
    def call_room(self, *names: str):
        """Alice creates a call room, the others join it; everybody gets a token and connects."""
        client = self.full_client
        users = []
        for name in ("alice",) + names:
            users.append((yield client.register(self.new_localpart(name))))
        room_id = yield client.create_call_room(users[0])
        for user in users[1:]:
            yield client.join(user, room_id)
        alias = v07_hash(room_id, SLOT_ID)
        identities = []
        for user in users:
            got = yield self.proxied(self.full, user, "get_token", {
                "url": self.full.appservice.sfu_url, "room_id": room_id, "slot_id": SLOT_ID, "member_id": "m1"})
            self.assertEqual(got.code, 200, f"{got.body!r}\n{self.everything()}")
            identity = v07_hash(user.user_id, "m1")
            yield self.connect(alias, identity)
            identities.append(identity)
        return room_id, alias, users, identities

    @defer.inlineCallbacks
    def connect(self, alias: str, identity: str):
        self.lk.joined.add((alias, identity))
        yield self.webhook(self.daemon, "participant_joined", alias=alias, identity=identity)

    def removed(self, alias: str, identity: str):
        return [c for c in self.lk.removals(alias, identity) if c.found]

    def wait_removed(self, alias, identity, what, *, count: int = 1):
        return self.poll(lambda: len(self.removed(alias, identity)) >= count, timeout=REMOVAL_DEADLINE, what=what)

    def room_path(self, room_id: str, action: str) -> str:
        return f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/{action}"

    @defer.inlineCallbacks
    def wait_sweeps(self, count: int):
        mark = self.full.log_mark()
        yield self.wait_access(self.full, mark, "/joined_members", status=200, count=count,
                               timeout=count * self.interval + 10)


class RemovalTests(MembershipTests):
    @defer.inlineCallbacks
    def test_a_user_who_leaves_is_removed_one_who_stays_is_not(self):
        room_id, alias, (alice, bob), (alice_id, bob_id) = yield self.call_room("bob")
        yield self.wait_sweeps(1)  # both are joined: the sweep changes nothing
        self.assertEqual(self.lk.removal_requests, [])
        yield self.full_client.call("POST", self.room_path(room_id, "leave"), {}, user=bob)
        yield self.wait_removed(alias, bob_id, "bob's removal after his leave")
        yield self.wait_sweeps(2)
        self.assertEqual(self.lk.removals(alias, alice_id), [])
        self.assertEqual(len(self.removed(alias, bob_id)), 1)
        self.assertNotIn(self.full.appservice.as_token, self.daemon.output)

    @defer.inlineCallbacks
    def test_a_banned_user_is_removed_and_caught_again_on_reconnect(self):
        room_id, alias, (alice, bob), (alice_id, bob_id) = yield self.call_room("bob")
        yield self.full_client.call("POST", self.room_path(room_id, "ban"),
                                    {"user_id": bob.user_id, "reason": "e2e"}, user=alice)
        yield self.wait_removed(alias, bob_id, "bob's removal after the ban")
        yield self.webhook(self.daemon, "participant_left", alias=alias, identity=bob_id)
        # the client reconnects with its still valid token
        yield self.connect(alias, bob_id)
        yield self.wait_removed(alias, bob_id, "bob's removal after reconnecting", count=2)
        self.assertEqual(self.lk.removals(alias, alice_id), [])


class RejoinTests(MembershipTests):
    interval = 3600  # no sweep during the test: only the check on join can act

    @defer.inlineCallbacks
    def test_a_reconnect_after_leaving_is_removed_within_seconds(self):
        room_id, alias, (alice, bob), (alice_id, bob_id) = yield self.call_room("bob")
        mark = self.full.log_mark()
        yield self.full_client.call("POST", self.room_path(room_id, "leave"), {}, user=bob)
        yield self.connect(alias, bob_id)  # e.g. a network blip: LiveKit reports a join again
        yield self.poll(lambda: self.removed(alias, bob_id), timeout=10.0, what="bob's removal on his re-join")
        self.assertEqual(self.full.access_lines(mark, containing="/joined_members"), [])
        self.assertTrue(self.full.access_lines(mark, containing="/is_joined"))
        self.assertEqual(self.lk.removals(alias, alice_id), [])


class OutageTests(MembershipTests):
    @defer.inlineCallbacks
    def test_synapse_stopped_mid_call_removes_nobody(self):
        room_id, alias, users, identities = yield self.call_room("bob")
        yield self.wait_sweeps(1)
        mark = self.daemon.mark()
        self.full.stop()
        try:
            for _ in range(2):
                yield self.daemon.wait_for_line("nobody is removed|cannot be resolved", since=mark,
                                                timeout=self.interval + 40)
                mark = self.daemon.mark()
            self.assertEqual(self.lk.removal_requests, [])
        finally:
            self.full.spawn()
            yield self.full.wait_ready(reactor)
        # back: the sweeps go on, and still nobody is removed
        yield self.wait_sweeps(1)
        self.assertEqual(self.lk.removal_requests, [])
