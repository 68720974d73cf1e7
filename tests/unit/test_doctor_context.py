"""The doctor's run context: findings computed once, redirects followed like a browser."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from rtcauthd.doctor.context import MAX_REDIRECTS, Context, DoctorOptions
from rtcauthd.matrix.servername import parse_server_name
from rtcauthd.outbound.client import HTTPResponse, OutboundError
from rtcauthd.outbound.errors import FailureKind


class ScriptedHTTP:
    """Answers each URL from a table; records what was asked."""

    def __init__(self, answers: dict) -> None:
        self.answers = answers
        self.urls: list[str] = []

    def request(self, method, url, *, headers=None, body=None, step="request"):
        self.urls.append(url)
        code, location = self.answers[url]
        raw = Headers({b"Location": [location.encode()]} if location is not None else {})
        return succeed(HTTPResponse(code=code, headers=raw, body=b""))


class Net:
    def __init__(self, http) -> None:
        self.http = http


def context(http) -> Context:
    return Context(
        clock=Clock(), options=DoctorOptions(server_name="example.com"), server=parse_server_name("example.com"), net=Net(http)
    )


class FetchFollowingTests(SynchronousTestCase):
    def test_follows_relative_and_absolute_locations(self):
        http = ScriptedHTTP({
            "https://example.com/a": (301, "/b"),
            "https://example.com/b": (307, "https://www.example.com/c"),
            "https://www.example.com/c": (200, None),
        })
        d = Deferred.fromCoroutine(context(http).fetch_following("https://example.com/a", {}))
        response, final, redirects = self.successResultOf(d)
        self.assertEqual((response.code, final), (200, "https://www.example.com/c"))
        self.assertEqual(redirects, ["https://example.com/b", "https://www.example.com/c"])

    def test_a_redirect_without_location_is_the_answer(self):
        http = ScriptedHTTP({"https://example.com/a": (302, "")})
        d = Deferred.fromCoroutine(context(http).fetch_following("https://example.com/a", {}))
        response, final, redirects = self.successResultOf(d)
        self.assertEqual((response.code, final, redirects), (302, "https://example.com/a", []))

    def test_too_many_redirects(self):
        http = ScriptedHTTP({"https://example.com/a": (302, "/a")})
        d = Deferred.fromCoroutine(context(http).fetch_following("https://example.com/a", {}))
        error = self.failureResultOf(d, OutboundError).value
        self.assertEqual((error.kind, error.detail), (FailureKind.REDIRECT, f"more than {MAX_REDIRECTS} redirects"))
        self.assertEqual(len(http.urls), MAX_REDIRECTS + 1)


class FindingTests(SynchronousTestCase):
    def test_computed_once_for_every_caller(self):
        ctx = context(None)
        calls = []
        pending: Deferred = Deferred()

        async def find(c):
            calls.append(c)
            return await pending

        first, second = ctx.finding(find), ctx.finding(find)
        pending.callback("value")
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), ("value", "value"))
        self.assertEqual(self.successResultOf(ctx.finding(find)), "value")
        self.assertEqual(calls, [ctx])

    def test_cancel_stops_a_running_finding(self):
        ctx = context(None)

        async def find(c):
            return await Deferred()

        d = ctx.finding(find)
        ctx.cancel()
        self.failureResultOf(d)


class TokenClaimTests(SynchronousTestCase):
    """What the doctor says about the token it got (the v0.7 grant matrix)."""

    def token(self, **video) -> str:
        import jwt

        grants = {"roomJoin": True, "room": "ALIAS", "canPublish": True, "canSubscribe": True}
        grants.update(video)
        return jwt.encode({"sub": "ID", "video": grants, "exp": 10**10}, "x" * 32, algorithm="HS256")

    def problems(self, token):
        from rtcauthd.doctor.check_token_flow import _jwt_problems

        return _jwt_problems(context(ScriptedHTTP({})), token, "ID", "ALIAS")

    def test_a_full_token_has_no_problem(self):
        self.assertEqual(self.problems(self.token()), [])

    def test_a_subscribe_only_token_names_the_full_access_setting(self):
        [problem] = self.problems(self.token(canPublish=False))
        self.assertIn("LIVEKIT_FULL_ACCESS_HOMESERVERS", problem)
        [problem] = self.problems(self.token(canSubscribe=False))
        self.assertEqual(problem, "video.canSubscribe is not true")


class SharedBucketTests(SynchronousTestCase):
    """The doctor notices a reverse proxy that does not pass the client address on (issue 12)."""

    def warning(self, base, seen):
        from rtcauthd.doctor.check_service import _shared_bucket_warning

        headers = Headers({b"X-Rtcauth-Client-Address": [seen.encode()]} if seen is not None else {})
        return _shared_bucket_warning(base, HTTPResponse(code=200, headers=headers, body=b""))

    def test_a_public_url_seeing_loopback_is_a_warning(self):
        result = self.warning("https://rtc.example.com/livekit/jwt", "127.0.0.1")
        self.assertEqual((result.check, result.status.value), ("service-client-address", "warn"))
        self.assertIn("proxy_set_header X-Forwarded-For", result.fix[0])
        self.assertIsNotNone(self.warning("https://rtc.example.com", "::1"))

    def test_otherwise_nothing(self):
        self.assertIsNone(self.warning("https://rtc.example.com", "203.0.113.5"))  # the proxy forwards
        self.assertIsNone(self.warning("https://rtc.example.com", None))  # limit off, or lk-jwt-service
        self.assertIsNone(self.warning("https://127.0.0.1:8443", "127.0.0.1"))  # reached directly
        self.assertIsNone(self.warning("https://localhost:8443", "127.0.0.1"))
        self.assertIsNone(self.warning("https://rtc.example.com", "garbage"))
