"""Black-box: exactly-once leaves and several instances on one Redis (issue 13; docs/several-instances.md).

Real daemons (``twistd rtcauth``) on loopback share one real redis-server; a round-robin
client of the test's own spreads delegations and webhooks over them; the fake
homeserver counts every restart and send per ``delay_id``. Nothing is asserted about
durations: effects are polled for with bounded deadlines, and "never sent twice" is
shown by what Redis and the daemons' own restore logs hold afterwards plus the final
per-``delay_id`` send counts.
"""

from __future__ import annotations

import itertools
import re
import signal

from twisted.internet import defer
from twisted.internet import reactor as global_reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from tests.blackbox.test_delegated_leave import REDIS_BACK_DEADLINE, LeaveCase, job_field, sign_webhook, webhook_body

#: a short lease so that takeover after kill -9 / SIGSTOP happens within a test's bounds
LEASE_SECONDS = 3
TAKEOVER_DEADLINE = 20.0


class RoundRobin:
    """The load balancer in front: each request goes to the next running instance."""

    def __init__(self, daemons) -> None:
        self.daemons = daemons
        self._turn = itertools.count()

    def next(self):
        running = [d for d in self.daemons if d.running]
        return running[next(self._turn) % len(running)]

    def post_json(self, path: str, body):
        return self.next().post_json(path, body)

    def request(self, *args, **kw):
        return self.next().request(*args, **kw)


class InstancesCase(LeaveCase):
    """One redis-server, N daemons sharing it, a round-robin client."""

    def setUp(self):
        LeaveCase.setUp(self)
        self.daemons = []
        self.lb = RoundRobin(self.daemons)

    def instance_env(self, name: str) -> dict[str, str]:
        return self.leave_env(
            RTCAUTH_INSTANCE_NAME=name,
            RTCAUTH_JOB_LEASE_SECONDS=str(LEASE_SECONDS),
            RTCAUTH_RATELIMIT_PER_SECOND="0",
        )

    @defer.inlineCallbacks
    def start_instances(self, count: int):
        yield self.redis.start()
        for i in range(count):
            d = self.make_daemon(self.instance_env(f"inst{i}"), name=f"inst{i}")
            yield d.start()
            self.daemons.append(d)
        self.daemon = self.daemons[0]  # LeaveCase helpers talk to one daemon; we use the balancer
        return self.daemons

    @defer.inlineCallbacks
    def delegate(self, p, delay_id: str, timeout_ms: int):
        result = yield self.lb.post_json("/get_token", p.body(delay_id, timeout_ms))
        self.assertEqual(result.code, 200, f"{result.body!r}\n{self.describe()}")

    @defer.inlineCallbacks
    def hook(self, event: str, p, reason: str | None = None):
        body = webhook_body(event, p.room, p.identity, reason)
        headers = {"Content-Type": "application/webhook+json", "Authorization": sign_webhook(body, self.key, self.secret)}
        result = yield self.lb.request("POST", "/sfu_webhook", body, headers)
        self.assertEqual((result.code, result.body), (200, b""))

    def owners(self):
        """Which instance (by RTCAUTH_INSTANCE_NAME) owns each job field, read from Redis."""
        def decode(flat):
            pairs = dict(zip(flat[0::2], flat[1::2])) if flat else {}
            return {f: t.split(b"|", 1)[1].split(b"#", 1)[0].decode() for f, t in pairs.items()}

        return self.redis.command("HGETALL", "rtcauth:owners").addCallback(decode)

    def wait_sends(self, delay_ids, timeout: float = TAKEOVER_DEADLINE):
        return self.wait_for(lambda: all(self.hs.sends(d) for d in delay_ids),
                             f"a send for each of {len(delay_ids)} delay IDs", timeout)

    def assert_each_sent_once(self, delay_ids) -> None:
        counts = {d: len(self.hs.sends(d)) for d in delay_ids}
        self.assertEqual(counts, dict.fromkeys(delay_ids, 1), self.describe())

    def restored_counts(self, daemon) -> list[int]:
        return [int(n) for n in re.findall(r"Restored (\d+) delegated-leave job", daemon.output)]


