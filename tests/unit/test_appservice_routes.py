"""The AS routes end to end in memory (docs/appservice.md): gates, statuses, errcodes, texts, calls made.

A real Site serves the AS mount over the real legacy routes; the homeserver calls, the
token minter, the SFU, the delay look-up and the job sink are fakes with call logs, so
each test also proves what was (not) called.
"""

from __future__ import annotations

import json

from twisted.internet.defer import fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from rtcauthd import errors
from rtcauthd.appservice_authorizer import AppserviceAuthorizer, mxid_server_name
from rtcauthd.errors import MatrixError
from rtcauthd.inbound.appservice import AppserviceApp, appservice_resource
from rtcauthd.inbound.site import RtcAuthSite
from rtcauthd.livekit import naming
from rtcauthd.matrix.appservice import FedProxyAnswer
from rtcauthd.outbound.errors import FailureKind, OutboundError
from tests.support.daemon import SiteClient, build_test_daemon

HS_TOKEN = "hs-token-secret"
LIVEKIT_URL = "wss://sfu.example.com"
CS = "/_matrix/client/unstable/io.element.msc4195/rtc/livekit"
SS = "/_matrix/federation/unstable/io.element.msc4195/rtc/livekit"
CS_V1 = "/_matrix/client/v1/rtc/livekit"
SS_V1 = "/_matrix/federation/v1/rtc/livekit"
CORS = {
    b"Content-Type": [b"application/json"],
    b"Access-Control-Allow-Origin": [b"*"],
    b"Access-Control-Allow-Methods": [b"POST"],
    b"Access-Control-Allow-Headers": [b"Accept, Content-Type, Content-Length, Accept-Encoding, X-CSRF-Token"],
}
# protocol vectors (docs/appservice.md#identities): H(["!roomid:example.com","slot1234"]) and H(["@alice:example.com","memberABC"])
ALIAS = "O8437W3+jmzMVjoIP3tNwbm+XxHQk2iKpOA7aqw3qSc"
ALICE_IDENTITY = "M3VnsLXrkbxIDINXO64u8PZzFyD9ZYFiQULR2dshWYs"
BOB_IDENTITY = "g/+jGZ04o50vnFyXaZRVJY+9QYFlqTReInF862pteJE"


class FakeHomeserver:
    """is_joined from a table (default joined), fed_proxy from one answer; both logged."""

    def __init__(self):
        self.calls = []
        self.not_joined = set()  # subjects (mxid or server name) answered False
        self.broken = set()  # subjects whose query fails
        self.relay_answer = FedProxyAnswer(200, {"jwt": "remote-jwt"})
        self.relay_error = None

    def is_joined(self, base_url, room_id, *, mxid=None, server_name=None):
        subject = mxid if mxid is not None else server_name
        self.calls.append(("is_joined", base_url, room_id, "mxid" if mxid is not None else "server_name", subject))
        if subject in self.broken:
            return fail(OutboundError(FailureKind.HTTP_STATUS, "is_joined", "HTTP 403", status=403))
        return succeed(subject not in self.not_joined)

    def fed_proxy(self, base_url, destination, path, body):
        self.calls.append(("fed_proxy", base_url, destination, path, body))
        if self.relay_error is not None:
            return fail(self.relay_error)
        return succeed(self.relay_answer)


class FakeResolver:
    def __init__(self):
        self.resolved = []
        self.resolvable = True

    def resolve(self, server_name):
        self.resolved.append(server_name)
        if not self.resolvable:
            return fail(LookupError("no .well-known"))
        return succeed("https://matrix.example.com")


class FakeTokens:
    def __init__(self):
        self.minted = []
        self.error = None

    def participant_token(self, identity, room, *, can_publish=True, can_update_own_metadata=False):
        if self.error is not None:
            raise self.error
        self.minted.append((identity, room, can_publish, can_update_own_metadata))
        return f"jwt-for-{identity}"


class FakeRooms:
    def __init__(self):
        self.created = []
        self.error = None

    def create_room(self, room):
        self.created.append(room)
        return fail(self.error) if self.error is not None else succeed(None)


class FakeJobs:
    def __init__(self):
        self.jobs = []
        self.error = None

    def resolve_cs_api(self, server_name):  # the legacy sink's other half; the AS routes use the resolver
        raise AssertionError("not used")

    def add_job(self, job):
        if self.error is not None:
            return fail(self.error)
        self.jobs.append(job)
        return succeed(None)


class DelayUnknown(OutboundError):
    """Stands in for the delay client's "no such pending event" failure."""


class FakeDelays:
    def __init__(self):
        self.calls = []
        self.answer = 3_600_000
        self.error = None

    def lookup_delay(self, server_name, user_id, delay_id, *, room_id=None):
        self.calls.append((server_name, user_id, delay_id, room_id))
        if self.error is not None:
            return fail(self.error)
        return succeed(self.answer)


def cs_body(**changes):
    body = {"url": LIVEKIT_URL, "room_id": "!roomid:example.com", "slot_id": "slot1234", "member_id": "memberABC"}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def ss_body(**changes):
    return cs_body(**dict({"user_id": "@bob:remote.example", "member_id": "memberXYZ"}, **changes))


def dl_body(**changes):
    return cs_body(**dict({"delay_id": "syd_cs_1"}, **changes))


