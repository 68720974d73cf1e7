"""Black-box tests of start-up, configuration sources, logging hygiene and shutdown.

docs/configuration.md: every configuration error ends the process with status 1 and one line
naming the variable (no traceback); every key/secret source works, proven by a token
that verifies with exactly that secret.
"""

from __future__ import annotations

import os
import signal
import time

from twisted.internet import defer
from twisted.trial import unittest

from tests.blackbox.harness import BlackBoxCase, lk_hash
from tests.blackbox.test_token_service import (
    DEVICE,
    MEMBER_ID,
    ROOM_ID,
    SLOT_ID,
    TokenAssertions,
    get_token_body,
    sfu_get_body,
)

NO_SFU = "ws://127.0.0.1:9"
MUST_BE_SET = "LIVEKIT_KEY* / LIVEKIT_SECRET* and LIVEKIT_URL must be set"
FULL_ACCESS_MISSING = (
    "LIVEKIT_FULL_ACCESS_HOMESERVERS environment variable must be set to the homeserver(s) "
    "you intend to serve \u2014 see README for guidance"
)


class ConfigErrorTests(BlackBoxCase, unittest.TestCase):
    """Each error: exit 1, exactly one output line, containing the message, no traceback."""

    def valid_env(self, **changes):
        env = {
            "LIVEKIT_URL": NO_SFU,
            "LIVEKIT_KEY": self.key,
            "LIVEKIT_SECRET": self.secret,
            "LIVEKIT_FULL_ACCESS_HOMESERVERS": "example.com",
        }
        for k, v in changes.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        return env

    @defer.inlineCallbacks
    def expect_error(self, env, *needles: str):
        self._n = getattr(self, "_n", 0) + 1
        daemon = self.make_daemon(env, name=f"daemon{self._n}")
        code, output = yield daemon.run_to_exit()
        context = f"env changes: {sorted(set(env.items()) - set(self.valid_env().items()))}\n" + daemon.describe()
        self.assertEqual(code, 1, context)
        self.assertNotIn("Traceback", output, context)
        lines = [line for line in output.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, "expected exactly one line of output\n" + context)
        for needle in needles:
            self.assertIn(needle, lines[0], context)

    def expect_errors(self, *cases):
        """Run (env, needles...) cases in parallel."""
        return defer.gatherResults([self.expect_error(env, *needles) for env, *needles in cases],
                                   consumeErrors=True).addErrback(lambda f: f.value.subFailure)

    def test_missing_url_key_or_secret(self):
        return self.expect_errors(
            (self.valid_env(LIVEKIT_URL=None), "LIVEKIT_URL", MUST_BE_SET),
            (self.valid_env(LIVEKIT_URL=""), "LIVEKIT_URL", MUST_BE_SET),
            (self.valid_env(LIVEKIT_KEY=None), "LIVEKIT_KEY", MUST_BE_SET),
            (self.valid_env(LIVEKIT_SECRET=None), "LIVEKIT_SECRET", MUST_BE_SET),
            (self.valid_env(LIVEKIT_SECRET=" \r\n"), "LIVEKIT_SECRET", MUST_BE_SET),
        )

    def test_full_access_homeservers_empty(self):
        return self.expect_errors(
            (self.valid_env(LIVEKIT_FULL_ACCESS_HOMESERVERS=""), FULL_ACCESS_MISSING),
            (self.valid_env(LIVEKIT_FULL_ACCESS_HOMESERVERS=None), FULL_ACCESS_MISSING),
        )

    def test_bind_and_port_together(self):
        return self.expect_error(
            self.valid_env(LIVEKIT_JWT_BIND="127.0.0.1:18080", LIVEKIT_JWT_PORT="18081"),
            "LIVEKIT_JWT_BIND and LIVEKIT_JWT_PORT must not be set together",
        )

    def test_bad_sanity_check_interval(self):
        return self.expect_errors(
            (self.valid_env(LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS="not-a-number"),
             'LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS must be a non-negative integer, got "not-a-number"'),
            (self.valid_env(LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS="-1"),
             'LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS must be a non-negative integer, got "-1"'),
            (self.valid_env(LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS='1.5"\\'),
             'LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS must be a non-negative integer, got "1.5\\"\\\\"'),
        )

    def test_bad_cs_api_override(self):
        return self.expect_error(
            self.valid_env(LIVEKIT_CS_API_URL_OVERRIDES="example.com=https://matrix.example.com,bogus"),
            'failed parsing LIVEKIT_CS_API_URL_OVERRIDES: invalid entry "bogus", expected server_name=url',
        )

    def test_malformed_key_file(self):
        return self.expect_errors(
            (self.valid_env(LIVEKIT_KEY_FILE=self.write("three.yaml", b"key: sec:ret\n")),
             "LIVEKIT_KEY_FILE", "invalid key secret file format!"),
            (self.valid_env(LIVEKIT_KEY_FILE=self.write("two.yaml", b"k1: s1\nk2: s2\n")),
             "LIVEKIT_KEY_FILE", "invalid key secret file format!"),
            (self.valid_env(LIVEKIT_KEY_FILE=self.write("none.yaml", b"just-a-key\n")),
             "LIVEKIT_KEY_FILE", "invalid key secret file format!"),
        )

    def test_unreadable_files(self):
        missing = os.path.join(self.workdir, "does-not-exist")
        return self.expect_errors(
            (self.valid_env(LIVEKIT_SECRET_FROM_FILE=missing), "LIVEKIT_SECRET_FROM_FILE"),
            (self.valid_env(LIVEKIT_KEY_FROM_FILE=missing), "LIVEKIT_KEY_FROM_FILE"),
            (self.valid_env(LIVEKIT_KEY_FILE=missing), "LIVEKIT_KEY_FILE"),
            (self.valid_env(LIVEKIT_SECRET_FROM_FILE=self.workdir), "LIVEKIT_SECRET_FROM_FILE"),
        )

    def test_bad_ca_file(self):
        return self.expect_errors(
            (self.valid_env(RTCAUTH_CA_FILE=self.write("garbage.pem", b"not a certificate\n")), "RTCAUTH_CA_FILE"),
            (self.valid_env(RTCAUTH_CA_FILE=os.path.join(self.workdir, "nope.pem")), "RTCAUTH_CA_FILE"),
        )

    def test_bad_cidr(self):
        return self.expect_errors(
            (self.valid_env(RTCAUTH_FEDERATION_IP_RANGE_BLOCKLIST="10.0.0.0/33"), "RTCAUTH_FEDERATION_IP_RANGE_BLOCKLIST"),
            (self.valid_env(RTCAUTH_FEDERATION_IP_RANGE_ALLOWLIST="127.0.0.0/8,not-a-cidr"),
             "RTCAUTH_FEDERATION_IP_RANGE_ALLOWLIST"),
        )

    def test_bad_numbers(self):
        return self.expect_errors(
            (self.valid_env(RTCAUTH_OUTBOUND_TIMEOUT_SECONDS="soon"), "RTCAUTH_OUTBOUND_TIMEOUT_SECONDS"),
            (self.valid_env(RTCAUTH_MAX_BODY_BYTES="-5"), "RTCAUTH_MAX_BODY_BYTES"),
        )