class ExactlyOnceAfterKillTests(InstancesCase, unittest.TestCase):
    """The single-instance bug of issue 13 item 4: kill -9 right after sending 20 leaves."""

    @defer.inlineCallbacks
    def test_kill_9_right_after_twenty_sends_never_sends_again(self):
        (daemon,) = yield self.start_instances(1)
        people = [self.participant(f"u{i}", f"syd_k{i}") for i in range(20)]
        ids = [f"syd_k{i}" for i in range(20)]
        for p, delay_id in zip(people, ids):
            yield self.delegate(p, delay_id, 30000)
            yield self.hook("participant_joined", p)
        yield self.wait_for(lambda: all(self.hs.restarts(d) for d in ids), "every job to be restarted once")

        # the homeserver takes the sends in and never answers: the daemon is killed with
        # every leave sent and none of the sends finished
        self.hs.never_answer()
        for p in people:
            yield self.hook("participant_left", p, "CLIENT_INITIATED")
        yield self.wait_sends(ids)
        yield daemon.kill()  # no clean shutdown: whatever is not in Redis yet is lost
        self.hs.answer_normally()

        # every sent leave's record was gone from Redis before its send went out
        records = yield self.stored()
        self.assertEqual(records, {}, self.describe())
        yield daemon.restart()
        self.assertEqual(self.restored_counts(daemon)[-1], 0, daemon.output)
        yield self.stop_daemon()
        self.assert_each_sent_once(ids)


