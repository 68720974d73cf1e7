"""The instance lease and the cluster's reactions, on task.Clock (docs/several-instances.md#leases).

Redis is a scripted stand-in here: it answers each script by name, so the tests are
about timing and bookkeeping; the scripts themselves run against a real redis-server in
tests/integration/test_cluster.py.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.cluster import scripts
from rtcauthd.cluster.coordinator import Cluster
from rtcauthd.cluster.lease import InstanceLease, instance_id
from rtcauthd.store.model import decode_value

NAMES = {text: name for name, text in scripts.SCRIPTS.items()}
FIELD = b'["room","alice"]'


class ScriptedRedis:
    """Answers eval by script name from ``answers`` (a value or a callable); records calls.
    ``hold`` keeps every answer pending (Redis unreachable)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list, list]] = []
        self.answers: dict[str, Any] = {"acquire": 1, "renew": 1, "release": 1, "claim": 1, "drain": [], "adopt": []}
        self.hold = False
        self.held: list[Deferred] = []

    def _reply(self, value: Any) -> Deferred:
        if self.hold:
            d: Deferred = Deferred()
            self.held.append(d)
            return d
        return succeed(value)

    def eval(self, script: str, keys: list, args: list) -> Deferred:
        name = NAMES[script]
        self.calls.append((name, keys, args))
        answer = self.answers.get(name, 1)
        return self._reply(answer(keys, args) if callable(answer) else answer)

    def execute_command(self, *args: Any) -> Deferred:
        self.calls.append((args[0].lower() if isinstance(args[0], str) else args[0], [], list(args[1:])))
        if args[0] == "SMEMBERS":
            return self._reply(self.answers.get("smembers", []))
        if args[0] == "MGET":
            return self._reply([None] * (len(args) - 1))
        if args[0] == "CLIENT" and args[1] == "LIST":
            return self._reply(b"")
        return self._reply(b"OK")

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


class Listener:
    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.taken: list = []  # the TakenJobs of the last takeover

    def job_lost(self, room: str, identity: str) -> None:
        self.events.append(("lost", room, identity))

    def taken_over(self, taken) -> None:
        self.events.append(("taken", [t.job.params.delay_id for t in taken]))
        self.taken = list(taken)

    def redeliver(self, room: str, identity: str, signal: str) -> None:
        self.events.append(("redeliver", room, identity, signal))

    def deliver(self, room: str, identity: str, signal: str) -> None:
        self.events.append(("deliver", room, identity, signal))
        return True


class LeaseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = ScriptedRedis()
        self.lease = InstanceLease(connection=lambda: self.redis, keys=scripts.ClusterKeys(0), iid=b"a#1",
                                   clock=self.clock, lease_seconds=10, op_timeout=2)

    def test_held_from_the_send_of_the_acquire_until_most_of_the_lease(self) -> None:
        self.redis.hold = True
        d = self.lease.acquire()
        self.clock.advance(1.5)  # the reply is slow
        self.redis.held.pop().callback(1)
        self.assertTrue(self.successResultOf(d))
        self.assertTrue(self.lease.holds())
        # 10 s lease less the 10 % margin, counted from the *sending* (t=0), not the reply
        self.clock.advance(7.4)
        self.assertTrue(self.lease.holds())
        self.clock.advance(0.2)
        self.assertFalse(self.lease.holds())

    def test_renew_extends_and_a_refused_renew_means_lost(self) -> None:
        self.lease.acquire()
        self.clock.advance(5)
        self.assertTrue(self.successResultOf(self.lease.renew()))
        self.clock.advance(8.9)  # 13.9 s after the start: held thanks to the renewal at 5 s
        self.assertTrue(self.lease.holds())
        self.redis.answers["renew"] = 0  # the key expired (we were paused) or is someone else's
        self.assertFalse(self.successResultOf(self.lease.renew()))
        self.assertFalse(self.lease.holds())
        self.assertFalse(self.lease.acquired)

    def test_while_redis_is_away_the_lease_runs_out_by_our_own_clock(self) -> None:
        self.lease.acquire()
        self.redis.hold = True
        renewal = self.lease.renew()
        self.clock.advance(2)
        self.failureResultOf(renewal)  # no answer within op_timeout
        self.assertTrue(self.lease.holds())
        self.clock.advance(7)
        self.assertFalse(self.lease.holds())

    def test_instance_ids_are_safe_client_names_and_unique(self) -> None:
        a, b = instance_id("host one/42"), instance_id("host one/42")
        self.assertNotEqual(a, b)
        self.assertRegex(a.decode(), r"\Ahost_one_42#[0-9a-f]{8}\Z")
        self.assertEqual(self.lease.client_name, b"rtcauthd-a#1")


class ClusterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = ScriptedRedis()
        self.listener = Listener()
        self.cluster = Cluster(connection=lambda: self.redis, clock=self.clock, iid=b"a#1", name="a", db=0,
                               lease_seconds=3, op_timeout=1, decode=decode_value)
        self.cluster.listener = self.listener
        self.successResultOf(self.cluster.start())
        self.addCleanup(self.cluster.stop)

    def test_renews_every_third_of_the_lease(self) -> None:
        self.redis.calls.clear()
        self.clock.advance(1)
        self.assertEqual(self.redis.names()[:3], ["renew", "drain", "smembers"])  # renew, own inbox, peers
        self.clock.advance(1)
        self.assertEqual(self.redis.names().count("renew"), 2)

    def test_a_lost_lease_drops_every_job_then_takes_back_what_is_left(self) -> None:
        self.cluster.tokens[FIELD] = b"7|a#1"
        self.redis.answers["renew"] = 0
        self.clock.advance(1)
        # (a job whose registration is still queued has no token yet, and keeps running)
        self.assertEqual(self.listener.events, [("lost", "room", "alice")])
        self.assertEqual(self.cluster.tokens, {})
        # a new lease, then our own leftovers are looked up for adoption
        self.assertIn(("smembers", [], [scripts.ClusterKeys(0).owned(b"a#1")]), self.redis.calls)
        self.assertTrue(self.cluster.lease.acquired)

    def test_a_restart_write_refused_by_the_fence_drops_the_job(self) -> None:
        self.cluster.tokens[FIELD] = b"7|a#1"
        self.redis.answers["restarted"] = 0
        self.cluster.write("restarted", FIELD, b"{}")
        self.assertEqual(self.listener.events, [("lost", "room", "alice")])
        self.assertNotIn(FIELD, self.cluster.tokens)

    def test_claim_answers_and_forgets_the_token(self) -> None:
        self.cluster.tokens[FIELD] = b"7|a#1"
        self.assertEqual(self.successResultOf(self.cluster.claim(FIELD)), 1)
        self.assertEqual(self.cluster.tokens, {})
        self.assertEqual(self.successResultOf(self.cluster.claim(FIELD)), 0)  # no token: not ours

    def test_superseded_only_by_a_newer_fence(self) -> None:
        self.cluster.tokens[FIELD] = b"7|a#1"
        self.cluster.on_message(b"chan", b"superseded\n5\n" + FIELD)  # older than ours: a stale message
        self.assertEqual(self.listener.events, [])
        self.cluster.on_message(b"chan", b"superseded\n9\n" + FIELD)
        self.assertEqual(self.listener.events, [("lost", "room", "alice")])

    def test_routed_signal_is_delivered_and_a_hand_over_starts_a_takeover(self) -> None:
        self.cluster.on_message(b"chan", b"signal\nParticipantConnected\n" + FIELD)
        self.assertEqual(self.listener.events, [("deliver", "room", "alice", "ParticipantConnected")])
        self.redis.calls.clear()
        self.cluster.on_message(b"all", b"gone\nb#2")
        self.assertEqual(self.redis.calls[0], ("smembers", [], [scripts.ClusterKeys(0).owned(b"b#2")]))

    def test_stop_releases_the_lease_and_stops_renewing(self) -> None:
        self.successResultOf(self.cluster.stop())
        self.assertEqual(self.redis.names()[-1], "release")
        self.redis.calls.clear()
        self.clock.advance(5)
        self.assertEqual(self.redis.calls, [])

    def test_peers_without_a_liveness_key_are_taken_over(self) -> None:
        self.redis.answers["smembers"] = [b"a#1", b"b#2"]
        self.clock.advance(1)
        owned_lookups = [c for c in self.redis.calls if c[0] == "smembers" and c[2] != [scripts.INSTANCES]]
        self.assertEqual(owned_lookups, [("smembers", [], [scripts.ClusterKeys(0).owned(b"b#2")])])


class GraceTests(SynchronousTestCase):
    """A peer whose liveness key lives but whose connection is missing is dead only if it
    is still missing a renewal interval later (at start-up: at once)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = ScriptedRedis()
        self.redis.execute_command = self.command
        self.cluster = Cluster(connection=lambda: self.redis, clock=self.clock, iid=b"a#1", name="a", db=0,
                               lease_seconds=3, op_timeout=1, decode=decode_value)

    def command(self, *args):
        if args[0] == "MGET":
            return succeed([b"b#2"])  # b's liveness key is alive
        return succeed(b"id=1 name=rtcauthd-a#1\n")  # CLIENT LIST: only our own connection

    def test_missing_connection_must_persist_for_a_renewal_interval(self) -> None:
        self.assertEqual(self.successResultOf(self.cluster.dead_instances([b"b#2"])), set())
        self.clock.advance(0.5)
        self.assertEqual(self.successResultOf(self.cluster.dead_instances([b"b#2"])), set())
        self.clock.advance(0.5)
        self.assertEqual(self.successResultOf(self.cluster.dead_instances([b"b#2"])), {b"b#2"})

    def test_at_start_up_at_once(self) -> None:
        self.assertEqual(self.successResultOf(self.cluster.dead_instances([b"b#2"], at_once=True)), {b"b#2"})
