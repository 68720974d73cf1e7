"""Black-box tests of application-service mode (docs/appservice.md, docs/appservice-synapse.md).

The real daemon runs with the AS settings; the fake homeserver plays Synapse on both sides:
it calls the MSC4195 routes the way Synapse's proxy does (``Authorization: Bearer
<hs_token>`` and the caller in ``X-Matrix-User-Identifier`` / ``X-Matrix-Origin``), and it
answers the as_token calls the daemon makes back (``/versions``, MSC4502 ``is_joined``,
MSC4512 ``fed_proxy``, the MSC4140 look-up and management calls), recording what it got.
Expected identities, aliases and claims are computed here, independently of rtcauthd.
"""

from __future__ import annotations

import json
import time

from twisted.internet import defer
from twisted.internet import reactor as global_reactor
from twisted.trial import unittest

from tests.blackbox.fake_homeserver import Answer
from tests.blackbox.harness import BlackBoxCase, lk_hash, matrix_error_body, poll_until
from tests.blackbox.test_delegated_leave import (
    JOBS_KEY,
    job_field,
    job_value,
    sign_webhook,
    webhook_body,
)
from tests.blackbox.test_token_service import TokenAssertions, get_token_body

AS_TOKEN = "as-token-blackbox-0123456789"
HS_TOKEN = "hs-token-blackbox-9876543210"
ROOM_ID = "!room:example.com"
SLOT_ID = "m.call#ROOM"
MEMBER_ID = "memberABC"
REMOTE = "remote.example"

CS = "/_matrix/client/unstable/io.element.msc4195/rtc/livekit"
SS = "/_matrix/federation/unstable/io.element.msc4195/rtc/livekit"
SS_STABLE = "/_matrix/federation/v1/rtc/livekit"
STABLE_FED_PROXY = "/_matrix/client/v1/appservice/fed_proxy"
CS_STABLE = "/_matrix/client/v1/rtc/livekit"
PING = "/_matrix/app/v1/ping"
UNSTABLE_IS_JOINED = "/_matrix/client/unstable/io.element.msc4502/rooms/"
STABLE_IS_JOINED = "/_matrix/client/v3/rooms/"
UNSTABLE_FED_PROXY = "/_matrix/client/unstable/io.element.msc4512/appservice/fed_proxy"
UNSTABLE_DELAYED = "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/"
STABLE_DELAYED = "/_matrix/client/v1/delayed_events/"

#: The error texts of the AS routes, as the spec words them.
E_HS_MISSING = "Missing homeserver access token"
E_HS_WRONG = "Unrecognised homeserver access token"
E_NO_USER = "Missing request authorization"
E_NO_ORIGIN = "Missing request origin"
E_URL = "The request `url` does not match this service's LiveKit URL"
E_NOT_MEMBER = "The requesting user is not a member of the room"
E_TARGET_NJ = "The target server is not joined to the room"
E_SELF_NJ = "This server is not joined to the room"
E_FOREIGN_USER = "The user_id does not belong to the origin server"
E_REMOTE_403 = "The requesting user is not a member of the room on the destination homeserver"
E_REMOTE_400 = "The destination homeserver rejected the specified `url`"
E_REMOTE_OTHER = "Unable to reach the specified homeserver"
E_DELAY_UNKNOWN = "Unknown `delay_id`"

EFFECT_DEADLINE = 8.0


