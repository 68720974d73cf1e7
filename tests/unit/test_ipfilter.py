"""SSRF guard: which addresses federation may connect to."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.matrix.ipfilter import DEFAULT_BLOCKLIST, IPRangeFilter, parse_cidr_list


class DefaultBlocklistTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.filter = IPRangeFilter()

    def test_each_blocked_class(self) -> None:
        cases = {
            "127.0.0.1": "127.0.0.0/8",  # loopback
            "127.255.255.254": "127.0.0.0/8",
            "::1": "::1/128",
            "10.0.0.5": "10.0.0.0/8",  # RFC 1918
            "172.16.0.1": "172.16.0.0/12",
            "172.31.255.255": "172.16.0.0/12",
            "192.168.1.1": "192.168.0.0/16",
            "169.254.1.1": "169.254.0.0/16",  # link-local
            "fe80::1": "fe80::/10",
            "fe80::1%eth0": "fe80::/10",
            "100.64.0.1": "100.64.0.0/10",  # CGNAT
            "100.127.255.255": "100.64.0.0/10",
            "fc00::1": "fc00::/7",  # unique local
            "fdff::1": "fc00::/7",
            "224.0.0.1": "224.0.0.0/4",  # multicast
            "239.255.255.250": "224.0.0.0/4",
            "ff02::1": "ff00::/8",
            "0.0.0.0": "0.0.0.0/8",  # unspecified / this network
            "::": "::/128",
            "169.254.169.254": "169.254.169.254/32",  # cloud metadata
            "fd00:ec2::254": "fd00:ec2::254/128",
            "192.0.0.8": "192.0.0.0/24",
            "198.18.0.1": "198.18.0.0/15",
            "198.19.255.255": "198.18.0.0/15",
            "240.0.0.1": "240.0.0.0/4",
            "255.255.255.255": "255.255.255.255/32",  # broadcast
            "100::1": "100::/64",  # discard
            "2001:db8::1": "2001:db8::/32",  # documentation
            "192.0.2.1": "192.0.2.0/24",
            "198.51.100.1": "198.51.100.0/24",
            "203.0.113.1": "203.0.113.0/24",
            "fec0::1": "fec0::/10",
        }
        for ip, rule in cases.items():
            with self.subTest(ip=ip):
                self.assertEqual(self.filter.check(ip), rule)

    def test_public_addresses_pass(self) -> None:
        for ip in ["8.8.8.8", "1.1.1.1", "93.184.216.34", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "2a00:1450::1"]:
            with self.subTest(ip=ip):
                self.assertIsNone(self.filter.check(ip))

    def test_ipv4_mapped_judged_by_embedded_ipv4(self) -> None:
        self.assertEqual(self.filter.check("::ffff:10.0.0.5"), "10.0.0.0/8")
        self.assertEqual(self.filter.check("::ffff:127.0.0.1"), "127.0.0.0/8")
        self.assertEqual(self.filter.check("::ffff:169.254.169.254"), "169.254.169.254/32")
        self.assertIsNone(self.filter.check("::ffff:8.8.8.8"))

    def test_nat64_judged_by_embedded_ipv4(self) -> None:
        self.assertEqual(self.filter.check("64:ff9b::10.0.0.5"), "10.0.0.0/8")
        self.assertEqual(self.filter.check("64:ff9b::7f00:1"), "127.0.0.0/8")
        self.assertIsNone(self.filter.check("64:ff9b::8.8.8.8"))

    def test_6to4_judged_by_embedded_ipv4(self) -> None:
        self.assertEqual(self.filter.check("2002:c0a8:0101::1"), "192.168.0.0/16")
        self.assertIsNone(self.filter.check("2002:0808:0808::1"))

    def test_brackets_are_ignored(self) -> None:
        self.assertEqual(self.filter.check("[::1]"), "::1/128")

    def test_garbage_is_refused(self) -> None:
        self.assertEqual(self.filter.check("not-an-ip"), "unparseable address")
        self.assertEqual(self.filter.check(""), "unparseable address")

    def test_default_list_parses(self) -> None:
        self.assertEqual(parse_cidr_list(",".join(DEFAULT_BLOCKLIST), "X"), list(DEFAULT_BLOCKLIST))


class CustomListTests(SynchronousTestCase):
    def test_allowlist_punches_holes(self) -> None:
        f = IPRangeFilter(allowlist=["10.1.0.0/16", "fd12::/16"])
        self.assertIsNone(f.check("10.1.2.3"))
        self.assertEqual(f.check("10.2.0.1"), "10.0.0.0/8")
        self.assertIsNone(f.check("fd12::5"))
        self.assertEqual(f.check("fd13::5"), "fc00::/7")

    def test_allowlist_applies_to_embedded_ipv4(self) -> None:
        f = IPRangeFilter(allowlist=["10.1.0.0/16"])
        self.assertIsNone(f.check("::ffff:10.1.2.3"))
        self.assertEqual(f.check("::ffff:10.2.2.3"), "10.0.0.0/8")

    def test_allowlist_single_address(self) -> None:
        f = IPRangeFilter(allowlist=["127.0.0.1", "::1"])
        self.assertIsNone(f.check("127.0.0.1"))
        self.assertIsNone(f.check("::1"))
        self.assertEqual(f.check("127.0.0.2"), "127.0.0.0/8")

    def test_blocklist_replaces_default(self) -> None:
        f = IPRangeFilter(blocklist=["8.8.8.0/24"], allowlist=[])
        self.assertEqual(f.check("8.8.8.8"), "8.8.8.0/24")
        self.assertIsNone(f.check("10.0.0.1"))
        self.assertIsNone(f.check("::1"))

    def test_embedded_ipv4_checked_against_custom_v4_rules(self) -> None:
        f = IPRangeFilter(blocklist=["8.8.8.0/24"])
        self.assertEqual(f.check("::ffff:8.8.8.8"), "8.8.8.0/24")
        self.assertEqual(f.check("64:ff9b::808:808"), "8.8.8.0/24")

    def test_empty_blocklist_allows_everything(self) -> None:
        self.assertIsNone(IPRangeFilter(blocklist=[]).check("127.0.0.1"))

    def test_bad_constructor_entry(self) -> None:
        with self.assertRaises(ValueError) as cm:
            IPRangeFilter(blocklist=["10.0.0.0/33"])
        self.assertEqual(str(cm.exception), 'IP range blocklist: "10.0.0.0/33" is not an IP address or CIDR range')


class ParseCidrListTests(SynchronousTestCase):
    def test_parse(self) -> None:
        self.assertEqual(
            parse_cidr_list(" 10.0.0.0/8 ,fd00::/8,, 192.168.1.7 ,::1,10.1.2.3/16 ", "VAR"),
            ["10.0.0.0/8", "fd00::/8", "192.168.1.7/32", "::1/128", "10.1.0.0/16"],
        )

    def test_empty(self) -> None:
        self.assertEqual(parse_cidr_list("", "VAR"), [])
        self.assertEqual(parse_cidr_list("  , ,", "VAR"), [])
        self.assertEqual(parse_cidr_list(None, "VAR"), [])

    def test_bad_entry_names_the_variable(self) -> None:
        for bad in ["10.0.0.0/33", "example.com", "10.0.0.0/8/1", "1.2.3.4.5", "fe80::1%eth0"]:
            with self.subTest(bad=bad):
                with self.assertRaises(ValueError) as cm:
                    parse_cidr_list(f"10.0.0.0/8, {bad}", "RTCAUTH_FEDERATION_IP_RANGE_BLOCKLIST")
                message = str(cm.exception)
                self.assertEqual(
                    message,
                    f'RTCAUTH_FEDERATION_IP_RANGE_BLOCKLIST: "{bad}" is not an IP address or CIDR range',
                )
                self.assertNotIn("\n", message)
