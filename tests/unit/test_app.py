"""The HTTP surface end to end in memory: routes, CORS, status codes, errcodes, access rules.

StubTreq drives real twisted.web Requests through the Klein resource; the homeserver and
the SFU are small fakes with call logs, so each test also proves what was (not) called.
"""

from __future__ import annotations

import json

import attr
import jwt as pyjwt
from twisted.internet.defer import fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd import errors
from rtcauthd.config import load_config
from rtcauthd.livekit import naming
from rtcauthd.livekit.twirp import twirp_failure
from rtcauthd.outbound.errors import FailureKind
from tests.support.daemon import SiteClient, build_test_daemon

SECRET = "unit-test-secret"
CORS = {
    b"Content-Type": [b"application/json"],
    b"Access-Control-Allow-Origin": [b"*"],
    b"Access-Control-Allow-Methods": [b"POST"],
    b"Access-Control-Allow-Headers": [b"Accept, Content-Type, Content-Length, Accept-Encoding, X-CSRF-Token"],
}


def grants(room, *, can_publish=True, can_update_own_metadata=False):
    """The whole ``video`` claim of a participant token (docs/authorization.md#participant-token)."""
    return {
        "roomCreate": False,
        "roomJoin": True,
        "room": room,
        "canPublish": can_publish,
        "canSubscribe": True,
        "canPublishData": True,
        "canUpdateOwnMetadata": can_update_own_metadata,
        "hidden": False,
    }


def jwt_claims(body):
    return pyjwt.decode(
        json.loads(body)["jwt"], SECRET, algorithms=["HS256"], options={"verify_exp": False, "verify_nbf": False}
    )


class OpenIDError(Exception):
    """Stands in for the federation client's failure (the authorizer only reads step/detail)."""

    def __init__(self, step, detail):
        super().__init__(step, detail)
        self.step, self.detail = step, detail


class FakeHomeservers:
    """userinfo(server_name, token): the user for a known (server, token), else an OpenIDError."""

    def __init__(self, users):
        self.users = users
        self.calls = []

    def userinfo(self, server_name, access_token):
        self.calls.append(server_name)
        user = self.users.get((server_name, access_token))
        if user is None:
            return fail(OpenIDError("status 401", "M_UNKNOWN_TOKEN"))
        return succeed(user)


class FakeRooms:
    def __init__(self):
        self.created = []
        self.error = None

    def create_room(self, room):
        self.created.append(room)
        if self.error is not None:
            return fail(self.error)
        return succeed(None)


class FakeDelegation:
    def __init__(self, resolvable=True):
        self.resolvable = resolvable
        self.jobs = []
        self.resolved = []
        self.webhooks = []

    def resolve_cs_api(self, server_name):
        self.resolved.append(server_name)
        if not self.resolvable:
            return fail(LookupError("no .well-known"))
        return succeed("https://matrix.example.com")

    def add_job(self, job):
        self.jobs.append(job)
        return succeed(None)

    def handle(self, authorization, body):
        """The webhook side (the real DelegatedLeave is both); these tests only count calls."""
        self.webhooks.append((authorization, body))


def token_body(**changes):
    obj = {
        "room_id": "!room:example.com",
        "slot_id": "m.call#ROOM",
        "openid_token": {
            "access_token": "good-token",
            "token_type": "Bearer",
            "matrix_server_name": "example.com",
            "expires_in": 3600,
        },
        "member": {"id": "member-1", "claimed_user_id": "@alice:example.com", "claimed_device_id": "DEVICE"},
    }
    for key, value in changes.items():
        if key in ("openid_token", "member"):
            obj[key].update(value)
        else:
            obj[key] = value
    return obj


