"""Black-box: membership enforcement with several daemons on one Redis (issue 15 item 4;
docs/membership.md#several-instances).

Real daemons in AS mode share one redis-server, the fake homeserver and the fake SFU.
Tokens are minted by one instance and the join webhooks go to another, as a load balancer
would spread them. Counted: ``RemoveParticipant`` calls on the SFU and ``joined_members``
requests per Matrix room. Nothing is asserted about durations; the spacing check is a
lower bound only (a slow machine spreads sweeps further apart, never closer).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet import reactor as global_reactor
from twisted.trial import unittest

from tests.blackbox.harness import lk_hash
from tests.blackbox.test_appservice import CS, ROOM_ID, SLOT_ID
from tests.blackbox.test_delegated_leave import sign_webhook, webhook_body
from tests.blackbox.test_membership import MembershipCase

INTERVAL = 2
ROOMS = [ROOM_ID] + [f"!other{n}:{ROOM_ID.split(':', 1)[1]}" for n in range(1, 3)]


class InstancesCase(MembershipCase):
    @defer.inlineCallbacks
    def start_instances(self, count: int):
        yield self.redis.start()
        self.daemons = []
        for room_id in ROOMS:
            self.hs.join(room_id, self.hs.server_name)
        for i in range(count):
            env = self.as_env(
                LIVEKIT_REDIS_URL=f"{self.redis.url}/0",
                LIVEKIT_MEMBERSHIP_CHECK_INTERVAL_SECONDS=str(INTERVAL),
                RTCAUTH_INSTANCE_NAME=f"inst{i}",
                RTCAUTH_JOB_LEASE_SECONDS="3",
                RTCAUTH_RATELIMIT_PER_SECOND="0",
            )
            d = self.make_daemon(env, name=f"inst{i}")
            yield d.start()
            self.daemons.append(d)
        self.daemon = self.daemons[0]
        return self.daemons

    @defer.inlineCallbacks
    def hook_on(self, daemon, event: str, room: str, identity: str, reason: str | None = None):
        body = webhook_body(event, room, identity, reason)
        headers = {"Content-Type": "application/webhook+json", "Authorization": sign_webhook(body, self.key, self.secret)}
        result = yield daemon.request("POST", "/sfu_webhook", body, headers)
        self.assertEqual((result.code, result.body), (200, b""), self.describe())

    @defer.inlineCallbacks
    def connect_via(self, minted_by, told, name: str, room_id: str = ROOM_ID):
        """``name`` gets a token from ``minted_by``; the SFU's join webhook reaches ``told``."""
        user = self.user(name)
        self.hs.join(room_id, user)
        self.daemon = minted_by
        result = yield self.proxied(CS + "/get_token", self.cs_body(room_id=room_id, member_id=f"m-{name}"),
                                    identity=user)
        self.assert_jwt_answer(result)
        room, identity = lk_hash(room_id, SLOT_ID), lk_hash(user, f"m-{name}")
        self.lk.set_present(room, identity)
        yield self.wait_for(lambda: self.redis.command("HLEN", "lk-jwt:participants").addCallback(bool),
                            "the participant record")
        yield self.hook_on(told, "participant_joined", room, identity)
        return user, room, identity

    def checks(self, room_id: str):
        return [c for c in self.hs.as_calls("joined_members") if c.subject == room_id]

    def holder(self, room_id: str):
        return self.redis.command("GET", f"rtcauth:membership:room:{room_id}").addCallback(
            lambda v: v.split(b"#", 1)[0].decode() if v else None)


class RemovedOnceTests(InstancesCase, unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_non_member_is_removed_exactly_once_across_the_instances(self):
        a, b, c = yield self.start_instances(3)
        _alice, _room, alice_id = yield self.connect_via(a, b, "alice")
        mallory, room, mallory_id = yield self.connect_via(b, c, "mallory")
        yield self.wait_for(lambda: len(self.hs.as_calls("is_joined")) >= 4, "the checks on join")
        self.assertEqual(self.lk.removal_requests, [])
        self.hs.leave(ROOM_ID, mallory)
        yield self.wait_for(lambda: self.removed(mallory_id), "mallory's removal")
        # the SFU's participant_left reaches yet another instance; the record stays for a reconnect
        self.lk.set_present(room, mallory_id, False)
        yield self.hook_on(a, "participant_left", room, mallory_id, "PARTICIPANT_REMOVED")
        seen = len(self.checks(ROOM_ID))
        yield self.wait_for(lambda: len(self.checks(ROOM_ID)) >= seen + 3, "three more sweeps of the room")
        self.assertEqual(len(self.lk.removals(room, mallory_id)), 1, self.describe())
        self.assertEqual(self.lk.removals(room, alice_id), [])
        # she reconnects with her old token through the instance that never saw her: removed again, once
        self.lk.set_present(room, mallory_id)
        yield self.hook_on(c, "participant_joined", room, mallory_id)
        yield self.wait_for(lambda: len(self.lk.removals(room, mallory_id)) == 2, "the second removal")
        seen = len(self.checks(ROOM_ID))
        yield self.wait_for(lambda: len(self.checks(ROOM_ID)) >= seen + 2, "two more sweeps")
        self.assertEqual(len(self.lk.removals(room, mallory_id)), 2, self.describe())


class OneSweepPerRoomTests(InstancesCase, unittest.TestCase):
    def assert_spaced(self, room_id: str, since: float = 0.0) -> None:
        times = [c.at for c in self.checks(room_id) if c.at >= since]
        gaps = [b - a for a, b in zip(times, times[1:])]
        # one sweeper: gaps of one interval; three would put most requests much closer together
        self.assertTrue(all(g >= 0.5 * INTERVAL for g in gaps), (room_id, gaps, self.describe()))

    @defer.inlineCallbacks
    def test_each_room_gets_one_joined_members_per_interval_and_survives_its_sweeper(self):
        daemons = yield self.start_instances(3)
        for n, room_id in enumerate(ROOMS):
            yield self.connect_via(daemons[n], daemons[(n + 1) % 3], f"user{n}", room_id)
        yield self.wait_for(lambda: all(len(self.checks(r)) >= 4 for r in ROOMS), "four sweeps of every room",
                            timeout=30)
        for room_id in ROOMS:
            self.assert_spaced(room_id)
        holders = {}
        for room_id in ROOMS:
            holders[room_id] = yield self.holder(room_id)
        self.assertTrue(set(holders.values()) <= {"inst0", "inst1", "inst2"}, holders)
        # kill -9 the instance sweeping the first room: another one sweeps it from now on
        victim = next(d for d in daemons if d.workdir.endswith(holders[ROOM_ID]))
        yield victim.kill()
        after = global_reactor.seconds()
        seen = len(self.checks(ROOM_ID))
        yield self.wait_for(lambda: len(self.checks(ROOM_ID)) >= seen + 3, "the room swept again", timeout=30)
        new_holder = yield self.holder(ROOM_ID)
        self.assertNotEqual(new_holder, holders[ROOM_ID])
        self.assert_spaced(ROOM_ID, since=after)
        self.assertEqual(self.lk.removal_requests, [])
