"""The doctor's DNS layer: --dns-server parsing, answer classification, name resolution."""

from __future__ import annotations

import os
import tempfile

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, TimeoutError as DeferTimeout, fail, succeed
from twisted.names import dns
from twisted.names.error import DNSNameError, DNSServerError
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.doctor.dns import (
    Answer,
    DNSClient,
    DNSServerSyntaxError,
    NamesHostnameResolver,
    parse_dns_server,
    query_timeouts,
    system_dns_servers,
)


class ParseDNSServerTests(SynchronousTestCase):
    def test_forms(self):
        self.assertEqual(parse_dns_server("127.0.0.1:5353"), ("127.0.0.1", 5353))
        self.assertEqual(parse_dns_server("192.0.2.53"), ("192.0.2.53", 53))
        self.assertEqual(parse_dns_server("[::1]:5353"), ("::1", 5353))
        self.assertEqual(parse_dns_server("[2001:db8::53]"), ("2001:db8::53", 53))
        self.assertEqual(parse_dns_server("::1"), ("::1", 53))

    def test_rejects(self):
        for text, needle in (
            ("dns.example.com:53", "must be an IP address"),
            ("127.0.0.1:0", "'0' is not a port number"),
            ("127.0.0.1:x", "'x' is not a port number"),
            ("[::1:53", "unbalanced '['"),
            ("[::1]53", "expected :PORT after ]"),
            ("127.0.0.1:70000", "'70000' is not a port number"),
        ):
            with self.assertRaises(DNSServerSyntaxError) as caught:
                parse_dns_server(text)
            self.assertIn(needle, str(caught.exception))


class SystemServersTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        fd, path = tempfile.mkstemp()
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self.addCleanup(os.remove, path)
        return path

    def test_nameserver_lines(self):
        path = self.write("# comment\nsearch example.com\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\n"
                          "nameserver not-an-ip\n")
        self.assertEqual(system_dns_servers(path), [("192.0.2.53", 53), ("fe80::1", 53)])

    def test_default_when_missing_or_empty(self):
        self.assertEqual(system_dns_servers(self.write("")), [("127.0.0.1", 53)])
        self.assertEqual(system_dns_servers("/nonexistent/resolv.conf"), [("127.0.0.1", 53)])


class TimeoutTests(SynchronousTestCase):
    def test_tries_stay_within_the_timeout(self):
        for timeout in (0.5, 1, 5, 30):
            tries = query_timeouts(timeout)
            self.assertEqual(len(tries), 2)
            self.assertLess(sum(tries), timeout)


def _rr(name: str, payload) -> dns.RRHeader:
    return dns.RRHeader(name=name, type=payload.TYPE, payload=payload)


class FakeNames:
    """twisted.names-like resolver answering from a table of name → result or exception."""

    def __init__(self, table) -> None:
        self.table = table
        self.calls = []

    def _answer(self, name, kind, timeout):
        self.calls.append((name, kind, timeout))
        value = self.table.get((name, kind))
        if isinstance(value, Exception):
            return fail(value)
        if value is None:
            return Deferred()
        return succeed((value, [], []))

    def lookupAddress(self, name, timeout=None):
        return self._answer(name, "A", timeout)

    def lookupIPV6Address(self, name, timeout=None):
        return self._answer(name, "AAAA", timeout)

    def lookupService(self, name, timeout=None):
        return self._answer(name, "SRV", timeout)


