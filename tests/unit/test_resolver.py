"""Server-name resolution (docs/federation.md#resolution): every table row, SRV rules, well-known cache."""

from __future__ import annotations

import json
import random
from typing import Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.names.error import DNSNameError, DNSServerError, DomainError
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from treq.testing import RequestTraversalAgent
from zope.interface import implementer

from rtcauthd.outbound.client import HTTPClient
from rtcauthd.matrix import resolver as resolver_module
from rtcauthd.matrix.resolver import (
    WELL_KNOWN_DOWN_CACHE_PERIOD,
    WELL_KNOWN_INVALID_CACHE_PERIOD,
    WELL_KNOWN_MAX_BODY,
    Resolution,
    ServerResolver,
)
from rtcauthd.matrix.servername import parse_server_name
from rtcauthd.outbound.errors import FailureKind, OutboundError
from tests.support.outbound import assert_fails_with, failed_with

HOUR = 3600.0


class FakeSRV:
    """A twisted.names-like resolver answering ``lookupService`` from a dict.

    Values: list of (priority, weight, port, target), an exception instance, or a
    Deferred. Missing names answer NXDOMAIN.
    """

    def __init__(self, records: Optional[dict] = None) -> None:
        self.records = dict(records or {})
        self.queries: list[str] = []

    def lookupService(self, name, timeout=None):
        self.queries.append(name)
        value = self.records.get(name)
        if value is None:
            return fail(DNSNameError(name))
        if isinstance(value, Exception):
            return fail(value)
        if isinstance(value, Deferred):
            return value
        answers = [
            dns.RRHeader(
                name=name,
                type=dns.SRV,
                payload=dns.Record_SRV(priority, weight, port, target.encode("ascii")),
            )
            for priority, weight, port, target in value
        ]
        return succeed((answers, [], []))