class AppserviceCase(BlackBoxCase, TokenAssertions):
    """A fake homeserver (our own, reached via LIVEKIT_CS_API_URL_OVERRIDES), a fake SFU and a
    redis-server (created, not started) per test; ``start`` runs the daemon in AS mode."""

    def setUp(self):
        BlackBoxCase.setUp(self)
        self.hs = self.make_homeserver()
        self.hs.as_token = AS_TOKEN
        self.lk = self.make_livekit()
        self.redis = self.make_redis()
        self.daemon = None

    def as_env(self, **extra: str) -> dict[str, str]:
        env = self.service_env(
            livekit_url=self.lk.url,
            full_access=self.hs.server_name,
            LIVEKIT_CS_API_URL_OVERRIDES=f"{self.hs.server_name}={self.hs.client_api_url}",
            LIVEKIT_AS_TOKEN=AS_TOKEN,
            LIVEKIT_HS_TOKEN=HS_TOKEN,
            LIVEKIT_HS_SERVER_NAME=self.hs.server_name,
            LIVEKIT_LOG_LEVEL="debug",
        )
        env.update(extra)
        return env

    @defer.inlineCallbacks
    def start(self, *, redis: bool = False, **extra: str):
        if redis:
            yield self.redis.start()
            extra.setdefault("LIVEKIT_REDIS_URL", f"{self.redis.url}/0")
        self.daemon = yield self.start_daemon(self.as_env(**extra))
        return self.daemon

    def user(self, name: str) -> str:
        return f"@{name}:{self.hs.server_name}"

    # -- Synapse's side of the proxy ---------------------------------------------------------

    def proxied(self, path: str, body, *, identity: str | None = None, origin: str | None = None,
                token: str | None = HS_TOKEN, method: str = "POST"):
        """A request as Synapse forwards it (hs_token, identity headers, JSON body)."""
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if identity is not None:
            headers["X-Matrix-User-Identifier"] = identity
        if origin is not None:
            headers["X-Matrix-Origin"] = origin
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode("utf-8")
        return self.daemon.request(method, path, data, headers)

    def cs_body(self, **extra) -> dict:
        body = {"url": self.lk.url, "room_id": ROOM_ID, "slot_id": SLOT_ID, "member_id": MEMBER_ID}
        body.update(extra)
        return body

    # -- assertions --------------------------------------------------------------------------

    def assert_error(self, result, status: int, errcode: str, message: str, *, cors: bool = True):
        self.assertEqual((result.code, result.body), (status, matrix_error_body(errcode, message)),
                         self.daemon_logs())
        self.assertEqual(result.header("Content-Type"), "application/json")
        if cors:
            self.assert_cors(result)
        else:
            self.assertIsNone(result.header("Access-Control-Allow-Origin"))

    def assert_jwt_answer(self, result) -> str:
        """200 ``{"jwt": …}`` + LF (no ``url``); return the JWT."""
        self.assertEqual(result.code, 200, f"{result.body!r}\n{self.daemon_logs()}")
        obj = json.loads(result.body)
        self.assertEqual(list(obj), ["jwt"])
        self.assertEqual(result.body, json.dumps(obj, separators=(",", ":")).encode() + b"\n")
        return obj["jwt"]

    def assert_as_call(self, call, *, form: str = "unstable"):
        """An as_token call to our homeserver: the token in the header only, never the URL."""
        self.assertEqual(call.form, form)
        self.assertEqual(call.bearer, AS_TOKEN)
        self.assertIsNone(call.request.access_token)
        self.assertEqual(call.request.peer_host, "127.0.0.1")

    def assert_is_joined(self, call, room_id: str, **subject: str):
        self.assertEqual(call.kind, "is_joined")
        self.assertEqual(call.subject, room_id)
        self.assertEqual(call.request.method, "GET")
        self.assertEqual(call.request.query, {k: [v] for k, v in subject.items()})
        self.assertNotIn("user_id", call.request.query)  # no masquerading on is_joined

    def describe(self) -> str:
        calls = "\n".join(
            f"  {c.request.method} {c.request.path} {c.request.query} -> {c.status}" for c in self.hs.appservice_calls
        ) or "  (none)"
        delayed = "\n".join(
            f"  {c.action} {c.delay_id!r} ({c.form}) {c.request.query} -> {c.status}"
            for c in self.hs.delayed_event_calls
        ) or "  (none)"
        return f"as calls:\n{calls}\ndelayed-event calls:\n{delayed}\n{self.daemon_logs()}"


class PingTests(AppserviceCase, unittest.TestCase):
    """``/_matrix/app/v1/ping`` and the hs_token gate (docs/appservice.md#routes)."""

    @defer.inlineCallbacks
    def test_ping(self):
        yield self.start()
        # Synapse's ping body; any method
        for method in ("POST", "PUT", "GET"):
            result = yield self.proxied(PING, {"transaction_id": "txn-1"}, method=method)
            self.assertEqual((result.code, result.body), (200, b"{}\n"), method)
            self.assertEqual(result.header("Content-Type"), "application/json")
            self.assertIsNone(result.header("Access-Control-Allow-Origin"))
        result = yield self.proxied(PING, None, token="not-the-hs-token")
        self.assert_error(result, 401, "M_UNKNOWN_TOKEN", E_HS_WRONG, cors=False)
        result = yield self.proxied(PING, None, token=AS_TOKEN)  # the other token is not the hs_token
        self.assert_error(result, 401, "M_UNKNOWN_TOKEN", E_HS_WRONG, cors=False)
        result = yield self.proxied(PING, None, token=None)
        self.assert_error(result, 401, "M_MISSING_TOKEN", E_HS_MISSING, cors=False)
        result = yield self.daemon.request("POST", PING, b"{}", {"Authorization": "bearer " + HS_TOKEN})
        self.assert_error(result, 401, "M_MISSING_TOKEN", E_HS_MISSING, cors=False)
        # no access_token query parameter is accepted instead of the header
        result = yield self.daemon.request("POST", PING + "?access_token=" + HS_TOKEN, b"{}")
        self.assert_error(result, 401, "M_MISSING_TOKEN", E_HS_MISSING, cors=False)
        yield self.daemon.stop()
        self.assertEqual(self.hs.requests, [])
        for secret in (AS_TOKEN, HS_TOKEN):
            self.assertNotIn(secret, self.daemon.output)

    @defer.inlineCallbacks
    def test_transactions_acknowledged(self):
        yield self.start()
        result = yield self.proxied("/_matrix/app/v1/transactions/txn-1", {"events": []}, method="PUT")
        self.assertEqual((result.code, result.body), (200, b"{}\n"))
        result = yield self.proxied("/_matrix/app/v1/transactions/txn-2", {"events": []}, method="PUT", token="x")
        self.assert_error(result, 401, "M_UNKNOWN_TOKEN", E_HS_WRONG, cors=False)
        self.assertEqual(self.hs.requests, [])

    @defer.inlineCallbacks
    def test_token_routes_gate_on_hs_token_then_identity(self):
        yield self.start()
        for path, body in ((CS + "/get_token", self.cs_body()),
                           (CS + "/delegate_delayed_leave", self.cs_body(delay_id="d"))):
            # no hs_token: 401 before the body is read
            result = yield self.proxied(path, b"not json", identity=self.user("alice"), token=None)
            self.assert_error(result, 401, "M_MISSING_TOKEN", E_HS_MISSING)
            result = yield self.proxied(path, body, identity=self.user("alice"), token="wrong")
            self.assert_error(result, 401, "M_UNKNOWN_TOKEN", E_HS_WRONG)
            result = yield self.proxied(path, body)
            self.assert_error(result, 401, "M_UNAUTHORIZED", E_NO_USER)
            # a bad body and no identity header: the body answers first
            result = yield self.proxied(path, b"not json")
            self.assert_error(result, 400, "M_NOT_JSON", "Error reading request")
            result = yield self.proxied(path, {"url": self.lk.url}, identity=self.user("alice"))
            self.assertEqual((result.code, json.loads(result.body)["errcode"]), (400, "M_BAD_JSON"))
            result = yield self.proxied(path, None, method="OPTIONS", token=None)
            self.assertEqual((result.code, result.body), (200, b""))
            self.assert_cors(result)
        ss_body = self.cs_body(user_id=f"@bob:{REMOTE}")
        result = yield self.proxied(SS + "/get_token", ss_body, origin=REMOTE, token="wrong")
        self.assert_error(result, 401, "M_UNKNOWN_TOKEN", E_HS_WRONG, cors=False)
        result = yield self.proxied(SS + "/get_token", ss_body)
        self.assert_error(result, 401, "M_UNAUTHORIZED", E_NO_ORIGIN, cors=False)
        result = yield self.proxied(CS + "/get_token", self.cs_body(), identity=self.user("alice"), method="GET")
        self.assertEqual((result.code, result.body), (405, b""))
        yield self.daemon.stop()
        self.assertEqual(self.hs.requests, [])
        self.assertEqual(self.lk.calls, [])


