"""v0.7 settings: application-service tokens and server name, the metadata opt-in, the Redis password.

docs/configuration.md#application-service-mode and #redis-password: upstream's exact start-up
errors, precedence of the token sources, and no token or password in a repr, warning or error.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.config import APPSERVICE_ALL_OR_NONE, ConfigError, load_config, settings_help
from rtcauthd.logging import scrub
from rtcauthd.store.redis_url import RedisURLError, parse_redis_url
from tests.support.config_loading import BASE, ConfigLoading
from tests.support.files import files

AS_TOKEN = "as-token-0123456789abcdef"
HS_TOKEN = "hs-token-fedcba9876543210"
REG = "/etc/rtcauthd/registration.yaml"

REGISTRATION = f"""\
id: "lk-jwt-service"
url: null
as_token: "{AS_TOKEN}"
hs_token: "{HS_TOKEN}"
sender_localpart: "_lk_jwt_service"
namespaces:
  users:
    - exclusive: false
      regex: '@.*:example\\.com'
io.element.msc4502.scopes:
  - "urn:matrix:client:io.element.msc4502:rooms:is_joined"
io.element.msc4512.proxy_prefix: "rtc/livekit"
io.element.msc4512.proxy_url: "http://127.0.0.1:8080"
"""
REGISTRATION_ERROR = "Could not parse app service registration file: "


class _Loading(ConfigLoading, SynchronousTestCase):
    def registration(self, text, **overrides):
        """Load with LIVEKIT_AS_REGISTRATION_FILE holding ``text``."""
        env = {"LIVEKIT_AS_REGISTRATION_FILE": REG, "LIVEKIT_HS_SERVER_NAME": "example.com", **overrides}
        return self.load(env, read_file=files({REG: text}))

    def registration_error(self, text, message):
        with self.assertRaises(ConfigError) as cm:
            self.registration(text)
        self.assertEqual(str(cm.exception), message)
        self.assertNotIn("\n", str(cm.exception))
        return str(cm.exception)


class AppServiceModeTests(_Loading):
    def test_standalone_by_default(self):
        c = self.load()
        self.assertEqual((c.as_token, c.hs_token, c.hs_server_name), ("", "", ""))
        self.assertFalse(c.appservice)
        self.assertFalse(c.can_update_own_metadata)
        self.assertEqual(c.warnings, ())

    def test_pair_and_server_name_turn_it_on(self):
        c = self.load(
            {
                "LIVEKIT_AS_TOKEN": f" {AS_TOKEN}\n",
                "LIVEKIT_HS_TOKEN": f"\u2003{HS_TOKEN}\t",  # Unicode whitespace trimmed
                "LIVEKIT_HS_SERVER_NAME": "example.com",
            }
        )
        self.assertEqual((c.as_token, c.hs_token, c.hs_server_name), (AS_TOKEN, HS_TOKEN, "example.com"))
        self.assertTrue(c.appservice)
        self.assertEqual(c.warnings, ())

    def test_server_name_taken_verbatim(self):
        c = self.load({"LIVEKIT_AS_TOKEN": "a", "LIVEKIT_HS_TOKEN": "h", "LIVEKIT_HS_SERVER_NAME": " Example.COM "})
        self.assertEqual(c.hs_server_name, " Example.COM ")

    def test_all_or_none(self):
        full = {"LIVEKIT_AS_TOKEN": AS_TOKEN, "LIVEKIT_HS_TOKEN": HS_TOKEN, "LIVEKIT_HS_SERVER_NAME": "example.com"}
        for present in (
            ("LIVEKIT_AS_TOKEN",),
            ("LIVEKIT_HS_TOKEN",),
            ("LIVEKIT_HS_SERVER_NAME",),
            ("LIVEKIT_AS_TOKEN", "LIVEKIT_HS_TOKEN"),
            ("LIVEKIT_AS_TOKEN", "LIVEKIT_HS_SERVER_NAME"),
            ("LIVEKIT_HS_TOKEN", "LIVEKIT_HS_SERVER_NAME"),
        ):
            with self.subTest(present=present):
                self.assertConfigError(APPSERVICE_ALL_OR_NONE, {n: full[n] for n in present})
        # a token of blanks is no token
        self.assertConfigError(APPSERVICE_ALL_OR_NONE, dict(full, LIVEKIT_HS_TOKEN=" \r\n"))

    def test_all_or_none_message_is_upstreams(self):
        self.assertEqual(
            APPSERVICE_ALL_OR_NONE,
            "The app service token(s) (LIVEKIT_AS_TOKEN/LIVEKIT_HS_TOKEN or LIVEKIT_AS_REGISTRATION_FILE) "
            "and LIVEKIT_HS_SERVER_NAME must either all be set or all be left empty",
        )

    def test_checked_after_the_overrides_and_before_redis(self):
        self.assertConfigError(
            'failed parsing LIVEKIT_CS_API_URL_OVERRIDES: invalid entry "bogus", expected server_name=url',
            {"LIVEKIT_CS_API_URL_OVERRIDES": "bogus", "LIVEKIT_AS_TOKEN": AS_TOKEN},
        )
        self.assertConfigError(
            APPSERVICE_ALL_OR_NONE,
            {"LIVEKIT_AS_TOKEN": AS_TOKEN, "LIVEKIT_REDIS_URL": "not a url"},
        )

    def test_full_access_homeservers_still_required(self):
        with self.assertRaises(ConfigError) as cm:
            self.load(
                {"LIVEKIT_AS_TOKEN": AS_TOKEN, "LIVEKIT_HS_TOKEN": HS_TOKEN, "LIVEKIT_HS_SERVER_NAME": "example.com"},
                remove=("LIVEKIT_FULL_ACCESS_HOMESERVERS",),
            )
        self.assertIn("LIVEKIT_FULL_ACCESS_HOMESERVERS environment variable must be set", str(cm.exception))


class TokenSourceTests(_Loading):
    def test_from_file_overrides_the_variable(self):
        read = files({"/as": f"{AS_TOKEN}\n", "/hs": f"  {HS_TOKEN}\r\n"})
        c = self.load(
            {
                "LIVEKIT_AS_TOKEN": "ignored-as-token",
                "LIVEKIT_AS_TOKEN_FROM_FILE": "/as",
                "LIVEKIT_HS_TOKEN_FROM_FILE": "/hs",
                "LIVEKIT_HS_SERVER_NAME": "example.com",
            },
            read_file=read,
        )
        self.assertEqual((c.as_token, c.hs_token), (AS_TOKEN, HS_TOKEN))
        self.assertIn("LIVEKIT_AS_TOKEN_FROM_FILE is set, so LIVEKIT_AS_TOKEN is ignored", c.warnings)

    def test_unreadable_file_names_the_variable(self):
        for variable in ("LIVEKIT_AS_TOKEN_FROM_FILE", "LIVEKIT_HS_TOKEN_FROM_FILE", "LIVEKIT_AS_REGISTRATION_FILE"):
            with self.subTest(variable=variable):
                with self.assertRaises(ConfigError) as cm:
                    self.load({variable: "/missing", "LIVEKIT_HS_SERVER_NAME": "example.com"})
                self.assertEqual(str(cm.exception), f"{variable}: cannot read /missing: No such file or directory")

    def test_systemd_credentials_fill_in_missing_tokens(self):
        read = files({"/creds/livekit_as_token": f"{AS_TOKEN}\n", "/creds/livekit_hs_token": f"{HS_TOKEN}\n"})
        c = self.load({"CREDENTIALS_DIRECTORY": "/creds", "LIVEKIT_HS_SERVER_NAME": "example.com"}, read_file=read)
        self.assertEqual((c.as_token, c.hs_token), (AS_TOKEN, HS_TOKEN))
        self.assertTrue(c.appservice)
        # an explicit variable still wins over a credential
        c = self.load(
            {"CREDENTIALS_DIRECTORY": "/creds", "LIVEKIT_HS_TOKEN": "explicit", "LIVEKIT_HS_SERVER_NAME": "x"},
            read_file=read,
        )
        self.assertEqual((c.as_token, c.hs_token), (AS_TOKEN, "explicit"))

    def test_empty_credentials_mean_standalone(self):
        # the unit's SetCredential= fallback: a credential holding only a newline
        read = files({"/creds/livekit_as_token": "\n", "/creds/livekit_hs_token": "\n"})
        self.assertFalse(self.load({"CREDENTIALS_DIRECTORY": "/creds"}, read_file=read).appservice)
        self.assertFalse(self.load({"CREDENTIALS_DIRECTORY": "/creds"}).appservice)  # none there at all

    def test_unreadable_credential_is_fatal(self):
        def read(path):
            raise PermissionError(13, "Permission denied", path)

        # key and secret are set, so the first credential read is the as_token's
        self.assertConfigError(
            "CREDENTIALS_DIRECTORY: cannot read credential livekit_as_token: Permission denied",
            {"CREDENTIALS_DIRECTORY": "/creds"},
            read_file=read,
        )


class RegistrationFileTests(_Loading):
    def test_tokens_come_from_the_file(self):
        c = self.registration(REGISTRATION)
        self.assertEqual((c.as_token, c.hs_token, c.hs_server_name), (AS_TOKEN, HS_TOKEN, "example.com"))
        self.assertTrue(c.appservice)
        self.assertEqual(c.warnings, ())

    def test_file_wins_over_the_pair_and_says_so(self):
        c = self.registration(
            REGISTRATION, LIVEKIT_AS_TOKEN="env-as", LIVEKIT_HS_TOKEN="env-hs", LIVEKIT_HS_TOKEN_FROM_FILE="/hs"
        )
        self.assertEqual((c.as_token, c.hs_token), (AS_TOKEN, HS_TOKEN))
        self.assertIn(
            "LIVEKIT_AS_REGISTRATION_FILE is set, so LIVEKIT_AS_TOKEN, LIVEKIT_HS_TOKEN, "
            "LIVEKIT_HS_TOKEN_FROM_FILE is ignored",
            c.warnings,
        )

    def test_file_without_server_name(self):
        self.assertConfigError(
            APPSERVICE_ALL_OR_NONE, {"LIVEKIT_AS_REGISTRATION_FILE": REG}, read_file=files({REG: REGISTRATION})
        )

    def test_values_are_trimmed(self):
        c = self.registration(f'as_token: " {AS_TOKEN} "\nhs_token: "\\t{HS_TOKEN}\\n"\n')
        self.assertEqual((c.as_token, c.hs_token), (AS_TOKEN, HS_TOKEN))

    def test_unquoted_string_scalars_are_strings(self):
        c = self.registration("as_token: abc123\nhs_token: 'def456'\n")
        self.assertEqual((c.as_token, c.hs_token), ("abc123", "def456"))

    def test_invalid_root(self):
        for text in ("", "- as_token\n- hs_token\n", "just a string\n", "42\n", "null\n"):
            with self.subTest(text=text):
                self.registration_error(text, REGISTRATION_ERROR + "invalid root element")

    def test_missing_keys_in_order(self):
        self.registration_error("id: x\n", REGISTRATION_ERROR + "no as_token property")
        self.registration_error("hs_token: h\n", REGISTRATION_ERROR + "no as_token property")
        self.registration_error("as_token: a\n", REGISTRATION_ERROR + "no hs_token property")

    def test_values_that_are_not_strings(self):
        for value in ("12345", "yes", "1.5", "null", "~", "[a, b]", "{a: b}", "2026-12-02"):
            with self.subTest(value=value):
                self.registration_error(
                    f"as_token: {value}\nhs_token: h\n", REGISTRATION_ERROR + "invalid value for as_token property"
                )
                self.registration_error(
                    f"as_token: a\nhs_token: {value}\n", REGISTRATION_ERROR + "invalid value for hs_token property"
                )
        # quoted, the same digits are a fine token
        self.assertEqual(self.registration('as_token: "12345"\nhs_token: "yes"\n').as_token, "12345")

    def test_yaml_syntax_error_is_one_line_without_the_token(self):
        # upstream README's example: a misspelt key ending in a stray comma
        text = (
            f'as_token: "{AS_TOKEN}"\nhs_token: "{HS_TOKEN}"\n'
            'io.element.msc4502.scope: ["urn:matrix:client:io.element.msc4502:rooms:is_joined"],\n'
        )
        with self.assertRaises(ConfigError) as cm:
            self.registration(text)
        message = str(cm.exception)
        self.assertTrue(message.startswith(REGISTRATION_ERROR), message)
        self.assertIn("line 3", message)
        self.assertNotIn("\n", message)
        # a broken token line: PyYAML's own message would quote it back in a snippet
        for broken in (f'as_token: "{AS_TOKEN}\n', f"as_token: {AS_TOKEN}: {HS_TOKEN}\n", f"as_token: [{AS_TOKEN}\n"):
            with self.subTest(broken=broken):
                with self.assertRaises(ConfigError) as cm:
                    self.registration(broken + "hs_token: x\n")
                for secret in (AS_TOKEN, HS_TOKEN):
                    self.assertNotIn(secret, str(cm.exception))
                self.assertNotIn("\n", str(cm.exception))

    def test_unacceptable_characters(self):
        with self.assertRaises(ConfigError) as cm:
            self.registration("as_token: a\x07\nhs_token: b\n")
        self.assertTrue(str(cm.exception).startswith(REGISTRATION_ERROR + "unacceptable character #x0007"))
        self.assertNotIn("\n", str(cm.exception))

    def test_several_documents(self):
        with self.assertRaises(ConfigError) as cm:
            self.registration("as_token: a\nhs_token: b\n---\nas_token: c\n")
        self.assertIn("expected a single document", str(cm.exception))

    def test_no_python_objects(self):
        # safe_load: a tag that would build an object is an error, not code
        with self.assertRaises(ConfigError) as cm:
            self.registration("as_token: !!python/object/apply:os.getcwd []\nhs_token: b\n")
        self.assertTrue(str(cm.exception).startswith(REGISTRATION_ERROR))


class SecrecyTests(_Loading):
    def appservice_config(self, **overrides):
        return self.load(
            {
                "LIVEKIT_AS_TOKEN": AS_TOKEN,
                "LIVEKIT_HS_TOKEN": HS_TOKEN,
                "LIVEKIT_HS_SERVER_NAME": "example.com",
                "LIVEKIT_REDIS_URL": "redis://127.0.0.1:6379/0",
                "LIVEKIT_REDIS_PASSWORD": "redis-pass-0123456789",
                **overrides,
            }
        )

    def test_tokens_and_password_not_in_repr(self):
        c = self.appservice_config()
        for secret in (AS_TOKEN, HS_TOKEN, "redis-pass-0123456789", "s3cr3t-value"):
            self.assertNotIn(secret, repr(c))
        self.assertIn("hs_server_name='example.com'", repr(c))

    def test_registration_tokens_not_in_repr_or_warnings(self):
        c = self.registration(REGISTRATION, LIVEKIT_AS_TOKEN="env-token-123456789")
        for text in (repr(c), *c.warnings):
            for secret in (AS_TOKEN, HS_TOKEN, "env-token-123456789"):
                self.assertNotIn(secret, text)

    def test_the_log_scrubber_knows_them(self):
        c = self.appservice_config()
        self.assertEqual(set(c.secrets), {"s3cr3t-value", AS_TOKEN, HS_TOKEN, "redis-pass-0123456789"})
        line = scrub(f"oops {AS_TOKEN} {HS_TOKEN} redis-pass-0123456789", c.secrets)
        self.assertEqual(line, "oops <redacted> <redacted> <redacted>")
        # a password written into the URL itself is known too
        c = self.load({"LIVEKIT_REDIS_URL": "redis://:in-url-password@h/0"})
        self.assertIn("in-url-password", c.secrets)


class OwnMetadataTests(_Loading):
    def test_exactly_true(self):
        self.assertTrue(self.load({"LIVEKIT_CAN_UPDATE_OWN_METADATA": "true"}).can_update_own_metadata)
        self.assertFalse(self.load({"LIVEKIT_CAN_UPDATE_OWN_METADATA": "false"}).can_update_own_metadata)
        self.assertFalse(self.load().can_update_own_metadata)

    def test_anything_else_is_off_with_a_warning(self):
        for value in ("True", "TRUE", "1", "yes", "on", " true", "true "):
            with self.subTest(value=value):
                c = self.load({"LIVEKIT_CAN_UPDATE_OWN_METADATA": value})
                self.assertFalse(c.can_update_own_metadata)
                self.assertIn(
                    "LIVEKIT_CAN_UPDATE_OWN_METADATA is set but not to true; canUpdateOwnMetadata is not granted",
                    c.warnings,
                )

    def test_false_is_quiet(self):
        self.assertEqual(self.load({"LIVEKIT_CAN_UPDATE_OWN_METADATA": "false"}).warnings, ())


class RedisPasswordTests(_Loading):
    def redis(self, url, password):
        return self.load({"LIVEKIT_REDIS_URL": url, "LIVEKIT_REDIS_PASSWORD": password}).redis_url

    def test_merged_into_the_url(self):
        self.assertEqual(self.redis("redis://127.0.0.1:6379/0", "pw"), "redis://:pw@127.0.0.1:6379/0")
        self.assertEqual(self.redis("rediss://redis.example", "pw"), "rediss://:pw@redis.example")
        self.assertEqual(self.redis("redis://[::1]:7000/2?db=3", "pw"), "redis://:pw@[::1]:7000/2?db=3")

    def test_replaces_the_urls_password_and_keeps_the_user(self):
        self.assertEqual(self.redis("redis://alice:old@h:6380/1", "new"), "redis://alice:new@h:6380/1")
        self.assertEqual(self.redis("redis://alice@h/1", "new"), "redis://alice:new@h/1")
        self.assertEqual(self.redis("redis://:old@h/1", "new"), "redis://:new@h/1")
        warning = "LIVEKIT_REDIS_PASSWORD is set, so the password in LIVEKIT_REDIS_URL is ignored"
        c = self.load({"LIVEKIT_REDIS_URL": "redis://:old-password@h/1", "LIVEKIT_REDIS_PASSWORD": "new"})
        self.assertIn(warning, c.warnings)
        self.assertNotIn("old-password", " ".join(c.warnings))
        c = self.load({"LIVEKIT_REDIS_URL": "redis://alice@h/1", "LIVEKIT_REDIS_PASSWORD": "new"})
        self.assertNotIn(warning, c.warnings)

    def test_password_reaches_redis_exactly(self):
        for password in ("p@ss:w/rd?#", "100%25", "sp ace", "\u00e9t\u00e9", "a!$&'()*+,;=b"):
            with self.subTest(password=password):
                target = parse_redis_url(self.redis("redis://user:old@h:6380/4", password))
                self.assertEqual((target.username, target.password), ("user", password))
                self.assertEqual((target.host, target.port, target.db), ("h", 6380, 4))
                self.assertNotIn(password, repr(target))
                self.assertEqual(target.redacted, "redis://user:xxxxx@h:6380/4")

    def test_without_password_the_url_is_kept_verbatim(self):
        for url in ("redis://:inline@h/0", "unix:///run/redis.sock?db=2", "localhost:6379", "REDIS://H"):
            self.assertEqual(self.redis(url, ""), url)

    def test_password_without_url_warns_and_uses_memory(self):
        c = self.load({"LIVEKIT_REDIS_PASSWORD": "pw"})
        self.assertEqual(c.redis_url, "")
        self.assertIn(
            "LIVEKIT_REDIS_PASSWORD was set without setting LIVEKIT_REDIS_URL. Continuing without Redis support",
            c.warnings,
        )

    def test_url_that_cannot_carry_a_password(self):
        message = "LIVEKIT_REDIS_PASSWORD was set but couldn't be combined with LIVEKIT_REDIS_URL"
        for url in ("unix:///run/redis.sock", "unix:///run/redis.sock?db=1", "localhost:6379", "redis://", "redis:x"):
            with self.subTest(url=url):
                self.assertConfigError(message, {"LIVEKIT_REDIS_URL": url, "LIVEKIT_REDIS_PASSWORD": "pw"})

    def test_malformed_url_fails_at_start_up(self):
        for url, problem in (
            ("not a url", "relative URL without a base"),
            ("/run/redis.sock", "relative URL without a base"),
            ("redis://h:port/0", "invalid port number"),
            ("redis://:pw@h:70000", "invalid port number"),
            ("redis://[::g]:6379", "invalid IPv6 address"),
            ("redis://a b/0", "invalid domain character"),
        ):
            for password in ("", "pw"):
                with self.subTest(url=url, password=password):
                    message = self.assertConfigError(
                        f"Could not parse LIVEKIT_REDIS_URL: {problem}",
                        {"LIVEKIT_REDIS_URL": url, "LIVEKIT_REDIS_PASSWORD": password},
                    )
                    self.assertNotIn("pw", message.replace("PASSWORD", ""))

    def test_go_redis_errors_stay_for_connect_time_and_are_redacted(self):
        url = self.redis("redis://h/x", "hunter2-secret")
        with self.assertRaises(RedisURLError) as cm:
            parse_redis_url(url)
        self.assertEqual(
            str(cm.exception), 'store: invalid Redis URL "redis://:xxxxx@h/x": redis: invalid database number: "x"'
        )


class HelpTests(SynchronousTestCase):
    def test_help_names_the_new_settings_and_credentials(self):
        text = settings_help().replace("\n", " ")
        for name in (
            "LIVEKIT_AS_TOKEN",
            "LIVEKIT_AS_TOKEN_FROM_FILE",
            "LIVEKIT_HS_TOKEN",
            "LIVEKIT_HS_TOKEN_FROM_FILE",
            "LIVEKIT_AS_REGISTRATION_FILE",
            "LIVEKIT_HS_SERVER_NAME",
            "LIVEKIT_CAN_UPDATE_OWN_METADATA",
            "LIVEKIT_REDIS_PASSWORD",
            "livekit_as_token",
            "livekit_hs_token",
        ):
            self.assertIn(name, text)
        self.assertIn("(default false)", " ".join(text.split()))

    def test_new_settings_are_not_unknown(self):
        env = dict(
            BASE, LIVEKIT_REDIS_PASSWORD="pw", LIVEKIT_REDIS_URL="redis://h", LIVEKIT_CAN_UPDATE_OWN_METADATA="true"
        )
        c = load_config(env, read_file=files({}))
        self.assertEqual([w for w in c.warnings if "unknown" in w], [])
