"""Several RedisStores sharing one real redis-server: the Lua scripts, fencing and routing
(docs/several-instances.md). Each store stands for one instance."""

from __future__ import annotations

import txredisapi
from twisted.internet import reactor
from twisted.internet.task import deferLater
from prometheus_client import generate_latest
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from rtcauthd.cluster.coordinator import ClusterSettings
from rtcauthd.metrics import Metrics
from rtcauthd.store.interface import Claim
from rtcauthd.store.model import encode_field, encode_value
from rtcauthd.store.redis import JOBS_KEY, RedisStore
from tests.integration.test_redis_store import GO_VALUES, job
from tests.support.redis_server import RedisServer, raw, raw_hgetall, wait_until
from tests.unit.test_cluster_lease import Listener

FIELD = encode_field("room-1", "ident-1").encode()


class ClusterCase(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.patch(txredisapi.RedisFactory, "initialDelay", 0.05)
        self.patch(txredisapi.RedisFactory, "maxDelay", 0.2)
        self.server = RedisServer(self)
        yield self.server.start()

    @inlineCallbacks
    def instance(self, name: str, lease: float = 3.0, metrics=None):
        store = RedisStore.from_url(
            f"redis://127.0.0.1:{self.server.port}/0", op_timeout=1.0, restore_wait=2.0, retry_interval=0.1,
            cluster=ClusterSettings(name=name, lease_seconds=lease), metrics=metrics,
        )
        self.addCleanup(store.close)
        listener = Listener()
        store.set_listener(listener)
        loaded = yield store.load_all()
        yield wait_until(lambda: name_seen(self.server.port, store), what=f"{name}'s subscription")
        return store, listener, loaded

    def owner(self, field: bytes = FIELD) -> bytes:
        token = raw(self.server.port, "HGET", "rtcauth:owners", field)
        return token.split(b"|", 1)[1].split(b"#")[0] if token else b""


def name_seen(port: int, store) -> bool:
    return raw(port, "PUBSUB", "NUMSUB", store.cluster.keys.channel(store.cluster.iid))[1] == 1


class FencingTests(ClusterCase):
    @inlineCallbacks
    def test_the_jobs_hash_stays_upstreams_and_cluster_state_has_keys_of_its_own(self):
        a, _, _ = yield self.instance("a")
        j = job(room="room-1", identity="ident-1")
        yield a.register(j)
        yield a.put(j)
        self.assertEqual(raw_hgetall(self.server.port), {FIELD: encode_value(j).encode()})
        keys = sorted(raw(self.server.port, "KEYS", "*"))
        self.assertEqual([k for k in keys if not k.startswith(b"rtcauth:")], [JOBS_KEY])
        self.assertEqual(self.owner(), b"a")

    @inlineCallbacks
    def test_a_replacement_elsewhere_supersedes_and_fences_the_old_owner(self):
        a, heard_a, _ = yield self.instance("a")
        b, _, _ = yield self.instance("b")
        yield a.register(job(room="room-1", identity="ident-1", delay_id="old"))
        yield b.register(job(room="room-1", identity="ident-1", delay_id="new"))
        self.assertEqual(self.owner(), b"b")
        yield wait_until(lambda: ("lost", "room-1", "ident-1") in heard_a.events, what="a to hear it was superseded")
        # a's late writes cannot touch b's record, nor can a send its leave
        yield a.put(job(room="room-1", identity="ident-1", delay_id="old"))
        claim = yield a.claim_send("room-1", "ident-1")
        self.assertEqual(claim, Claim.LOST)
        self.assertIn(b'"DelayId":"new"', raw_hgetall(self.server.port)[FIELD])
        claim = yield b.claim_send("room-1", "ident-1")
        self.assertEqual(claim, Claim.GRANTED)
        self.assertEqual(raw_hgetall(self.server.port), {})

    @inlineCallbacks
    def test_records_without_an_owner_are_adopted_at_start_by_one_instance(self):
        for field, value in GO_VALUES.items():
            raw(self.server.port, "HSET", JOBS_KEY, field, value)
        _, _, first = yield self.instance("a")
        _, _, second = yield self.instance("b")  # a is alive: nothing for b
        self.assertEqual(sorted(j.params.delay_id for j in first), ["syd_a", "syd_b", "syd_c"])
        self.assertEqual(second, [])
        self.assertEqual({self.owner(f) for f in GO_VALUES}, {b"a"})


    @inlineCallbacks
    def test_metrics_show_who_holds_what(self):
        metrics = Metrics()
        a, _, _ = yield self.instance("a", metrics=metrics)
        yield a.register(job(room="room-1", identity="ident-1"))
        routed = yield a.forward("room-2", "nobody", "ParticipantConnected")
        self.assertEqual(routed, "none")
        text = generate_latest(metrics.registry).decode()
        self.assertIn('rtcauthd_lease_held{instance="a"} 1.0', text)
        self.assertIn('rtcauthd_jobs_owned{instance="a"} 1.0', text)
        self.assertIn('rtcauthd_webhooks_routed_total{instance="a",result="none"} 1.0', text)


class TakeoverTests(ClusterCase):
    @inlineCallbacks
    def test_a_dead_instances_jobs_and_kept_webhooks_go_to_a_survivor(self):
        a, _, _ = yield self.instance("a")
        b, heard_b, _ = yield self.instance("b")
        yield a.register(job(room="room-1", identity="ident-1"))
        yield a.put(job(room="room-1", identity="ident-1"))  # a restart: the participant had connected
        # a dies without a word: its connections go, its liveness key outlives it for a while
        a.cluster.stop_renewing()
        a_iid = a.cluster.iid
        yield a._redis.disconnect()
        yield a._subscriber.disconnect()
        a._subscriber = None
        a._cluster = None  # nothing of a acts again
        # while a's key lives, a is taken for alive but not listening: its inbox
        queued = yield b.forward("room-1", "ident-1", "ParticipantConnected")
        self.assertEqual(queued, "queued")
        b.cluster.stop_renewing()  # b's rounds are run by hand
        yield b.cluster.scan_peers()  # a's connection is gone ...
        self.assertEqual(self.owner(), b"a")
        yield deferLater(reactor, b.cluster.renew_interval, lambda: None)
        # once a's key is gone too, a signal is kept with the job for its next owner
        raw(self.server.port, "DEL", b"rtcauth:instance:" + a_iid)
        kept = yield b.forward("room-1", "ident-1", "ParticipantDisconnectedIntentionally")
        self.assertEqual(kept, "kept")
        yield b.cluster.scan_peers()  # ... and still gone a renewal interval later: a is dead
        self.assertEqual(self.owner(), b"b")
        (taken,) = [e for e in heard_b.events if e[0] == "taken"]
        self.assertEqual(taken, ("taken", ["syd_integration_1"]))
        self.assertEqual(heard_b.taken[0].pending, ("ParticipantDisconnectedIntentionally",))
        self.assertTrue(heard_b.taken[0].connected)
        # and what waited in the dead one's inbox is routed on, to the new owner
        self.assertIn(("redeliver", "room-1", "ident-1", "ParticipantConnected"), heard_b.events)

    @inlineCallbacks
    def test_a_live_but_slow_instance_keeps_its_jobs_until_its_lease_expires(self):
        a, _, _ = yield self.instance("a", lease=0.6)
        b, _, _ = yield self.instance("b", lease=0.6)
        yield a.register(job(room="room-1", identity="ident-1"))
        a.cluster.stop_renewing()  # "paused": its connection stays open, it just says nothing
        b.cluster.stop_renewing()  # b's rounds are run by hand below
        yield b.cluster.scan_peers()
        self.assertEqual(self.owner(), b"a")  # connected and within its lease: alive
        yield wait_until(lambda: raw(self.server.port, "EXISTS", a.cluster.keys.instance(a.cluster.iid)) == 0,
                         what="a's lease to expire in Redis")
        yield b.cluster.scan_peers()
        self.assertEqual(self.owner(), b"b")
        # a wakes up: its send claim is refused, and its next round finds the lease gone
        claim = yield a.claim_send("room-1", "ident-1")
        self.assertEqual(claim, Claim.LOST)
        yield a.cluster.tick()
        self.assertTrue(a.cluster.lease.acquired)  # a lease again, and nothing of b's taken back
        self.assertEqual(self.owner(), b"b")
