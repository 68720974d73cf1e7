"""The real daemon under abuse, on loopback only: distinct clients are distinct loopback
source addresses (127.0.0.2, 127.0.0.3, ...), every loop is bounded in count and time.

- a flood from one address is limited (429 + Retry-After) while another still gets tokens;
- a client trickling its request is dropped at the deadline;
- a server name carrying a newline cannot forge a log line.
"""

from __future__ import annotations

import json
import socket
import time

from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from rtcauthd.outbound.client import BytesProducer
from tests.blackbox.harness import BlackBoxCase, free_port
from tests.blackbox.test_token_service import get_token_body


@implementer(IAgentEndpointFactory)
class _FromSource:
    """Connects to the daemon from a chosen loopback source address."""

    def __init__(self, source: str, port: int) -> None:
        self._source = source
        self._port = port

    def endpointForURI(self, uri):
        return TCP4ClientEndpoint(reactor, "127.0.0.1", self._port, timeout=5, bindAddress=(self._source, 0))


class AbuseTests(BlackBoxCase, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.hs = self.make_homeserver()
        self.lk = self.make_livekit()
        self.hs.add_token("good-token", f"@alice:{self.hs.server_name}")
        self.daemon = yield self.start_daemon(
            self.service_env(
                livekit_url=self.lk.url,
                full_access=self.hs.server_name,
                RTCAUTH_RATELIMIT_BURST="5",
                RTCAUTH_RATELIMIT_PER_SECOND="0.2",
                RTCAUTH_TRUSTED_PROXIES="127.0.0.1/32",
                RTCAUTH_REQUEST_TIMEOUT_SECONDS="1",
            )
        )
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)

    @defer.inlineCallbacks
    def post_from(self, source: str, body: bytes):
        agent = Agent.usingEndpointFactory(reactor, _FromSource(source, self.daemon.port), pool=self.pool)
        response = yield agent.request(
            b"POST", self.daemon.base_url.encode() + b"/get_token", Headers({b"Content-Type": [b"application/json"]}),
            BytesProducer(body),
        )
        data = yield readBody(response)
        return response, data

    @defer.inlineCallbacks
    def test_a_flood_from_one_address_is_limited_another_still_gets_tokens(self):
        codes = []
        for _ in range(8):
            response, _ = yield self.post_from("127.0.0.2", b"{}")
            codes.append(response.code)
        self.assertEqual(codes, [400] * 5 + [429] * 3)
        response, data = yield self.post_from("127.0.0.2", b"{}")
        self.assertEqual(response.code, 429)
        self.assertEqual(json.loads(data)["errcode"], "M_LIMIT_EXCEEDED")
        self.assertGreaterEqual(int(response.headers.getRawHeaders(b"Retry-After")[0]), 1)
        self.assertEqual(response.headers.getRawHeaders(b"Access-Control-Allow-Origin"), [b"*"])
        body = json.dumps(get_token_body(self.hs.server_name, "good-token")).encode()
        response, data = yield self.post_from("127.0.0.3", body)
        self.assertEqual(response.code, 200, data)
        self.assertIn("jwt", json.loads(data))
        self.assertIn("127.0.0.2 POST /get_token -> 429", self.daemon.output)

    @defer.inlineCallbacks
    def test_a_trickling_client_is_dropped(self):
        def trickle() -> tuple[float, bytes]:
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", self.daemon.port), timeout=5) as s:
                request = b"POST /get_token HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
                try:
                    for byte in request[:40]:  # bounded: at most 40 bytes, 4 s
                        s.sendall(bytes([byte]))
                        time.sleep(0.1)
                    s.settimeout(3)
                    answer = s.recv(100)
                except OSError:
                    answer = b""
            return time.monotonic() - started, answer

        elapsed, answer = yield deferToThread(trickle)
        self.assertEqual(answer, b"")  # dropped, never answered
        self.assertLess(elapsed, 3.5)
        yield self.daemon.wait_for_output(lambda line: "no complete request within 1 s" in line, timeout=5)

    @defer.inlineCallbacks
    def test_a_newline_in_a_server_name_cannot_forge_a_log_line(self):
        forged = "evil.example\n2026-12-02T00:00:00+0000 [critical] rtcauthd.forged: owned"
        mark = self.daemon.mark()
        response, _ = yield self.post_from("127.0.0.4", json.dumps(get_token_body(forged, "t")).encode())
        self.assertIn(response.code, (400, 401))
        yield self.daemon.request("GET", "/healthz")
        lines = self.daemon.lines_since(mark)
        self.assertFalse([line for line in lines if "rtcauthd.forged" in line and not line.startswith("20")], lines)
        self.assertFalse([line for line in lines if line.startswith("2026-12-02T00:00:00+0000 [critical]")], lines)


class _Sink(protocol.Protocol):
    """Accepts and never answers: the homeserver that hangs."""

    def connectionMade(self):
        self.factory.open += 1
        self.factory.peak = max(self.factory.peak, self.factory.open)

    def connectionLost(self, reason):
        self.factory.open -= 1


class FanOutTests(BlackBoxCase, unittest.TestCase):
    """Many made-up homeservers that hang: outbound stays within the caps, the operator's
    user still gets a token, and the requests over the caps are answered at once."""

    NAMES = 40
    CONCURRENT = 120

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.hs = self.make_homeserver()
        self.lk = self.make_livekit()
        self.hs.add_token("good-token", f"@alice:{self.hs.server_name}")
        self.sink = protocol.Factory.forProtocol(_Sink)
        self.sink.open = self.sink.peak = 0
        self.sink_port = free_port("127.1.0.1")
        for k in range(1, self.NAMES + 1):
            port = reactor.listenTCP(self.sink_port, self.sink, interface=f"127.1.0.{k}")
            self.addCleanup(port.stopListening)
        self.daemon = yield self.start_daemon(
            self.service_env(
                livekit_url=self.lk.url,
                full_access=self.hs.server_name,
                RTCAUTH_RATELIMIT_PER_SECOND="0",  # this test is about the outbound caps
                RTCAUTH_FEDERATION_MAX_INFLIGHT="10",
                RTCAUTH_FEDERATION_MAX_INFLIGHT_PER_SERVER="2",
                RTCAUTH_FEDERATION_IP_RANGE_ALLOWLIST="127.1.0.0/16",
                RTCAUTH_OUTBOUND_TIMEOUT_SECONDS="3",
            )
        )

    @defer.inlineCallbacks
    def test_made_up_names_stay_within_the_caps(self):
        flood, answered = [], []
        for i in range(self.CONCURRENT):
            name = f"127.1.0.{i % self.NAMES + 1}:{self.sink_port}"
            d = self.daemon.post_json("/get_token", get_token_body(name, "t"), timeout=20)
            d.addBoth(lambda result: answered.append(result) or result)
            flood.append(d)
        yield deferLater(reactor, 0.5, lambda: None)
        ours = yield self.daemon.post_json("/get_token", get_token_body(self.hs.server_name, "good-token"))
        self.assertEqual(ours.code, 200, ours.body)
        # served while the strangers' verifications still hang (they end at the 3 s bound)
        self.assertLess(len(answered), self.CONCURRENT)
        answers = yield defer.gatherResults(flood)
        codes = sorted({a.code for a in answers})
        self.assertEqual(codes, [401, 503])
        busy = [a for a in answers if a.code == 503]
        self.assertGreaterEqual(len(busy), self.CONCURRENT - 10)
        self.assertEqual(busy[0].headers.getRawHeaders(b"Retry-After"), [b"1"])
        self.assertLessEqual(self.sink.peak, 10)
        self.assertGreater(self.sink.peak, 0)
