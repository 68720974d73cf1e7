"""The as_token calls to our homeserver (docs/appservice.md#homeserver-calls): /versions, is_joined, fed_proxy."""

from __future__ import annotations

import json

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from rtcauthd.matrix.appservice import FedProxyAnswer, HomeserverAppservice, path_segment
from rtcauthd.outbound.client import HTTPClient
from rtcauthd.outbound.errors import FailureKind
from tests.support.outbound import failed_with

BASE = "https://hs.example.com"
AS_TOKEN = "as-secret-token"
UNSTABLE_IS_JOINED = b"/_matrix/client/unstable/io.element.msc4502/rooms/"


class FakeHomeserver(Resource):
    """Answers from a table keyed by path; records (method, uri, Authorization, body)."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen = []
        self.features = {"io.element.msc4502": True}
        self.answers = {}  # path -> (status, body bytes)
        self.hang = False

    def render(self, request):
        self.seen.append(
            (request.method, request.uri, request.getHeader(b"Authorization"), request.content.read())
        )
        if self.hang:
            return NOT_DONE_YET
        if request.path == b"/_matrix/client/versions" and request.path not in self.answers:
            request.setResponseCode(200)
            return json.dumps({"versions": ["v1.11"], "unstable_features": self.features}).encode()
        status, body = self.answers.get(request.path, (200, b'{"joined": true}'))
        request.setResponseCode(status)
        return body


class Fixture(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.server = FakeHomeserver()
        self.agent = RequestTraversalAgent(self.server)
        self.http = HTTPClient(clock=self.clock, agent=self.agent)
        self.hs = HomeserverAppservice(clock=self.clock, http=self.http, as_token=AS_TOKEN)

    def call(self, coroutine) -> Deferred:
        d = Deferred.fromCoroutine(coroutine)
        self.agent.flush()
        return d

    def is_joined(self, room="!room:example.com", **subject):
        return self.call(self.hs.is_joined(BASE, room, **subject))

    def uris(self):
        return [uri for _m, uri, _a, _b in self.server.seen]


class VersionsTests(Fixture):
    def test_unauthenticated_and_cached_for_an_hour(self):
        self.assertTrue(self.successResultOf(self.is_joined(mxid="@a:example.com")))
        self.assertEqual(self.server.seen[0][:3], (b"GET", b"/_matrix/client/versions", None))
        self.successResultOf(self.is_joined(mxid="@a:example.com"))
        self.assertEqual(self.uris().count(b"/_matrix/client/versions"), 1)
        self.clock.advance(3600)
        self.successResultOf(self.is_joined(mxid="@a:example.com"))
        self.assertEqual(self.uris().count(b"/_matrix/client/versions"), 2)

    def test_failures_are_not_cached(self):
        self.server.answers[b"/_matrix/client/versions"] = (500, b"{}")
        failed_with(self, self.is_joined(mxid="@a:example.com"), FailureKind.HTTP_STATUS)
        del self.server.answers[b"/_matrix/client/versions"]
        self.assertTrue(self.successResultOf(self.is_joined(mxid="@a:example.com")))
        self.assertEqual(self.uris().count(b"/_matrix/client/versions"), 2)

    def test_unparsable_versions_fail(self):
        for body in (b"not json", b"[]", b'{"unstable_features": []}'):
            self.server.answers[b"/_matrix/client/versions"] = (200, body)
            failed_with(self, self.is_joined(mxid="@a:example.com"), FailureKind.BAD_BODY)

    def test_each_base_url_has_its_own_cache_entry(self):
        self.successResultOf(self.call(self.hs.unstable_features(BASE)))
        self.successResultOf(self.call(self.hs.unstable_features(BASE + "/prefix")))
        self.assertEqual(self.uris(), [b"/_matrix/client/versions", b"/prefix/_matrix/client/versions"])


class IsJoinedTests(Fixture):
    def test_unstable_user_query_with_as_token(self):
        self.assertTrue(self.successResultOf(self.is_joined("!roomid:example.com", mxid="@alice:example.com")))
        method, uri, auth, _ = self.server.seen[1]
        self.assertEqual(method, b"GET")
        self.assertEqual(
            uri,
            b"/_matrix/client/unstable/io.element.msc4502/rooms/!roomid:example.com/is_joined?mxid=%40alice%3Aexample.com",
        )
        self.assertEqual(auth, b"Bearer " + AS_TOKEN.encode())

    def test_server_query(self):
        self.successResultOf(self.is_joined(server_name="remote.example:8448"))
        self.assertEqual(self.server.seen[1][1], UNSTABLE_IS_JOINED + b"!room:example.com/is_joined?server_name=remote.example%3A8448")

    def test_stable_flag_wins(self):
        self.server.features = {"io.element.msc4502": True, "io.element.msc4502.stable": True}
        self.successResultOf(self.is_joined(mxid="@a:example.com"))
        self.assertTrue(self.server.seen[1][1].startswith(b"/_matrix/client/v3/rooms/!room:example.com/is_joined?"))

    def test_flag_must_be_true(self):
        for features in ({}, {"io.element.msc4502": False}, {"io.element.msc4502": "true"}, {"io.element.msc4502.stable": 1}):
            self.hs = HomeserverAppservice(clock=self.clock, http=self.http, as_token=AS_TOKEN)
            self.server.features = features
            error = failed_with(self, self.is_joined(mxid="@a:example.com"), FailureKind.BAD_BODY)
            self.assertIn("MSC4502", error.detail)
        self.assertNotIn(b"is_joined", b" ".join(self.uris()))

    def test_room_id_is_one_segment(self):
        self.successResultOf(self.is_joined("!a/b?c#d%e f:x", mxid="@a:example.com"))
        self.assertEqual(self.server.seen[1][1], UNSTABLE_IS_JOINED + b"!a%2Fb%3Fc%23d%25e%20f:x/is_joined?mxid=%40a%3Aexample.com")
        self.assertEqual(path_segment(".."), "%2E%2E")

    def test_answers(self):
        path = b"/_matrix/client/unstable/io.element.msc4502/rooms/!room:example.com/is_joined"
        for body, joined in ((b'{"joined": false}', False), (b"{}", False), (b'{"joined": true, "x": 1}', True)):
            self.server.answers[path] = (200, body)
            self.assertIs(self.successResultOf(self.is_joined(mxid="@a:example.com")), joined)
        for body in (b"nope", b'{"joined": "yes"}', b"[true]"):
            self.server.answers[path] = (200, body)
            failed_with(self, self.is_joined(mxid="@a:example.com"), FailureKind.BAD_BODY)
        self.server.answers[path] = (403, b'{"errcode": "M_FORBIDDEN", "error": "Missing scope"}')
        error = failed_with(self, self.is_joined(mxid="@a:example.com"), FailureKind.HTTP_STATUS)
        self.assertEqual((error.status, error.code), (403, "M_FORBIDDEN"))
        self.assertNotIn(AS_TOKEN, str(error) + repr(error) + repr(self.hs))

    def test_bounded_in_time(self):
        self.successResultOf(self.call(self.hs.unstable_features(BASE)))
        self.server.hang = True
        d = self.is_joined(mxid="@a:example.com")
        self.assertNoResult(d)
        self.clock.advance(10)
        failed_with(self, d, FailureKind.TIMEOUT)

    def test_exactly_one_subject(self):
        with self.assertRaises(ValueError):
            self.hs.is_joined(BASE, "!r:x", mxid="@a:x", server_name="x").send(None)


class FedProxyTests(Fixture):
    PATH = "/_matrix/federation/unstable/io.element.msc4195/rtc/livekit/get_token"
    BODY = {"user_id": "@alice:example.com", "url": "wss://sfu.remote", "room_id": "!r:x", "slot_id": "s", "member_id": "m"}

    def relay(self):
        return self.call(self.hs.fed_proxy(BASE, "remote.example", self.PATH, self.BODY))

    def test_request_shape(self):
        self.server.answers[b"/_matrix/client/unstable/io.element.msc4512/appservice/fed_proxy"] = (
            200,
            b'{"status": 200, "content": {"jwt": "remote-jwt"}}',
        )
        self.assertEqual(self.successResultOf(self.relay()), FedProxyAnswer(200, {"jwt": "remote-jwt"}))
        method, uri, auth, body = self.server.seen[1]
        self.assertEqual((method, uri, auth), (b"POST", b"/_matrix/client/unstable/io.element.msc4512/appservice/fed_proxy", b"Bearer " + AS_TOKEN.encode()))
        self.assertEqual(
            json.loads(body),
            {"destination": "remote.example", "method": "POST", "path": self.PATH, "body": self.BODY},
        )

    def test_stable_path_only_when_advertised(self):
        self.server.features = {"io.element.msc4502": True, "io.element.msc4512.stable": True}
        self.server.answers[b"/_matrix/client/v1/appservice/fed_proxy"] = (200, b'{"status": 403, "content": null}')
        self.assertEqual(self.successResultOf(self.relay()), FedProxyAnswer(403, None))
        self.assertEqual(self.server.seen[1][1], b"/_matrix/client/v1/appservice/fed_proxy")

    def test_homeserver_errors_fail(self):
        path = b"/_matrix/client/unstable/io.element.msc4512/appservice/fed_proxy"
        self.server.answers[path] = (502, b'{"errcode": "IO.ELEMENT.MSC4512.M_FEDPROXY_CONNECTION_FAILED"}')
        error = failed_with(self, self.relay(), FailureKind.HTTP_STATUS)
        self.assertEqual(error.code, "IO.ELEMENT.MSC4512.M_FEDPROXY_CONNECTION_FAILED")
        for body in (b"nope", b'{"content": {}}', b'{"status": "200"}', b"[]"):
            self.server.answers[path] = (200, body)
            failed_with(self, self.relay(), FailureKind.BAD_BODY)

    def test_thirty_seconds(self):
        self.successResultOf(self.call(self.hs.unstable_features(BASE)))
        self.server.hang = True
        d = self.relay()
        self.clock.advance(29)
        self.assertNoResult(d)
        self.clock.advance(1)
        failed_with(self, d, FailureKind.TIMEOUT)