class ClientTokenTests(AppserviceCase, unittest.TestCase):
    """C-S ``get_token`` (docs/appservice.md#procedures)."""

    @defer.inlineCallbacks
    def test_joined_local_user_gets_a_token_and_a_room(self):
        yield self.start()
        alice = self.user("alice")
        self.hs.join(ROOM_ID, alice)
        t0 = time.time()
        result = yield self.proxied(CS + "/get_token", self.cs_body(), identity=alice)
        t1 = time.time()
        token = self.assert_jwt_answer(result)
        self.assert_cors(result)
        alias = lk_hash(ROOM_ID, SLOT_ID)
        self.assert_participant_jwt(token, identity=lk_hash(alice, MEMBER_ID), alias=alias, t0=t0, t1=t1,
                                    can_publish=True)
        self.assertEqual([c.name for c in self.lk.create_room_requests], [alias])
        # feature detection, then the unstable is_joined as the AS (no masquerade)
        [versions] = self.hs.versions_requests
        self.assertNotIn("authorization", versions.headers)
        [call] = self.hs.as_calls()
        self.assert_as_call(call)
        self.assert_is_joined(call, ROOM_ID, mxid=alice)
        self.assertTrue(call.request.path.startswith(UNSTABLE_IS_JOINED))

        # a member object instead of member_id, the stable route path, server_name = ours: the same
        body = self.cs_body(server_name=self.hs.server_name)
        del body["member_id"]
        body["member"] = {"id": MEMBER_ID, "claimed_device_id": "IGNORED", "claimed_user_id": "@mallory:evil"}
        result = yield self.proxied(CS_STABLE + "/get_token", body, identity=alice)
        token = self.assert_jwt_answer(result)
        self.assert_participant_jwt(token, identity=lk_hash(alice, MEMBER_ID), alias=alias, t0=t0,
                                    t1=time.time(), can_publish=True)
        self.assertEqual(len(self.hs.versions_requests), 1, "the /versions answer is cached")
        self.assertEqual(len(self.lk.create_room_requests), 2)
        yield self.daemon.stop()
        self.assertNotIn(AS_TOKEN, self.daemon.output)
        self.assertNotIn(HS_TOKEN, self.daemon.output)

    @defer.inlineCallbacks
    def test_stable_is_joined_when_advertised(self):
        self.hs.unstable_features = {"io.element.msc4502": True, "io.element.msc4502.stable": True}
        yield self.start()
        alice = self.user("alice")
        self.hs.join(ROOM_ID, alice)
        result = yield self.proxied(CS + "/get_token", self.cs_body(), identity=alice)
        self.assert_jwt_answer(result)
        [call] = self.hs.as_calls()
        self.assert_as_call(call, form="stable")
        self.assertTrue(call.request.path.startswith(STABLE_IS_JOINED), call.request.path)

    @defer.inlineCallbacks
    def test_not_joined_and_wrong_url(self):
        yield self.start()
        alice = self.user("alice")
        self.hs.join(ROOM_ID, self.user("bob"), self.hs.server_name)
        result = yield self.proxied(CS + "/get_token", self.cs_body(), identity=alice)
        self.assert_error(result, 403, "M_FORBIDDEN", E_NOT_MEMBER)
        self.assertEqual(len(self.hs.as_calls("is_joined")), 1)
        # the URL is checked before any homeserver call
        result = yield self.proxied(CS + "/get_token", self.cs_body(url=self.lk.url + "/"), identity=alice)
        self.assert_error(result, 400, "M_INVALID_PARAM", E_URL)
        self.assertEqual(len(self.hs.as_calls("is_joined")), 1)
        yield self.daemon.stop()
        self.assertEqual(self.lk.create_room_requests, [])

    @defer.inlineCallbacks
    def test_bad_mxid_unresolvable_cs_api_and_sfu_failure(self):
        # no override and no .well-known: our own client-server API cannot be found
        yield self.start(LIVEKIT_CS_API_URL_OVERRIDES="")
        alice = self.user("alice")
        self.hs.join(ROOM_ID, alice)
        result = yield self.proxied(CS + "/get_token", self.cs_body(), identity="alice")
        self.assert_error(result, 400, "M_INVALID_PARAM", "Malformed user identifier")
        result = yield self.proxied(CS + "/get_token", self.cs_body(), identity=alice)
        self.assert_error(result, 400, "M_BAD_JSON", "Unable to resolve client-server API")
        self.assertEqual(self.hs.as_calls(), [])
        # once the homeserver publishes itself, the SFU refusing CreateRoom means no token
        self.hs.publish_client_well_known({"m.homeserver": {"base_url": self.hs.client_api_url}})
        self.lk.fail_with(500)
        result = yield self.proxied(CS + "/get_token", self.cs_body(), identity=alice)
        self.assert_error(result, 500, "M_UNKNOWN", "Unable to create room on SFU")
        self.assertEqual(len(self.lk.create_room_requests), 1)
        self.lk.succeed()
        result = yield self.proxied(CS + "/get_token", self.cs_body(), identity=alice)
        self.assert_jwt_answer(result)

    @defer.inlineCallbacks
    def test_room_id_is_one_path_segment(self):
        yield self.start()
        alice = self.user("alice")
        room_id = "!a/b?c#d%e:example.com"
        self.hs.join(room_id, alice)
        result = yield self.proxied(CS + "/get_token", self.cs_body(room_id=room_id), identity=alice)
        self.assert_jwt_answer(result)
        [call] = self.hs.as_calls("is_joined")
        self.assertEqual(call.subject, room_id)
        self.assertEqual(call.request.path,
                         UNSTABLE_IS_JOINED + "!a%2Fb%3Fc%23d%25e:example.com/is_joined")
        self.assertEqual([c.name for c in self.lk.create_room_requests], [lk_hash(room_id, SLOT_ID)])

    @defer.inlineCallbacks
    def test_identity_header_not_ascii_is_missing(self):
        yield self.start()
        result = yield self.daemon.request("POST", CS + "/get_token", json.dumps(self.cs_body()).encode(), {
            "Content-Type": "application/json", "Authorization": f"Bearer {HS_TOKEN}",
            "X-Matrix-User-Identifier": "@\u00e4lice:example.com"})  # goes out as UTF-8 bytes
        self.assert_error(result, 401, "M_UNAUTHORIZED", E_NO_USER)
        self.assertEqual(self.hs.requests, [])

    @defer.inlineCallbacks
    def test_membership_unverifiable(self):
        self.hs.unstable_features = {}
        yield self.start()
        alice = self.user("alice")
        self.hs.join(ROOM_ID, alice)
        result = yield self.proxied(CS + "/get_token", self.cs_body(), identity=alice)
        self.assert_error(result, 502, "M_UNKNOWN", "Unable to verify room membership")
        self.assertEqual(self.hs.as_calls(), [])
        self.assertEqual(self.lk.create_room_requests, [])

    @defer.inlineCallbacks
    def test_remote_server_name_is_relayed(self):
        yield self.start()
        alice = self.user("alice")
        self.hs.join(ROOM_ID, alice, REMOTE)
        self.hs.answer_fed_proxy(200, {"jwt": "remote.jwt.value"})
        # the remote checks its own URL: ours need not match
        body = self.cs_body(server_name=REMOTE, url="wss://sfu.remote.example")
        result = yield self.proxied(CS + "/get_token", body, identity=alice)
        self.assertEqual(self.assert_jwt_answer(result), "remote.jwt.value")
        self.assertEqual(self.lk.create_room_requests, [], "the remote creates its room")
        joined = self.hs.as_calls("is_joined")
        self.assertEqual(len(joined), 2)
        self.assert_is_joined(joined[0], ROOM_ID, mxid=alice)
        self.assert_is_joined(joined[1], ROOM_ID, server_name=REMOTE)
        [relay] = self.hs.as_calls("fed_proxy")
        self.assert_as_call(relay)
        self.assertEqual(relay.request.path, UNSTABLE_FED_PROXY)
        self.assertEqual(relay.request.headers.get("content-type"), ["application/json"])
        self.assertEqual(json.loads(relay.request.body), {
            "destination": REMOTE,
            "method": "POST",
            "path": SS + "/get_token",
            "body": {"user_id": alice, "url": "wss://sfu.remote.example", "room_id": ROOM_ID,
                     "slot_id": SLOT_ID, "member_id": MEMBER_ID},
        })

    @defer.inlineCallbacks
    def test_stable_fed_proxy_when_advertised(self):
        self.hs.unstable_features = {"io.element.msc4502": True, "io.element.msc4512.stable": True}
        yield self.start()
        alice = self.user("alice")
        self.hs.join(ROOM_ID, alice, REMOTE)
        self.hs.answer_fed_proxy(200, {"jwt": "remote.jwt.value"})
        result = yield self.proxied(CS + "/get_token", self.cs_body(server_name=REMOTE), identity=alice)
        self.assertEqual(self.assert_jwt_answer(result), "remote.jwt.value")
        [relay] = self.hs.as_calls("fed_proxy")
        self.assert_as_call(relay, form="stable")
        self.assertEqual(relay.request.path, STABLE_FED_PROXY)
        # the relayed path stays the unstable S-S route every v0.7 peer serves
        self.assertEqual(json.loads(relay.request.body)["path"], SS + "/get_token")

    @defer.inlineCallbacks
    def test_relay_error_mapping(self):
        yield self.start()
        alice = self.user("alice")
        self.hs.join(ROOM_ID, alice, REMOTE)
        body = self.cs_body(server_name=REMOTE)
        cases = [
            # (remote status, remote content, homeserver's own status) → client answer
            ((403, {"errcode": "M_FORBIDDEN", "error": "remote text never relayed"}, 200),
             (403, "M_FORBIDDEN", E_REMOTE_403)),
            ((400, {"errcode": "M_INVALID_PARAM", "error": "remote text"}, 200),
             (400, "M_INVALID_PARAM", E_REMOTE_400)),
            ((403, {"errcode": "M_UNKNOWN", "error": "x"}, 200), (502, "M_UNKNOWN", E_REMOTE_OTHER)),
            ((404, {"errcode": "M_UNRECOGNIZED", "error": "x"}, 200), (502, "M_UNKNOWN", E_REMOTE_OTHER)),
            ((500, None, 200), (502, "M_UNKNOWN", E_REMOTE_OTHER)),
            ((200, None, 200), (502, "M_UNKNOWN", E_REMOTE_OTHER)),
            ((200, {"token": "x"}, 200), (502, "M_UNKNOWN", E_REMOTE_OTHER)),
            # Synapse itself fails (cannot reach the destination)
            ((None, {"errcode": "IO.ELEMENT.MSC4512.REQUEST_FAILED", "error": "x"}, 502),
             (502, "M_UNKNOWN", E_REMOTE_OTHER)),
        ]
        for (status, content, http_status), expected in cases:
            self.hs.answer_fed_proxy(status, content, http_status=http_status)
            result = yield self.proxied(CS + "/get_token", body, identity=alice)
            self.assert_error(result, *expected)
            self.assertNotIn(b"remote text", result.body)
        self.assertEqual(len(self.hs.as_calls("fed_proxy")), len(cases))
        # the target server is not in the room: no relay
        self.hs.joined_servers[ROOM_ID].discard(REMOTE)
        result = yield self.proxied(CS + "/get_token", body, identity=alice)
        self.assert_error(result, 403, "M_FORBIDDEN", E_TARGET_NJ)
        # a non-member never reaches the relay either
        result = yield self.proxied(CS + "/get_token", body, identity=self.user("carol"))
        self.assert_error(result, 403, "M_FORBIDDEN", E_NOT_MEMBER)
        self.assertEqual(len(self.hs.as_calls("fed_proxy")), len(cases))
        self.assertEqual(self.lk.create_room_requests, [])