class AppTestCase(SynchronousTestCase):
    #: Config fields a test class sets differently (attr.evolve of the loaded Config).
    config_changes: dict = {}

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.clock.advance(1785000000)
        self.config = load_config(
            {
                "LIVEKIT_URL": "wss://sfu.example.com",
                "LIVEKIT_KEY": "devkey",
                "LIVEKIT_SECRET": SECRET,
                "LIVEKIT_FULL_ACCESS_HOMESERVERS": "example.com",
                "RTCAUTH_MAX_BODY_BYTES": "4096",
            }
        )
        if self.config_changes:
            self.config = attr.evolve(self.config, **self.config_changes)
        self.homeservers = FakeHomeservers(
            {
                ("example.com", "good-token"): "@alice:example.com",
                ("other.org", "remote-token"): "@bob:other.org",
            }
        )
        self.rooms = FakeRooms()
        self.delegation = FakeDelegation()
        self.daemon = build_test_daemon(
            self.config,
            self.clock,
            federation=self.homeservers,
            rooms=self.rooms,
            delegation=self.delegation,
            **self.daemon_parts(),
        )
        self.tokens = self.daemon.tokens
        self.metrics = self.daemon.metrics
        self.site = self.daemon.site
        self.client = SiteClient(self.site)
        self.agent, self.treq = self.client.agent, self.client.treq

    def daemon_parts(self):
        """More build_daemon keywords for a test class (e.g. a request policy)."""
        return {}

    def request(self, method, path, data=b"", headers=None):
        return self.successResultOf(self.client.request(method, "http://rtc.test" + path, data, headers))

    def raw_request(self, method: bytes, path: bytes):
        """Bypasses treq, which upper-cases methods."""
        return self.successResultOf(self.client.raw_request(method, b"http://rtc.test" + path))

    def assertMatrixError(self, response, body, status, errcode, message):
        self.assertEqual(response.code, status)
        self.assertEqual(body, json.dumps({"errcode": errcode, "error": message}, separators=(",", ":")).encode() + b"\n")

    def assertCORS(self, response):
        for name, value in CORS.items():
            self.assertEqual(response.headers.getRawHeaders(name), value, name)


class RoutingTests(AppTestCase):
    def test_healthz(self):
        for method in ("GET", "HEAD"):
            response, body = self.request(method, "/healthz")
            self.assertEqual((response.code, body), (200, b""))
            self.assertIsNone(response.headers.getRawHeaders(b"Access-Control-Allow-Origin"))
        for method in ("POST", "PUT", "DELETE", "OPTIONS"):
            response, body = self.request(method, "/healthz")
            self.assertEqual((response.code, body), (405, b""), method)
        response, body = self.raw_request(b"get", b"/healthz")
        self.assertEqual((response.code, body), (405, b""))

    def test_unknown_paths_are_go_404(self):
        for path in ("/", "/nope", "/get_token/", "/sfu/get/", "//get_token", "/./get_token", "/x/../healthz", "/GET_TOKEN", "/sfu"):
            response, body = self.request("POST", path, b"{}")
            self.assertEqual(response.code, 404, path)
            self.assertEqual(body, b"404 page not found\n")
            self.assertEqual(response.headers.getRawHeaders(b"Content-Type"), [b"text/plain; charset=utf-8"])

    def test_query_string_ignored(self):
        response, _ = self.request("GET", "/healthz?x=1")
        self.assertEqual(response.code, 200)

    def test_cors_and_methods_on_every_json_endpoint(self):
        for path in ("/get_token", "/sfu/get", "/delegate_delayed_leave"):
            response, body = self.request("OPTIONS", path, headers={"Access-Control-Request-Method": "POST"})
            self.assertEqual((response.code, body), (200, b""))
            self.assertCORS(response)
            for method in ("GET", "HEAD", "PUT", "DELETE", "PATCH"):
                response, body = self.request(method, path)
                self.assertEqual((response.code, body), (405, b""), (path, method))
                self.assertCORS(response)
            response, body = self.raw_request(b"post", path.encode())
            self.assertEqual((response.code, body), (405, b""), path)
            response, body = self.request("POST", path, b"{nope")
            self.assertMatrixError(response, body, 400, "M_NOT_JSON", "Error reading request")
            self.assertCORS(response)

    def test_webhook_any_method_200_empty(self):
        for method in ("POST", "GET", "PUT"):
            response, body = self.request(method, "/sfu_webhook", b"{}")
            self.assertEqual((response.code, body), (200, b""))
            self.assertIsNone(response.headers.getRawHeaders(b"Access-Control-Allow-Origin"))

    def test_body_too_large_is_413_and_nothing_happens(self):
        big = json.dumps(token_body(room_id="x" * 5000)).encode()
        response, body = self.request("POST", "/get_token", big)
        self.assertMatrixError(response, body, 413, "M_TOO_LARGE", errors.E_TOO_LARGE)
        self.assertCORS(response)
        self.assertEqual((self.homeservers.calls, self.rooms.created), ([], []))


