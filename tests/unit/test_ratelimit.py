"""Per-client rate limits and the client address behind trusted proxies, on a fake clock."""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from rtcauthd.config import load_config
from rtcauthd.inbound.client_address import ClientAddresses, parse_address
from rtcauthd.inbound.ratelimit import RateLimitPolicy, TokenBuckets, limit_exceeded
from rtcauthd.metrics import Metrics
from tests.support.daemon import SiteClient, build_test_daemon


class FakeRequest:
    def __init__(self, peer="203.0.113.7", headers=None) -> None:
        if isinstance(peer, str):
            peer = (IPv6Address if ":" in peer else IPv4Address)("TCP", peer, 40000)
        self._peer = peer
        self.requestHeaders = Headers({k.encode(): [v.encode() for v in vs] for k, vs in (headers or {}).items()})

    def getClientAddress(self):
        return self._peer


class TokenBucketTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.buckets = TokenBuckets(self.clock, rate=5.0, burst=3)

    def test_burst_then_rate(self) -> None:
        self.assertEqual([self.buckets.take("a") for _ in range(3)], [0.0, 0.0, 0.0])
        self.assertAlmostEqual(self.buckets.take("a"), 0.2)
        self.clock.advance(0.1)
        self.assertAlmostEqual(self.buckets.take("a"), 0.1)  # a refused request costs nothing
        self.clock.advance(0.1)
        self.assertEqual(self.buckets.take("a"), 0.0)
        self.assertAlmostEqual(self.buckets.take("a"), 0.2)

    def test_refills_to_the_burst_only(self) -> None:
        for _ in range(3):
            self.buckets.take("a")
        self.clock.advance(3600)
        self.assertEqual([self.buckets.take("a") for _ in range(3)], [0.0, 0.0, 0.0])
        self.assertGreater(self.buckets.take("a"), 0)

    def test_clients_are_independent(self) -> None:
        for _ in range(3):
            self.buckets.take("a")
        self.assertGreater(self.buckets.take("a"), 0)
        self.assertEqual(self.buckets.take("b"), 0.0)

    def test_table_is_bounded_least_recently_seen_goes(self) -> None:
        buckets = TokenBuckets(self.clock, rate=1.0, burst=1, max_clients=100)
        buckets.take("first")
        for i in range(1000):
            buckets.take(f"client-{i}")
        self.assertEqual(len(buckets), 100)
        self.assertEqual(buckets.take("client-999"), 1.0)  # still known: drained
        self.assertEqual(buckets.take("first"), 0.0)  # forgotten: a fresh bucket

    def test_bad_parameters(self) -> None:
        for rate, burst in ((0, 1), (1, 0), (-1, 5)):
            with self.assertRaises(ValueError):
                TokenBuckets(self.clock, rate=rate, burst=burst)


class AnswerTests(SynchronousTestCase):
    def test_429_body_and_retry_after(self) -> None:
        answer = limit_exceeded(0.2001)
        self.assertEqual((answer.status, answer.errcode, answer.message), (429, "M_LIMIT_EXCEEDED", "Too many requests"))
        self.assertEqual(answer.retry_after_ms, 201)
        self.assertEqual(limit_exceeded(2.5).retry_after_ms, 2500)


class ClientAddressTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clients = ClientAddresses(["127.0.0.0/8", "::1/128", "10.0.0.0/8"])

    def client(self, peer, **headers) -> str:
        return self.clients.client_of(FakeRequest(peer, {k.replace("_", "-"): v for k, v in headers.items()}))

    def test_untrusted_peer_is_the_client_whatever_it_claims(self) -> None:
        self.assertEqual(self.client("203.0.113.7", X_Forwarded_For=["198.51.100.1"]), "203.0.113.7")
        self.assertEqual(self.client("2001:db8::1", Forwarded=["for=198.51.100.1"]), "2001:db8::1")

    def test_trusted_proxy_names_the_client_rightmost_untrusted_wins(self) -> None:
        # the client forged "1.1.1.1"; the proxy appended the peer it saw
        self.assertEqual(self.client("127.0.0.1", X_Forwarded_For=["1.1.1.1, 198.51.100.9"]), "198.51.100.9")
        # two proxies: the inner one (10.x) is skipped too
        self.assertEqual(self.client("127.0.0.1", X_Forwarded_For=["1.1.1.1, 198.51.100.9, 10.1.2.3"]), "198.51.100.9")
        # repeated headers are one list
        self.assertEqual(self.client("::1", X_Forwarded_For=["1.1.1.1", "198.51.100.9"]), "198.51.100.9")

    def test_forwarded_header_wins_and_is_parsed(self) -> None:
        self.assertEqual(
            self.client(
                "127.0.0.1",
                Forwarded=['for=1.1.1.1, for="[2001:db8::7]:4711";proto=https;by=10.0.0.1'],
                X_Forwarded_For=["198.51.100.9"],
            ),
            "2001:db8::7",
        )
        self.assertEqual(self.client("127.0.0.1", Forwarded=["For=198.51.100.3:8080"]), "198.51.100.3")

    def test_all_hops_trusted_gives_the_leftmost(self) -> None:
        self.assertEqual(self.client("127.0.0.1", X_Forwarded_For=["10.9.9.9, 127.0.0.2"]), "10.9.9.9")

    def test_unparsable_hop_stops_at_the_last_vouched_address(self) -> None:
        self.assertEqual(self.client("127.0.0.1", X_Forwarded_For=["198.51.100.9, unknown"]), "127.0.0.1")
        self.assertEqual(self.client("127.0.0.1", Forwarded=["for=_hidden, for=10.0.0.5"]), "10.0.0.5")
        self.assertEqual(self.client("127.0.0.1", X_Forwarded_For=["evil\nline"]), "127.0.0.1")

    def test_ipv4_mapped_peers_are_ipv4(self) -> None:
        self.assertEqual(self.client("::ffff:127.0.0.1", X_Forwarded_For=["198.51.100.9"]), "198.51.100.9")
        self.assertEqual(str(parse_address("::ffff:203.0.113.1")), "203.0.113.1")

    def test_unix_socket_peer_is_a_local_proxy(self) -> None:
        request = FakeRequest(UNIXAddress(None), {"X-Forwarded-For": ["198.51.100.4"]})
        self.assertEqual(self.clients.client_of(request), "198.51.100.4")
        self.assertEqual(self.clients.client_of(FakeRequest(UNIXAddress(None))), "unix")

    def test_computed_once_per_request(self) -> None:
        request = FakeRequest("127.0.0.1", {"X-Forwarded-For": ["198.51.100.4"]})
        self.assertEqual(self.clients.client_of(request), "198.51.100.4")
        request.requestHeaders.setRawHeaders(b"X-Forwarded-For", [b"198.51.100.5"])
        self.assertEqual(self.clients.client_of(request), "198.51.100.4")

    def test_trusted_proxy_without_header_is_said_once(self) -> None:
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for _ in range(5):
            self.assertEqual(self.client("127.0.0.1"), "127.0.0.1")
        warnings = [e for e in events if "share one rate-limit bucket" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        self.assertIn("proxy_set_header X-Forwarded-For", warnings[0]["log_format"])


class PolicyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics()
        self.policy = RateLimitPolicy(
            self.clock, rate=1.0, burst=2, clients=ClientAddresses(), metrics=self.metrics
        )

    def test_limits_token_endpoints_per_client_and_counts(self) -> None:
        a, b = FakeRequest("203.0.113.1"), FakeRequest("203.0.113.2")
        self.assertEqual([self.policy.check(a, "get_token") for _ in range(2)], [None, None])
        refused = self.policy.check(a, "sfu_get")  # one bucket per client, across endpoints
        self.assertEqual(refused.status, 429)
        self.assertIsNone(self.policy.check(b, "delegate_delayed_leave"))
        self.assertEqual(
            self.metrics.registry.get_sample_value("rtcauthd_rate_limited_total", {"endpoint": "sfu_get"}), 1.0
        )

    def test_other_routes_are_never_limited(self) -> None:
        a = FakeRequest("203.0.113.1")
        for _ in range(100):
            self.assertIsNone(self.policy.check(a, "healthz"))
            self.assertIsNone(self.policy.check(a, "sfu_webhook"))
        self.assertIsNone(self.policy.check(a, "get_token"))


ENV = {
    "LIVEKIT_URL": "wss://sfu.example.com",
    "LIVEKIT_KEY": "devkey",
    "LIVEKIT_SECRET": "secret-secret-secret-secret-secret",
    "LIVEKIT_FULL_ACCESS_HOMESERVERS": "example.com",
    "RTCAUTH_RATELIMIT_PER_SECOND": "2",
    "RTCAUTH_RATELIMIT_BURST": "3",
}


class ThroughTheDaemonTests(SynchronousTestCase):
    """The limit as a client sees it: 429 with CORS and Retry-After, then served again."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.daemon = build_test_daemon(ENV, self.reactor)
        self.client = SiteClient(self.daemon.site)

    def post(self, path="/get_token", forwarded_for=None):
        headers = {"X-Forwarded-For": [forwarded_for]} if forwarded_for else None
        return self.successResultOf(self.client.request("POST", "http://localhost" + path, b"{}", headers=headers))

    def test_flood_from_one_client_is_limited_another_is_not(self) -> None:
        codes = [self.post(forwarded_for="198.51.100.1")[0].code for _ in range(3)]
        self.assertEqual(codes, [400, 400, 400])  # bad bodies still cost a token
        response, body = self.post(forwarded_for="198.51.100.1")
        self.assertEqual(response.code, 429)
        self.assertEqual(json.loads(body)["errcode"], "M_LIMIT_EXCEEDED")
        self.assertEqual(json.loads(body)["retry_after_ms"], 500)
        self.assertEqual(response.headers.getRawHeaders(b"Retry-After"), [b"1"])
        self.assertEqual(response.headers.getRawHeaders(b"Access-Control-Allow-Origin"), [b"*"])
        self.assertEqual(self.post(forwarded_for="198.51.100.2")[0].code, 400)  # another client
        self.reactor.advance(0.5)
        self.assertEqual(self.post(forwarded_for="198.51.100.1")[0].code, 400)

    def test_healthz_is_never_limited(self) -> None:
        for _ in range(10):
            self.post(forwarded_for="198.51.100.1")
        response, _ = self.successResultOf(self.client.request("GET", "http://localhost/healthz"))
        self.assertEqual(response.code, 200)

    def test_zero_turns_it_off(self) -> None:
        daemon = build_test_daemon(dict(ENV, RTCAUTH_RATELIMIT_BURST="0"), MemoryReactorClock())
        client = SiteClient(daemon.site)
        for _ in range(20):
            response, _ = self.successResultOf(client.request("POST", "http://localhost/get_token", b"{}"))
            self.assertEqual(response.code, 400)


class ConfigTests(SynchronousTestCase):
    def test_defaults_and_errors(self) -> None:
        base = {k: v for k, v in ENV.items() if not k.startswith("RTCAUTH_")}
        config = load_config(base)
        self.assertEqual((config.ratelimit_per_second, config.ratelimit_burst), (5.0, 50))
        self.assertEqual(config.trusted_proxies, ("127.0.0.0/8", "::1/128"))
        self.assertEqual(load_config(dict(base, RTCAUTH_TRUSTED_PROXIES="10.0.0.0/8, 192.0.2.1")).trusted_proxies,
                         ("10.0.0.0/8", "192.0.2.1/32"))
        for name, value in (("RTCAUTH_RATELIMIT_PER_SECOND", "-1"), ("RTCAUTH_RATELIMIT_BURST", "x"),
                            ("RTCAUTH_RATELIMIT_PER_SECOND", "nan"), ("RTCAUTH_TRUSTED_PROXIES", "10.0.0.0/33")):
            with self.subTest(name=name, value=value), self.assertRaises(Exception) as cm:
                load_config(dict(base, **{name: value}))
            self.assertIn(name, str(cm.exception))


class HealthzClientAddressTests(SynchronousTestCase):
    def test_healthz_names_the_address_the_limit_uses(self) -> None:
        client = SiteClient(build_test_daemon(ENV, MemoryReactorClock()).site)
        response, _ = self.successResultOf(
            client.request("GET", "http://localhost/healthz", headers={"X-Forwarded-For": ["198.51.100.7"]})
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"X-Rtcauth-Client-Address"), [b"198.51.100.7"])
        quiet = SiteClient(build_test_daemon(dict(ENV, RTCAUTH_RATELIMIT_BURST="0"), MemoryReactorClock()).site)
        response, _ = self.successResultOf(quiet.request("GET", "http://localhost/healthz"))
        self.assertIsNone(response.headers.getRawHeaders(b"X-Rtcauth-Client-Address"))