class WellKnownSite(Resource):
    """Serves ``/.well-known/matrix/server`` per Host header from ``answers``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, tuple[int, bytes, dict]] = {}
        self.hang: set[str] = set()

    def render_GET(self, request):
        host = request.getHeader("host")
        if host in self.hang:
            return NOT_DONE_YET
        code, body, headers = self.answers.get(host, (404, b"", {}))
        request.setResponseCode(code)
        for name, value in headers.items():
            request.setHeader(name, value)
        return body

    def delegate(self, host: str, m_server, headers: Optional[dict] = None) -> None:
        self.answers[host] = (200, json.dumps({"m.server": m_server}).encode(), headers or {})


@implementer(IAgent)
class FakeWebAgent:
    """In-memory web for the well-known fetch; hosts in ``down`` refuse connections."""

    def __init__(self, site: Resource) -> None:
        self._agent = RequestTraversalAgent(site)
        self.down: set[str] = set()
        self.fetched: list[bytes] = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        self.fetched.append(uri)
        host = URI.fromBytes(uri).host.decode()
        if host in self.down:
            return fail(ConnectionRefusedError("connection refused"))
        d = self._agent.request(method, uri, headers, bodyProducer)
        self._agent.flush()
        return d

    def fetch_count(self, host: str) -> int:
        return sum(1 for uri in self.fetched if URI.fromBytes(uri).host.decode() == host)


class FixedRandom(random.Random):
    """uniform() returns ``fraction`` of the way from a to b; randint the lowest."""

    def __init__(self, fraction: float = 0.5) -> None:
        super().__init__(0)
        self.fraction = fraction

    def uniform(self, a, b):
        return a + (b - a) * self.fraction


class ResolverTestBase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)  # realistic "now" for Expires headers
        self.site = WellKnownSite()
        self.web = FakeWebAgent(self.site)
        self.srv = FakeSRV()
        self.random = FixedRandom()
        self.resolver = ServerResolver(
            clock=self.clock,
            http=HTTPClient(clock=self.clock, agent=self.web),
            srv_resolver=self.srv,
            _random=self.random,
        )
        self.addCleanup(self.assertNoDelayedCalls)

    def assertNoDelayedCalls(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def resolve(self, name: str) -> Resolution:
        return self.successResultOf(self.resolver.resolve(name))

    def resolve_error(self, name: str, kind: FailureKind = FailureKind.RESOLVE) -> OutboundError:
        return failed_with(self, self.resolver.resolve(name), kind)


class TableRowTests(ResolverTestBase):
    """One test per row of docs/federation.md#resolution: targets, Host header, certificate name."""

    def test_row1_ipv4_literal_without_port(self) -> None:
        self.assertEqual(self.resolve("192.0.2.1"), Resolution((("192.0.2.1", 8448),), "192.0.2.1", "192.0.2.1"))
        self.assertEqual(self.web.fetched, [])
        self.assertEqual(self.srv.queries, [])

    def test_row1_ipv6_literal_without_port(self) -> None:
        self.assertEqual(
            self.resolve("[2001:db8::1]"),
            Resolution((("2001:db8::1", 8448),), "[2001:db8::1]", "2001:db8::1"),
        )

    def test_row1_ip_literal_with_port(self) -> None:
        self.assertEqual(
            self.resolve("192.0.2.1:8449"), Resolution((("192.0.2.1", 8449),), "192.0.2.1:8449", "192.0.2.1")
        )
        self.assertEqual(
            self.resolve("[::1]:8448"), Resolution((("::1", 8448),), "[::1]:8448", "::1")
        )
        self.assertEqual(self.web.fetched, [])

    def test_row2_dns_name_with_port(self) -> None:
        self.srv.records["_matrix-fed._tcp.example.com"] = [(0, 0, 443, "ignored.example.com.")]
        self.assertEqual(
            self.resolve("example.com:8450"),
            Resolution((("example.com", 8450),), "example.com:8450", "example.com"),
        )
        self.assertEqual(self.web.fetched, [])
        self.assertEqual(self.srv.queries, [])

    def test_row3_well_known_url(self) -> None:
        self.resolve("example.com")
        self.assertEqual(self.web.fetched, [b"https://example.com/.well-known/matrix/server"])

    def test_row3_1_well_known_ip_literal(self) -> None:
        self.site.delegate("example.com", "192.0.2.7")
        self.assertEqual(self.resolve("example.com"), Resolution((("192.0.2.7", 8448),), "192.0.2.7", "192.0.2.7"))

    def test_row3_1_well_known_ip_literal_with_port(self) -> None:
        self.site.delegate("example.com", "[2001:db8::7]:9000")
        self.assertEqual(
            self.resolve("example.com"),
            Resolution((("2001:db8::7", 9000),), "[2001:db8::7]:9000", "2001:db8::7"),
        )

    def test_row3_2_delegated_name_with_port(self) -> None:
        self.site.delegate("example.com", "matrix.example.net:443")
        self.srv.records["_matrix-fed._tcp.matrix.example.net"] = [(0, 0, 8448, "other.example.")]
        self.assertEqual(
            self.resolve("example.com"),
            Resolution((("matrix.example.net", 443),), "matrix.example.net:443", "matrix.example.net"),
        )
        self.assertEqual(self.srv.queries, [])

    def test_row3_3_delegated_name_matrix_fed_srv(self) -> None:
        self.site.delegate("example.com", "matrix.example.net")
        self.srv.records["_matrix-fed._tcp.matrix.example.net"] = [(10, 0, 8443, "fed1.example.net.")]
        self.srv.records["_matrix._tcp.matrix.example.net"] = [(10, 0, 1111, "legacy.example.net.")]
        self.assertEqual(
            self.resolve("example.com"),
            Resolution((("fed1.example.net", 8443),), "matrix.example.net", "matrix.example.net"),
        )
        self.assertEqual(self.srv.queries, ["_matrix-fed._tcp.matrix.example.net"])

    def test_row3_4_delegated_name_legacy_srv(self) -> None:
        self.site.delegate("example.com", "matrix.example.net")
        self.srv.records["_matrix._tcp.matrix.example.net"] = [(10, 0, 1111, "legacy.example.net.")]
        self.assertEqual(
            self.resolve("example.com"),
            Resolution((("legacy.example.net", 1111),), "matrix.example.net", "matrix.example.net"),
        )
        self.assertEqual(
            self.srv.queries,
            ["_matrix-fed._tcp.matrix.example.net", "_matrix._tcp.matrix.example.net"],
        )

    def test_row3_5_delegated_name_no_srv(self) -> None:
        self.site.delegate("example.com", "matrix.example.net")
        self.assertEqual(
            self.resolve("example.com"),
            Resolution((("matrix.example.net", 8448),), "matrix.example.net", "matrix.example.net"),
        )

    def test_row4_no_well_known_matrix_fed_srv(self) -> None:
        self.srv.records["_matrix-fed._tcp.example.com"] = [(0, 5, 8448, "hs.example.com.")]
        self.assertEqual(
            self.resolve("example.com"),
            Resolution((("hs.example.com", 8448),), "example.com", "example.com"),
        )

    def test_row5_no_well_known_legacy_srv(self) -> None:
        self.srv.records["_matrix._tcp.example.com"] = [(0, 5, 8449, "old.example.com.")]
        self.assertEqual(
            self.resolve("example.com"),
            Resolution((("old.example.com", 8449),), "example.com", "example.com"),
        )

    def test_row6_nothing(self) -> None:
        self.assertEqual(
            self.resolve("example.com"), Resolution((("example.com", 8448),), "example.com", "example.com")
        )

    def test_only_one_level_of_delegation(self) -> None:
        self.site.delegate("example.com", "matrix.example.net")
        self.site.delegate("matrix.example.net", "elsewhere.example.org")
        self.assertEqual(self.resolve("example.com").host_header, "matrix.example.net")
        self.assertEqual(self.web.fetched, [b"https://example.com/.well-known/matrix/server"])


