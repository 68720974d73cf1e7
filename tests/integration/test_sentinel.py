"""Redis behind Debian's redis-sentinel, with a real failover (docs/several-instances.md#redis-sentinel).

A master, one replica and one Sentinel (quorum 1) on loopback; the store asks the
Sentinel for the master, the master is killed, the Sentinel promotes the replica, and
the store's writes and leases carry on there. Without a redis-sentinel binary this test
FAILS (``apt-get install -y redis-sentinel``; scripts/bootstrap installs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import attr
import txredisapi
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from rtcauthd.cluster.coordinator import ClusterSettings
from rtcauthd.store.interface import Claim
from rtcauthd.store.model import encode_field
from rtcauthd.store.redis import RedisStore
from rtcauthd.store.redis_url import parse_redis_url
from tests.integration.test_redis_store import job
from tests.support.redis_server import RedisServer, free_port, raw, raw_hgetall, wait_until

SERVICE = "rtcauthd"


class Sentinel:
    """One redis-sentinel process watching ``master`` (quorum 1, quick to declare it down)."""

    def __init__(self, test: TestCase, master_port: int) -> None:
        binary = shutil.which("redis-sentinel")
        if binary is None:
            test.fail("redis-sentinel is not installed (apt-get install -y redis-sentinel)")
        self.port = free_port()
        self.dir = test.mktemp()
        os.makedirs(self.dir)
        self.conf = os.path.join(self.dir, "sentinel.conf")  # Sentinel rewrites it: a file of its own
        with open(self.conf, "w") as f:
            f.write(
                f"port {self.port}\nbind 127.0.0.1\ndaemonize no\ndir {os.path.abspath(self.dir)}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 1\n"
                f"sentinel down-after-milliseconds {SERVICE} 500\n"
                f"sentinel failover-timeout {SERVICE} 3000\n"
            )
        log = open(os.path.join(self.dir, "sentinel.log"), "ab")
        self.proc = subprocess.Popen([binary, self.conf], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        test.addCleanup(self.kill)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def master_port(self) -> int:
        try:
            _host, port = raw(self.port, "SENTINEL", "get-master-addr-by-name", SERVICE)
        except (OSError, ConnectionError, TypeError):
            return 0
        return int(port)

    def knows_replicas(self) -> bool:
        try:
            return len(raw(self.port, "SENTINEL", "replicas", SERVICE)) > 0
        except (OSError, ConnectionError):
            return False


class SentinelFailoverTests(TestCase):
    @inlineCallbacks
    def test_the_store_follows_the_master_through_a_failover(self):
        self.patch(txredisapi.RedisFactory, "initialDelay", 0.05)
        self.patch(txredisapi.RedisFactory, "maxDelay", 0.2)
        master = RedisServer(self)
        yield master.start()
        replica = RedisServer(self, "--replicaof", "127.0.0.1", str(master.port))
        yield replica.start()
        sentinel = Sentinel(self, master.port)
        yield wait_until(sentinel.knows_replicas, what="the Sentinel to find the replica", timeout=30)

        target = attr.evolve(parse_redis_url("redis://127.0.0.1:1/0"), sentinels=(("127.0.0.1", sentinel.port),),
                             sentinel_master=SERVICE)
        store = RedisStore(target, op_timeout=1.0, restore_wait=2.0, retry_interval=0.1,
                           cluster=ClusterSettings(name="s", lease_seconds=60))  # outlives the failover
        self.addCleanup(store.close)
        yield store.load_all()
        first = job(room="room-a", identity="ident-a")
        yield store.register(first)
        field = encode_field("room-a", "ident-a").encode()
        self.assertIn(field, raw_hgetall(master.port))
        yield wait_until(lambda: field in raw_hgetall(replica.port), what="replication of the record")

        master.kill()
        yield wait_until(lambda: sentinel.master_port() == replica.port, what="the Sentinel's failover", timeout=40)
        second = job(room="room-b", identity="ident-b")
        yield store.register(second)
        yield wait_until(lambda: encode_field("room-b", "ident-b").encode() in raw_hgetall(replica.port),
                         what="writes to reach the new master", timeout=30)
        # ownership came along with the data: the lease and the fencing tokens still hold
        claim = yield store.claim_send("room-a", "ident-a")
        self.assertEqual(claim, Claim.GRANTED)
        self.assertNotIn(field, raw_hgetall(replica.port))
