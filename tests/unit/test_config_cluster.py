"""Settings for several instances and Redis Sentinel (docs/several-instances.md, docs/configuration.md)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.support.config_loading import ConfigLoading

REDIS = {"LIVEKIT_REDIS_URL": "redis://:pw@127.0.0.1:6379/2"}


class ClusterSettingsTests(ConfigLoading, SynchronousTestCase):
    def test_defaults_need_no_setting(self) -> None:
        config = self.load(REDIS)
        self.assertEqual((config.job_lease_seconds, config.instance_name), (10.0, ""))
        self.assertEqual((config.redis_sentinels, config.redis_sentinel_master), ((), ""))

    def test_lease_and_name(self) -> None:
        config = self.load({**REDIS, "RTCAUTH_JOB_LEASE_SECONDS": "2.5", "RTCAUTH_INSTANCE_NAME": " web-1 "})
        self.assertEqual((config.job_lease_seconds, config.instance_name), (2.5, "web-1"))

    def test_sentinels_with_their_master(self) -> None:
        config = self.load({**REDIS, "RTCAUTH_REDIS_SENTINELS": "10.0.0.1:26379, [fd00::2]:26380",
                            "RTCAUTH_REDIS_SENTINEL_MASTER": "calls"})
        self.assertEqual(config.redis_sentinels, (("10.0.0.1", 26379), ("fd00::2", 26380)))
        self.assertEqual(config.redis_sentinel_master, "calls")

    def test_sentinel_settings_go_together_and_need_a_plain_redis_url(self) -> None:
        both = "RTCAUTH_REDIS_SENTINELS and RTCAUTH_REDIS_SENTINEL_MASTER go together: set both or neither"
        self.assertConfigError(both, {**REDIS, "RTCAUTH_REDIS_SENTINELS": "h:1"})
        self.assertConfigError(both, {**REDIS, "RTCAUTH_REDIS_SENTINEL_MASTER": "calls"})
        self.assertConfigError(
            "RTCAUTH_REDIS_SENTINELS needs LIVEKIT_REDIS_URL=redis://… (its password and db are used; no TLS or unix socket)",
            {"LIVEKIT_REDIS_URL": "rediss://h:1", "RTCAUTH_REDIS_SENTINELS": "h:1", "RTCAUTH_REDIS_SENTINEL_MASTER": "m"},
        )
        self.assertConfigError(
            "RTCAUTH_REDIS_SENTINELS: 'h' is not host:port",
            {**REDIS, "RTCAUTH_REDIS_SENTINELS": "h", "RTCAUTH_REDIS_SENTINEL_MASTER": "m"},
        )