class WellKnownValidityTests(ResolverTestBase):
    """Unusable answers fall back to SRV/8448; an invalid m.server fails the lookup."""

    def assertFallsBack(self, code: int, body: bytes, headers: Optional[dict] = None) -> None:
        self.site.answers["example.com"] = (code, body, headers or {})
        self.assertEqual(
            self.resolve("example.com"), Resolution((("example.com", 8448),), "example.com", "example.com")
        )

    def test_not_found(self) -> None:
        self.assertFallsBack(404, b'{"m.server": "x.example"}')

    def test_not_json(self) -> None:
        self.assertFallsBack(200, b"<html>")

    def test_not_an_object(self) -> None:
        self.assertFallsBack(200, b'["m.server"]')

    def test_missing_m_server(self) -> None:
        self.assertFallsBack(200, b'{"m.homeserver": "x.example"}')

    def test_m_server_not_a_string(self) -> None:
        self.assertFallsBack(200, b'{"m.server": 8448}')

    def test_empty_m_server(self) -> None:
        self.assertFallsBack(200, b'{"m.server": ""}')

    def test_nan_is_not_json(self) -> None:
        self.assertFallsBack(200, b'{"m.server": "x.example", "n": NaN}')

    def test_too_large(self) -> None:
        body = json.dumps({"m.server": "x.example", "pad": "x" * WELL_KNOWN_MAX_BODY}).encode()
        self.assertFallsBack(200, body)

    def test_host_down(self) -> None:
        self.web.down.add("example.com")
        self.assertEqual(self.resolve("example.com").targets, (("example.com", 8448),))

    def test_invalid_m_server_fails_the_lookup(self) -> None:
        self.site.delegate("example.com", "evil.example/path")
        error = self.resolve_error("example.com")
        self.assertEqual(error.step, "well-known")
        self.assertIn("m.server of example.com is not a valid server name", error.detail)
        self.assertEqual(self.srv.queries, [])

    def test_invalid_m_server_is_cached_for_the_invalid_period(self) -> None:
        self.site.delegate("example.com", "bad name")
        self.resolve_error("example.com")
        self.clock.advance(WELL_KNOWN_INVALID_CACHE_PERIOD - 1)
        self.resolve_error("example.com")
        self.assertEqual(self.web.fetch_count("example.com"), 1)
        self.site.delegate("example.com", "good.example.net")
        self.clock.advance(1)
        self.assertEqual(self.resolve("example.com").host_header, "good.example.net")


class SRVTests(ResolverTestBase):
    def test_dns_error_on_first_query_skips_to_8448(self) -> None:
        self.srv.records["_matrix-fed._tcp.example.com"] = DNSServerError("SERVFAIL")
        self.srv.records["_matrix._tcp.example.com"] = [(0, 0, 1111, "legacy.example.com.")]
        self.assertEqual(self.resolve("example.com").targets, (("example.com", 8448),))
        self.assertEqual(self.srv.queries, ["_matrix-fed._tcp.example.com"])

    def test_no_records_of_type_counts_as_not_found(self) -> None:
        self.srv.records["_matrix-fed._tcp.example.com"] = DomainError("no SRV")
        self.srv.records["_matrix._tcp.example.com"] = [(0, 0, 1111, "legacy.example.com.")]
        self.assertEqual(self.resolve("example.com").targets, (("legacy.example.com", 1111),))

    def test_empty_answer_counts_as_not_found(self) -> None:
        self.srv.records["_matrix-fed._tcp.example.com"] = []
        self.srv.records["_matrix._tcp.example.com"] = [(0, 0, 1111, "legacy.example.com.")]
        self.assertEqual(self.resolve("example.com").targets, (("legacy.example.com", 1111),))

    def test_timeout_skips_to_8448(self) -> None:
        from twisted.names.error import DNSQueryTimeoutError

        self.srv.records["_matrix-fed._tcp.example.com"] = DNSQueryTimeoutError(1)
        self.assertEqual(self.resolve("example.com").targets, (("example.com", 8448),))

    def test_dot_target_means_no_service(self) -> None:
        self.srv.records["_matrix-fed._tcp.example.com"] = [(0, 0, 0, ".")]
        error = self.resolve_error("example.com")
        self.assertEqual(error.step, "resolve")
        self.assertEqual(error.detail, "SRV _matrix-fed._tcp.example.com says the service is not offered")

    def test_priority_order(self) -> None:
        self.srv.records["_matrix-fed._tcp.example.com"] = [
            (20, 0, 3, "c.example."),
            (10, 0, 1, "a.example."),
            (15, 0, 2, "b.example."),
        ]
        self.assertEqual(
            self.resolve("example.com").targets,
            (("a.example", 1), ("b.example", 2), ("c.example", 3)),
        )

    def test_weights_shuffle_within_a_priority(self) -> None:
        records = [(10, 1, 1, "light.example."), (10, 99, 2, "heavy.example."), (5, 0, 9, "first.example.")]
        self.srv.records["_matrix-fed._tcp.example.com"] = records
        firsts = {}
        for seed in range(200):
            self.resolver._random = random.Random(seed)
            targets = self.successResultOf(self.resolver.targets(parse_server_name("example.com")))
            self.assertEqual(targets[0], ("first.example", 9))
            self.assertEqual(sorted(targets[1:]), [("heavy.example", 2), ("light.example", 1)])
            firsts[targets[1][0]] = firsts.get(targets[1][0], 0) + 1
        self.assertGreater(firsts["heavy.example"], 150)
        self.assertGreater(firsts.get("light.example", 0), 0)


