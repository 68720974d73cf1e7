"""The doctor's reading of an AS registration and the YAML its fixes tell operators to write."""

from __future__ import annotations

import textwrap
from types import SimpleNamespace

import yaml
from twisted.trial import unittest

from rtcauthd.doctor import as_config
from rtcauthd.doctor.as_config import (
    IS_JOINED_SCOPE,
    flags_yaml,
    judge_registration,
    namespace_yaml,
    registration_keys_yaml,
    service_homeserver_url,
    transports_yaml,
    url_difference,
)
from tests.unit.test_config_appservice import REGISTRATION

#: A correct registration (shared with the configuration tests).
GOOD = REGISTRATION


def parse(snippet: str):
    """A fix paragraph is preformatted (two leading spaces): it must be valid YAML."""
    return yaml.safe_load(textwrap.dedent(snippet))


class SnippetTests(unittest.TestCase):
    def test_transports_yaml_is_what_synapse_reads(self):
        self.assertEqual(
            parse(transports_yaml("wss://sfu.example.com", "https://rtc.example.com/livekit/jwt")),
            {"matrix_rtc": {"transports": [{"type": "livekit", "url": "wss://sfu.example.com",
                                            "livekit_service_url": "https://rtc.example.com/livekit/jwt"}]}},
        )
        self.assertEqual(parse(transports_yaml(None, None))["matrix_rtc"]["transports"][0]["url"],
                         as_config.PLACEHOLDER_SFU)

    def test_flags_and_registration_keys(self):
        self.assertEqual(parse(flags_yaml(["msc4512_enabled"])), {"experimental_features": {"msc4512_enabled": True}})
        self.assertEqual(set(parse(flags_yaml())["experimental_features"]),
                         {"msc4502_enabled", "msc4512_enabled", "msc4143_enabled"})
        self.assertEqual(parse(registration_keys_yaml("http://10.0.0.2:8080")), {
            "io.element.msc4502.scopes": [IS_JOINED_SCOPE],
            "io.element.msc4512.proxy_prefix": "rtc/livekit",
            "io.element.msc4512.proxy_url": "http://10.0.0.2:8080",
        })
        namespace = parse(namespace_yaml("example.com:8448"))["namespaces"]["users"][0]
        self.assertEqual(namespace["exclusive"], False)
        self.assertRegex("@bob:example.com:8448", namespace["regex"])
        self.assertNotRegex("@bob:exampleXcom:8448", namespace["regex"])


class UrlDifferenceTests(unittest.TestCase):
    def test_words(self):
        self.assertEqual(url_difference("wss://a.example", "wss://a.example/"), "only a trailing '/' differs")
        self.assertEqual(url_difference("wss://a.example", "wss://A.example"), "only upper/lower case differs")
        self.assertEqual(url_difference("wss://a.example", "ws://a.example"),
                         "they differ from character 3 on ('s' vs ':')")
        self.assertEqual(url_difference("wss://a.example", "wss://a.example:443"), "one is 4 character(s) longer")


class JudgeRegistrationTests(unittest.TestCase):
    def judge(self, text: str):
        return judge_registration("/etc/reg.yaml", text, server_name="example.com")

    def test_good_file(self):
        reg = self.judge(GOOD.replace('8080"', '8080/"'))
        self.assertEqual((reg.error, reg.problems, reg.missing), (None, [], []))
        self.assertEqual((reg.id, reg.url, reg.proxy_url), ("lk-jwt-service", None, "http://127.0.0.1:8080"))
        self.assertTrue(reg.proxy_claimed)

    def test_unprefixed_keys_are_named_with_their_consequence(self):
        text = (GOOD.replace("io.element.msc4502.scopes", "scopes")
                .replace("io.element.msc4512.proxy_prefix", "proxy_prefix")
                .replace("io.element.msc4512.proxy_url", "proxy_url"))
        reg = self.judge(text)
        self.assertFalse(reg.proxy_claimed)
        (message, fix), = reg.problems
        self.assertIn("uses proxy_prefix, proxy_url, scopes, which Synapse ignores", message)
        self.assertIn("Synapse proxies nothing", message)
        self.assertIn("is_joined answers 403", message)
        # The fix keeps the operator's proxy_url and is valid YAML.
        self.assertEqual(parse(fix[1])["io.element.msc4512.proxy_url"], "http://127.0.0.1:8080")

    def test_misspelt_scope_key(self):
        reg = self.judge(GOOD.replace("io.element.msc4502.scopes", "io.element.msc4502.scope"))
        self.assertIn("io.element.msc4502.scope,", reg.problems[0][0] + ",")
        self.assertEqual(reg.missing, ["io.element.msc4502.scopes"])
        self.assertTrue(reg.proxy_claimed)

    def test_missing_scope_value(self):
        reg = self.judge(GOOD.replace("rooms:is_joined", "rooms:other"))
        self.assertIn("lacks io.element.msc4502.scopes", reg.problems[0][0])

    def test_proxy_url_path_and_bad_prefix(self):
        reg = self.judge(GOOD.replace('8080"', '8080/livekit/jwt"').replace('"rtc/livekit"', '"rtc"'))
        messages = [m for m, _f in reg.problems]
        self.assertIn("io.element.msc4512.proxy_prefix is 'rtc'", messages[0])
        self.assertIn("has a path", messages[1])
        self.assertEqual(parse(reg.problems[1][1][0]), {"io.element.msc4512.proxy_url": "http://127.0.0.1:8080"})

    def test_namespace_must_cover_local_users(self):
        reg = self.judge(GOOD.replace("'@.*:example\\.com'", "'@_rtcauthd:example\\.com'"))
        self.assertIn("does not cover local users such as @rtcauth-doctor:example.com", reg.problems[0][0])

    def test_rate_limited_default(self):
        self.assertTrue(self.judge(GOOD).rate_limited)
        self.assertFalse(self.judge(GOOD + "rate_limited: false\n").rate_limited)

    def test_unreadable_yaml(self):
        self.assertIn("while parsing", self.judge("id: [unclosed\n").error)
        self.assertEqual(self.judge("- a list\n").error, "the top level is not a mapping")


class ServiceHomeserverTests(unittest.TestCase):
    def ctx(self, **config):
        fields = {"appservice": True, "hs_server_name": "example.com", "cs_api_url_overrides": {}}
        fields.update(config)
        options = SimpleNamespace(config=SimpleNamespace(**fields))
        return SimpleNamespace(options=options, server=SimpleNamespace(original="example.com"))

    def test_the_as_token_goes_only_where_the_service_sends_it(self):
        self.assertEqual(service_homeserver_url(self.ctx(), "https://matrix.example.com"), "https://matrix.example.com")
        self.assertEqual(
            service_homeserver_url(self.ctx(cs_api_url_overrides={"example.com": "http://10.0.0.5:8008/"}), "https://x"),
            "http://10.0.0.5:8008",
        )
        # Another server's well-known is not where this service sends its token.
        self.assertIsNone(service_homeserver_url(self.ctx(hs_server_name="other.com"), "https://matrix.example.com"))
        self.assertIsNone(service_homeserver_url(self.ctx(appservice=False), "https://matrix.example.com"))