class KeySourceTests(TokenAssertions, BlackBoxCase, unittest.TestCase):
    """Each key/secret source works: the token verifies with exactly that key and secret."""

    def setUp(self):
        BlackBoxCase.setUp(self)
        self.hs = self.make_homeserver()
        self.lk = self.make_livekit()
        self.user = f"@alice:{self.hs.server_name}"
        self.hs.add_token("syt_keys", self.user)

    def env(self, **extra):
        env = self.service_env(livekit_url=self.lk.url, full_access=self.hs.server_name, **extra)
        del env["LIVEKIT_KEY"], env["LIVEKIT_SECRET"]
        return env

    @defer.inlineCallbacks
    def prove(self, daemon, key: str, secret: str):
        t0 = time.time()
        result = yield daemon.post_json("/get_token", get_token_body(self.hs.server_name, "syt_keys"))
        token = self.assert_token_response(result, self.lk.url)
        self.assert_participant_jwt(token, identity=lk_hash(self.user, DEVICE, MEMBER_ID),
                                    alias=lk_hash(ROOM_ID, SLOT_ID), t0=t0, t1=time.time(), key=key, secret=secret)
        self.assert_create_room(self.lk, lk_hash(ROOM_ID, SLOT_ID), key=key, secret=secret)

    @defer.inlineCallbacks
    def test_key_file(self):
        path = self.write("keys.yaml", b"kfkey: kfsecret-0123456789abcdef\n")
        daemon = yield self.start_daemon(self.env(LIVEKIT_KEY_FILE=path))
        yield self.prove(daemon, "kfkey", "kfsecret-0123456789abcdef")

    @defer.inlineCallbacks
    def test_from_file_with_crlf(self):
        daemon = yield self.start_daemon(self.env(
            LIVEKIT_KEY_FROM_FILE=self.write("key", b" ffkey\r\n"),
            LIVEKIT_SECRET_FROM_FILE=self.write("secret", b"ffsecret-0123456789abcdef\r\n"),
        ))
        yield self.prove(daemon, "ffkey", "ffsecret-0123456789abcdef")

    @defer.inlineCallbacks
    def test_credentials_directory(self):
        creds = os.path.join(self.workdir, "credentials")
        os.makedirs(creds)
        with open(os.path.join(creds, "livekit_key"), "wb") as f:
            f.write(b"credkey\n")
        with open(os.path.join(creds, "livekit_secret"), "wb") as f:
            f.write(b"credsecret-0123456789abcdef\n")
        daemon = yield self.start_daemon(self.env(CREDENTIALS_DIRECTORY=creds))
        yield self.prove(daemon, "credkey", "credsecret-0123456789abcdef")

    @defer.inlineCallbacks
    def test_config_file_with_environment_winning(self):
        lines = [f"{k}={v}" for k, v in self.env().items()] + [
            "LIVEKIT_KEY=filekey",
            "LIVEKIT_SECRET=filesecret-0123456789abcdef",
        ]
        path = self.write("rtcauthd.env", ("\n".join(lines) + "\n").encode())
        daemon = yield self.start_daemon({"LIVEKIT_KEY": "envkey"}, args=["--config", path])
        yield self.prove(daemon, "envkey", "filesecret-0123456789abcdef")


