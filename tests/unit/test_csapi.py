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
        self.auth = []  # the Authorization header of each request in seen, or None
        self.answers = {}  # path -> (status, headers, body)
        self.default = (200, {}, b"{}")

    def render(self, request):
        self.seen.append((request.method, request.uri, request.getHeader(b"host"), request.content.read()))
        self.auth.append(request.getHeader(b"authorization"))
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


# --------------------------------------------------------------------------- v0.7: acting as the user

from twisted.logger import globalLogPublisher  # noqa: E402

from rtcauthd.matrix.csapi import (  # noqa: E402
    DelayedEventUnknown,
    StableDelayedEvents,
    advertises_stable_delayed_events,
)
from rtcauthd.matrix.delayed_events import OutcomeKind as Kind  # noqa: E402
from rtcauthd.outbound.errors import FailureKind, OutboundError  # noqa: E402
from tests.support.outbound import failed_with  # noqa: E402

AS_TOKEN = "as_token_SECRET_4f2a"
VERSIONS = b"/prefix/_matrix/client/versions"
UNSTABLE = b"/prefix/_matrix/client/unstable/org.matrix.msc4140/delayed_events/"
STABLE = b"/prefix/_matrix/client/v1/delayed_events/"
ALICE_QUERY = b"?user_id=%40alice%3Aexample.com"


def versions(**features) -> bytes:
    return json.dumps({"versions": ["v1.11", "v1.12"], "unstable_features": features}).encode()


class PathFormUrlTests(SynchronousTestCase):
    def test_stable_form_look_up_form_and_identity_assertion(self):
        base = "https://hs.example.com/prefix/"
        self.assertEqual(
            delayed_event_url(base, "a/b", "send", stable=True, user_id="@alice:example.com"),
            "https://hs.example.com/prefix/_matrix/client/v1/delayed_events/a%2Fb/send?user_id=%40alice%3Aexample.com",
        )
        self.assertEqual(
            delayed_event_url(base, "syd", user_id="@a b&c=d:x"),
            "https://hs.example.com/prefix/_matrix/client/unstable/org.matrix.msc4140/delayed_events/syd"
            "?user_id=%40a+b%26c%3Dd%3Ax",
        )

    def test_stable_flag_must_be_exactly_true(self):
        self.assertTrue(advertises_stable_delayed_events(versions(**{"org.matrix.msc4140.stable": True})))
        for body in (
            versions(**{"org.matrix.msc4140": True}),
            versions(**{"org.matrix.msc4140.stable": False}),
            versions(**{"org.matrix.msc4140.stable": "true"}),
            versions(**{"org.matrix.msc4140.stable": 1}),
            b'{"versions":["v1.99"]}',
            b'{"unstable_features":["org.matrix.msc4140.stable"]}',
        ):
            self.assertFalse(advertises_stable_delayed_events(body), body)
        for body in (b"[]", b"nope", b"\xff"):
            with self.assertRaises(ValueError):
                advertises_stable_delayed_events(body)


