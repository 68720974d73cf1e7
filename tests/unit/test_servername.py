"""Server-name grammar (docs/federation.md#server-names)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.matrix.servername import InvalidServerName, ServerName, parse_server_name


class ValidNameTests(SynchronousTestCase):
    def test_valid_names(self) -> None:
        cases = {
            "example.com": ServerName("example.com", None, False, "example.com"),
            "example.com:8448": ServerName("example.com", 8448, False, "example.com:8448"),
            "localhost": ServerName("localhost", None, False, "localhost"),
            "Matrix-1.Example.ORG:1": ServerName("Matrix-1.Example.ORG", 1, False, "Matrix-1.Example.ORG:1"),
            "xn--bcher-kva.example": ServerName("xn--bcher-kva.example", None, False, "xn--bcher-kva.example"),
            "1.2.3.4": ServerName("1.2.3.4", None, True, "1.2.3.4"),
            "1.2.3.4:65535": ServerName("1.2.3.4", 65535, True, "1.2.3.4:65535"),
            "[::1]": ServerName("::1", None, True, "[::1]"),
            "[2001:db8::1]:8448": ServerName("2001:db8::1", 8448, True, "[2001:db8::1]:8448"),
            "[::ffff:1.2.3.4]": ServerName("::ffff:1.2.3.4", None, True, "[::ffff:1.2.3.4]"),
            "a" * 63 + ".example": ServerName("a" * 63 + ".example", None, False, "a" * 63 + ".example"),
            "host.example:08448": ServerName("host.example", 8448, False, "host.example:08448"),
        }
        for text, expected in cases.items():
            with self.subTest(text=text):
                self.assertEqual(parse_server_name(text), expected)

    def test_helpers(self) -> None:
        name = parse_server_name("[2001:db8::1]:8448")
        self.assertTrue(name.is_ipv6)
        self.assertEqual(name.bracketed_host, "[2001:db8::1]")
        self.assertEqual(str(name), "[2001:db8::1]:8448")
        self.assertEqual(parse_server_name("1.2.3.4").bracketed_host, "1.2.3.4")
        self.assertFalse(parse_server_name("1.2.3.4").is_ipv6)

    def test_longest_host(self) -> None:
        host = ".".join(["a" * 63] * 4)[:255]
        self.assertEqual(len(host), 255)
        self.assertEqual(parse_server_name(host).host, host)


class InvalidNameTests(SynchronousTestCase):
    def assertInvalid(self, text, reason_part: str) -> None:
        with self.subTest(text=text):
            with self.assertRaises(InvalidServerName) as cm:
                parse_server_name(text)
            self.assertIn(reason_part, cm.exception.reason)

    def test_invalid_names(self) -> None:
        cases = [
            ("", "empty"),
            ("evil.com/x", "may only contain"),
            ("a@b", "may only contain"),
            ("user@evil.com:443", "may only contain"),
            ("evil.com?x=1", "may only contain"),
            ("evil.com#frag", "may only contain"),
            ("exa mple.com", "may only contain"),
            ("under_score.example", "may only contain"),
            ("host:99999", "out of range"),
            ("host:65536", "out of range"),
            ("host:0", "out of range"),
            ("host:123456", "1-5 digits"),
            ("host:", "1-5 digits"),
            ("host:-1", "1-5 digits"),
            ("host:+80", "1-5 digits"),
            ("host:8a", "1-5 digits"),
            ("host: 80", "1-5 digits"),
            ("host:80:80", "brackets"),
            (":8448", "empty host"),
            ("[::1", "unbalanced"),
            ("::1]", "unbalanced"),
            ("]example.com", "unbalanced"),
            ("::1", "brackets"),
            ("2001:db8::1:8448", "brackets"),
            ("[]", "empty IPv6"),
            ("[not-ipv6]", "not an IPv6 address"),
            ("[1.2.3.4]", "not an IPv6 address"),
            ("[fe80::1%eth0]", "zone"),
            ("[::1]x", "after the IPv6 literal"),
            ("[::1]:", "1-5 digits"),
            ("[::1]:0", "out of range"),
            ("example.com:80abc", "1-5 digits"),
            ("bücher.example", "non-ASCII"),
            ("example.com\u00a0", "non-ASCII"),
            ("a" * 64 + ".example", "label longer than 63"),
            ("a." * 127 + "ab", "longer than 255"),
            ("a..b", "empty label"),
            (".example.com", "empty label"),
            ("example.com.", "empty label"),
            ("1.2.3.256", "looks like an IPv4"),
            ("1.2.3", "looks like an IPv4"),
            ("1.2.3.4.5", "looks like an IPv4"),
            ("01.2.3.4", "looks like an IPv4"),
            ("127.1", "looks like an IPv4"),
            ("2130706433", "looks like an IPv4"),
            ("0x7f000001", "looks like an IPv4"),
            ("host.example.123", "looks like an IPv4"),
        ]
        for text, reason in cases:
            self.assertInvalid(text, reason)

    def test_not_a_string(self) -> None:
        self.assertInvalid(b"example.com", "not a string")
        self.assertInvalid(None, "not a string")

    def test_is_a_value_error(self) -> None:
        self.assertTrue(issubclass(InvalidServerName, ValueError))


class LabelRulesTests(SynchronousTestCase):
    """Names that could only cost a DNS query to fail are refused up front."""

    def test_hyphen_edges_and_bad_punycode(self) -> None:
        for name in ("xn--", "xn--zz-invalid-.example", "-a.com", "a-.com", "xn--a.example", "xn--zz.example:8448"):
            with self.assertRaises(InvalidServerName, msg=name):
                parse_server_name(name)

    def test_valid_idna(self) -> None:
        for name in ("xn--bcher-kva.example", "xn--80ak6aa92e.com:8448", "a-b.example"):
            self.assertEqual(parse_server_name(name).original, name)