class WellKnownCacheTests(ResolverTestBase):
    """Cache periods (docs/federation.md#resolution), driven by the clock."""

    def assertCachedFor(self, host: str, period: float) -> None:
        """The answer is reused until just before ``period`` and refetched at it."""
        before = self.web.fetch_count(host)
        self.clock.advance(period - 1)
        self.resolve(host)
        self.assertEqual(self.web.fetch_count(host), before, "refetched too early")
        self.clock.advance(1)
        self.resolve(host)
        self.assertEqual(self.web.fetch_count(host), before + 1, "not refetched at expiry")

    def test_default_period_24h_with_jitter(self) -> None:
        self.random.fraction = 1.0  # +10 %
        self.site.delegate("example.com", "hs.example.net")
        self.resolve("example.com")
        self.assertCachedFor("example.com", 24 * HOUR * 1.1)

    def test_default_period_lower_jitter_bound(self) -> None:
        self.random.fraction = 0.0  # -10 %
        self.site.delegate("example.com", "hs.example.net")
        self.resolve("example.com")
        self.assertCachedFor("example.com", 24 * HOUR * 0.9)

    def test_cache_control_max_age(self) -> None:
        self.site.delegate("example.com", "hs.example.net", {"Cache-Control": "public, max-age=7200"})
        self.resolve("example.com")
        self.assertCachedFor("example.com", 2 * HOUR)

    def test_max_age_capped_at_48h(self) -> None:
        self.site.delegate("example.com", "hs.example.net", {"Cache-Control": "max-age=31536000"})
        self.resolve("example.com")
        self.assertCachedFor("example.com", 48 * HOUR)

    def test_max_age_raised_to_5_minutes(self) -> None:
        self.site.delegate("example.com", "hs.example.net", {"Cache-Control": "max-age=10"})
        self.resolve("example.com")
        self.assertCachedFor("example.com", 300)

    def test_no_store_means_minimum(self) -> None:
        self.site.delegate("example.com", "hs.example.net", {"Cache-Control": "no-store"})
        self.resolve("example.com")
        self.assertCachedFor("example.com", 300)

    def test_expires_header(self) -> None:
        from email.utils import formatdate

        expires = formatdate(self.clock.seconds() + 3 * HOUR, usegmt=True)
        self.site.delegate("example.com", "hs.example.net", {"Expires": expires})
        self.resolve("example.com")
        self.assertCachedFor("example.com", 3 * HOUR)

    def test_invalid_expires_means_minimum(self) -> None:
        self.site.delegate("example.com", "hs.example.net", {"Expires": "0"})
        self.resolve("example.com")
        self.assertCachedFor("example.com", 300)

    def test_invalid_answer_cached_one_hour(self) -> None:
        self.site.answers["example.com"] = (200, b"nope", {})
        self.resolve("example.com")
        self.assertCachedFor("example.com", WELL_KNOWN_INVALID_CACHE_PERIOD)

    def test_host_down_backs_off_exponentially(self) -> None:
        self.web.down.add("example.com")
        self.resolve("example.com")
        self.assertCachedFor("example.com", WELL_KNOWN_DOWN_CACHE_PERIOD)  # 2 min, refetch #2
        self.assertCachedFor("example.com", 2 * WELL_KNOWN_DOWN_CACHE_PERIOD)  # 4 min, refetch #3
        self.assertCachedFor("example.com", 4 * WELL_KNOWN_DOWN_CACHE_PERIOD)  # 8 min, refetch #4
        # back up: a valid answer resets the back-off
        self.web.down.clear()
        self.site.delegate("example.com", "hs.example.net", {"Cache-Control": "max-age=600"})
        self.clock.advance(16 * WELL_KNOWN_DOWN_CACHE_PERIOD)
        self.assertEqual(self.resolve("example.com").host_header, "hs.example.net")
        self.web.down.add("example.com")
        self.clock.advance(600)
        self.resolve("example.com")
        self.assertCachedFor("example.com", WELL_KNOWN_DOWN_CACHE_PERIOD)

    def test_down_back_off_is_capped_at_an_hour(self) -> None:
        self.web.down.add("example.com")
        self.resolve("example.com")
        for _ in range(8):
            self.clock.advance(HOUR)
            self.resolve("example.com")
        self.assertCachedFor("example.com", HOUR)

    def test_server_error_counts_as_down(self) -> None:
        self.site.answers["example.com"] = (503, b"", {})
        self.resolve("example.com")
        self.assertCachedFor("example.com", WELL_KNOWN_DOWN_CACHE_PERIOD)

    def test_concurrent_lookups_share_one_fetch(self) -> None:
        self.site.hang.add("example.com")
        first = self.resolver.resolve("example.com")
        second = self.resolver.resolve("example.com")
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.assertEqual(self.web.fetch_count("example.com"), 1)
        self.clock.advance(resolver_module.WELL_KNOWN_TIMEOUT)  # the fetch times out: "down"
        self.assertEqual(self.successResultOf(first).targets, (("example.com", 8448),))
        self.assertEqual(self.successResultOf(second).targets, (("example.com", 8448),))

    def test_cache_is_bounded(self) -> None:
        self.patch(resolver_module, "WELL_KNOWN_CACHE_SIZE", 2)
        for host in ("a.example", "b.example", "c.example"):
            self.site.delegate(host, "hs.example.net")
            self.resolve(host)
        self.assertEqual(list(self.resolver._cache), ["b.example", "c.example"])
        self.resolve("a.example")
        self.assertEqual(self.web.fetch_count("a.example"), 2)

    def test_names_are_case_sensitive_cache_keys_but_answers_reused(self) -> None:
        self.site.delegate("example.com", "hs.example.net")
        self.resolve("example.com")
        self.resolve("example.com")
        self.assertEqual(self.web.fetch_count("example.com"), 1)