class GetTokenTests(AppTestCase):
    def test_full_access_success(self):
        response, body = self.request("POST", "/get_token", token_body())
        self.assertEqual(response.code, 200)
        self.assertCORS(response)
        self.assertTrue(body.endswith(b"\n"))
        self.assertEqual(list(json.loads(body)), ["url", "jwt"])
        answer = json.loads(body)
        self.assertEqual(answer["url"], "wss://sfu.example.com")
        claims = pyjwt.decode(answer["jwt"], SECRET, algorithms=["HS256"], options={"verify_exp": False, "verify_nbf": False})
        identity = naming.identity("@alice:example.com", "DEVICE", "member-1")
        room = naming.room_alias("!room:example.com", "m.call#ROOM")
        self.assertEqual(claims["sub"], identity)
        self.assertEqual(claims["video"]["room"], room)
        self.assertEqual(claims["video"], grants(room))
        self.assertEqual(self.rooms.created, [room])
        self.assertEqual(self.homeservers.calls, ["example.com"])

    def test_restricted_user_gets_token_without_room_creation(self):
        response, body = self.request(
            "POST",
            "/get_token",
            token_body(
                openid_token={"access_token": "remote-token", "matrix_server_name": "other.org"},
                member={"claimed_user_id": "@bob:other.org"},
            ),
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(self.rooms.created, [])
        # users of other homeservers may subscribe but not publish (upstream PR #222)
        claims = jwt_claims(body)
        self.assertEqual(claims["sub"], naming.identity("@bob:other.org", "DEVICE", "member-1"))
        self.assertEqual(claims["video"], grants(naming.room_alias("!room:example.com", "m.call#ROOM"), can_publish=False))

    def test_unknown_token_401(self):
        response, body = self.request("POST", "/get_token", token_body(openid_token={"access_token": "forged"}))
        self.assertMatrixError(response, body, 401, "M_UNAUTHORIZED", "The request could not be authorised.")
        self.assertEqual(self.rooms.created, [])

    def test_claimed_user_mismatch_401(self):
        response, body = self.request("POST", "/get_token", token_body(member={"claimed_user_id": "@mallory:example.com"}))
        self.assertMatrixError(response, body, 401, "M_UNAUTHORIZED", errors.E_UNAUTH)
        self.assertEqual(self.rooms.created, [])

    def test_validation_happens_before_any_network_call(self):
        response, body = self.request("POST", "/get_token", token_body(delay_id="d"))
        self.assertMatrixError(response, body, 400, "M_BAD_JSON", errors.E_DELAY)
        self.assertEqual(self.homeservers.calls, [])

    def test_restricted_delegation_400_after_one_lookup(self):
        response, body = self.request(
            "POST",
            "/get_token",
            token_body(
                openid_token={"access_token": "remote-token", "matrix_server_name": "other.org"},
                member={"claimed_user_id": "@bob:other.org"},
                delay_id="syd_1",
                delay_timeout=8000,
            ),
        )
        self.assertMatrixError(response, body, 400, "M_BAD_JSON", errors.E_DELEG)
        self.assertEqual(self.homeservers.calls, ["other.org"])
        self.assertEqual((self.rooms.created, self.delegation.jobs), ([], []))

    def test_full_access_delegation_registers_job(self):
        response, _ = self.request("POST", "/get_token", token_body(delay_id="syd_1", delay_timeout=8000))
        self.assertEqual(response.code, 200)
        [job] = self.delegation.jobs
        # the client's milliseconds become the record's nanoseconds
        self.assertEqual((job.server_name, job.delay_id, job.delay_timeout_ns), ("example.com", "syd_1", 8_000_000_000))
        self.assertEqual(job.room, naming.room_alias("!room:example.com", "m.call#ROOM"))

    def test_unresolvable_cs_api_400_before_room_creation(self):
        self.delegation.resolvable = False
        response, body = self.request("POST", "/get_token", token_body(delay_id="syd_1", delay_timeout=8000))
        self.assertMatrixError(response, body, 400, "M_BAD_JSON", errors.E_CSAPI)
        self.assertEqual((self.rooms.created, self.delegation.jobs), ([], []))

    def test_sfu_failure_500(self):
        self.rooms.error = twirp_failure(FailureKind.HTTP_STATUS, "CreateRoom", 503, "unavailable", "down")
        response, body = self.request("POST", "/get_token", token_body())
        self.assertMatrixError(response, body, 500, "M_UNKNOWN", errors.E_CREATE)

    def test_any_create_room_failure_is_500_create(self):
        self.rooms.error = RuntimeError("boom")
        response, body = self.request("POST", "/get_token", token_body())
        self.assertMatrixError(response, body, 500, "M_UNKNOWN", errors.E_CREATE)

    def test_signing_failure_is_500_internal(self):
        def broken(identity, room, **grants):
            raise ValueError("no key")

        self.tokens.participant_token = broken
        response, body = self.request("POST", "/get_token", token_body())
        self.assertMatrixError(response, body, 500, "M_UNKNOWN", errors.E_INTERNAL)
        self.assertEqual(self.rooms.created, [])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class DisconnectTests(AppTestCase):
    def test_client_going_away_does_not_cancel_job_registration(self):
        from twisted.internet.defer import Deferred

        stored = Deferred()  # the store write is still in flight when the client leaves
        self.delegation.add_job = lambda job: (self.delegation.jobs.append(job), stored)[1]
        d = self.treq.request(
            "POST", "http://rtc.test/get_token", data=json.dumps(token_body(delay_id="syd_1", delay_timeout=8000)).encode()
        )
        self.client.flush()
        self.assertNoResult(d)
        d.cancel()  # the client disconnects
        self.client.flush()
        self.failureResultOf(d)  # the client sees its own cancellation
        self.assertFalse(stored.called)  # our work was not cancelled with it
        stored.callback(None)
        self.assertEqual(len(self.delegation.jobs), 1)
        self.assertEqual(self.flushLoggedErrors(), [])


class LegacyTests(AppTestCase):
    def legacy(self, **changes):
        obj = {
            "room": "!room:example.com",
            "openid_token": {"access_token": "good-token", "matrix_server_name": "example.com"},
            "device_id": "DEVICE123",
        }
        obj.update(changes)
        return obj

    def test_success_identity_not_hashed(self):
        response, body = self.request("POST", "/sfu/get", self.legacy())
        self.assertEqual(response.code, 200)
        claims = pyjwt.decode(json.loads(body)["jwt"], SECRET, algorithms=["HS256"], options={"verify_exp": False, "verify_nbf": False})
        self.assertEqual(claims["sub"], "@alice:example.com:DEVICE123")
        self.assertEqual(claims["video"]["room"], "krj2dgxw2K6EOm9he4GfQJ6JsSVWfJ8a7BkyjZcSmxs")
        self.assertEqual(claims["video"], grants("krj2dgxw2K6EOm9he4GfQJ6JsSVWfJ8a7BkyjZcSmxs"))
        self.assertEqual(self.rooms.created, ["krj2dgxw2K6EOm9he4GfQJ6JsSVWfJ8a7BkyjZcSmxs"])

    def test_restricted_may_not_publish(self):
        response, body = self.request(
            "POST",
            "/sfu/get",
            self.legacy(openid_token={"access_token": "remote-token", "matrix_server_name": "other.org"}),
        )
        self.assertEqual(response.code, 200)
        claims = jwt_claims(body)
        self.assertEqual(claims["sub"], "@bob:other.org:DEVICE123")
        self.assertEqual(claims["video"], grants("krj2dgxw2K6EOm9he4GfQJ6JsSVWfJ8a7BkyjZcSmxs", can_publish=False))
        self.assertEqual(self.rooms.created, [])

    def test_missing_device_gives_trailing_colon(self):
        response, body = self.request("POST", "/sfu/get", self.legacy(device_id=None))
        claims = pyjwt.decode(json.loads(body)["jwt"], SECRET, algorithms=["HS256"], options={"verify_exp": False, "verify_nbf": False})
        self.assertEqual(claims["sub"], "@alice:example.com:")

    def test_errors(self):
        response, body = self.request("POST", "/sfu/get", {})
        self.assertMatrixError(response, body, 400, "M_BAD_JSON", errors.E_ROOM)
        response, body = self.request("POST", "/sfu/get", {"room": "r"})
        self.assertMatrixError(response, body, 400, "M_BAD_JSON", errors.E_OPENID_LG)
        response, body = self.request("POST", "/sfu/get", self.legacy(openid_token={"access_token": "x", "matrix_server_name": "example.com"}))
        self.assertMatrixError(response, body, 401, "M_UNAUTHORIZED", errors.E_UNAUTH)


class DelegateTests(AppTestCase):
    def test_success_empty_object(self):
        response, body = self.request("POST", "/delegate_delayed_leave", token_body(delay_id="syd_1", delay_timeout=10000))
        self.assertEqual((response.code, body), (200, b"{}\n"))
        self.assertCORS(response)
        self.assertEqual(len(self.delegation.jobs), 1)
        self.assertEqual(self.rooms.created, [])

    def test_restricted_is_403(self):
        response, body = self.request(
            "POST",
            "/delegate_delayed_leave",
            token_body(
                openid_token={"access_token": "remote-token", "matrix_server_name": "other.org"},
                member={"claimed_user_id": "@bob:other.org"},
                delay_id="syd_1",
                delay_timeout=10000,
            ),
        )
        self.assertMatrixError(response, body, 403, "M_FORBIDDEN", errors.E_DELEG)
        self.assertEqual(self.homeservers.calls, ["other.org"])

    def test_missing_delay_400(self):
        response, body = self.request("POST", "/delegate_delayed_leave", token_body())
        self.assertMatrixError(response, body, 400, "M_BAD_JSON", errors.E_DELAY)
        self.assertEqual(self.homeservers.calls, [])


class MetadataOptInTests(AppTestCase):
    """LIVEKIT_CAN_UPDATE_OWN_METADATA=true grants canUpdateOwnMetadata on every token, nothing else."""

    config_changes = {"can_update_own_metadata": True}

    def test_full_access_and_restricted_on_both_endpoints(self):
        room = naming.room_alias("!room:example.com", "m.call#ROOM")
        legacy_room = naming.legacy_room_alias("!room:example.com")
        restricted = {"openid_token": {"access_token": "remote-token", "matrix_server_name": "other.org"}}
        cases = [
            ("/get_token", token_body(), grants(room, can_update_own_metadata=True)),
            (
                "/get_token",
                token_body(member={"claimed_user_id": "@bob:other.org"}, **restricted),
                grants(room, can_publish=False, can_update_own_metadata=True),
            ),
            (
                "/sfu/get",
                {"room": "!room:example.com", "device_id": "D", "openid_token": token_body()["openid_token"]},
                grants(legacy_room, can_update_own_metadata=True),
            ),
            (
                "/sfu/get",
                {"room": "!room:example.com", "device_id": "D", "openid_token": restricted["openid_token"]},
                grants(legacy_room, can_publish=False, can_update_own_metadata=True),
            ),
        ]
        for path, body, video in cases:
            response, answer = self.request("POST", path, body)
            self.assertEqual(response.code, 200, (path, answer))
            self.assertEqual(jwt_claims(answer)["video"], video, path)
        self.assertEqual(self.rooms.created, [room, legacy_room])


class RecordingPolicy:
    """Refuses the endpoints in ``refuse`` (with their answer); records every check."""

    def __init__(self, refuse=None):
        self.refuse = refuse or {}
        self.checked = []

    def check(self, request, endpoint):
        self.checked.append((request.method, endpoint))
        return self.refuse.get(endpoint)


class PolicyTests(AppTestCase):
    def daemon_parts(self):
        self.policy = RecordingPolicy()
        return {"policy": self.policy}

    def test_refusal_is_answered_with_cors_and_the_handler_never_runs(self):
        from rtcauthd.errors import MatrixError

        limited = MatrixError(429, "M_LIMIT_EXCEEDED", "Too many requests")
        for endpoint in ("get_token", "sfu_get", "delegate_delayed_leave"):
            self.policy.refuse[endpoint] = limited
        for path in ("/get_token", "/sfu/get", "/delegate_delayed_leave"):
            response, body = self.request("POST", path, token_body(delay_id="syd_1", delay_timeout=8000))
            self.assertMatrixError(response, body, 429, "M_LIMIT_EXCEEDED", "Too many requests")
            self.assertCORS(response)
        self.assertEqual(
            [endpoint for _method, endpoint in self.policy.checked],
            ["get_token", "sfu_get", "delegate_delayed_leave"],
        )
        self.assertEqual((self.homeservers.calls, self.rooms.created, self.delegation.jobs), ([], [], []))

    def test_raw_answer_with_headers(self):
        from rtcauthd.inbound.policy import PolicyAnswer

        self.policy.refuse["healthz"] = PolicyAnswer(503, b"later\n", ((b"Retry-After", b"2"),))
        self.policy.refuse["sfu_webhook"] = PolicyAnswer(429)
        response, body = self.request("GET", "/healthz")
        self.assertEqual((response.code, body), (503, b"later\n"))
        self.assertEqual(response.headers.getRawHeaders(b"Retry-After"), [b"2"])
        response, body = self.request("POST", "/sfu_webhook", b"{}")
        self.assertEqual((response.code, body), (429, b""))
        self.assertEqual(self.delegation.webhooks, [])

    def test_every_handler_asks_once_and_allowed_requests_are_unchanged(self):
        response, body = self.request("POST", "/get_token", token_body())
        self.assertEqual(response.code, 200)
        self.assertCORS(response)
        self.assertEqual(self.rooms.created, [naming.room_alias("!room:example.com", "m.call#ROOM")])
        self.assertEqual(self.request("GET", "/healthz")[0].code, 200)
        self.assertEqual(self.request("POST", "/sfu_webhook", b"{}")[0].code, 200)
        self.assertEqual(len(self.delegation.webhooks), 1)
        self.assertEqual(
            self.policy.checked, [(b"POST", "get_token"), (b"GET", "healthz"), (b"POST", "sfu_webhook")]
        )

    def test_method_and_size_checks_come_before_the_policy(self):
        self.assertEqual(self.request("OPTIONS", "/get_token")[0].code, 200)
        self.assertEqual(self.request("GET", "/get_token")[0].code, 405)
        response, body = self.request("POST", "/get_token", b"x" * 5000)
        self.assertMatrixError(response, body, 413, "M_TOO_LARGE", errors.E_TOO_LARGE)
        self.assertEqual(self.request("POST", "//get_token", b"{}")[0].code, 404)
        self.assertEqual(self.policy.checked, [])

    def test_asynchronous_decision(self):
        from twisted.internet.defer import Deferred

        decision = Deferred()
        self.policy.check = lambda request, endpoint: decision
        d = self.client.request("POST", "http://rtc.test/get_token", token_body())
        self.assertNoResult(d)
        self.assertEqual(self.homeservers.calls, [])
        decision.callback(None)
        self.client.flush()
        response, body = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.homeservers.calls, ["example.com"])

    def test_allow_all_is_the_default_and_lets_everything_through(self):
        from zope.interface.verify import verifyObject

        from rtcauthd.inbound.policy import AllowAll, IRequestPolicy

        self.assertTrue(verifyObject(IRequestPolicy, AllowAll()))
        # With the per-client rate limit turned off (0), nothing else stands in the way.
        unlimited = attr.evolve(self.config, ratelimit_per_second=0.0)
        self.assertIsInstance(build_test_daemon(unlimited).app._policy, AllowAll)
        self.assertIsNone(AllowAll().check(object(), "get_token"))

    def test_the_rate_limit_is_the_default_policy(self):
        from rtcauthd.inbound.ratelimit import RateLimitPolicy

        self.assertIsInstance(build_test_daemon(self.config).app._policy, RateLimitPolicy)

    def test_failing_policy_is_a_500(self):
        def broken(request, endpoint):
            raise RuntimeError("policy bug")

        self.policy.check = broken
        response, body = self.request("POST", "/get_token", token_body())
        self.assertMatrixError(response, body, 500, "M_UNKNOWN", errors.E_INTERNAL)
        self.assertCORS(response)
        response, body = self.request("GET", "/healthz")
        self.assertMatrixError(response, body, 500, "M_UNKNOWN", errors.E_INTERNAL)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertEqual(self.homeservers.calls, [])