class SharedRedisTests(InstancesCase, unittest.TestCase):
    """Three instances, one Redis: every job has one driver, wherever its webhooks land."""

    @defer.inlineCallbacks
    def connected_jobs(self, count: int, prefix: str):
        """``count`` participants delegated and connected through the balancer."""
        people = [self.participant(f"{prefix}{i}", f"syd_{prefix}{i}") for i in range(count)]
        for p in people:
            self.lk.set_present(p.room, p.identity)
            yield self.delegate(p, p.delay_id, 4000)
        for p in people:
            yield self.hook("participant_joined", p)
        yield self.wait_for(lambda: all(self.hs.restarts(p.delay_id) for p in people), "every job to be restarted")
        return people

    def participant(self, name: str, *delay_ids: str):
        p = LeaveCase.participant(self, name, *delay_ids)
        p.delay_id = delay_ids[0] if delay_ids else None
        return p

    def drivers(self, p) -> list[str]:
        """Instances whose log shows this job being connected (one driver = one name)."""
        pattern = re.compile(r"for [^ ]*/" + re.escape(p.identity) + r": \w+ -> Connected")
        return [d.workdir.rsplit("/", 1)[-1] for d in self.daemons if pattern.search(d.output)]

    @defer.inlineCallbacks
    def leave_all(self, people):
        for p in people:
            self.lk.set_present(p.room, p.identity, False)
            yield self.hook("participant_left", p, "CLIENT_INITIATED")
        yield self.wait_sends([p.delay_id for p in people])

    @defer.inlineCallbacks
    def stop_all(self):
        for d in self.daemons:
            if d.running:
                yield d.stop()

    def assert_restarts_spaced(self, people, timeout_ms: int) -> None:
        """Restarts of one delayed event come every 80 % of its timeout from its one driver;
        two drivers would put some of them much closer together. (Lower bound only: a
        slow machine spreads them further apart, never closer.)"""
        for p in people:
            times = [c.at for c in self.hs.restarts(p.delay_id)]
            gaps = [b - a for a, b in zip(times, times[1:])]
            self.assertTrue(all(g >= 0.4 * timeout_ms / 1000 for g in gaps), (p.delay_id, gaps, self.describe()))

    @defer.inlineCallbacks
    def test_jobs_over_three_instances_are_each_driven_by_one(self):
        yield self.start_instances(3)
        people = yield self.connected_jobs(9, "a")
        owners = yield self.owners()
        self.assertEqual(sorted(owners), sorted(job_field(p.room, p.identity) for p in people))
        self.assertEqual(set(owners.values()), {"inst0", "inst1", "inst2"})  # round robin spread them
        # webhooks reached random instances, yet each job was connected by one instance only
        yield deferLater(global_reactor, 4.0, lambda: None)  # a few restart rounds (not asserted as time)
        for p in people:
            self.assertEqual(len(self.drivers(p)), 1, (p.delay_id, self.drivers(p)))
        self.assert_restarts_spaced(people, 4000)
        yield self.leave_all(people)
        yield self.wait_for(lambda: self.stored().addCallback(lambda r: r == {}), "every record to be gone")
        yield self.stop_all()
        self.assert_each_sent_once([p.delay_id for p in people])

    @defer.inlineCallbacks
    def test_kill_9_of_the_busiest_instance_its_jobs_are_taken_over(self):
        yield self.start_instances(3)
        people = yield self.connected_jobs(9, "b")
        owners = yield self.owners()
        counts = {name: list(owners.values()).count(name) for name in ("inst0", "inst1", "inst2")}
        busiest = max(counts, key=counts.get)
        victim = [d for d in self.daemons if d.workdir.endswith(busiest)][0]
        yield victim.kill()

        def moved(o):
            return len(o) == len(people) and busiest not in o.values()

        yield self.wait_for(lambda: self.owners().addCallback(moved), f"{busiest}'s jobs to be taken over",
                            TAKEOVER_DEADLINE)
        taken = [p for p in people if owners[job_field(p.room, p.identity)] == busiest]
        before = {p.delay_id: len(self.hs.restarts(p.delay_id)) for p in taken}
        # a taken-over job knows its participant had connected: it is restarted again at once
        yield self.wait_for(lambda: all(len(self.hs.restarts(d)) > n for d, n in before.items()),
                            "the taken-over jobs to be restarted by their new owners", TAKEOVER_DEADLINE)
        yield self.leave_all(people)
        yield self.stop_all()
        self.assert_each_sent_once([p.delay_id for p in people])

    @defer.inlineCallbacks
    def test_sigterm_hands_over_at_once_and_a_rolling_restart_loses_nothing(self):
        yield self.start_instances(3)
        people = yield self.connected_jobs(6, "c")
        for d in list(self.daemons):
            mark = d.mark()
            others = [o for o in self.daemons if o is not d]
            marks = [o.mark() for o in others]
            yield d.stop()
            self.assertIn("Handing this instance's jobs over", d.output_since(mark))
            # the others heard of it from the instance itself, not from its lease running out
            heard = yield self.wait_for(
                lambda: any("handed its jobs over" in o.output_since(m) for o, m in zip(others, marks)),
                "another instance to hear of the hand-over")
            self.assertTrue(heard)
            yield d.restart()
            # nothing lost: every job still has its record and a live owner
            owners = yield self.owners()
            self.assertEqual(sorted(owners), sorted(job_field(p.room, p.identity) for p in people), self.describe())
        yield self.leave_all(people)
        yield self.stop_all()
        self.assert_each_sent_once([p.delay_id for p in people])

    @defer.inlineCallbacks
    def test_a_paused_instance_past_its_lease_never_sends(self):
        yield self.start_instances(2)
        paused = self.daemons[0]
        p = self.participant("dora", "syd_paused")  # never on the SFU: the leave is due after the window
        result = yield paused.post_json("/get_token", p.body("syd_paused", 4000))
        self.assertEqual(result.code, 200)
        owners = yield self.owners()
        self.assertEqual(list(owners.values()), ["inst0"])
        paused.send_signal(signal.SIGSTOP)
        try:
            yield self.wait_for(lambda: self.owners().addCallback(lambda o: list(o.values()) != ["inst0"]),
                                "the other instance to take the job over", TAKEOVER_DEADLINE)
            yield self.wait_sends(["syd_paused"])
        finally:
            mark = paused.mark()
            paused.send_signal(signal.SIGCONT)
        # the paused one wakes with its waiting timer long due, but its lease is gone
        yield paused.wait_for_line(r"lease of instance .* was lost|driven by another instance", since=mark,
                                   timeout=TAKEOVER_DEADLINE)
        yield self.stop_all()
        self.assert_each_sent_once(["syd_paused"])
        self.assertEqual(len(self.hs.sends("syd_paused")), 1)

    @defer.inlineCallbacks
    def test_a_replacement_on_another_instance_supersedes_the_old_job(self):
        yield self.start_instances(2)
        first, second = self.daemons
        p = self.participant("erin", "syd_old", "syd_new")
        self.lk.set_present(p.room, p.identity)
        result = yield first.post_json("/get_token", p.body("syd_old", 4000))
        self.assertEqual(result.code, 200)
        yield self.wait_calls("syd_old", "restart")
        result = yield second.post_json("/get_token", p.body("syd_new", 4000))
        self.assertEqual(result.code, 200)
        yield first.wait_for_line(r"driven by another instance")
        yield self.wait_calls("syd_new", "restart")
        yield self.leave_all_of(p, "syd_new")
        yield self.stop_all()
        self.assertEqual(len(self.hs.sends("syd_old")), 0, self.describe())
        self.assert_each_sent_once(["syd_new"])

    @defer.inlineCallbacks
    def leave_all_of(self, p, delay_id: str):
        self.lk.set_present(p.room, p.identity, False)
        yield self.hook("participant_left", p, "CLIENT_INITIATED")
        yield self.wait_sends([delay_id])


