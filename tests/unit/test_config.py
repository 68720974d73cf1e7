"""Configuration parsing: upstream's defaults, precedence, trimming and exact start-up errors."""

from __future__ import annotations

import os
import re

from twisted.trial.unittest import SynchronousTestCase

from tests.support.config_loading import BASE, ConfigLoading
from tests.support.files import files
from rtcauthd.config import KNOWN_VARIABLES, SETTINGS, ConfigError, load_config, settings_help
from rtcauthd.config_sources import parse_env_file
from rtcauthd.config_values import bind_to_endpoints, parse_cs_api_overrides



class LoadConfigTests(ConfigLoading, SynchronousTestCase):
    def test_defaults_match_upstream(self):
        c = self.load()
        self.assertEqual(c.livekit_url, "wss://sfu.example.com")
        self.assertEqual(c.listen, ("tcp6:8080:interface=\\:\\:",))
        self.assertEqual(c.log_level, "info")
        self.assertEqual(c.sanity_check_interval, 0)
        self.assertEqual(c.cs_api_url_overrides, {})
        self.assertEqual(c.redis_url, "")
        self.assertFalse(c.insecure_skip_verify_tls)
        self.assertEqual(c.outbound_timeout, 10.0)
        self.assertEqual(c.max_body_bytes, 65536)
        self.assertIsNone(c.ip_blocklist)

    def test_secret_not_in_repr(self):
        c = self.load({"LIVEKIT_REDIS_URL": "redis://:hunter2@localhost/0"})
        self.assertNotIn("s3cr3t-value", repr(c))
        self.assertNotIn("hunter2", repr(c))

    def test_missing_url_key_or_secret(self):
        msg = "LIVEKIT_KEY* / LIVEKIT_SECRET* and LIVEKIT_URL must be set"
        for name in ("LIVEKIT_URL", "LIVEKIT_KEY", "LIVEKIT_SECRET"):
            self.assertConfigError(msg, remove=(name,))
        self.assertConfigError(msg, {"LIVEKIT_SECRET": " \r\n"})

    def test_full_access_required_with_exact_message(self):
        self.assertConfigError(
            "LIVEKIT_FULL_ACCESS_HOMESERVERS environment variable must be set to the homeserver(s) "
            "you intend to serve \u2014 see README for guidance",
            remove=("LIVEKIT_FULL_ACCESS_HOMESERVERS",),
        )

    def test_full_access_list_split_on_commas_and_spaces(self):
        c = self.load({"LIVEKIT_FULL_ACCESS_HOMESERVERS": "example.com, test.com,,other.org:8448"})
        self.assertEqual(c.full_access_homeservers, ("example.com", "test.com", "other.org:8448"))
        self.assertTrue(c.is_full_access("test.com"))
        self.assertTrue(c.is_full_access("other.org:8448"))
        self.assertFalse(c.is_full_access("other.org"))
        self.assertFalse(c.is_full_access("Example.com"))
        self.assertFalse(c.is_full_access("matrix.example.com"))

    def test_only_separators_means_nobody(self):
        c = self.load({"LIVEKIT_FULL_ACCESS_HOMESERVERS": " , "})
        self.assertEqual(c.full_access_homeservers, ())
        self.assertFalse(c.is_full_access("example.com"))

    def test_wildcard_only_alone(self):
        wildcard = self.load({"LIVEKIT_FULL_ACCESS_HOMESERVERS": "*"})
        self.assertTrue(wildcard.is_full_access("any.org"))
        self.assertFalse(wildcard.is_named_full_access("any.org"))  # SSRF filter stays on
        mixed = self.load({"LIVEKIT_FULL_ACCESS_HOMESERVERS": "*, example.com"})
        self.assertFalse(mixed.is_full_access("any.org"))
        self.assertTrue(mixed.is_full_access("example.com"))

    def test_bind_and_port_exclusive(self):
        self.assertConfigError(
            "LIVEKIT_JWT_BIND and LIVEKIT_JWT_PORT must not be set together",
            {"LIVEKIT_JWT_BIND": ":9000", "LIVEKIT_JWT_PORT": "9001"},
        )

    def test_deprecated_port_maps_to_all_interfaces_and_warns(self):
        c = self.load({"LIVEKIT_JWT_PORT": "9001"})
        self.assertEqual(c.listen, ("tcp6:9001:interface=\\:\\:",))
        self.assertTrue(any("LIVEKIT_JWT_PORT is deprecated" in w for w in c.warnings))

    def test_cli_listen_overrides_bind(self):
        c = self.load({"LIVEKIT_JWT_BIND": ":9000"}, listen=("unix:/run/x.sock",))
        self.assertEqual(c.listen, ("unix:/run/x.sock",))

    def test_sanity_interval(self):
        self.assertEqual(self.load({"LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS": "+5"}).sanity_check_interval, 5)
        self.assertEqual(self.load({"LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS": "0"}).sanity_check_interval, 0)
        for bad in ("not-a-number", "-1", " 5", "1.5", "99999999999999999999999", "9223372036854775808"):
            self.assertConfigError(
                f'LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS must be a non-negative integer, got "{bad}"',
                {"LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS": bad},
            )

    def test_log_level(self):
        self.assertEqual(self.load({"LIVEKIT_LOG_LEVEL": "DEBUG"}).log_level, "debug")
        self.assertEqual(self.load({"LIVEKIT_LOG_LEVEL": "warning"}).log_level, "warn")
        c = self.load({"LIVEKIT_LOG_LEVEL": "loud"})
        self.assertEqual(c.log_level, "info")
        self.assertIn("Invalid log level in LIVEKIT_LOG_LEVEL, defaulting to info", c.warnings)

    def test_insecure_only_with_magic_value(self):
        self.assertTrue(
            self.load({"LIVEKIT_INSECURE_SKIP_VERIFY_TLS": "YES_I_KNOW_WHAT_I_AM_DOING"}).insecure_skip_verify_tls
        )
        c = self.load({"LIVEKIT_INSECURE_SKIP_VERIFY_TLS": "true"})
        self.assertFalse(c.insecure_skip_verify_tls)
        self.assertTrue(any("TLS certificates are verified" in w for w in c.warnings))

    def test_key_file(self):
        read = files({"/k": "keysecret_abc: keysecret_xyz\n"})
        c = self.load({"LIVEKIT_KEY_FILE": "/k"}, read_file=read)
        self.assertEqual((c.api_key, c.api_secret), ("keysecret_abc", "keysecret_xyz"))
        self.assertTrue(any("LIVEKIT_KEY_FILE is set" in w for w in c.warnings))

    def test_key_file_malformed(self):
        for content in ("only-a-key\n", "a: b: c\n", "a: b\nc: d\n"):
            self.assertConfigError(
                "LIVEKIT_KEY_FILE: invalid key secret file format!",
                {"LIVEKIT_KEY_FILE": "/k"},
                read_file=files({"/k": content}),
            )

    def test_unreadable_files_name_the_variable(self):
        for variable in ("LIVEKIT_KEY_FILE", "LIVEKIT_KEY_FROM_FILE", "LIVEKIT_SECRET_FROM_FILE"):
            with self.assertRaises(ConfigError) as cm:
                self.load({variable: "/missing"})
            self.assertTrue(str(cm.exception).startswith(f"{variable}: cannot read /missing"))

    def test_from_file_overrides_and_trims_crlf_but_not_tabs(self):
        read = files({"/key": "filekey\r\n", "/secret": "  sec\tret \r\n"})
        c = self.load(
            {"LIVEKIT_KEY_FROM_FILE": "/key", "LIVEKIT_SECRET_FROM_FILE": "/secret"}, read_file=read
        )
        self.assertEqual(c.api_key, "filekey")
        self.assertEqual(c.api_secret, "sec\tret")
        self.assertIn("/secret", c.secret_source)

    def test_systemd_credentials_fill_in_missing_values(self):
        read = files({"/creds/livekit_key": "credkey\n", "/creds/livekit_secret": "credsecret\n"})
        c = self.load({"CREDENTIALS_DIRECTORY": "/creds"}, remove=("LIVEKIT_KEY", "LIVEKIT_SECRET"), read_file=read)
        self.assertEqual((c.api_key, c.api_secret), ("credkey", "credsecret"))
        self.assertEqual(c.secret_source, "systemd credential livekit_secret")
        # an explicit variable still wins over a credential
        c = self.load({"CREDENTIALS_DIRECTORY": "/creds"}, remove=("LIVEKIT_SECRET",), read_file=read)
        self.assertEqual((c.api_key, c.api_secret), ("devkey", "credsecret"))

    def test_cs_api_overrides(self):
        c = self.load({"LIVEKIT_CS_API_URL_OVERRIDES": " example.com = https://a , example.org = https://b "})
        self.assertEqual(c.cs_api_url_overrides, {"example.com": "https://a", "example.org": "https://b"})
        self.assertEqual(
            parse_cs_api_overrides("[2001:db8::1]:1234=https://x"), {"[2001:db8::1]:1234": "https://x"}
        )
        for bad, entry in (
            ("example.com", "example.com"),
            ("=https://x", "=https://x"),
            ("example.com=", "example.com="),
            ("a=b,example.com", "example.com"),
            ("a=b,", ""),
        ):
            self.assertConfigError(
                f'failed parsing LIVEKIT_CS_API_URL_OVERRIDES: invalid entry "{entry}", expected server_name=url',
                {"LIVEKIT_CS_API_URL_OVERRIDES": bad},
            )

    def test_ip_ranges(self):
        c = self.load(
            {
                "RTCAUTH_FEDERATION_IP_RANGE_ALLOWLIST": "127.0.0.0/8, ::1",
                "RTCAUTH_FEDERATION_IP_RANGE_BLOCKLIST": "10.0.0.0/8",
            }
        )
        self.assertEqual(c.ip_allowlist, ("127.0.0.0/8", "::1/128"))
        self.assertEqual(c.ip_blocklist, ("10.0.0.0/8",))
        self.assertConfigError(
            'RTCAUTH_FEDERATION_IP_RANGE_ALLOWLIST: "10.0.0.300/8" is not an IP address or CIDR range',
            {"RTCAUTH_FEDERATION_IP_RANGE_ALLOWLIST": "10.0.0.300/8"},
        )
        # zone IDs were accepted here once and crashed the filter at start-up
        self.assertConfigError(
            'RTCAUTH_FEDERATION_IP_RANGE_ALLOWLIST: "fe80::1%eth0" is not an IP address or CIDR range',
            {"RTCAUTH_FEDERATION_IP_RANGE_ALLOWLIST": "fe80::1%eth0"},
        )

    def test_numbers(self):
        self.assertEqual(self.load({"RTCAUTH_OUTBOUND_TIMEOUT_SECONDS": "2.5"}).outbound_timeout, 2.5)
        self.assertConfigError(
            'RTCAUTH_OUTBOUND_TIMEOUT_SECONDS must be a positive number, got "0"',
            {"RTCAUTH_OUTBOUND_TIMEOUT_SECONDS": "0"},
        )
        self.assertConfigError(
            'RTCAUTH_MAX_BODY_BYTES must be a positive number, got "lots"',
            {"RTCAUTH_MAX_BODY_BYTES": "lots"},
        )
        for unbounded in ("nan", "inf", "-inf", "Infinity"):
            self.assertConfigError(
                f'RTCAUTH_OUTBOUND_TIMEOUT_SECONDS must be a positive number, got "{unbounded}"',
                {"RTCAUTH_OUTBOUND_TIMEOUT_SECONDS": unbounded},
            )

    def test_port_errors_name_the_variable_given(self):
        self.assertConfigError('LIVEKIT_JWT_PORT: ":80a" is not host:port', {"LIVEKIT_JWT_PORT": "80a"})
        self.assertConfigError('LIVEKIT_JWT_BIND: ":80a" is not host:port', {"LIVEKIT_JWT_BIND": ":80a"})

    def test_secret_that_is_not_utf8_keeps_its_bytes(self):
        read = files({"/secret": b"secretsecret\xff\n".decode("utf-8", "surrogateescape")})
        c = self.load({"LIVEKIT_SECRET_FROM_FILE": "/secret"}, read_file=read)
        self.assertEqual(c.api_secret.encode("utf-8", "surrogateescape"), b"secretsecret\xff")

    def test_dev_mode_fills_only_missing_values(self):
        c = load_config({}, dev=True, read_file=files({}))
        self.assertEqual((c.api_key, c.api_secret, c.livekit_url), ("devkey", "secret", "ws://localhost:7880"))
        self.assertTrue(c.is_full_access("localhost"))
        self.assertTrue(any("DEVELOPMENT MODE" in w for w in c.warnings))
        c = load_config({"LIVEKIT_URL": "wss://real"}, dev=True, read_file=files({}))
        self.assertEqual(c.livekit_url, "wss://real")

    def test_without_dev_nothing_is_defaulted(self):
        with self.assertRaises(ConfigError):
            load_config({}, read_file=files({}))

    def test_config_file_below_environment(self):
        read = files({"/etc/rtcauthd.env": "# comment\nLIVEKIT_URL=ws://file\nLIVEKIT_LOG_LEVEL='debug'\n"})
        c = self.load(remove=("LIVEKIT_URL",), config_file="/etc/rtcauthd.env", read_file=read)
        self.assertEqual(c.livekit_url, "ws://file")
        self.assertEqual(c.log_level, "debug")
        c = self.load(config_file="/etc/rtcauthd.env", read_file=read)
        self.assertEqual(c.livekit_url, "wss://sfu.example.com")

    def test_env_file_syntax(self):
        self.assertEqual(parse_env_file('export A=1\nB = " x "\n; c\n'), {"A": "1", "B": " x "})

    def test_env_file_quoting_matches_systemd(self):
        text = (
            "A=tcp6:8080:interface=\\:\\:1\n"
            "B='tcp6:8080:interface=\\:\\:1'\n"
            'C="a \\" b \\\\ c \\: d"\n'
            "D=plain value   \n"
            "E=x'y z'\"w\"\n"
        )
        self.assertEqual(
            parse_env_file(text),
            {
                "A": "tcp6:8080:interface=::1",
                "B": "tcp6:8080:interface=\\:\\:1",
                "C": 'a " b \\ c \\: d',
                "D": "plain value",
                "E": "xy zw",
            },
        )
        with self.assertRaises(ConfigError):
            parse_env_file("not a setting\n")

    def test_unknown_variables_warned(self):
        c = self.load({"LIVEKIT_FULL_ACCESS_HOMESERVER": "typo.org"})
        self.assertIn("unknown variable LIVEKIT_FULL_ACCESS_HOMESERVER is ignored", c.warnings)