class ServerTokenTests(AppserviceCase, unittest.TestCase):
    """S-S ``get_token``: a remote homeserver asks for one of its users."""

    def ss_body(self, user_id: str = f"@bob:{REMOTE}", **extra) -> dict:
        return self.cs_body(user_id=user_id, **extra)

    @defer.inlineCallbacks
    def test_joined_remote_user_gets_subscribe_only_token(self):
        yield self.start()
        bob = f"@bob:{REMOTE}"
        self.hs.join(ROOM_ID, bob, self.hs.server_name, REMOTE)
        t0 = time.time()
        result = yield self.proxied(SS + "/get_token", self.ss_body(member_id="memberXYZ"), origin=REMOTE)
        t1 = time.time()
        token = self.assert_jwt_answer(result)
        self.assertIsNone(result.header("Access-Control-Allow-Origin"))
        alias = lk_hash(ROOM_ID, SLOT_ID)
        self.assert_participant_jwt(token, identity=lk_hash(bob, "memberXYZ"), alias=alias, t0=t0, t1=t1,
                                    can_publish=False)
        self.assertEqual([c.name for c in self.lk.create_room_requests], [alias])
        joined = self.hs.as_calls("is_joined")
        self.assertEqual(len(joined), 2)
        self.assert_is_joined(joined[0], ROOM_ID, server_name=self.hs.server_name)
        self.assert_is_joined(joined[1], ROOM_ID, mxid=bob)
        for call in joined:
            self.assert_as_call(call)
        # the stable federation path form answers the same
        result = yield self.proxied(SS_STABLE + "/get_token", self.ss_body(member_id="memberXYZ"), origin=REMOTE)
        token = self.assert_jwt_answer(result)
        self.assert_participant_jwt(token, identity=lk_hash(bob, "memberXYZ"), alias=alias, t0=t0,
                                    t1=time.time(), can_publish=False)
        self.assertEqual(len(self.lk.create_room_requests), 2)

    @defer.inlineCallbacks
    def test_refusals(self):
        yield self.start()
        bob = f"@bob:{REMOTE}"
        result = yield self.proxied(SS + "/get_token", self.ss_body(user_id="bob"), origin=REMOTE)
        self.assert_error(result, 400, "M_INVALID_PARAM", "Malformed user identifier", cors=False)
        # another server's user: refused before any homeserver call
        result = yield self.proxied(SS + "/get_token", self.ss_body(), origin="evil.example")
        self.assert_error(result, 403, "M_FORBIDDEN", E_FOREIGN_USER, cors=False)
        self.assertEqual(self.hs.as_calls(), [])
        # we are not in the room
        self.hs.join(ROOM_ID, bob)
        result = yield self.proxied(SS + "/get_token", self.ss_body(), origin=REMOTE)
        self.assert_error(result, 403, "M_FORBIDDEN", E_SELF_NJ, cors=False)
        # we are, the user is not
        self.hs.joined_users[ROOM_ID].clear()
        self.hs.join(ROOM_ID, self.hs.server_name)
        result = yield self.proxied(SS + "/get_token", self.ss_body(), origin=REMOTE)
        self.assert_error(result, 403, "M_FORBIDDEN", E_NOT_MEMBER, cors=False)
        # both joined, wrong URL (checked after the membership)
        self.hs.join(ROOM_ID, bob)
        before = len(self.hs.as_calls("is_joined"))
        result = yield self.proxied(SS + "/get_token", self.ss_body(url="wss://other.example"), origin=REMOTE)
        self.assert_error(result, 400, "M_INVALID_PARAM", E_URL, cors=False)
        self.assertEqual(len(self.hs.as_calls("is_joined")), before + 2)
        self.assertEqual(self.lk.create_room_requests, [])


