"""The IJobStore contract, run against MemoryStore."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from rtcauthd.store.memory import MemoryStore
from tests.support.job_store_contract import JobStoreContract


class MemoryStoreContractTests(JobStoreContract, TestCase):
    persistent = False

    def make_store(self) -> MemoryStore:
        return MemoryStore()