class PathFormTests(Fixture):
    BASE = "https://cs.override.org/prefix/"

    def setUp(self):
        super().setUp()
        self.form = StableDelayedEvents(clock=self.clock)

    def ask(self):
        d = self.form.stable(self.http, self.BASE)
        self.agent.flush()
        return d

    def test_advertised_answer_is_cached_for_exactly_one_hour(self):
        self.server.answers[VERSIONS] = (200, {}, versions(**{"org.matrix.msc4140.stable": True}))
        self.assertIs(self.successResultOf(self.ask()), True)
        [(method, uri, _host, _body)] = self.server.seen
        self.assertEqual((method, uri, self.server.auth), (b"GET", VERSIONS, [None]))  # unauthenticated
        self.clock.advance(3600 - 1)
        self.assertIs(self.successResultOf(self.ask()), True)
        self.assertEqual(len(self.server.seen), 1)
        self.clock.advance(1)
        self.server.answers[VERSIONS] = (200, {}, versions())
        self.assertIs(self.successResultOf(self.ask()), False)
        self.assertEqual(len(self.server.seen), 2)

    def test_unusable_answers_mean_unstable_for_one_minute(self):
        for answer in ((500, {}, b"{}"), (404, {}, versions(**{"org.matrix.msc4140.stable": True})), (200, {}, b"x")):
            self.server.answers[VERSIONS] = answer
            self.assertIs(self.successResultOf(self.ask()), False)
            calls = len(self.server.seen)
            self.clock.advance(59)
            self.assertIs(self.successResultOf(self.ask()), False)
            self.assertEqual(len(self.server.seen), calls)
            self.clock.advance(1)
        self.server.answers[VERSIONS] = (200, {}, versions(**{"org.matrix.msc4140.stable": True}))
        self.assertIs(self.successResultOf(self.ask()), True)

    def test_concurrent_questions_share_one_request(self):
        from twisted.web.server import NOT_DONE_YET

        held = []

        class Holding(Resource):
            isLeaf = True

            def render(self, request):
                held.append(request)
                return NOT_DONE_YET

        agent = RequestTraversalAgent(Holding())
        http = HTTPClient(clock=self.clock, agent=agent)
        first = self.form.stable(http, self.BASE)
        second = self.form.stable(http, self.BASE.rstrip("/"))
        agent.flush()
        self.assertNoResult(second)
        self.assertEqual(len(held), 1)
        held[0].write(versions(**{"org.matrix.msc4140.stable": True}))
        held[0].finish()
        agent.flush()
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (True, True))
        self.assertIs(self.successResultOf(self.form.stable(http, self.BASE)), True)
        self.assertEqual(len(held), 1)

    def test_body_is_bounded(self):
        self.server.answers[VERSIONS] = (200, {}, b" " * (64 * 1024 + 1) + versions(**{"org.matrix.msc4140.stable": True}))
        self.assertIs(self.successResultOf(self.ask()), False)


class OwnedFixture(Fixture):
    def setUp(self):
        super().setUp()
        self.client = DelayedEventClient(clock=self.clock, resolver=self.resolver, as_token=AS_TOKEN)

    def params(self, owner=None, delay_id="syd_1"):
        return JobParams(delay_id, 10**10, "override.org", "r", "i", owner)

    def call(self, action, params, client=None):
        d = getattr(client or self.client, action)(params)
        self.agent.flush()
        return d

    def lookup(self, room_id=None, delay_id="syd_1", client=None):
        d = (client or self.client).lookup_delay("override.org", "@alice:example.com", delay_id, room_id=room_id)
        self.agent.flush()
        return d


