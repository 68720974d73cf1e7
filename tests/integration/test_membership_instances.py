"""Two membership monitors sharing one real redis-server, as two instances would
(docs/membership.md#several-instances): one sweep per room per interval, a removal done
once, a join reported to the instance that did not mint the token, takeover of a dead
instance's rooms. The SFU and the homeserver are the unit tests' fakes, shared by both."""

from __future__ import annotations

from types import SimpleNamespace

import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks, succeed
from twisted.trial.unittest import TestCase

from rtcauthd.cluster.scripts import ClusterKeys
from rtcauthd.membership.monitor import build_monitor
from rtcauthd.store.redis_url import parse_redis_url
from tests.support.redis_server import RedisServer, raw, wait_until
from tests.unit.test_membership_sweep import FakeHomeserver, FakeRooms

HS = "example.com"
ROOMS = [f"!room{n}:{HS}" for n in range(6)]


class FakeCluster:
    """What the monitor uses of the job store's Cluster: the instance id and key names."""

    def __init__(self, iid: bytes) -> None:
        self.iid = iid
        self.keys = ClusterKeys(0)


class InstancesCase(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.patch(txredisapi.RedisFactory, "initialDelay", 0.05)
        self.server = RedisServer(self)
        yield self.server.start()
        self.hs = FakeHomeserver()
        self.sfu = FakeRooms()
        self.stopped = []
        self.iids = {}

    @inlineCallbacks
    def instance(self, name: str):
        iid = f"{name}#0000".encode()
        self.alive(iid)
        config = SimpleNamespace(
            redis_url=f"redis://127.0.0.1:{self.server.port}/0", token_ttl=3600.0, hs_server_name=HS,
            membership_check_interval=30,
        )
        cluster = FakeCluster(iid)
        monitor = build_monitor(
            config=config, clock=reactor, homeserver=self.hs, resolve_cs_api=lambda _name: succeed("https://hs"),
            rooms=self.sfu, stop_job=lambda room, identity: self.stopped.append((name, room, identity)),
            redis_target=parse_redis_url(config.redis_url), cluster=lambda: cluster,
        )
        self.iids[name] = iid
        self.addCleanup(monitor.stop)
        yield monitor._store.load_all()  # connected
        return monitor

    def alive(self, iid: bytes) -> None:
        raw(self.server.port, "SET", b"rtcauth:instance:" + iid, iid, "PX", 60_000)
        raw(self.server.port, "SADD", "rtcauth:instances", iid)

    def dead(self, iid: bytes) -> None:
        raw(self.server.port, "DEL", b"rtcauth:instance:" + iid)
        raw(self.server.port, "SREM", "rtcauth:instances", iid)

    def token(self, monitor, user: str, room_id: str):
        """``monitor``'s instance minted a token for ``user`` (joined on the homeserver)."""
        lk_room, identity = f"LK{ROOMS.index(room_id)}", f"ID_{user}"
        monitor.register(matrix_room_id=room_id, matrix_user_id=f"@{user}:{HS}", livekit_room=lk_room,
                         livekit_identity=identity)
        self.hs.joined.setdefault(room_id, set()).add(f"@{user}:{HS}")
        return lk_room, identity

    def webhook(self, monitor, event: str, room: str, identity: str) -> None:
        if event == "participant_joined":
            self.sfu.present.add((room, identity))
        monitor.on_webhook(SimpleNamespace(event=event, room_name=room, participant_identity=identity))

    def written(self, count: int):
        return wait_until(lambda: raw(self.server.port, "HLEN", "lk-jwt:participants") >= count,
                          what=f"{count} participant records")

    def checks(self, room_id: str) -> int:
        return sum(1 for c in self.hs.calls if c[0] == "joined_members" and c[2] == room_id)

    def removals(self, identity: str) -> int:
        return sum(1 for c in self.sfu.of("RemoveParticipant") if c[2] == identity)

    @inlineCallbacks
    def sweep_both(self, *monitors):
        for monitor in monitors:
            yield monitor.sweep.tick()


class OneSweepPerRoomTests(InstancesCase):
    @inlineCallbacks
    def test_each_room_is_checked_by_one_instance_per_interval(self):
        a = yield self.instance("a")
        b = yield self.instance("b")
        people = []
        for n, room_id in enumerate(ROOMS):
            minted_by, told = (a, b) if n % 2 else (b, a)  # token on one, join webhook on the other
            people.append((told, self.token(minted_by, f"user{n}", room_id)))
        yield self.written(len(ROOMS))
        for told, (lk_room, identity) in people:
            self.webhook(told, "participant_joined", lk_room, identity)
        yield wait_until(lambda: len(self.hs.calls) >= len(ROOMS), what="the join checks")
        for interval in range(1, 4):
            yield self.sweep_both(a, b) if interval % 2 else self.sweep_both(b, a)
            self.assertEqual({r: self.checks(r) for r in ROOMS}, {r: interval for r in ROOMS})
            # a first sweep looks up what it learnt from Redis once; nobody is looked up twice
            looked_up = [c[2] for c in self.sfu.of("GetParticipant")]
            self.assertEqual(len(looked_up), len(set(looked_up)))
        # every room was checked in every round, by the instance holding its claim, and only by it
        holders = {r: raw(self.server.port, "GET", b"rtcauth:membership:room:" + r.encode()) for r in ROOMS}
        self.assertEqual(set(holders.values()) - {b"a#0000", b"b#0000"}, set())
        self.assertEqual(self.sfu.of("RemoveParticipant"), [])


class RemovalOnceTests(InstancesCase):
    @inlineCallbacks
    def test_a_join_on_the_other_instance_is_checked_and_removed_once(self):
        a = yield self.instance("a")
        b = yield self.instance("b")
        lk_room, identity = self.token(a, "mallory", ROOMS[0])
        yield self.written(1)
        self.hs.joined[ROOMS[0]].discard(f"@mallory:{HS}")  # banned since her token was minted
        self.webhook(b, "participant_joined", lk_room, identity)  # the load balancer picked b
        yield wait_until(lambda: self.removals(identity) == 1, what="mallory's removal")
        yield wait_until(lambda: raw(self.server.port, "HGET", "rtcauth:membership:state",
                                     f'["{lk_room}","{identity}"]') == b"removed", what="the removal record")
        # the removal causes participant_left, delivered to a: the record stays (she may reconnect)
        self.webhook(a, "participant_left", lk_room, identity)
        for _ in range(3):
            yield self.sweep_both(a, b)
        self.assertEqual(self.removals(identity), 1)
        self.assertTrue(raw(self.server.port, "HGET", "lk-jwt:participants", f'["{lk_room}","{identity}"]'))
        # she reconnects with the same token through a: removed again, once
        self.webhook(a, "participant_joined", lk_room, identity)
        yield wait_until(lambda: self.removals(identity) == 2, what="the second removal")
        for _ in range(2):
            yield self.sweep_both(b, a)
        self.assertEqual(self.removals(identity), 2)

    @inlineCallbacks
    def test_a_sweep_and_a_join_check_on_two_instances_remove_once(self):
        a = yield self.instance("a")
        b = yield self.instance("b")
        lk_room, identity = self.token(a, "eve", ROOMS[1])
        self.webhook(a, "participant_joined", lk_room, identity)
        yield wait_until(lambda: any(c[0] == "is_joined" for c in self.hs.calls), what="the join check")
        yield self.written(1)
        yield b.sweep.tick()  # b now knows eve, connected
        self.assertTrue(b.tracker.get(lk_room, identity).connected)
        self.hs.joined[ROOMS[1]].clear()
        self.hs.joined[ROOMS[1]].add(f"@someone:{HS}")
        self.webhook(a, "participant_joined", lk_room, identity)  # a reconnect, told to a
        yield self.sweep_both(b)  # while b's sweep finds her gone from the room
        yield wait_until(lambda: self.removals(identity) >= 1, what="eve's removal")
        yield self.sweep_both(a, b, a, b)
        self.assertEqual(self.removals(identity), 1)


class TakeoverTests(InstancesCase):
    @inlineCallbacks
    def test_the_rooms_of_a_dead_instance_are_swept_by_another_at_its_next_sweep(self):
        a = yield self.instance("a")
        b = yield self.instance("b")
        for n, room_id in enumerate(ROOMS[:3]):
            lk_room, identity = self.token(a, f"user{n}", room_id)
            self.webhook(a, "participant_joined", lk_room, identity)
        yield self.written(3)
        yield a.sweep.tick()  # a claims the three rooms
        yield b.sweep.tick()
        self.assertEqual([self.checks(r) for r in ROOMS[:3]], [1, 1, 1])
        yield b.sweep.tick()
        self.assertEqual([self.checks(r) for r in ROOMS[:3]], [1, 1, 1])  # a is alive: not b's
        self.dead(self.iids["a"])  # kill -9 of a, noticed by the cluster
        yield a.stop()
        yield b.sweep.tick()
        self.assertEqual([self.checks(r) for r in ROOMS[:3]], [2, 2, 2])
        holders = {raw(self.server.port, "GET", b"rtcauth:membership:room:" + r.encode()) for r in ROOMS[:3]}
        self.assertEqual(holders, {b"b#0000"})
