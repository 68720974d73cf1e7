"""Client-server API discovery (docs/delegated-leave.md#client-server-api) and one-shot delayed-event calls (docs/delegated-leave.md#restart-and-send-calls)."""

from __future__ import annotations

import json

from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from rtcauthd.outbound.client import HTTPClient
from rtcauthd.leave.record import JobParams
from rtcauthd.matrix.delayed_events import CsApiUnresolvable, OutcomeKind
from rtcauthd.matrix.csapi import ClientAPIResolver, DelayedEventClient, delayed_event_url


class Recorder(Resource):
    """Answers every request from a table keyed by path; records (method, raw URI, host)."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen = []
        self.answers = {}  # path -> (status, headers, body)
        self.default = (200, {}, b"{}")

    def render(self, request):
        self.seen.append((request.method, request.uri, request.getHeader(b"host"), request.content.read()))
        status, headers, body = self.answers.get(request.path, self.default)
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name, value)
        return body


def well_known(base_url="https://matrix.example.com", **extra):
    doc = {"m.homeserver": {"base_url": base_url}}
    doc.update(extra)
    return json.dumps(doc).encode()


class Fixture(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.server = Recorder()
        self.agent = RequestTraversalAgent(self.server)
        self.http = HTTPClient(clock=self.clock, agent=self.agent)
        self.resolver = ClientAPIResolver(
            clock=self.clock, http=self.http, overrides={"override.org": "https://cs.override.org/prefix/"}
        )

    def resolve(self, server_name):
        d = self.resolver.resolve(server_name)
        self.agent.flush()
        return d


class DiscoveryTests(Fixture):
    def test_override_wins_without_network(self):
        self.assertEqual(self.successResultOf(self.resolve("override.org")), "https://cs.override.org/prefix/")
        self.assertEqual(self.server.seen, [])

    def test_well_known_fetched_with_port_and_cached_for_exactly_four_hours(self):
        self.server.default = (200, {}, well_known())
        self.assertEqual(self.successResultOf(self.resolve("example.com:8448")), "https://matrix.example.com")
        [(method, uri, host, _)] = self.server.seen
        self.assertEqual((method, uri, host), (b"GET", b"/.well-known/matrix/client", b"example.com:8448"))
        self.clock.advance(4 * 3600 - 1)
        self.successResultOf(self.resolve("example.com:8448"))
        self.assertEqual(len(self.server.seen), 1)
        self.clock.advance(1)
        self.successResultOf(self.resolve("example.com:8448"))
        self.assertEqual(len(self.server.seen), 2)

    def test_base_url_verbatim(self):
        self.server.default = (200, {}, well_known("https://hs.example.com/sub/"))
        self.assertEqual(self.successResultOf(self.resolve("example.com")), "https://hs.example.com/sub/")

    def test_non_200_body_still_parsed(self):
        self.server.default = (500, {}, well_known())
        self.assertEqual(self.successResultOf(self.resolve("example.com")), "https://matrix.example.com")

    def test_failures_are_not_cached(self):
        cases = [
            (404, well_known()),
            (200, b"not json"),
            (200, b"[]"),
            (200, json.dumps({"m.homeserver": {}}).encode()),
            (200, json.dumps({"m.homeserver": {"base_url": ""}}).encode()),
            (200, json.dumps({"m.homeserver": "x"}).encode()),
            (200, json.dumps({"m.homeserver": {"base_url": 5}}).encode()),
            (200, well_known(**{"m.identity_server": {"base_url": 1}})),
            (200, b" " * (64 * 1024) + well_known()),
        ]
        for status, body in cases:
            self.server.default = (status, {}, body)
            self.failureResultOf(self.resolve("example.com"), CsApiUnresolvable)
        self.assertEqual(len(self.server.seen), len(cases))

    def test_server_name_with_path_characters_is_refused(self):
        for bad in ("evil.com/x", "a@b", "x?y", "x#y"):
            self.failureResultOf(self.resolve(bad), CsApiUnresolvable)
        self.assertEqual(self.server.seen, [])


class UrlTests(SynchronousTestCase):
    def test_delay_id_is_one_segment(self):
        base = "https://hs.example.com/prefix/"
        cases = {
            "syd_abc": "syd_abc",
            "../../admin": "..%2F..%2Fadmin",
            "a%2Fb": "a%252Fb",
            "x?y=1": "x%3Fy%3D1",
            "x#frag": "x%23frag",
            "ünï": "%C3%BCn%C3%AF",
            "..": "%2E%2E",
            ".": "%2E",
        }
        for delay_id, segment in cases.items():
            self.assertEqual(
                delayed_event_url(base, delay_id, "restart"),
                "https://hs.example.com/prefix/_matrix/client/unstable/org.matrix.msc4140/delayed_events/"
                + segment
                + "/restart",
            )


class DelayedEventTests(Fixture):
    def setUp(self):
        super().setUp()
        self.client = DelayedEventClient(clock=self.clock, resolver=self.resolver)

    def params(self, delay_id="syd_1", server_name="override.org"):
        return JobParams(delay_id=delay_id, delay_timeout_ns=10**10, server_name=server_name, room="r", identity="i")

    def call(self, action, params):
        d = getattr(self.client, action)(params)
        self.agent.flush()
        return d

    def test_restart_posts_empty_object_to_escaped_url(self):
        for delay_id in ("../x", "a%2Fb", "q?x", "h#x", "ü", ".."):
            outcome = self.successResultOf(self.call("restart", self.params(delay_id)))
            self.assertEqual(outcome.kind, OutcomeKind.OK)
        paths = [uri for _m, uri, _h, _b in self.server.seen]
        prefix = b"/prefix/_matrix/client/unstable/org.matrix.msc4140/delayed_events/"
        self.assertEqual(
            paths,
            [prefix + seg + b"/restart" for seg in (b"..%2Fx", b"a%252Fb", b"q%3Fx", b"h%23x", b"%C3%BC", b"%2E%2E")],
        )
        self.assertTrue(all(m == b"POST" and body == b"{}" for m, _u, _h, body in self.server.seen))

    def test_classification_passes_through(self):
        self.server.default = (404, {}, b'{"errcode":"M_NOT_FOUND"}')
        self.assertEqual(self.successResultOf(self.call("send", self.params())).kind, OutcomeKind.NOT_FOUND)
        self.server.default = (429, {"Retry-After": "7"}, b"{}")
        outcome = self.successResultOf(self.call("restart", self.params()))
        self.assertEqual((outcome.kind, outcome.retry_after), (OutcomeKind.RETRY, 7))

    def test_unresolvable_cs_api_fails_the_attempt(self):
        self.server.default = (404, {}, b"")
        self.failureResultOf(self.call("restart", self.params(server_name="example.com")), CsApiUnresolvable)

    def test_timeout_is_a_retry(self):
        class Silent(Resource):
            isLeaf = True

            def render(self, request):
                from twisted.web.server import NOT_DONE_YET

                return NOT_DONE_YET

        agent = RequestTraversalAgent(Silent())
        resolver = ClientAPIResolver(
            clock=self.clock,
            http=HTTPClient(clock=self.clock, agent=agent),
            overrides={"override.org": "https://cs.override.org/prefix/"},
        )
        client = DelayedEventClient(clock=self.clock, resolver=resolver, timeout=5)
        d = client.send(self.params())
        agent.flush()
        self.assertNoResult(d)
        self.clock.advance(5)
        outcome = self.successResultOf(d)
        self.assertEqual(outcome.kind, OutcomeKind.RETRY)
        self.assertIn("no complete answer within 5 s", outcome.detail)


class GuardedTests(Fixture):
    """Servers the operator did not name (admitted by "*") go through the guarded client."""

    def setUp(self):
        super().setUp()
        self.guarded_server = Recorder()
        self.guarded_server.default = (200, {}, well_known("https://wild.example/cs"))
        self.guarded_agent = RequestTraversalAgent(self.guarded_server)
        self.resolver = ClientAPIResolver(
            clock=self.clock,
            http=self.http,
            guarded_http=HTTPClient(clock=self.clock, agent=self.guarded_agent),
            is_trusted=lambda name: name == "named.example",
            overrides={"override.org": "https://cs.override.org/"},
        )
        self.client = DelayedEventClient(clock=self.clock, resolver=self.resolver)

    def call(self, d):
        self.agent.flush()
        self.guarded_agent.flush()
        return d

    def test_well_known_and_calls_of_an_unnamed_server_are_guarded(self):
        self.successResultOf(self.call(self.client.restart(JobParams("d", 10**10, "wild.example", "r", "i"))))
        self.assertEqual([m for m, *_ in self.guarded_server.seen], [b"GET", b"POST"])
        self.assertEqual(self.server.seen, [])

    def test_named_servers_and_overrides_use_the_plain_client(self):
        self.server.default = (200, {}, well_known("https://named.example/cs"))
        self.successResultOf(self.call(self.client.send(JobParams("d", 10**10, "named.example", "r", "i"))))
        self.successResultOf(self.call(self.client.send(JobParams("d", 10**10, "override.org", "r", "i"))))
        self.assertEqual([m for m, *_ in self.server.seen], [b"GET", b"POST", b"POST"])
        self.assertEqual(self.guarded_server.seen, [])


class IdentityServerNullTests(SynchronousTestCase):
    def test_null_identity_server_base_url_is_accepted_like_go(self):
        from rtcauthd.matrix.csapi import _well_known_base_url

        body = b'{"m.homeserver":{"base_url":"https://hs"},"m.identity_server":{"base_url":null}}'
        self.assertEqual(_well_known_base_url(body), "https://hs")