class DelegationCase(AppserviceCase):
    """Webhooks and the checks of calls made as the job's owner."""

    def wait_for(self, check, what: str, timeout: float = EFFECT_DEADLINE):
        return poll_until(global_reactor, check, timeout=timeout, what=what, describe=self.describe)

    @defer.inlineCallbacks
    def webhook(self, event: str, room: str, identity: str, reason: str | None = None):
        body = webhook_body(event, room, identity, reason)
        headers = {"Content-Type": "application/webhook+json", "Authorization": sign_webhook(body, self.key, self.secret)}
        result = yield self.daemon.request("POST", "/sfu_webhook", body, headers)
        self.assertEqual((result.code, result.body), (200, b""), self.describe())

    def assert_acting_as(self, call, action: str, delay_id: str, user_id: str, *, form: str = "unstable"):
        req = call.request
        self.assertEqual((call.delay_id, call.action, call.form), (delay_id, action, form))
        base = STABLE_DELAYED if form == "stable" else UNSTABLE_DELAYED
        self.assertEqual(req.path, base + call.segment + "/" + action)
        self.assertEqual(req.query, {"user_id": [user_id]})
        self.assertEqual(call.bearer, AS_TOKEN)
        self.assertIsNone(req.access_token)
        self.assertEqual(req.body, b"{}")