class RunTimeTests(TokenAssertions, BlackBoxCase, unittest.TestCase):

    @defer.inlineCallbacks
    def test_dev_mode(self):
        hs = self.make_homeserver()
        user = f"@alice:{hs.server_name}"
        hs.add_token("syt_dev", user)
        daemon = yield self.start_daemon(
            {"RTCAUTH_CA_FILE": self.ca_file, "RTCAUTH_FEDERATION_IP_RANGE_ALLOWLIST": "127.0.0.0/8"},
            args=["--dev"],
        )
        yield daemon.wait_for_line("warn", "dev")
        t0 = time.time()
        result = yield daemon.post_json("/get_token", get_token_body(hs.server_name, "syt_dev"))
        # 127.0.0.1:PORT is not "localhost": a restricted user, so ws://localhost:7880 is never called
        token = self.assert_token_response(result, "ws://localhost:7880")
        self.assert_participant_jwt(token, identity=lk_hash(user, DEVICE, MEMBER_ID), alias=lk_hash(ROOM_ID, SLOT_ID),
                                    t0=t0, t1=time.time(), key="devkey", secret="secret", can_publish=False)

    @defer.inlineCallbacks
    def test_invalid_log_level_warns_and_runs(self):
        daemon = yield self.start_daemon({
            "LIVEKIT_URL": NO_SFU, "LIVEKIT_KEY": self.key, "LIVEKIT_SECRET": self.secret,
            "LIVEKIT_FULL_ACCESS_HOMESERVERS": "example.com", "LIVEKIT_LOG_LEVEL": "chatty",
        })
        yield daemon.wait_for_line("LIVEKIT_LOG_LEVEL", "invalid|unknown|defaulting")

    @defer.inlineCallbacks
    def test_no_secrets_in_debug_logs(self):
        hs = self.make_homeserver()
        lk = self.make_livekit()
        access_token = "syt_" + self.secret[-20:][::-1] + "OpenIDtoken"
        user = f"@alice:{hs.server_name}"
        hs.add_token(access_token, user)
        daemon = yield self.start_daemon(self.service_env(
            livekit_url=lk.url, full_access=hs.server_name, LIVEKIT_LOG_LEVEL="debug",
        ))
        tokens = []
        for path, body in [("/get_token", get_token_body(hs.server_name, access_token)),
                           ("/sfu/get", sfu_get_body(hs.server_name, access_token))]:
            result = yield daemon.post_json(path, body)
            tokens.append(self.assert_token_response(result, lk.url))
        result = yield daemon.post_json("/get_token", get_token_body(hs.server_name, access_token + "-forged"))
        self.assertEqual(result.code, 401)
        yield daemon.stop(expect_code=None)  # the exit status is test_sigterm_exits_zero's business
        output = daemon.output
        self.assertTrue(output.strip(), "no log output at all at debug level")
        forbidden = {"LiveKit secret": self.secret, "OpenID access token": access_token}
        for i, t in enumerate(tokens + [c.bearer for c in lk.create_room_requests]):
            forbidden[f"JWT #{i}"] = t
            forbidden[f"JWT #{i} signature"] = t.rsplit(".", 1)[1]
        for what, value in forbidden.items():
            self.assertNotIn(value, output, f"{what} appears in the daemon's output")

    @defer.inlineCallbacks
    def test_sigterm_exits_zero(self):
        daemon = yield self.start_daemon({
            "LIVEKIT_URL": NO_SFU, "LIVEKIT_KEY": self.key, "LIVEKIT_SECRET": self.secret,
            "LIVEKIT_FULL_ACCESS_HOMESERVERS": "example.com",
        })
        result = yield daemon.request("GET", "/healthz")
        self.assertEqual(result.code, 200)
        code, sig = yield daemon.stop(expect_code=0)
        self.assertEqual((code, sig), (0, None))

    @defer.inlineCallbacks
    def test_kill_and_restart_on_same_port(self):
        """Harness self-check that later suites rely on: kill -9, then restart with the same env."""
        daemon = yield self.start_daemon({
            "LIVEKIT_URL": NO_SFU, "LIVEKIT_KEY": self.key, "LIVEKIT_SECRET": self.secret,
            "LIVEKIT_FULL_ACCESS_HOMESERVERS": "example.com",
        })
        port = daemon.port
        code, sig = yield daemon.kill()
        self.assertEqual(sig, signal.SIGKILL)
        yield daemon.restart()
        self.assertEqual((daemon.port, daemon.starts), (port, 2))
        result = yield daemon.request("GET", "/healthz")
        self.assertEqual(result.code, 200)


class RedisHelperTests(BlackBoxCase, unittest.TestCase):
    """The RedisServer helper works (later suites persist jobs in a real Redis)."""

    @defer.inlineCallbacks
    def test_round_trip_kill_and_restart(self):
        redis = yield self.start_redis()
        self.assertEqual((yield redis.command("HSET", "lk-jwt:jobs", '["a","b"]', "{}")), 1)
        self.assertEqual((yield redis.hgetall("lk-jwt:jobs")), {b'["a","b"]': b"{}"})
        _, sig = yield redis.kill()
        self.assertEqual(sig, signal.SIGKILL)
        yield redis.restart()
        # --save "" and no AOF: nothing survives a restart
        self.assertEqual((yield redis.hgetall("lk-jwt:jobs")), {})
        yield redis.stop()