class OwnedJobTests(OwnedFixture):
    """docs/delegated-leave.md#acting-as-the-user: jobs of the application-service route act as their owner."""

    def test_job_without_owner_is_unauthenticated_and_unstable_even_with_a_token(self):
        self.server.answers[VERSIONS] = (200, {}, versions(**{"org.matrix.msc4140.stable": True}))
        for action in ("restart", "send"):
            self.assertEqual(self.successResultOf(self.call(action, self.params())).kind, Kind.OK)
        self.assertEqual([uri for _m, uri, _h, _b in self.server.seen], [UNSTABLE + b"syd_1/restart", UNSTABLE + b"syd_1/send"])
        self.assertEqual(self.server.auth, [None, None])

    def test_owner_without_token_is_unauthenticated(self):
        plain = DelayedEventClient(clock=self.clock, resolver=self.resolver)
        self.successResultOf(self.call("restart", self.params("@alice:example.com"), plain))
        self.assertEqual([uri for _m, uri, _h, _b in self.server.seen], [UNSTABLE + b"syd_1/restart"])
        self.assertEqual(self.server.auth, [None])

    def test_owner_acts_with_the_token_on_the_unstable_paths(self):
        self.server.answers[VERSIONS] = (200, {}, versions(**{"org.matrix.msc4140": True}))
        for action in ("restart", "send"):
            self.assertEqual(self.successResultOf(self.call(action, self.params("@alice:example.com"))).kind, Kind.OK)
        self.assertEqual(
            [(m, uri, body) for m, uri, _h, body in self.server.seen],
            [
                (b"GET", VERSIONS, b""),
                (b"POST", UNSTABLE + b"syd_1/restart" + ALICE_QUERY, b"{}"),
                (b"POST", UNSTABLE + b"syd_1/send" + ALICE_QUERY, b"{}"),
            ],
        )
        self.assertEqual(self.server.auth, [None] + [("Bearer " + AS_TOKEN).encode()] * 2)

    def test_owner_uses_the_stable_paths_when_advertised(self):
        self.server.answers[VERSIONS] = (200, {}, versions(**{"org.matrix.msc4140.stable": True}))
        self.successResultOf(self.call("restart", self.params("@alice:example.com", "a/b")))
        self.successResultOf(self.call("send", self.params("@alice:example.com", "a/b")))
        self.assertEqual(
            [uri for _m, uri, _h, _b in self.server.seen],
            [VERSIONS, STABLE + b"a%2Fb/restart" + ALICE_QUERY, STABLE + b"a%2Fb/send" + ALICE_QUERY],
        )
        self.assertEqual(self.server.auth[1:], [("Bearer " + AS_TOKEN).encode()] * 2)

    def test_versions_failure_falls_back_to_unstable(self):
        self.server.answers[VERSIONS] = (503, {}, b"")
        self.assertEqual(self.successResultOf(self.call("restart", self.params("@alice:example.com"))).kind, Kind.OK)
        self.assertEqual(self.server.seen[-1][1], UNSTABLE + b"syd_1/restart" + ALICE_QUERY)

    def test_409_passes_through_as_a_conflict(self):
        self.server.default = (409, {}, b'{"errcode":"M_UNKNOWN"}')
        self.server.answers[VERSIONS] = (200, {}, versions())
        for action in ("restart", "send"):
            self.assertEqual(self.successResultOf(self.call(action, self.params("@alice:example.com"))).kind, Kind.CONFLICT)

    def test_token_is_never_logged(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.server.answers[VERSIONS] = (500, {}, AS_TOKEN.encode())
        self.server.default = (500, {}, AS_TOKEN.encode())
        self.successResultOf(self.call("restart", self.params("@alice:example.com")))
        self.failureResultOf(self.lookup())
        self.assertNotIn(AS_TOKEN, repr(self.client))
        from twisted.logger import formatEvent

        self.assertTrue(events)
        for event in events:
            self.assertNotIn(AS_TOKEN, formatEvent(event) + repr(event))


class LookupDelayTests(OwnedFixture):
    """docs/delegated-leave.md#the-delay-look-up, row by row."""

    def event(self, **fields):
        doc = {"delay_id": "syd_1", "room_id": "!room:example.com", "type": "org.matrix.msc3401.call.member",
               "state_key": "_@alice:example.com_DEV_m.call", "delay_ms": 3600000,
               "delayed_since_ts": 1785000000000, "content": {}}
        doc.update(fields)
        return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()

    def test_request_shape_unstable(self):
        self.server.answers[VERSIONS] = (200, {}, versions(**{"org.matrix.msc4140": True}))
        self.server.default = (200, {}, self.event())
        self.assertEqual(self.successResultOf(self.lookup(delay_id="../x")), 3600000)
        (method, uri, _h, body) = self.server.seen[-1]
        self.assertEqual((method, uri, body), (b"GET", UNSTABLE + b"..%2Fx" + ALICE_QUERY, b""))
        self.assertEqual(self.server.auth[-1], ("Bearer " + AS_TOKEN).encode())

    def test_request_shape_stable(self):
        self.server.answers[VERSIONS] = (200, {}, versions(**{"org.matrix.msc4140.stable": True}))
        self.server.default = (200, {}, self.event())
        self.assertEqual(self.successResultOf(self.lookup("!room:example.com")), 3600000)
        self.assertEqual(self.server.seen[-1][1], STABLE + b"syd_1" + ALICE_QUERY)

    def test_delay_ms_then_legacy_delay(self):
        for fields, expected in (
            ({"delay_ms": 5000}, 5000),
            ({"delay_ms": 0, "delay": 7000}, 7000),
            ({"delay_ms": ..., "delay": 9000}, 9000),
            ({"delay_ms": 5000, "delay": 9000}, 5000),
        ):
            self.server.default = (200, {}, self.event(**fields))
            self.assertEqual(self.successResultOf(self.lookup("!room:example.com")), expected, fields)

    def test_unknown(self):
        cases = [
            (404, b'{"errcode":"M_NOT_FOUND","error":"Delayed event not found"}', None),
            (200, self.event(room_id="!other:example.com"), "!room:example.com"),
            (200, self.event(room_id=...), "!room:example.com"),
            (200, self.event(delay_ms=0), None),
            (200, self.event(delay_ms=-5, delay=0), None),
            (200, self.event(delay_ms=...), None),
        ]
        for status, body, room_id in cases:
            self.server.default = (status, {}, body)
            error = self.failureResultOf(self.lookup(room_id), DelayedEventUnknown).value
            self.assertIsInstance(error, OutboundError)

    def test_errors(self):
        cases = [
            (200, b"not json", FailureKind.BAD_BODY),
            (200, b"[]", FailureKind.BAD_BODY),
            (200, self.event(delay_ms="3600000"), FailureKind.BAD_BODY),
            (200, self.event(delay_ms=True), FailureKind.BAD_BODY),
            (200, self.event(room_id=5), FailureKind.BAD_BODY),
            (429, b'{"errcode":"M_LIMIT_EXCEEDED","retry_after_ms":1000}', FailureKind.HTTP_STATUS),
            (500, b"", FailureKind.HTTP_STATUS),
            (403, b'{"errcode":"M_FORBIDDEN"}', FailureKind.HTTP_STATUS),
            (204, b"", FailureKind.HTTP_STATUS),
            (200, b" " * (64 * 1024 + 1), FailureKind.TOO_LARGE),
        ]
        for status, body, kind in cases:
            self.server.default = (status, {}, body)
            error = failed_with(self, self.lookup(), kind)
            self.assertFalse(isinstance(error, DelayedEventUnknown), (status, body))
        self.server.default = (429, {}, b'{"errcode":"M_LIMIT_EXCEEDED"}')
        error = failed_with(self, self.lookup(), FailureKind.HTTP_STATUS)
        self.assertEqual((error.status, error.code), (429, "M_LIMIT_EXCEEDED"))

    def test_timeout_and_no_retry(self):
        class Silent(Resource):
            isLeaf = True
            calls = 0

            def render(self, request):
                from twisted.web.server import NOT_DONE_YET

                Silent.calls += 1
                return NOT_DONE_YET

        agent = RequestTraversalAgent(Silent())
        resolver = ClientAPIResolver(
            clock=self.clock,
            http=HTTPClient(clock=self.clock, agent=agent),
            overrides={"override.org": "https://cs.override.org/prefix/"},
        )
        client = DelayedEventClient(clock=self.clock, resolver=resolver, as_token=AS_TOKEN)
        d = client.lookup_delay("override.org", "@alice:example.com", "syd_1")
        agent.flush()
        self.clock.advance(5)  # /versions gives up: unstable paths
        agent.flush()
        self.assertNoResult(d)
        self.clock.advance(5)
        failed_with(self, d, FailureKind.TIMEOUT)
        self.assertEqual(Silent.calls, 2)  # /versions and one look-up, no retry

    def test_unresolvable_and_no_token(self):
        self.server.default = (404, {}, b"")
        d = self.client.lookup_delay("example.com", "@alice:example.com", "syd_1")
        self.agent.flush()
        failed_with(self, d, FailureKind.RESOLVE)
        plain = DelayedEventClient(clock=self.clock, resolver=self.resolver)
        failed_with(self, self.lookup(client=plain), FailureKind.INVALID)