class SentinelTests(InstancesCase, unittest.TestCase):
    """Two instances behind Debian's redis-sentinel while the Redis master dies."""

    @defer.inlineCallbacks
    def test_two_instances_follow_a_sentinel_failover_and_send_each_leave_once(self):
        from tests.integration.test_sentinel import SERVICE, Sentinel
        from tests.support.redis_server import RedisServer, raw_hgetall

        master = RedisServer(self)
        yield master.start()
        replica = RedisServer(self, "--replicaof", "127.0.0.1", str(master.port))
        yield replica.start()
        sentinel = Sentinel(self, master.port)
        yield self.wait_for(sentinel.knows_replicas, "the Sentinel to find the replica", 30)
        for i in range(2):
            env = self.instance_env(f"inst{i}")
            env.update(LIVEKIT_REDIS_URL="redis://127.0.0.1:1/0",  # host and port come from the Sentinel
                       RTCAUTH_REDIS_SENTINELS=f"127.0.0.1:{sentinel.port}", RTCAUTH_REDIS_SENTINEL_MASTER=SERVICE)
            d = self.make_daemon(env, name=f"inst{i}")
            yield d.start()
            self.daemons.append(d)
        self.daemon = self.daemons[0]

        before = self.participant("fay", "syd_before")
        self.lk.set_present(before.room, before.identity)
        # 30 s: a send that must wait for the failover still has its window (it is never
        # sent while this instance cannot prove it owns the job)
        yield self.delegate(before, "syd_before", 30000)
        yield self.hook("participant_joined", before)
        yield self.wait_calls("syd_before", "restart")
        field = job_field(before.room, before.identity)
        yield self.wait_for(lambda: field in raw_hgetall(replica.port), "the record to reach the replica")

        master.kill()
        yield self.wait_for(lambda: sentinel.master_port() == replica.port, "the Sentinel's failover", 60)
        after = self.participant("gus", "syd_after")
        self.lk.set_present(after.room, after.identity)
        yield self.delegate(after, "syd_after", 30000)
        yield self.hook("participant_joined", after)
        yield self.wait_calls("syd_after", "restart", timeout=REDIS_BACK_DEADLINE)
        # accepted while an instance may still be finding the new master: queued, then written
        after_field = job_field(after.room, after.identity)
        yield self.wait_for(lambda: after_field in raw_hgetall(replica.port), "the new job's record on the new master",
                            REDIS_BACK_DEADLINE)
        # webhooks may meet an instance still finding the new master: they are retried
        for p in (before, after):
            self.lk.set_present(p.room, p.identity, False)
            yield self.hook("participant_left", p, "CLIENT_INITIATED")
        yield self.wait_sends(["syd_before", "syd_after"], 2 * REDIS_BACK_DEADLINE)
        yield self.wait_for(lambda: raw_hgetall(replica.port) == {}, "both records to be gone from the new master")
        for d in self.daemons:
            yield d.stop()
        self.assert_each_sent_once(["syd_before", "syd_after"])