class DelegationTests(DelegationCase, unittest.TestCase):
    """C-S ``delegate_delayed_leave``: the job acts as the user (docs/appservice.md#procedures)."""

    @defer.inlineCallbacks
    def run_cycle(self, *, form: str):
        yield self.start(redis=True)
        alice = self.user("alice")
        delay_id = "syd_cs_1"
        self.hs.schedule_delayed_event(delay_id, user_id=alice, room_id=ROOM_ID, delay_ms=3_600_000)
        body = self.cs_body(delay_id=delay_id, delay_timeout=5)  # the delay is looked up, not taken
        result = yield self.proxied(CS + "/delegate_delayed_leave", body, identity=alice)
        self.assertEqual((result.code, result.body), (200, b"{}\n"), self.describe())
        self.assert_cors(result)
        # the look-up, as the user, in the advertised form
        [lookup] = self.hs.as_calls("lookup")
        self.assert_as_call(lookup, form=form)
        base = STABLE_DELAYED if form == "stable" else UNSTABLE_DELAYED
        self.assertEqual((lookup.request.method, lookup.request.path), ("GET", base + delay_id))
        self.assertEqual(lookup.request.query, {"user_id": [alice]})
        # no token, no room, no membership check on this route
        self.assertEqual(self.lk.create_room_requests, [])
        self.assertEqual(self.hs.as_calls("is_joined"), [])
        # stored before the answer, with the looked-up delay and the owner
        room, identity = lk_hash(ROOM_ID, SLOT_ID), lk_hash(alice, MEMBER_ID)
        records = yield self.redis.hgetall(JOBS_KEY)
        field = job_field(room, identity)
        self.assertEqual(list(records), [field])
        restarted_at = json.loads(records[field])["RestartedAt"]
        self.assertEqual(records[field], job_value(
            delay_id=delay_id, timeout_ns=3_600_000 * 1_000_000, server_name=self.hs.server_name,
            room=room, identity=identity, restarted_at=restarted_at, owner=alice))
        self.assertEqual(self.hs.delayed_event_calls, [])

        yield self.webhook("participant_joined", room, identity)
        yield self.wait_for(lambda: self.hs.restarts(delay_id), "a restart")
        self.assert_acting_as(self.hs.restarts(delay_id)[0], "restart", delay_id, alice, form=form)
        yield self.webhook("participant_left", room, identity, "CLIENT_INITIATED")
        yield self.wait_for(lambda: self.hs.sends(delay_id), "the send")
        yield self.wait_for(lambda: self.redis.hgetall(JOBS_KEY).addCallback(lambda m: field not in m),
                            "the record to be deleted")
        yield self.daemon.stop()
        [send] = self.hs.sends(delay_id)
        self.assert_acting_as(send, "send", delay_id, alice, form=form)
        self.assertEqual(send.status, 200)
        for call in self.hs.delayed_event_calls:
            self.assert_acting_as(call, call.action, delay_id, alice, form=form)
        self.assertNotIn(AS_TOKEN, self.daemon.output)

    def test_cycle_unstable(self):
        return self.run_cycle(form="unstable")

    def test_cycle_stable_when_advertised(self):
        self.hs.unstable_features = {"io.element.msc4502": True, "org.matrix.msc4140.stable": True}
        return self.run_cycle(form="stable")

    @defer.inlineCallbacks
    def test_second_delegation_replaces_the_job(self):
        yield self.start(redis=True)
        alice = self.user("alice")
        first, second = "syd/first?", "syd_second"
        self.hs.schedule_delayed_event(first, user_id=alice, room_id=ROOM_ID, delay_ms=1_000_000)
        self.hs.schedule_delayed_event(second, user_id=alice, room_id=ROOM_ID, delay_ms=2_000_000)
        for delay_id in (first, second):
            result = yield self.proxied(CS + "/delegate_delayed_leave", self.cs_body(delay_id=delay_id),
                                        identity=alice)
            self.assertEqual(result.code, 200, self.describe())
        lookup = self.hs.as_calls("lookup")[0]
        self.assertEqual((lookup.subject, lookup.request.path), (first, UNSTABLE_DELAYED + "syd%2Ffirst%3F"))
        room, identity = lk_hash(ROOM_ID, SLOT_ID), lk_hash(alice, MEMBER_ID)
        records = yield self.redis.hgetall(JOBS_KEY)
        field = job_field(room, identity)
        self.assertEqual(list(records), [field])
        record = json.loads(records[field])["Params"]
        self.assertEqual((record["DelayId"], record["DelayTimeout"], record["OwnerUserId"]),
                         (second, 2_000_000 * 1_000_000, alice))

    @defer.inlineCallbacks
    def test_unknown_delay(self):
        yield self.start(redis=True)
        alice = self.user("alice")
        self.hs.schedule_delayed_event("syd_bob", user_id=self.user("bob"), room_id=ROOM_ID)
        self.hs.schedule_delayed_event("syd_other_room", user_id=alice, room_id="!other:example.com")
        for delay_id in ("syd_none", "syd_bob", "syd_other_room"):
            result = yield self.proxied(CS + "/delegate_delayed_leave", self.cs_body(delay_id=delay_id), identity=alice)
            self.assert_error(result, 400, "M_INVALID_PARAM", E_DELAY_UNKNOWN)
        result = yield self.proxied(CS + "/delegate_delayed_leave",
                                    self.cs_body(delay_id="syd_bob", url="wss://x"), identity=alice)
        self.assert_error(result, 400, "M_INVALID_PARAM", E_URL)
        self.assertEqual(len(self.hs.as_calls("lookup")), 3)
        records = yield self.redis.hgetall(JOBS_KEY)
        self.assertEqual(records, {})


