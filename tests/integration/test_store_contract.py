"""The IJobStore contract, run against RedisStore on a real redis-server (one per test)."""

from __future__ import annotations

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from rtcauthd.store.redis import RedisStore
from tests.support.job_store_contract import JobStoreContract
from tests.support.redis_server import RedisServer


class RedisStoreContractTests(JobStoreContract, TestCase):
    persistent = True

    @inlineCallbacks
    def setUp(self):
        self.server = RedisServer(self)
        yield self.server.start()

    def make_store(self) -> RedisStore:
        return RedisStore.from_url(f"redis://127.0.0.1:{self.server.port}/0", op_timeout=2.0, restore_wait=5.0)
