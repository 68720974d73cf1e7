"""Black-box start-up with the v0.7 settings: the real daemon's exit status, its one error
line, and its output never holding a token or the Redis password (docs/configuration.md)."""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.trial import unittest

from tests.blackbox import test_startup as startup
from tests.blackbox.harness import BlackBoxCase

AS_TOKEN = "as-token-blackbox-0123456789"
HS_TOKEN = "hs-token-blackbox-9876543210"
ALL_OR_NONE = (
    "The app service token(s) (LIVEKIT_AS_TOKEN/LIVEKIT_HS_TOKEN or LIVEKIT_AS_REGISTRATION_FILE) "
    "and LIVEKIT_HS_SERVER_NAME must either all be set or all be left empty"
)
REGISTRATION = f"""\
id: "rtcauthd"
url: null
as_token: "{AS_TOKEN}"
hs_token: "{HS_TOKEN}"
sender_localpart: "_rtcauthd"
namespaces:
  users:
    - exclusive: false
      regex: '@.*:example\\.com'
io.element.msc4512.proxy_prefix: "rtc/livekit"
io.element.msc4512.proxy_url: "http://127.0.0.1:8080"
""".encode()


class AppServiceConfigErrorTests(BlackBoxCase, unittest.TestCase):
    """Exit 1 with exactly the one line, as for every other setting."""

    valid_env = startup.ConfigErrorTests.valid_env
    expect_error = startup.ConfigErrorTests.expect_error
    expect_errors = startup.ConfigErrorTests.expect_errors
    write = startup.ConfigErrorTests.write

    def test_all_or_none(self):
        return self.expect_errors(
            (self.valid_env(LIVEKIT_AS_TOKEN=AS_TOKEN), ALL_OR_NONE),
            (self.valid_env(LIVEKIT_HS_SERVER_NAME="example.com"), ALL_OR_NONE),
            (self.valid_env(LIVEKIT_AS_TOKEN=AS_TOKEN, LIVEKIT_HS_TOKEN=HS_TOKEN), ALL_OR_NONE),
            (self.valid_env(LIVEKIT_AS_REGISTRATION_FILE=self.write("reg.yaml", REGISTRATION)), ALL_OR_NONE),
        )

    def test_registration_file_errors(self):
        prefix = "Could not parse app service registration file: "
        server = {"LIVEKIT_HS_SERVER_NAME": "example.com"}
        return self.expect_errors(
            (self.valid_env(LIVEKIT_AS_REGISTRATION_FILE=os.path.join(self.workdir, "none.yaml"), **server),
             "LIVEKIT_AS_REGISTRATION_FILE: cannot read", "No such file or directory"),
            (self.valid_env(LIVEKIT_AS_REGISTRATION_FILE=self.write("list.yaml", b"- a\n"), **server),
             prefix + "invalid root element"),
            (self.valid_env(LIVEKIT_AS_REGISTRATION_FILE=self.write("nohs.yaml", b"as_token: a\n"), **server),
             prefix + "no hs_token property"),
            (self.valid_env(LIVEKIT_AS_REGISTRATION_FILE=self.write("int.yaml", b"as_token: 1\nhs_token: h\n"),
                            **server),
             prefix + "invalid value for as_token property"),
            (self.valid_env(LIVEKIT_AS_REGISTRATION_FILE=self.write("bad.yaml", b'as_token: "x\nhs_token: [\n'),
                            **server),
             prefix),
        )

    def test_redis_password_and_url_errors(self):
        return self.expect_errors(
            (self.valid_env(LIVEKIT_REDIS_URL="unix:///run/redis.sock", LIVEKIT_REDIS_PASSWORD="pw-0123456789"),
             "LIVEKIT_REDIS_PASSWORD was set but couldn't be combined with LIVEKIT_REDIS_URL"),
            (self.valid_env(LIVEKIT_REDIS_URL="not a url"),
             "Could not parse LIVEKIT_REDIS_URL: relative URL without a base"),
        )


class AppServiceSecrecyTests(BlackBoxCase, unittest.TestCase):
    def env(self, **extra):
        return {
            "LIVEKIT_URL": startup.NO_SFU,
            "LIVEKIT_KEY": self.key,
            "LIVEKIT_SECRET": self.secret,
            "LIVEKIT_FULL_ACCESS_HOMESERVERS": "example.com",
            "LIVEKIT_LOG_LEVEL": "debug",
            **extra,
        }

    @defer.inlineCallbacks
    def run_and_stop(self, env):
        daemon = yield self.start_daemon(env)
        result = yield daemon.request("GET", "/healthz")
        self.assertEqual(result.code, 200)
        yield daemon.stop(expect_code=0)
        return daemon.output

    @defer.inlineCallbacks
    def test_tokens_from_every_source_never_logged(self):
        creds = os.path.join(self.workdir, "credentials")
        os.makedirs(creds)
        with open(os.path.join(creds, "livekit_hs_token"), "wb") as f:
            f.write(HS_TOKEN.encode() + b"\n")
        outputs = []
        # the registration file, with the variables it overrides also set (a warning names them)
        outputs.append((yield self.run_and_stop(self.env(
            LIVEKIT_AS_REGISTRATION_FILE=self.write("reg.yaml", REGISTRATION),
            LIVEKIT_HS_SERVER_NAME="example.com",
            LIVEKIT_AS_TOKEN="env-as-token-0123456789",
        ))))
        self.assertIn("LIVEKIT_AS_REGISTRATION_FILE is set, so LIVEKIT_AS_TOKEN is ignored", outputs[-1])
        # a file for one token, a systemd credential for the other
        outputs.append((yield self.run_and_stop(self.env(
            LIVEKIT_AS_TOKEN_FROM_FILE=self.write("as", AS_TOKEN.encode() + b"\r\n"),
            LIVEKIT_HS_SERVER_NAME="example.com",
            CREDENTIALS_DIRECTORY=creds,
        ))))
        for output in outputs:
            self.assertTrue(output.strip())
            for secret in (AS_TOKEN, HS_TOKEN, "env-as-token-0123456789"):
                self.assertNotIn(secret, output)

    @defer.inlineCallbacks
    def test_redis_password_reaches_redis_and_never_the_log(self):
        password = "redis-pass-w0rd@:/%"
        redis = yield self.start_redis()
        # a record the daemon can only report (skipped, left in place) if it could read it
        yield redis.command("HSET", "lk-jwt:jobs", "marker-field", "not json")
        yield redis.command("CONFIG", "SET", "requirepass", password)
        url = f"{redis.url}/0"

        # without the password Redis refuses the daemon (which keeps running, in memory)
        refused = yield self.start_daemon(self.env(LIVEKIT_REDIS_URL=url), name="refused")
        yield refused.wait_for_line("Could not read stored jobs from Redis", "NOAUTH|auth")
        yield refused.stop(expect_code=0)

        daemon = yield self.start_daemon(self.env(LIVEKIT_REDIS_URL=url, LIVEKIT_REDIS_PASSWORD=password))
        yield daemon.wait_for_line("Skipping unparsable job record marker-field")
        result = yield daemon.request("GET", "/healthz")
        self.assertEqual(result.code, 200)
        yield daemon.stop(expect_code=0)
        self.assertNotIn("Could not read stored jobs", daemon.output)
        for output in (refused.output, daemon.output):
            self.assertNotIn(password, output)