class InputTests(ResolverTestBase):
    def test_invalid_server_name(self) -> None:
        error = self.resolve_error("evil.example/x", FailureKind.INVALID)
        self.assertEqual(error.step, "server name")
        self.assertEqual(self.web.fetched, [])


class WellKnownTrustTests(ResolverTestBase):
    """Trust for the well-known fetch comes from the name being resolved, not from hops."""

    def setUp(self) -> None:
        super().setUp()
        self.guarded = FakeWebAgent(self.site)
        self.resolver = ServerResolver(
            clock=self.clock,
            http=HTTPClient(clock=self.clock, agent=self.web),
            guarded_http=HTTPClient(clock=self.clock, agent=self.guarded),
            is_trusted=lambda name: name == "trusted.example",
            srv_resolver=self.srv,
            _random=self.random,
        )

    def test_untrusted_name_uses_the_guarded_client(self) -> None:
        self.site.delegate("evil.example", "delegated.example:443")
        self.resolve("evil.example")
        self.assertEqual(self.guarded.fetch_count("evil.example"), 1)
        self.assertEqual(self.web.fetched, [])

    def test_trusted_name_uses_the_plain_client(self) -> None:
        self.site.delegate("trusted.example", "delegated.example:443")
        self.resolve("trusted.example")
        self.assertEqual(self.web.fetch_count("trusted.example"), 1)
        self.assertEqual(self.guarded.fetched, [])


class SRVTargetValidationTests(ResolverTestBase):
    def test_targets_outside_the_server_name_grammar_are_skipped(self) -> None:
        self.srv.records["_matrix-fed._tcp.example.com"] = [
            (0, 0, 8448, "x\n2030-01-01 [rtcauthd] INFO: fake line."),
            (1, 0, 8449, "good.example.com."),
        ]
        resolution = self.resolve("example.com")
        self.assertEqual(resolution.targets, (("good.example.com", 8449),))