class SiteTests(AppTestCase):
    def daemon_parts(self):
        self.policy = RecordingPolicy()
        return {"policy": self.policy}

    def test_access_log_duration_comes_from_the_clock(self):
        from twisted.internet.defer import Deferred
        from twisted.logger import Logger

        from rtcauthd.inbound import site as site_module

        events = []
        self.patch(site_module, "log", Logger(observer=events.append))
        decision = Deferred()
        self.policy.check = lambda request, endpoint: decision
        d = self.client.request("POST", "http://rtc.test/get_token", token_body())
        self.clock.advance(0.25)
        decision.callback(None)
        self.client.flush()
        self.assertEqual(self.successResultOf(d)[0].code, 200)
        [event] = [e for e in events if e.get("path") == "/get_token"]
        self.assertEqual((event["status"], event["duration_ms"]), (200, 250.0))

    def test_when_idle_fires_when_the_last_request_ends(self):
        from twisted.internet.defer import Deferred

        self.successResultOf(self.site.when_idle())  # nothing in flight: at once
        stored = Deferred()
        self.delegation.add_job = lambda job: (self.delegation.jobs.append(job), stored)[1]
        first = self.client.request("POST", "http://rtc.test/get_token", token_body(delay_id="a", delay_timeout=8000))
        second = self.client.request("GET", "http://rtc.test/healthz")
        self.successResultOf(second)
        self.assertEqual(self.site.in_flight, 1)
        idle, forgotten = self.site.when_idle(), self.site.when_idle()
        forgotten.cancel()
        self.failureResultOf(forgotten)
        self.assertNoResult(idle)
        stored.callback(None)
        self.client.flush()
        self.successResultOf(first)
        self.assertEqual(self.site.in_flight, 0)
        self.successResultOf(idle)  # without advancing the clock: no polling