class DelegationRecoveryTests(DelegationCase, unittest.TestCase):
    """Owned jobs keep acting as the user after a restart (the as_token comes from the configuration);
    a look-up that fails is the homeserver's problem (503), not an unknown delay."""

    @defer.inlineCallbacks
    def test_restored_job_acts_as_user(self):
        yield self.start(redis=True)
        alice = self.user("alice")
        delay_id = "syd_restored"
        self.hs.schedule_delayed_event(delay_id, user_id=alice, room_id=ROOM_ID, delay_ms=600_000)
        result = yield self.proxied(CS + "/delegate_delayed_leave", self.cs_body(delay_id=delay_id), identity=alice)
        self.assertEqual(result.code, 200, self.describe())
        room, identity = lk_hash(ROOM_ID, SLOT_ID), lk_hash(alice, MEMBER_ID)
        yield self.daemon.stop()
        self.lk.set_present(room, identity)
        yield self.daemon.restart()
        yield self.daemon.wait_for_line("Restored 1 delegated-leave job")
        yield self.webhook("participant_joined", room, identity)
        yield self.wait_for(lambda: self.hs.restarts(delay_id), "a restart after recovery")
        yield self.webhook("participant_left", room, identity, "CLIENT_INITIATED")
        yield self.wait_for(lambda: self.hs.sends(delay_id), "the send after recovery")
        yield self.daemon.stop()
        self.assertEqual(len(self.hs.sends(delay_id)), 1)
        for call in self.hs.delayed_event_calls:
            self.assert_acting_as(call, call.action, delay_id, alice)

    @defer.inlineCallbacks
    def test_lookup_failures_are_503(self):
        yield self.start(redis=True)
        alice = self.user("alice")
        self.hs.schedule_delayed_event("syd_x", user_id=alice, room_id=ROOM_ID)
        for answer in (Answer.rate_limited(retry_after_ms=1000), Answer.json(500, {"errcode": "M_UNKNOWN"}),
                       Answer(200, b"not json")):
            self.hs.lookup_answer = answer
            result = yield self.proxied(CS + "/delegate_delayed_leave", self.cs_body(delay_id="syd_x"), identity=alice)
            self.assert_error(result, 503, "M_UNKNOWN", "Unable to look up the delayed event")
        # a pending event without a usable delay is unknown
        self.hs.lookup_answer = Answer.json(200, {"delay_id": "syd_x", "room_id": ROOM_ID, "delay_ms": 0})
        result = yield self.proxied(CS + "/delegate_delayed_leave", self.cs_body(delay_id="syd_x"), identity=alice)
        self.assert_error(result, 400, "M_INVALID_PARAM", E_DELAY_UNKNOWN)
        self.assertEqual(len(self.hs.as_calls("lookup")), 4)
        records = yield self.redis.hgetall(JOBS_KEY)
        self.assertEqual(records, {})