class BindTests(SynchronousTestCase):
    def test_mapping(self):
        self.assertEqual(bind_to_endpoints(":8080"), ("tcp6:8080:interface=\\:\\:",))
        self.assertEqual(bind_to_endpoints("127.0.0.1:8080"), ("tcp:8080:interface=127.0.0.1",))
        self.assertEqual(bind_to_endpoints("[::1]:8080"), ("tcp6:8080:interface=\\:\\:1",))
        self.assertEqual(bind_to_endpoints("[::]:8080"), ("tcp6:8080:interface=\\:\\:",))
        # Go's listener takes the first address of localhost: 127.0.0.1 (no ::1 to fail
        # on hosts without IPv6).
        self.assertEqual(bind_to_endpoints("localhost:8080"), ("tcp:8080:interface=127.0.0.1",))

    def test_bad(self):
        for bad in ("8080", "host:port", ":99999", "example.com:80", ":\u00b2", ":+80", ": 80"):
            with self.assertRaises(ConfigError) as cm:
                bind_to_endpoints(bad)
            self.assertIn("LIVEKIT_JWT_BIND", str(cm.exception))


ENV_FILE = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "debian", "rtcauthd.env")


class SettingsTableTests(SynchronousTestCase):
    """The table is the one list of settings: the env file and --help follow it."""

    def env_file_examples(self):
        """``NAME=value`` of every (commented-out) example line in debian/rtcauthd.env."""
        with open(ENV_FILE, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
        examples = {}
        for line in lines:
            match = re.fullmatch(r"#?([A-Z][A-Z0-9_]*)=(.*)", line)
            if match:
                examples[match.group(1)] = match.group(2)
        return examples

    def test_env_file_documents_every_setting_and_nothing_else(self):
        examples = self.env_file_examples()
        documented = [s.name for s in SETTINGS if s.documented]
        self.assertEqual(sorted(n for n in documented if n not in examples), [], "missing from debian/rtcauthd.env")
        self.assertEqual(sorted(n for n in examples if n not in KNOWN_VARIABLES), [], "not a setting")

    def test_every_known_variable_is_documented_commented_out(self):
        # What scripts/package-test checks in the installed package, here without root.
        examples = self.env_file_examples()
        self.assertEqual(sorted(n for n in KNOWN_VARIABLES if n not in examples), [])
        self.assertNotIn("CREDENTIALS_DIRECTORY", KNOWN_VARIABLES)  # set by systemd, not by the operator
        with open(ENV_FILE, encoding="utf-8") as f:
            self.assertEqual(re.findall(r"^[A-Z_]+=", f.read(), re.M), [], "an example is not commented out")

    def test_env_file_examples_show_the_table_default(self):
        examples = self.env_file_examples()
        for setting in SETTINGS:
            if setting.documented and setting.default:
                self.assertEqual(examples[setting.name], setting.default, setting.name)

    def test_defaults_in_the_table_are_the_config_defaults(self):
        c = load_config(BASE)
        self.assertEqual(c.log_level, "info")
        self.assertEqual(c.log_format, "auto")
        by_name = {s.name: s for s in SETTINGS}
        self.assertEqual(c.listen, bind_to_endpoints(by_name["LIVEKIT_JWT_BIND"].default))
        self.assertEqual(c.sanity_check_interval, int(by_name["LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS"].default))
        self.assertEqual(c.outbound_timeout, float(by_name["RTCAUTH_OUTBOUND_TIMEOUT_SECONDS"].default))
        self.assertEqual(c.max_body_bytes, int(by_name["RTCAUTH_MAX_BODY_BYTES"].default))

    def test_names_are_unique_and_every_group_has_a_reader(self):
        names = [s.name for s in SETTINGS]
        self.assertEqual(len(names), len(set(names)))
        self.assertIsNotNone(SETTINGS[0].parse)  # a reader-less row belongs to the one before

    def test_help_lists_every_setting_with_its_default(self):
        text = settings_help()
        for setting in SETTINGS:
            self.assertIn(f"  {setting.name}  ", text.replace("\n", "  ") + "  ")
        self.assertIn("(default 65536)", text)
        self.assertTrue(all(len(line) <= 80 for line in text.splitlines()))
