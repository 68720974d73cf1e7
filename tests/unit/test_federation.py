"""OpenID userinfo over federation (docs/federation.md#userinfo)."""

from __future__ import annotations

import json
from typing import Optional

from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from treq.testing import RequestTraversalAgent
from zope.interface import implementer

from rtcauthd.outbound.client import HTTPClient
from rtcauthd.matrix import federation as federation_module
from rtcauthd.matrix.federation import USERINFO_MAX_BODY, FederationClient
from rtcauthd.outbound.errors import FailureKind, OutboundError
from tests.support.outbound import assert_fails_with, failed_with

TOKEN = "s3cr3t-OpenID-token"


class FakeHomeserver(Resource):
    """Answers the userinfo endpoint like Synapse, with overridable answers."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.users: dict[str, str] = {}  # access token -> sub
        self.answer: Optional[tuple[int, bytes]] = None
        self.hang = False
        self.requests: list[tuple[bytes, dict]] = []

    def render_GET(self, request):
        self.requests.append((request.path, dict(request.args)))
        if self.hang:
            return NOT_DONE_YET
        request.setHeader("content-type", "application/json")
        if self.answer is not None:
            code, body = self.answer
            request.setResponseCode(code)
            return body
        if request.path != b"/_matrix/federation/v1/openid/userinfo":
            request.setResponseCode(404)
            return b'{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}'
        tokens = request.args.get(b"access_token")
        if not tokens:
            request.setResponseCode(401)
            return b'{"errcode":"M_MISSING_TOKEN","error":"Access Token required"}'
        sub = self.users.get(tokens[0].decode())
        if sub is None:
            request.setResponseCode(401)
            return b'{"errcode":"M_UNKNOWN_TOKEN","error":"Access Token unknown or expired"}'
        return json.dumps({"sub": sub}).encode()


@implementer(IAgent)
class FakeFederationAgent:
    """Stands in for FederationAgent: serves matrix-federation:// from a resource."""

    def __init__(self, homeserver: Resource) -> None:
        self._agent = RequestTraversalAgent(homeserver)
        self.urls: list[bytes] = []
        self.error: Optional[Exception] = None

    def request(self, method, uri, headers=None, bodyProducer=None):
        self.urls.append(uri)
        if self.error is not None:
            return fail(self.error)
        assert uri.startswith(b"matrix-federation://"), uri
        d = self._agent.request(method, b"https://" + uri[len(b"matrix-federation://") :], headers, bodyProducer)
        self._agent.flush()
        return d

    def flush(self) -> None:
        self._agent.flush()


class FederationClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.homeserver = FakeHomeserver()
        self.agent = FakeFederationAgent(self.homeserver)
        self.client = FederationClient(http=HTTPClient(clock=self.clock, agent=self.agent, timeout=10))
        self.events: list[dict] = []
        self.patch(federation_module, "log", Logger(observer=self.events.append))
        self.addCleanup(lambda: self.assertEqual(self.clock.getDelayedCalls(), []))

    def userinfo(self, server_name: str, token: str = TOKEN) -> str:
        return self.successResultOf(self.client.userinfo(server_name, token))

    def error(self, server_name: str, token: str = TOKEN) -> OutboundError:
        error = self.failureResultOf(self.client.userinfo(server_name, token), OutboundError).value
        self.assertNotIn(token, str(error))
        self.assertNotIn(token, repr(error.args))
        return error

    def test_success(self) -> None:
        self.homeserver.users[TOKEN] = "@alice:example.com"
        self.assertEqual(self.userinfo("example.com"), "@alice:example.com")
        self.assertEqual(
            self.agent.urls,
            [b"matrix-federation://example.com/_matrix/federation/v1/openid/userinfo?access_token=" + TOKEN.encode()],
        )
        path, args = self.homeserver.requests[0]
        self.assertEqual(args, {b"access_token": [TOKEN.encode()]})

    def test_server_name_with_port(self) -> None:
        self.homeserver.users[TOKEN] = "@x:127.0.0.1:8448"
        self.assertEqual(self.userinfo("127.0.0.1:8448"), "@x:127.0.0.1:8448")

    def test_ipv6_literal_url(self) -> None:
        self.agent.error = OutboundError(FailureKind.CONNECT, "connect", "no route")
        self.error("[2001:db8::1]:8448")
        self.assertEqual(
            self.agent.urls[0].split(b"/_matrix")[0], b"matrix-federation://[2001:db8::1]:8448"
        )

    def test_token_is_form_encoded_like_go(self) -> None:
        token = "a b+c/d?e&f=g~h_i.j-k%l\u00e9"
        self.homeserver.users[token] = "@alice:example.com"
        self.assertEqual(self.userinfo("example.com", token), "@alice:example.com")
        self.assertTrue(
            self.agent.urls[0].endswith(b"?access_token=a+b%2Bc%2Fd%3Fe%26f%3Dg~h_i.j-k%25l%C3%A9"),
            self.agent.urls[0],
        )

    def test_sub_from_another_server_is_refused(self) -> None:
        self.homeserver.users[TOKEN] = "@alice:matrix.org"
        error = self.error("example.com")
        self.assertEqual(error.step, "sub mismatch")
        self.assertEqual(
            error.detail, "homeserver 'example.com' answered for '@alice:matrix.org', not one of its users"
        )

    def test_sub_domain_compared_byte_for_byte(self) -> None:
        cases = {
            "Example.com": "@a:example.com",  # case matters
            "example.com": "@a:example.com:443",  # resolved host:port is not the server name
            "example.com:8448": "@a:example.com",
            "example.org": "@a:sub.example.org",
        }
        for server_name, sub in cases.items():
            with self.subTest(server_name=server_name, sub=sub):
                self.homeserver.users[TOKEN] = sub
                self.assertEqual(self.error(server_name).step, "sub mismatch")

    def test_sub_split_at_first_colon(self) -> None:
        self.homeserver.users[TOKEN] = "@a:example.com:8448"
        self.assertEqual(self.userinfo("example.com:8448"), "@a:example.com:8448")
        self.homeserver.users[TOKEN] = "@a:b:example.com"
        self.assertEqual(self.error("example.com").step, "sub mismatch")

    def test_sub_without_colon(self) -> None:
        self.homeserver.users[TOKEN] = "@alice"
        self.assertEqual(self.error("example.com").step, "sub mismatch")

    def test_unknown_token(self) -> None:
        error = self.error("example.com")
        self.assertEqual(error.step, "status 401")
        self.assertEqual(error.detail, "M_UNKNOWN_TOKEN: Access Token unknown or expired")

    def test_other_statuses(self) -> None:
        self.homeserver.answer = (500, b"<html>Internal\nServer Error</html>")
        error = self.error("example.com")
        self.assertEqual((error.step, error.detail), ("status 500", "<html>Internal Server Error</html>"))
        self.homeserver.answer = (404, b"")
        error = self.error("example.com")
        self.assertEqual((error.step, error.detail), ("status 404", "(empty body)"))

    def test_long_error_body_is_cut(self) -> None:
        self.homeserver.answer = (502, b"x" * 1000)
        self.assertEqual(self.error("example.com").detail, "x" * 200 + "...")

    def test_2xx_is_success(self) -> None:
        self.homeserver.answer = (203, b'{"sub": "@a:example.com", "extra": 1}')
        self.assertEqual(self.userinfo("example.com"), "@a:example.com")

    def test_bad_bodies(self) -> None:
        cases = {
            b"not json": "userinfo body is not JSON",
            b"[1]": "userinfo body is not a JSON object",
            b"{}": "userinfo has no string 'sub'",
            b'{"sub": 5}': "userinfo has no string 'sub'",
            b'{"sub": null}': "userinfo has no string 'sub'",
            b'{"sub": "@a:example.com", "x": NaN}': "userinfo body is not JSON",
            b"\xff\xfe": "userinfo body is not JSON",
        }
        for body, detail in cases.items():
            with self.subTest(body=body):
                self.homeserver.answer = (200, body)
                error = self.error("example.com")
                self.assertEqual(error.step, "bad json")
                self.assertIn(detail, error.detail)

    def test_body_cap(self) -> None:
        self.homeserver.answer = (200, b'{"sub": "@a:example.com", "pad": "' + b"x" * USERINFO_MAX_BODY + b'"}')
        self.assertEqual(self.error("example.com").step, "body too large")

    def test_invalid_server_names_make_no_request(self) -> None:
        for name in ["", "evil.com/x", "a@b", "host:99999", "[::1", "bücher.example", "example.com/../x"]:
            with self.subTest(name=name):
                self.assertEqual(self.error(name).step, "server name")
        self.assertEqual(self.agent.urls, [])

    def test_timeout(self) -> None:
        self.homeserver.hang = True
        d = self.client.userinfo("example.com", TOKEN)
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        error = self.failureResultOf(d, OutboundError).value
        self.assertEqual(error.step, "timeout")
        self.assertEqual(error.detail, "no complete answer within 10 s")

    def test_transport_failures_keep_their_step(self) -> None:
        cases = [
            (OutboundError(FailureKind.RESOLVE, "resolve", "SRV says no"), "resolve", "SRV says no"),
            (OutboundError(FailureKind.INVALID, "server name", "bad"), "server name", "bad"),
            (
                OutboundError(FailureKind.REFUSED, "connect", "refusing to connect to 10.0.0.5 (blocked by 10.0.0.0/8)"),
                "connect",
                "refusing to connect to 10.0.0.5 (blocked by 10.0.0.0/8)",
            ),
            (OutboundError(FailureKind.CONNECT, "connect", "ConnectionRefusedError"), "connect", "ConnectionRefusedError"),
            (OutboundError(FailureKind.TLS, "tls", "certificate verify failed"), "tls", "certificate verify failed"),
            (RuntimeError("boom"), "request", "RuntimeError: boom"),
        ]
        for exception, step, detail in cases:
            with self.subTest(exception=exception):
                self.agent.error = exception
                error = self.error("example.com")
                self.assertEqual((error.step, error.detail), (step, detail))

    def test_token_scrubbed_from_details(self) -> None:
        self.agent.error = OutboundError(FailureKind.CONNECT, "connect", f"weird error mentioning {TOKEN} and s3cr3t-OpenID-token")
        error = self.error("example.com")
        self.assertEqual(error.detail, "weird error mentioning <redacted> and <redacted>")

    def test_token_never_logged(self) -> None:
        self.homeserver.users[TOKEN] = "@alice:example.com"
        self.userinfo("example.com")
        self.error("example.org")
        self.assertTrue(self.events)
        for event in self.events:
            self.assertNotIn(TOKEN, repr(event))

    def test_access_token_must_be_text(self) -> None:
        error = self.failureResultOf(self.client.userinfo("example.com", None), OutboundError).value
        self.assertEqual(error.step, "request")
        self.assertEqual(self.agent.urls, [])