class RateLimitTests(AppserviceCase, unittest.TestCase):
    """The AS routes count per Matrix user, not per address (every request comes from Synapse)."""

    @defer.inlineCallbacks
    def test_one_user_limited_another_served(self):
        yield self.start(RTCAUTH_RATELIMIT_BURST="3", RTCAUTH_RATELIMIT_PER_SECOND="0.01")
        alice, bob = self.user("alice"), self.user("bob")
        self.hs.join(ROOM_ID, alice, bob)
        codes = []
        for _ in range(5):
            result = yield self.proxied(CS + "/get_token", self.cs_body(), identity=alice)
            codes.append(result.code)
        self.assertEqual(codes[:3], [200, 200, 200], self.describe())
        self.assertEqual(result.code, 429, self.describe())
        self.assertEqual(json.loads(result.body)["errcode"], "M_LIMIT_EXCEEDED")
        self.assertIsNotNone(result.header("Retry-After"))
        self.assert_cors(result)
        # from the same address, another user is not limited
        result = yield self.proxied(CS + "/get_token", self.cs_body(), identity=bob)
        self.assert_jwt_answer(result)
        # a limited user costs the homeserver and the SFU nothing
        self.assertEqual(len(self.lk.create_room_requests), 4)
        self.assertEqual(len(self.hs.as_calls("is_joined")), 4)


class WithoutAppserviceTests(BlackBoxCase, TokenAssertions, unittest.TestCase):
    """Without the AS settings the AS paths do not exist and the legacy routes are unchanged."""

    @defer.inlineCallbacks
    def test_paths_404_and_legacy_works(self):
        hs = self.make_homeserver()
        lk = self.make_livekit()
        alice = f"@alice:{hs.server_name}"
        hs.add_token("syt_openid", alice)
        daemon = yield self.start_daemon(self.service_env(livekit_url=lk.url, full_access=hs.server_name))
        headers = {"Authorization": f"Bearer {HS_TOKEN}", "X-Matrix-User-Identifier": alice,
                   "X-Matrix-Origin": REMOTE, "Content-Type": "application/json"}
        body = json.dumps({"url": lk.url, "room_id": ROOM_ID, "slot_id": SLOT_ID, "member_id": MEMBER_ID,
                           "user_id": alice, "delay_id": "d"}).encode()
        for path in (PING, CS + "/get_token", CS + "/delegate_delayed_leave", SS + "/get_token",
                     CS_STABLE + "/get_token"):
            result = yield daemon.request("POST", path, body, headers)
            self.assertEqual(result.code, 404, path)
        self.assertEqual(hs.requests, [])
        self.assertEqual(lk.calls, [])
        t0 = time.time()
        result = yield daemon.post_json("/get_token", get_token_body(hs.server_name, "syt_openid", user_id=alice))
        token = self.assert_token_response(result, lk.url)
        self.assert_participant_jwt(token, identity=lk_hash(alice, "DEVICE", "member-1"),
                                    alias=lk_hash(ROOM_ID, SLOT_ID), t0=t0, t1=time.time())


class LegacyInAppserviceModeTests(AppserviceCase, unittest.TestCase):
    """In AS mode the legacy routes still work, and never trust the identity headers."""

    @defer.inlineCallbacks
    def test_legacy_get_token(self):
        yield self.start()
        alice = self.user("alice")
        self.hs.add_token("syt_openid", alice)
        t0 = time.time()
        result = yield self.daemon.post_json("/get_token", get_token_body(self.hs.server_name, "syt_openid",
                                                                          user_id=alice))
        token = self.assert_token_response(result, self.lk.url)
        self.assert_participant_jwt(token, identity=lk_hash(alice, "DEVICE", "member-1"),
                                    alias=lk_hash(ROOM_ID, SLOT_ID), t0=t0, t1=time.time())
        # hs_token and identity header on a legacy route change nothing: the OpenID token decides
        result = yield self.daemon.request(
            "POST", "/get_token",
            json.dumps(get_token_body(self.hs.server_name, "syt_unknown", user_id=alice)).encode(),
            {"Content-Type": "application/json", "Authorization": f"Bearer {HS_TOKEN}",
             "X-Matrix-User-Identifier": alice})
        self.assertEqual(result.code, 401, result.body)
        self.assertEqual(self.hs.as_calls(), [])

    @defer.inlineCallbacks
    def test_legacy_jobs_never_carry_the_as_token(self):
        yield self.start()
        alice = self.user("alice")
        self.hs.add_token("syt_openid", alice)
        self.hs.schedule_delayed_event("syd_legacy")
        body = get_token_body(self.hs.server_name, "syt_openid", user_id=alice)
        body.update(delay_id="syd_legacy", delay_timeout=10000)
        result = yield self.daemon.post_json("/get_token", body)
        self.assertEqual(result.code, 200, result.body)
        room, identity = lk_hash(ROOM_ID, SLOT_ID), lk_hash(alice, "DEVICE", "member-1")
        sig_body = webhook_body("participant_left", room, identity, "CLIENT_INITIATED")
        joined = webhook_body("participant_joined", room, identity)
        for data in (joined, sig_body):
            result = yield self.daemon.request("POST", "/sfu_webhook", data, {
                "Content-Type": "application/webhook+json", "Authorization": sign_webhook(data, self.key, self.secret)})
            self.assertEqual(result.code, 200)
        yield poll_until(global_reactor, lambda: self.hs.sends("syd_legacy"), timeout=EFFECT_DEADLINE,
                         what="the legacy send", describe=self.describe)
        yield self.daemon.stop()
        self.assertTrue(self.hs.restarts("syd_legacy"))
        for call in self.hs.delayed_event_calls:
            self.assertEqual(call.form, "unstable")
            self.assertNotIn("authorization", call.request.headers)
            self.assertEqual(call.request.query, {})
        self.assertEqual(self.hs.as_calls(), [])