class DNSClientTests(SynchronousTestCase):
    def client(self, table) -> tuple[DNSClient, FakeNames]:
        names = FakeNames(table)
        return DNSClient(reactor=None, servers=[("127.0.0.1", 53)], timeout=5, _resolver=names), names

    def test_addresses(self):
        client, names = self.client({
            ("example.com", "A"): [_rr("example.com", dns.Record_CNAME("web.example.com")),
                                   _rr("web.example.com", dns.Record_A("192.0.2.1"))],
            ("example.com", "AAAA"): [_rr("example.com", dns.Record_AAAA("2001:db8::1"))],
        })
        v4, v6 = self.successResultOf(client.addresses("example.com"))
        self.assertEqual(v4, Answer("example.com", "A", ("192.0.2.1",)))
        self.assertEqual(v6, Answer("example.com", "AAAA", ("2001:db8::1",)))
        self.assertEqual([c[2] for c in names.calls], [query_timeouts(5)] * 2)

    def test_nodata_nxdomain_and_errors(self):
        client, _ = self.client({
            ("a.example", "A"): [],
            ("b.example", "A"): DNSNameError("b.example"),
            ("c.example", "A"): DeferTimeout("c.example"),
            ("d.example", "A"): DNSServerError("d.example"),
        })
        a = self.successResultOf(client.lookup("a.example", "A"))
        self.assertTrue(a.nodata)
        self.assertEqual(a.describe_absence(), "no A record")
        b = self.successResultOf(client.lookup("b.example", "A"))
        self.assertTrue(b.nxdomain)
        self.assertFalse(b.nodata)
        self.assertEqual(b.describe_absence(), "no such name (NXDOMAIN)")
        c = self.successResultOf(client.lookup("c.example", "A"))
        self.assertEqual(c.error, "the DNS server did not answer in time")
        d = self.successResultOf(client.lookup("d.example", "A"))
        self.assertEqual(d.describe_absence(), "A lookup failed (SERVFAIL)")

    def test_srv_lookups_use_the_doctor_timeouts(self):
        client, names = self.client({("_matrix-fed._tcp.example.com", "SRV"): []})
        self.successResultOf(client.lookupService("_matrix-fed._tcp.example.com", timeout=(1, 3, 5)))
        self.assertEqual(names.calls, [("_matrix-fed._tcp.example.com", "SRV", query_timeouts(5))])


class Receiver:
    def __init__(self) -> None:
        self.events = []

    def resolutionBegan(self, resolution):
        self.events.append(("began", resolution.name))

    def addressResolved(self, address):
        self.events.append((type(address).__name__, address.host, address.port))

    def resolutionComplete(self):
        self.events.append(("complete",))


class FakeDNSClient:
    def __init__(self, answers) -> None:
        self.answers = answers

    def addresses(self, name):
        return self.answers[name]


class HostnameResolverTests(SynchronousTestCase):
    def test_ipv6_first_then_ipv4(self):
        pending: Deferred = Deferred()
        resolver = NamesHostnameResolver(FakeDNSClient({"example.com": pending}))
        receiver = Receiver()
        resolver.resolveHostName(receiver, "example.com", 443)
        self.assertEqual(receiver.events, [("began", "example.com")])
        pending.callback((Answer("example.com", "A", ("192.0.2.1",)), Answer("example.com", "AAAA", ("2001:db8::1",))))
        self.assertEqual(receiver.events[1:], [
            ("IPv6Address", "2001:db8::1", 443),
            ("IPv4Address", "192.0.2.1", 443),
            ("complete",),
        ])

    def test_address_types_filter(self):
        answers = succeed((Answer("h", "A", ("192.0.2.1",)), Answer("h", "AAAA", ("2001:db8::1",))))
        receiver = Receiver()
        NamesHostnameResolver(FakeDNSClient({"h": answers})).resolveHostName(receiver, "h", 80, [IPv4Address])
        self.assertEqual(receiver.events[1:], [("IPv4Address", "192.0.2.1", 80), ("complete",)])

    def test_literals_need_no_lookup(self):
        resolver = NamesHostnameResolver(FakeDNSClient({}))
        for literal, kind in (("::1", "IPv6Address"), ("127.0.0.1", "IPv4Address")):
            receiver = Receiver()
            resolver.resolveHostName(receiver, literal, 8443)
            self.assertEqual(receiver.events, [("began", literal), (kind, literal, 8443), ("complete",)])

    def test_no_addresses_completes_empty(self):
        answers = succeed((Answer("h", "A", nxdomain=True), Answer("h", "AAAA", nxdomain=True)))
        receiver = Receiver()
        NamesHostnameResolver(FakeDNSClient({"h": answers})).resolveHostName(receiver, b"h", 443)
        self.assertEqual(receiver.events, [("began", "h"), ("complete",)])

    def test_addresses_are_twisted_addresses(self):
        answers = succeed((Answer("h", "A", ()), Answer("h", "AAAA", ("::1",))))
        seen = []

        class Keep(Receiver):
            def addressResolved(self, address):
                seen.append(address)

        NamesHostnameResolver(FakeDNSClient({"h": answers})).resolveHostName(Keep(), "h", 1)
        self.assertEqual(seen, [IPv6Address("TCP", "::1", 1)])