class Harness(SynchronousTestCase):
    can_update_own_metadata = False

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.clock.advance(1785000000)
        self.homeserver = FakeHomeserver()
        self.resolver = FakeResolver()
        self.tokens = FakeTokens()
        self.rooms = FakeRooms()
        self.jobs = FakeJobs()
        self.delays = FakeDelays()
        authorizer = AppserviceAuthorizer(
            server_name="example.com",
            livekit_url=LIVEKIT_URL,
            can_update_own_metadata=self.can_update_own_metadata,
            homeserver=self.homeserver,
            resolve_cs_api=self.resolver.resolve,
            tokens=self.tokens,
            rooms=self.rooms,
            leave_jobs=self.jobs,
            lookup_delay=self.delays.lookup_delay,
            delay_unknown=(DelayUnknown,),
            identity=lambda user_id, member_id: naming.H(user_id, member_id),
            new_job=lambda **fields: fields,
        )
        legacy = build_test_daemon(
            {"LIVEKIT_URL": LIVEKIT_URL, "LIVEKIT_KEY": "devkey", "LIVEKIT_SECRET": "s", "LIVEKIT_FULL_ACCESS_HOMESERVERS": "example.com"}, self.clock
        ).app.resource()
        self.authorizer = authorizer
        app = AppserviceApp(authorizer=authorizer, hs_token=HS_TOKEN)
        site = RtcAuthSite(appservice_resource(legacy, app), max_body=4096, reactor=self.clock, clock=self.clock)
        self.client = SiteClient(site)

    def request(self, method, path, data=b"", headers=None):
        return self.successResultOf(self.client.request(method, "http://rtc.test" + path, data, headers))

    def post(self, path, data, *, token=HS_TOKEN, user="@alice:example.com", origin=None, headers=None):
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = "Bearer " + token
        if user is not None:
            all_headers["X-Matrix-User-Identifier"] = user
        if origin is not None:
            all_headers["X-Matrix-Origin"] = origin
        return self.request("POST", path, data, all_headers)

    def post_ss(self, data, origin="remote.example", path=SS + "/get_token", **kw):
        return self.post(path, data, user=None, origin=origin, **kw)

    def assertMatrixError(self, response, body, status, errcode, message):
        self.assertEqual(response.code, status, body)
        self.assertEqual(
            json.loads(body), {"errcode": errcode, "error": message}
        )
        self.assertEqual(response.headers.getRawHeaders(b"Content-Type"), [b"application/json"])

    def assertCORS(self, response):
        for name, value in CORS.items():
            self.assertEqual(response.headers.getRawHeaders(name), value, name)

    def assertNoCORS(self, response):
        self.assertIsNone(response.headers.getRawHeaders(b"Access-Control-Allow-Origin"))

    def outbound(self):
        return self.homeserver.calls + [("resolve", s) for s in self.resolver.resolved] + self.delays.calls


