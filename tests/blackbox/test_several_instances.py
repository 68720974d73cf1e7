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

        for p in people:
            yield self.hook("participant_left", p, "CLIENT_INITIATED")
        yield self.wait_sends(ids)
        yield daemon.kill()  # no clean shutdown: whatever is not in Redis yet is lost

        # every sent leave's record was gone from Redis before its send went out
        records = yield self.stored()
        self.assertEqual(records, {}, self.describe())
        yield daemon.restart()
        self.assertEqual(self.restored_counts(daemon)[-1], 0, daemon.output)
        yield self.stop_daemon()
        self.assert_each_sent_once(ids)