class GateTests(Harness):
    ROUTES = (
        (CS + "/get_token", True),
        (CS_V1 + "/get_token", True),
        (SS + "/get_token", False),
        (SS_V1 + "/get_token", False),
        (CS + "/delegate_delayed_leave", True),
        (CS_V1 + "/delegate_delayed_leave", True),
    )

    def test_a1_methods(self):
        for path, cors in self.ROUTES:
            response, body = self.request("OPTIONS", path)
            self.assertEqual((response.code, body), (200, b""), path)
            (self.assertCORS if cors else self.assertNoCORS)(response)
            for method in ("GET", "PUT", "DELETE", "PATCH", "HEAD"):
                response, body = self.request(method, path, headers={"Authorization": "Bearer " + HS_TOKEN})
                self.assertEqual((response.code, body), (405, b""), (path, method))
                (self.assertCORS if cors else self.assertNoCORS)(response)
        self.assertEqual(self.outbound(), [])

    def test_a2_missing_token(self):
        for path, cors in self.ROUTES:
            for auth in (None, "", "Bearer", "Bearer ", "bearer " + HS_TOKEN, "Basic " + HS_TOKEN, "Bearer\t" + HS_TOKEN):
                headers = {"X-Matrix-User-Identifier": "@alice:example.com", "X-Matrix-Origin": "remote.example"}
                if auth is not None:
                    headers["Authorization"] = auth
                response, body = self.request("POST", path, b"{not json", headers)
                self.assertMatrixError(response, body, 401, "M_MISSING_TOKEN", "Missing homeserver access token")
                if cors:
                    self.assertCORS(response)
                else:
                    self.assertNoCORS(response)
        self.assertEqual(self.outbound(), [])

    def test_a2_not_visible_ascii_is_missing(self):
        response, body = self.request(
            "POST", CS + "/get_token", b"{}", {"Authorization": ("Bearer " + HS_TOKEN + "\x7f").encode("latin-1")}
        )
        self.assertMatrixError(response, body, 401, "M_MISSING_TOKEN", errors.E7_HS_MISSING)

    def test_a2_wrong_token(self):
        for path, _cors in self.ROUTES:
            for token in ("wrong", HS_TOKEN + "x", HS_TOKEN[:-1], HS_TOKEN.upper()):
                response, body = self.post(path, b"{not json", token=token)
                self.assertMatrixError(response, body, 401, "M_UNKNOWN_TOKEN", "Unrecognised homeserver access token")

    def test_a2_no_query_parameter_token(self):
        response, body = self.request("POST", CS + "/get_token?access_token=" + HS_TOKEN, cs_body())
        self.assertEqual(response.code, 401)

    def test_a2_uses_constant_time_compare(self):
        import hmac

        from rtcauthd.inbound import appservice

        seen = []
        real = hmac.compare_digest
        self.patch(appservice.hmac, "compare_digest", lambda a, b: seen.append((a, b)) or real(a, b))
        self.post(CS + "/get_token", cs_body(), token="guess")
        self.assertEqual(seen, [(b"guess", HS_TOKEN.encode())])

    def test_a3_not_json(self):
        for path, _cors in self.ROUTES:
            for data in (b"{nope", b"", b"[1]", b'"x"', json.dumps(dict(cs_body(), extra=1)).encode(), b'{"url": 1}'):
                response, body = self.post(path, data, user=None)  # A3 before A5
                self.assertMatrixError(response, body, 400, "M_NOT_JSON", "Error reading request")
        self.assertEqual(self.outbound(), [])

    def test_a3_body_too_large(self):
        response, body = self.post(CS + "/get_token", cs_body(room_id="!" + "x" * 5000))
        self.assertMatrixError(response, body, 400, "M_NOT_JSON", errors.E_NOTJSON)
        response, body = self.post(CS + "/get_token", cs_body(room_id="!" + "x" * 5000), token="wrong")
        self.assertEqual(response.code, 401)

    def test_a4_validation(self):
        for field in ("url", "room_id", "slot_id", "member_id"):
            for value in ("", None):
                response, body = self.post(CS + "/get_token", cs_body(**{field: value}), user=None)
                self.assertMatrixError(response, body, 400, "M_BAD_JSON", errors.E7V_CS)
        for field in ("url", "user_id", "room_id", "slot_id", "member_id"):
            response, body = self.post_ss(ss_body(**{field: ""}), origin=None)
            self.assertMatrixError(response, body, 400, "M_BAD_JSON", errors.E7V_SS)
        for field in ("url", "room_id", "slot_id", "member_id", "delay_id"):
            response, body = self.post(CS + "/delegate_delayed_leave", dl_body(**{field: ""}), user=None)
            self.assertMatrixError(response, body, 400, "M_BAD_JSON", errors.E7V_DL)
        self.assertEqual(self.outbound(), [])

    def test_a4_member_object(self):
        body = cs_body(member_id=None, member={"id": "memberABC", "claimed_device_id": "DEV", "claimed_user_id": "@eve:evil"})
        response, answer = self.post(CS + "/get_token", body)
        self.assertEqual((response.code, json.loads(answer)), (200, {"jwt": "jwt-for-" + ALICE_IDENTITY}))
        body = cs_body(member={"id": "memberABC"})
        self.assertEqual(self.post(CS + "/get_token", body)[0].code, 200)
        response, answer = self.post(CS + "/get_token", cs_body(member={"id": "other"}))
        self.assertMatrixError(response, answer, 400, "M_BAD_JSON", errors.E7V_MEMBER_MISMATCH)
        response, answer = self.post(CS + "/get_token", cs_body(member_id=None, member={"claimed_device_id": "D"}))
        self.assertMatrixError(response, answer, 400, "M_BAD_JSON", errors.E7V_CS)
        response, answer = self.post(CS + "/get_token", cs_body(member={"id": "memberABC", "claimed_device_id": 5}))
        self.assertMatrixError(response, answer, 400, "M_NOT_JSON", errors.E_NOTJSON)

    def test_a5_identity_header(self):
        for path, cors in self.ROUTES:
            federation = path.startswith("/_matrix/federation")
            body = ss_body() if federation else dl_body() if "delegate" in path else cs_body()
            for value in (None, "", "\x80@alice:example.com"):
                headers = {"Authorization": "Bearer " + HS_TOKEN}
                if value is not None:
                    headers["X-Matrix-Origin" if federation else "X-Matrix-User-Identifier"] = value.encode("latin-1")
                # the other route kind's header does not count
                headers["X-Matrix-User-Identifier" if federation else "X-Matrix-Origin"] = "example.com"
                response, answer = self.request("POST", path, body, headers)
                message = errors.E7_NO_ORIGIN if federation else errors.E7_NO_USER
                self.assertMatrixError(response, answer, 401, "M_UNAUTHORIZED", message)
                (self.assertCORS if cors else self.assertNoCORS)(response)
        self.assertEqual(self.outbound(), [])

    def test_delegation_probe_is_not_404(self):
        """Element Call's empty, unauthenticated probe (docs/appservice.md#delegation-probe)."""
        for path in (CS + "/delegate_delayed_leave", CS_V1 + "/delegate_delayed_leave"):
            response, body = self.request("POST", path)
            self.assertMatrixError(response, body, 401, "M_MISSING_TOKEN", errors.E7_HS_MISSING)
            self.assertCORS(response)

    def test_paths_are_exact(self):
        for path in (
            CS + "/get_token/",
            "/_matrix/client/unstable/io.element.msc4195/rtc/livekit//get_token",
            "/_matrix/client/v3/rtc/livekit/get_token",
            "/_matrix/client/unstable/org.example/rtc/livekit/get_token",
            SS + "/delegate_delayed_leave",
            "/_matrix/app/v1/pings",
            "/_matrix/app/v1/transactions/",
            "/_matrix/",
        ):
            response, body = self.post(path, cs_body())
            self.assertEqual((response.code, body), (404, b"404 page not found\n"), path)

    def test_legacy_routes_still_served(self):
        response, body = self.request("GET", "/healthz")
        self.assertEqual((response.code, body), (200, b""))
        response, body = self.request("POST", "/get_token", b"{nope")
        self.assertEqual(json.loads(body)["errcode"], "M_NOT_JSON")
        self.assertCORS(response)
        response, _ = self.request("POST", "/nope")
        self.assertEqual(response.code, 404)

    def test_secrets_never_logged(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.homeserver.broken.add("@alice:example.com")
        self.post(CS + "/get_token", cs_body())
        self.post(CS + "/get_token", cs_body(), token="wrong-guess")
        self.resolver.resolvable = False
        self.post(CS + "/delegate_delayed_leave", dl_body())
        text = " ".join(formatEvent(e) + repr(e) for e in events)
        self.assertNotIn(HS_TOKEN, text)
        self.assertNotIn("wrong-guess", text)


class PingAndTransactionTests(Harness):
    def test_ping_any_method(self):
        for method in ("POST", "GET", "PUT", "DELETE"):
            response, body = self.request(method, "/_matrix/app/v1/ping", b'{"transaction_id": null}', {"Authorization": "Bearer " + HS_TOKEN})
            self.assertEqual((response.code, json.loads(body)), (200, {}), method)
            self.assertEqual(response.headers.getRawHeaders(b"Content-Type"), [b"application/json"])
            self.assertNoCORS(response)
        response, body = self.request("POST", "/_matrix/app/v1/ping", b"not json at all", {"Authorization": "Bearer " + HS_TOKEN})
        self.assertEqual(response.code, 200)

    def test_ping_needs_the_hs_token(self):
        response, body = self.request("POST", "/_matrix/app/v1/ping", b"{}")
        self.assertMatrixError(response, body, 401, "M_MISSING_TOKEN", errors.E7_HS_MISSING)
        self.assertNoCORS(response)
        response, body = self.request("GET", "/_matrix/app/v1/ping", b"", {"Authorization": "Bearer nope"})
        self.assertMatrixError(response, body, 401, "M_UNKNOWN_TOKEN", errors.E7_HS_WRONG)

    def test_transactions_acknowledged(self):
        txn = {"events": [{"type": "m.room.message", "content": {}}], "ephemeral": []}
        response, body = self.request("PUT", "/_matrix/app/v1/transactions/42", txn, {"Authorization": "Bearer " + HS_TOKEN})
        self.assertEqual((response.code, json.loads(body)), (200, {}))
        response, body = self.request("PUT", "/_matrix/app/v1/transactions/43", txn)
        self.assertMatrixError(response, body, 401, "M_MISSING_TOKEN", errors.E7_HS_MISSING)
        response, body = self.request("PUT", "/_matrix/app/v1/transactions/43", txn, {"Authorization": "Bearer x"})
        self.assertMatrixError(response, body, 401, "M_UNKNOWN_TOKEN", errors.E7_HS_WRONG)
        response, body = self.request("POST", "/_matrix/app/v1/transactions/42", txn, {"Authorization": "Bearer " + HS_TOKEN})
        self.assertEqual((response.code, body), (405, b""))
        self.assertEqual(self.outbound(), [])


class ClientTokenTests(Harness):
    def test_local_success(self):
        for path in (CS + "/get_token", CS_V1 + "/get_token"):
            self.homeserver.calls.clear()
            response, body = self.post(path, cs_body())
            self.assertEqual(response.code, 200, body)
            self.assertEqual(json.loads(body), {"jwt": "jwt-for-" + ALICE_IDENTITY})  # no "url"
            self.assertCORS(response)
            self.assertEqual(
                self.homeserver.calls,
                [("is_joined", "https://matrix.example.com", "!roomid:example.com", "mxid", "@alice:example.com")],
            )
        self.assertEqual(self.tokens.minted[-1], (ALICE_IDENTITY, ALIAS, True, False))
        self.assertEqual(self.rooms.created, [ALIAS, ALIAS])
        self.assertEqual(self.resolver.resolved, ["example.com", "example.com"])

    def test_own_server_name_is_local(self):
        response, body = self.post(CS + "/get_token", cs_body(server_name="example.com"))
        self.assertEqual(response.code, 200, body)
        self.assertEqual([c[0] for c in self.homeserver.calls], ["is_joined"])
        self.assertEqual(self.rooms.created, [ALIAS])

    def test_server_name_compared_exactly(self):
        self.post(CS + "/get_token", cs_body(server_name="EXAMPLE.com"))
        self.assertEqual(self.homeserver.calls[-1][0], "fed_proxy")

    def test_c2_url_mismatch(self):
        for url in ("wss://sfu.example.com/", "WSS://sfu.example.com", "wss://other"):
            response, body = self.post(CS + "/get_token", cs_body(url=url))
            self.assertMatrixError(response, body, 400, "M_INVALID_PARAM", errors.E7_URL)
            self.assertCORS(response)
        self.assertEqual(self.outbound(), [])

    def test_c3_bad_mxid(self):
        for mxid in ("alice", "@alice", "@:example.com", "@alice:", "alice:example.com"):
            response, body = self.post(CS + "/get_token", cs_body(), user=mxid)
            self.assertMatrixError(response, body, 400, "M_INVALID_PARAM", errors.E7_BAD_MXID)
        self.assertEqual(self.outbound(), [])
        self.assertEqual(mxid_server_name("@a:b:8448"), "b:8448")

    def test_c4_unresolvable(self):
        self.resolver.resolvable = False
        response, body = self.post(CS + "/get_token", cs_body())
        self.assertMatrixError(response, body, 400, "M_BAD_JSON", errors.E_CSAPI)
        self.assertEqual(self.homeserver.calls, [])

    def test_c5_not_a_member(self):
        self.homeserver.not_joined.add("@alice:example.com")
        for server_name in ("", "remote.example"):
            response, body = self.post(CS + "/get_token", cs_body(server_name=server_name))
            self.assertMatrixError(response, body, 403, "M_FORBIDDEN", errors.E7_NOT_MEMBER)
        self.assertEqual([c[0] for c in self.homeserver.calls], ["is_joined", "is_joined"])
        self.assertEqual((self.tokens.minted, self.rooms.created), ([], []))

    def test_c5_membership_unknown(self):
        self.homeserver.broken.add("@alice:example.com")
        response, body = self.post(CS + "/get_token", cs_body())
        self.assertMatrixError(response, body, 502, "M_UNKNOWN", errors.E7_MEMBERSHIP)
        self.assertEqual(self.rooms.created, [])

    def test_c6_signing_and_create_room_failures(self):
        self.tokens.error = ValueError("no key")
        response, body = self.post(CS + "/get_token", cs_body())
        self.assertMatrixError(response, body, 500, "M_UNKNOWN", errors.E_INTERNAL)
        self.assertEqual(self.rooms.created, [])
        self.flushLoggedErrors(ValueError)
        self.tokens.error = None
        self.rooms.error = OutboundError(FailureKind.CONNECT, "CreateRoom", "refused")
        response, body = self.post(CS + "/get_token", cs_body())
        self.assertMatrixError(response, body, 500, "M_UNKNOWN", errors.E_CREATE)

    def test_remote_relay(self):
        response, body = self.post(CS + "/get_token", cs_body(url="wss://sfu.remote.example", server_name="remote.example"))
        self.assertEqual((response.code, json.loads(body)), (200, {"jwt": "remote-jwt"}))
        self.assertCORS(response)
        self.assertEqual(
            self.homeserver.calls,
            [
                ("is_joined", "https://matrix.example.com", "!roomid:example.com", "mxid", "@alice:example.com"),
                ("is_joined", "https://matrix.example.com", "!roomid:example.com", "server_name", "remote.example"),
                (
                    "fed_proxy",
                    "https://matrix.example.com",
                    "remote.example",
                    "/_matrix/federation/unstable/io.element.msc4195/rtc/livekit/get_token",
                    {
                        "user_id": "@alice:example.com",
                        "url": "wss://sfu.remote.example",
                        "room_id": "!roomid:example.com",
                        "slot_id": "slot1234",
                        "member_id": "memberABC",
                    },
                ),
            ],
        )
        self.assertEqual((self.tokens.minted, self.rooms.created), ([], []))
        self.assertEqual(self.resolver.resolved, ["example.com"])  # never the remote's API

    def test_c7_target_not_joined(self):
        self.homeserver.not_joined.add("remote.example")
        response, body = self.post(CS + "/get_token", cs_body(server_name="remote.example"))
        self.assertMatrixError(response, body, 403, "M_FORBIDDEN", errors.E7_TARGET_NJ)
        self.homeserver.broken.add("remote.example")
        response, body = self.post(CS + "/get_token", cs_body(server_name="remote.example"))
        self.assertMatrixError(response, body, 502, "M_UNKNOWN", errors.E7_MEMBERSHIP)
        self.assertNotIn("fed_proxy", [c[0] for c in self.homeserver.calls])

    def test_c8_error_mapping(self):
        other = (502, "M_UNKNOWN", errors.E7_REMOTE_OTHER)
        cases = [
            (FedProxyAnswer(200, {"jwt": ""}), other),
            (FedProxyAnswer(200, {"jwt": 5}), other),
            (FedProxyAnswer(200, None), other),
            (FedProxyAnswer(200, ["jwt"]), other),
            (FedProxyAnswer(201, {"token": "x"}), other),
            (FedProxyAnswer(403, {"errcode": "M_FORBIDDEN", "error": "remote says no"}), (403, "M_FORBIDDEN", errors.E7_REMOTE_403)),
            (FedProxyAnswer(403, {"errcode": "M_UNKNOWN"}), other),
            (FedProxyAnswer(403, None), other),
            (FedProxyAnswer(400, {"errcode": "M_INVALID_PARAM", "error": "bad url"}), (400, "M_INVALID_PARAM", errors.E7_REMOTE_400)),
            (FedProxyAnswer(400, {"errcode": "M_BAD_JSON"}), other),
            (FedProxyAnswer(404, {"errcode": "M_UNRECOGNIZED"}), other),
            (FedProxyAnswer(500, {"errcode": "M_UNKNOWN"}), other),
            (FedProxyAnswer(401, {"errcode": "M_FORBIDDEN"}), other),
        ]
        for answer, expected in cases:
            self.homeserver.relay_answer = answer
            response, body = self.post(CS + "/get_token", cs_body(server_name="remote.example"))
            self.assertMatrixError(response, body, *expected)
        self.homeserver.relay_error = OutboundError(FailureKind.HTTP_STATUS, "fed_proxy", "HTTP 502", status=502)
        response, body = self.post(CS + "/get_token", cs_body(server_name="remote.example"))
        self.assertMatrixError(response, body, *other)
        self.homeserver.relay_error = OutboundError(FailureKind.TIMEOUT, "fed_proxy", "no answer")
        response, body = self.post(CS + "/get_token", cs_body(server_name="remote.example"))
        self.assertMatrixError(response, body, *other)


class OwnMetadataTests(Harness):
    can_update_own_metadata = True

    def test_flag_reaches_every_token(self):
        self.post(CS + "/get_token", cs_body())
        self.post_ss(ss_body())
        self.assertEqual([m[2:] for m in self.tokens.minted], [(True, True), (False, True)])


class ServerTokenTests(Harness):
    def test_success(self):
        for path in (SS + "/get_token", SS_V1 + "/get_token"):
            self.homeserver.calls.clear()
            response, body = self.post_ss(ss_body(), path=path)
            self.assertEqual((response.code, json.loads(body)), (200, {"jwt": "jwt-for-" + BOB_IDENTITY}))
            self.assertNoCORS(response)
            self.assertEqual(
                self.homeserver.calls,
                [
                    ("is_joined", "https://matrix.example.com", "!roomid:example.com", "server_name", "example.com"),
                    ("is_joined", "https://matrix.example.com", "!roomid:example.com", "mxid", "@bob:remote.example"),
                ],
            )
        self.assertEqual(self.tokens.minted[-1], (BOB_IDENTITY, ALIAS, False, False))
        self.assertEqual(self.rooms.created, [ALIAS, ALIAS])  # #228: created for remote users too

    def test_s2_bad_user_id(self):
        response, body = self.post_ss(ss_body(user_id="bob"))
        self.assertMatrixError(response, body, 400, "M_INVALID_PARAM", errors.E7_BAD_MXID)
        self.assertNoCORS(response)

    def test_s3_foreign_user(self):
        for origin in ("other.example", "REMOTE.example", "remote.example:8448"):
            response, body = self.post_ss(ss_body(), origin=origin)
            self.assertMatrixError(response, body, 403, "M_FORBIDDEN", errors.E7_FOREIGN_USER)
        self.assertEqual(self.outbound(), [])

    def test_s4_unresolvable(self):
        self.resolver.resolvable = False
        response, body = self.post_ss(ss_body())
        self.assertMatrixError(response, body, 400, "M_BAD_JSON", errors.E_CSAPI)

    def test_s5_this_server_not_joined(self):
        self.homeserver.not_joined.add("example.com")
        response, body = self.post_ss(ss_body())
        self.assertMatrixError(response, body, 403, "M_FORBIDDEN", errors.E7_SELF_NJ)
        self.assertEqual(len(self.homeserver.calls), 1)
        self.homeserver.broken.add("example.com")
        response, body = self.post_ss(ss_body())
        self.assertMatrixError(response, body, 502, "M_UNKNOWN", errors.E7_MEMBERSHIP)

    def test_s6_user_not_joined(self):
        self.homeserver.not_joined.add("@bob:remote.example")
        response, body = self.post_ss(ss_body())
        self.assertMatrixError(response, body, 403, "M_FORBIDDEN", errors.E7_NOT_MEMBER)
        self.homeserver.broken.add("@bob:remote.example")
        response, body = self.post_ss(ss_body())
        self.assertMatrixError(response, body, 502, "M_UNKNOWN", errors.E7_MEMBERSHIP)
        self.assertEqual((self.tokens.minted, self.rooms.created), ([], []))

    def test_s7_url_checked_after_membership(self):
        response, body = self.post_ss(ss_body(url="wss://elsewhere"))
        self.assertMatrixError(response, body, 400, "M_INVALID_PARAM", errors.E7_URL)
        self.assertEqual(len(self.homeserver.calls), 2)
        self.homeserver.not_joined.add("@bob:remote.example")
        response, body = self.post_ss(ss_body(url="wss://elsewhere"))
        self.assertEqual(response.code, 403)

    def test_s8_create_room_failure(self):
        self.rooms.error = RuntimeError("twirp down")
        response, body = self.post_ss(ss_body())
        self.assertMatrixError(response, body, 500, "M_UNKNOWN", errors.E_CREATE)


class DelegationTests(Harness):
    def test_success(self):
        for path in (CS + "/delegate_delayed_leave", CS_V1 + "/delegate_delayed_leave"):
            self.jobs.jobs.clear()
            response, body = self.post(path, dl_body(delay_timeout=5))  # delay_timeout is ignored
            self.assertEqual((response.code, json.loads(body)), (200, {}))
            self.assertCORS(response)
            self.assertEqual(
                self.jobs.jobs,
                [
                    {
                        "delay_id": "syd_cs_1",
                        "delay_timeout_ns": 3_600_000 * 1_000_000,
                        "server_name": "example.com",
                        "room": ALIAS,
                        "identity": ALICE_IDENTITY,
                        "owner_user_id": "@alice:example.com",
                    }
                ],
            )
        self.assertEqual(self.delays.calls[-1], ("example.com", "@alice:example.com", "syd_cs_1", "!roomid:example.com"))
        self.assertEqual(self.homeserver.calls, [])  # no membership check, no token, no room
        self.assertEqual((self.tokens.minted, self.rooms.created), ([], []))

    def test_no_mxid_shape_check(self):
        response, _ = self.post(CS + "/delegate_delayed_leave", dl_body(), user="not-an-mxid")
        self.assertEqual(response.code, 200)

    def test_d2_url_mismatch(self):
        response, body = self.post(CS + "/delegate_delayed_leave", dl_body(url="wss://elsewhere"))
        self.assertMatrixError(response, body, 400, "M_INVALID_PARAM", errors.E7_URL)
        self.assertEqual(self.outbound(), [])

    def test_d3_unresolvable(self):
        self.resolver.resolvable = False
        response, body = self.post(CS + "/delegate_delayed_leave", dl_body())
        self.assertMatrixError(response, body, 400, "M_BAD_JSON", errors.E_CSAPI)
        self.assertEqual(self.delays.calls, [])

    def test_d4_unknown_delay(self):
        for answer in (0, -5, None):
            self.delays.answer = answer
            response, body = self.post(CS + "/delegate_delayed_leave", dl_body())
            self.assertMatrixError(response, body, 400, "M_INVALID_PARAM", errors.E7_DELAY_UNKNOWN)
        self.delays.error = OutboundError(FailureKind.HTTP_STATUS, "delay look-up", "HTTP 404", status=404, code="M_NOT_FOUND")
        response, body = self.post(CS + "/delegate_delayed_leave", dl_body())
        self.assertMatrixError(response, body, 400, "M_INVALID_PARAM", errors.E7_DELAY_UNKNOWN)
        # another room, no positive delay: the look-up's own "unknown" failure, whatever its status
        self.delays.error = DelayUnknown(FailureKind.INVALID, "delay look-up", "another room", status=200)
        response, body = self.post(CS + "/delegate_delayed_leave", dl_body())
        self.assertMatrixError(response, body, 400, "M_INVALID_PARAM", errors.E7_DELAY_UNKNOWN)
        self.assertEqual(self.jobs.jobs, [])

    def test_d4_lookup_failure(self):
        for error in (
            OutboundError(FailureKind.HTTP_STATUS, "delay look-up", "HTTP 429", status=429),
            OutboundError(FailureKind.HTTP_STATUS, "delay look-up", "HTTP 500", status=500),
            OutboundError(FailureKind.TIMEOUT, "delay look-up", "no answer"),
            OutboundError(FailureKind.BAD_BODY, "delay look-up", "not JSON"),
        ):
            self.delays.error = error
            response, body = self.post(CS + "/delegate_delayed_leave", dl_body())
            self.assertMatrixError(response, body, 503, "M_UNKNOWN", errors.E7_DELAY_LOOKUP)
            self.assertCORS(response)
        self.assertEqual(self.jobs.jobs, [])

    def test_d5_job_errors_pass_through(self):
        self.jobs.error = MatrixError(503, errors.M_UNKNOWN, errors.E_SHUTDOWN)
        response, body = self.post(CS + "/delegate_delayed_leave", dl_body())
        self.assertMatrixError(response, body, 503, "M_UNKNOWN", errors.E_SHUTDOWN)
        self.jobs.error = errors.bad_json("invalid delay timeout for delayed event job: 0s")
        response, body = self.post(CS + "/delegate_delayed_leave", dl_body())
        self.assertMatrixError(response, body, 400, "M_BAD_JSON", "invalid delay timeout for delayed event job: 0s")


class WiringTests(SynchronousTestCase):
    def test_defaults_are_the_shared_names(self):
        """With the other parts of the v0.7 work merged, the defaults build what the routes need."""
        from rtcauthd.matrix import csapi
        from rtcauthd.appservice_authorizer import _default_delay_unknown, _default_identity, _default_job

        self.assertEqual(_default_delay_unknown(), (csapi.DelayedEventUnknown,))

        self.assertEqual(_default_identity("@alice:example.com", "memberABC"), ALICE_IDENTITY)
        job = _default_job(
            delay_id="d", delay_timeout_ns=1, server_name="example.com", room=ALIAS, identity=ALICE_IDENTITY,
            owner_user_id="@alice:example.com",
        )
        self.assertEqual(job.owner_user_id, "@alice:example.com")


    def test_build_daemon_mounts_the_routes_only_in_appservice_mode(self):
        from twisted.internet.testing import MemoryReactorClock

        from tests.support.daemon import SiteClient, build_test_daemon

        env = {
            "LIVEKIT_URL": "wss://sfu.example.com",
            "LIVEKIT_KEY": "devkey",
            "LIVEKIT_SECRET": "secret-secret-secret-secret-secret",
            "LIVEKIT_FULL_ACCESS_HOMESERVERS": "example.com",
        }
        as_env = dict(env, LIVEKIT_AS_TOKEN="as-token-123456", LIVEKIT_HS_TOKEN="hs-token-123456",
                      LIVEKIT_HS_SERVER_NAME="example.com")
        headers = {"Authorization": ["Bearer hs-token-123456"], "Content-Type": ["application/json"]}
        for environment, mounted in ((env, False), (as_env, True)):
            daemon = build_test_daemon(environment, MemoryReactorClock())
            self.assertEqual(daemon.appservice is not None, mounted)
            client = SiteClient(daemon.site)
            response, body = self.successResultOf(
                client.request("POST", "http://localhost/_matrix/app/v1/ping", b"{}", headers=headers)
            )
            self.assertEqual(response.code, 200 if mounted else 404, body)
            response, _ = self.successResultOf(client.request("GET", "http://localhost/healthz"))
            self.assertEqual(response.code, 200)  # the legacy routes stay


class BuiltAppTests(SynchronousTestCase):
    """build_appservice_app: the three modules together, with the real homeserver client."""

    def test_local_token_through_the_real_homeserver_client(self):
        from types import SimpleNamespace

        from treq.testing import RequestTraversalAgent

        from rtcauthd.inbound.appservice import build_appservice_app
        from rtcauthd.outbound.client import HTTPClient
        from tests.unit.test_appservice_homeserver import FakeHomeserver as FakeHomeserverResource

        if not hasattr(naming, "appservice_identity"):  # until the tokens work is merged
            naming.appservice_identity = lambda user_id, member_id: naming.H(user_id, member_id)
            self.addCleanup(delattr, naming, "appservice_identity")
        clock = MemoryReactorClock()
        server = FakeHomeserverResource()
        agent = RequestTraversalAgent(server)
        config = SimpleNamespace(
            as_token="the-as-token",
            hs_token=HS_TOKEN,
            hs_server_name="example.com",
            livekit_url=LIVEKIT_URL,
            can_update_own_metadata=False,
            ratelimit_per_second=5.0,
            ratelimit_burst=50,
        )
        tokens, rooms = FakeTokens(), FakeRooms()
        app = build_appservice_app(
            config=config,
            clock=clock,
            http=HTTPClient(clock=clock, agent=agent),
            resolve_cs_api=lambda name: succeed("https://hs.example.com/"),
            tokens=tokens,
            rooms=rooms,
            leave_jobs=FakeJobs(),
            lookup_delay=FakeDelays().lookup_delay,
        )
        self.assertNotIn(HS_TOKEN, repr(app))
        site = RtcAuthSite(appservice_resource(Resource(), app), max_body=4096, reactor=clock, clock=clock)
        client = SiteClient(site)
        d = client.request(
            "POST",
            "http://rtc.test" + CS + "/get_token",
            cs_body(),
            {"Authorization": "Bearer " + HS_TOKEN, "X-Matrix-User-Identifier": "@alice:example.com"},
        )
        agent.flush()
        client.flush()
        agent.flush()
        client.flush()
        response, body = self.successResultOf(d)
        self.assertEqual(response.code, 200, body)
        self.assertEqual(rooms.created, [ALIAS])
        self.assertEqual(tokens.minted, [(ALICE_IDENTITY, ALIAS, True, False)])
        self.assertEqual(
            [(uri, auth) for _m, uri, auth, _b in server.seen],
            [
                (b"/_matrix/client/versions", None),
                (
                    b"/_matrix/client/unstable/io.element.msc4502/rooms/!roomid:example.com/is_joined?mxid=%40alice%3Aexample.com",
                    b"Bearer the-as-token",
                ),
            ],
        )


class PerUserRateLimitTests(Harness):
    """The AS routes are limited per Matrix user (issue 12), after the hs_token and identity gates."""

    def test_a_user_over_the_limit_gets_429_with_cors_another_user_does_not(self):
        from rtcauthd.inbound.ratelimit import TokenBuckets

        app = AppserviceApp(authorizer=self.authorizer, hs_token=HS_TOKEN, limits=TokenBuckets(self.clock, rate=1.0, burst=2))
        site = RtcAuthSite(app.resource(), max_body=4096, reactor=self.clock, clock=self.clock)
        self.client = SiteClient(site)
        codes = [self.post(CS + "/get_token", cs_body())[0].code for _ in range(2)]
        self.assertEqual(codes, [200, 200])
        response, body = self.post(CS + "/get_token", cs_body())
        self.assertEqual(response.code, 429)
        self.assertEqual(json.loads(body), {"errcode": "M_LIMIT_EXCEEDED", "error": "Too many requests", "retry_after_ms": 1000})
        self.assertEqual(response.headers.getRawHeaders(b"Retry-After"), [b"1"])
        self.assertEqual(response.headers.getRawHeaders(b"Access-Control-Allow-Origin"), [b"*"])
        response, _ = self.post(CS + "/get_token", cs_body(), user="@bob:example.com")
        self.assertNotEqual(response.code, 429)
        response, body = self.post(CS + "/get_token", cs_body(), token="wrong")  # the hs_token gate comes first
        self.assertNotEqual(response.code, 429)
