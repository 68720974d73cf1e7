"""Black-box tests of the token endpoints: the real daemon against loopback fakes.

docs/endpoints.md, docs/authorization.md#access-rules, docs/authorization.md#hash-inputs, docs/authorization.md#participant-token, docs/livekit.md#roomservice, docs/federation.md.  Expected identities, aliases and JWT claims are
computed here independently of rtcauthd's code; JWTs are checked with PyJWT and with
LiveKit's own ``TokenVerifier``.
"""

from __future__ import annotations

import json
import math
import re
import time

import jwt
from livekit.api import TokenVerifier
from twisted.internet import defer
from twisted.trial import unittest

from tests.blackbox.fake_homeserver import SYNAPSE_UNKNOWN_TOKEN
from tests.blackbox.harness import (
    CORS_HEADERS,
    JOSE_HEADER_B64,
    BlackBoxCase,
    lk_hash,
    matrix_error_body,
)

ROOM_ID = "!room:example.com"
SLOT_ID = "m.call#ROOM"
MEMBER_ID = "member-1"
DEVICE = "DEVICE"
UNAUTHORISED = matrix_error_body("M_UNAUTHORIZED", "The request could not be authorised.")
UNREACHABLE_SFU = "ws://127.0.0.1:9"  # discard port: nothing listens, nothing should be called

#: Address outside the daemon's own listener and the test client, so log lines naming it
#: can only be about the homeserver.
RESTRICTED_HOST = "127.0.0.2"

#: How a log line says certificate checks are off (LIVEKIT_INSECURE_SKIP_VERIFY_TLS).
INSECURE_BANNER = r"disabl|not verif|unverified|no verification"


def get_token_body(server_name: str, token: str, *, user_id: str | None = None, room_id: str = ROOM_ID,
                   slot_id: str = SLOT_ID, member_id: str = MEMBER_ID, device: str = DEVICE) -> dict:
    return {
        "room_id": room_id,
        "slot_id": slot_id,
        "openid_token": {
            "access_token": token,
            "token_type": "Bearer",
            "matrix_server_name": server_name,
            "expires_in": 3600,
        },
        "member": {
            "id": member_id,
            "claimed_user_id": user_id if user_id is not None else f"@alice:{server_name}",
            "claimed_device_id": device,
        },
    }


def sfu_get_body(server_name: str, token: str, *, room: str = ROOM_ID, device: str = DEVICE) -> dict:
    return {
        "room": room,
        "openid_token": {
            "access_token": token,
            "token_type": "Bearer",
            "matrix_server_name": server_name,
            "expires_in": 3600,
        },
        "device_id": device,
    }


class HashHelperTests(unittest.SynchronousTestCase):
    """The suite's own H must reproduce docs/authorization.md#worked-examples before it can judge the daemon."""

    def test_vectors(self):
        self.assertEqual(lk_hash("!roomid:example.com", "slot1234"), "O8437W3+jmzMVjoIP3tNwbm+XxHQk2iKpOA7aqw3qSc")
        self.assertEqual(lk_hash("@alice:example.com", "DEVICE123", "memberABC"),
                         "J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU")
        self.assertEqual(lk_hash(ROOM_ID, SLOT_ID), "krj2dgxw2K6EOm9he4GfQJ6JsSVWfJ8a7BkyjZcSmxs")
        # v0.7's serialisation: vectors 8 and 11 are no longer HTML-escaped
        self.assertEqual(lk_hash("!a&b<c>d:example.com", SLOT_ID), "ziAFdEueqv1/nH7UcCdcviIljbbj3ddMMoKY5eXoylI")
        self.assertEqual(lk_hash("a\u2028b", SLOT_ID), "9JGEmwE/UL2GPDK9QvVpDHBgK564rkE7DCD/o3QtVWU")
        self.assertEqual(lk_hash("@alice:example.com", "memberABC"), "M3VnsLXrkbxIDINXO64u8PZzFyD9ZYFiQULR2dshWYs")


class TokenAssertions:
    """Checks shared by the token tests (mixed into trial TestCases)."""

    def assert_cors(self, result):
        for name, value in CORS_HEADERS.items():
            self.assertEqual(result.header(name), value, f"header {name}")

    def assert_matrix_error(self, result, status: int, errcode: str, message: str):
        self.assertEqual((result.code, result.body), (status, matrix_error_body(errcode, message)),
                         self.daemon_logs())
        self.assert_cors(result)

    def assert_token_response(self, result, url: str) -> str:
        """200, ``{"url","jwt"}`` in that order + LF, CORS; return the JWT."""
        self.assertEqual(result.code, 200, f"{result.body!r}\n{self.daemon_logs()}")
        self.assert_cors(result)
        self.assertTrue(result.body.endswith(b"}\n"), result.body)
        obj = json.loads(result.body)
        self.assertEqual(list(obj), ["url", "jwt"])
        self.assertEqual(obj["url"], url)
        self.assertEqual(
            result.body, json.dumps({"url": url, "jwt": obj["jwt"]}, separators=(",", ":")).encode() + b"\n"
        )
        return obj["jwt"]

    def assert_participant_jwt(self, token: str, *, identity: str, alias: str, t0: float, t1: float,
                               key: str | None = None, secret: str | None = None, can_publish: bool = True):
        key = key or self.key
        secret = secret or self.secret
        self.assertEqual(token.split(".")[0], JOSE_HEADER_B64)
        claims = jwt.decode(token, secret, algorithms=["HS256"], issuer=key,
                            options={"require": ["exp", "nbf", "iat", "iss", "sub"]})
        self.assertEqual(set(claims), {"iss", "sub", "exp", "nbf", "iat", "identity", "video"})
        self.assertEqual((claims["sub"], claims["identity"]), (identity, identity))
        # every grant explicit, false ones included (docs/authorization.md#participant-token)
        self.assertEqual(list(claims["video"]), ["roomCreate", "roomJoin", "room", "canPublish", "canSubscribe",
                                                 "canPublishData", "canUpdateOwnMetadata", "hidden"])
        self.assertEqual(claims["video"], {
            "roomCreate": False,
            "roomJoin": True,
            "room": alias,
            "canPublish": can_publish,
            "canSubscribe": True,
            "canPublishData": True,
            "canUpdateOwnMetadata": False,
            "hidden": False,
        })
        self.assertEqual(claims["iat"], claims["nbf"])
        self.assertEqual(claims["exp"] - claims["nbf"], 3600)
        self.assertTrue(math.floor(t0) - 1 <= claims["nbf"] <= t1 + 1, (t0, claims["nbf"], t1))
        # and LiveKit's own verifier agrees
        verified = TokenVerifier(key, secret).verify(token)
        self.assertEqual(verified.identity, identity)
        self.assertEqual(verified.video.room, alias)
        self.assertTrue(verified.video.room_join and verified.video.can_subscribe and verified.video.can_publish_data)
        self.assertIs(verified.video.can_publish, can_publish)
        self.assertIs(verified.video.can_update_own_metadata, False)
        self.assertIs(verified.video.room_create, False)
        self.assertIs(verified.video.hidden, False)
        self.assertRaises(jwt.InvalidSignatureError, jwt.decode, token, secret + "x", algorithms=["HS256"])

    def assert_create_room(self, lk, alias: str, *, key: str | None = None, secret: str | None = None):
        """Exactly one CreateRoom(alias, 300, 20), protobuf, with a roomCreate admin token."""
        key = key or self.key
        secret = secret or self.secret
        self.assertEqual(lk.rejected, [])
        self.assertEqual(len(lk.create_room_requests), 1, lk.create_room_requests)
        call = lk.create_room_requests[0]
        self.assertEqual((call.name, call.empty_timeout, call.departure_timeout, call.max_participants),
                         (alias, 300, 20, 0))
        # byte-exact protobuf (docs/livekit.md#createroom)
        name = alias.encode()
        self.assertEqual(call.call.body, b"\x0a" + bytes([len(name)]) + name + b"\x10\xac\x02\x50\x14")
        self.assertEqual(call.call.path, "/twirp/livekit.RoomService/CreateRoom")
        self.assertEqual(call.call.content_type, "application/protobuf")
        self.assertIsNotNone(call.bearer, call.call.authorization)
        self.assertEqual(call.bearer.split(".")[0], JOSE_HEADER_B64)
        admin = jwt.decode(call.bearer, secret, algorithms=["HS256"], issuer=key, options={"require": ["exp"]})
        self.assertEqual(set(admin), {"iss", "exp", "nbf", "iat", "video"})
        self.assertEqual(admin["video"], {"roomCreate": True})
        self.assertEqual(admin["exp"] - admin["nbf"], 6 * 3600)
        return call

    def assert_one_userinfo(self, hs, token: str):
        """Exactly one GET userinfo with the token, nothing else in the query, Host = server name."""
        self.assertEqual(len(hs.requests), 1, hs.requests)
        req = hs.requests[0]
        self.assertEqual((req.method, req.path), ("GET", "/_matrix/federation/v1/openid/userinfo"))
        self.assertEqual(req.access_token, token)
        self.assertEqual(req.query, {})
        self.assertEqual(req.host, hs.server_name)
        self.assertNotIn("authorization", req.headers)
        return req


class FullAccessTests(TokenAssertions, BlackBoxCase, unittest.TestCase):
    """A homeserver listed in LIVEKIT_FULL_ACCESS_HOMESERVERS, certificate from RTCAUTH_CA_FILE."""

    @defer.inlineCallbacks
    def setUp(self):
        BlackBoxCase.setUp(self)
        self.hs = self.make_homeserver()
        self.lk = self.make_livekit()
        self.token = "syt_full_" + self.secret[-8:]
        self.user = f"@alice:{self.hs.server_name}"
        self.hs.add_token(self.token, self.user)
        self.daemon = yield self.start_daemon(
            self.service_env(livekit_url=self.lk.url, full_access=f"other.example, {self.hs.server_name}")
        )

    @defer.inlineCallbacks
    def test_get_token(self):
        t0 = time.time()
        result = yield self.daemon.post_json("/get_token", get_token_body(self.hs.server_name, self.token))
        t1 = time.time()
        token = self.assert_token_response(result, self.lk.url)
        identity = lk_hash(self.user, DEVICE, MEMBER_ID)
        alias = lk_hash(ROOM_ID, SLOT_ID)
        self.assertEqual(alias, "krj2dgxw2K6EOm9he4GfQJ6JsSVWfJ8a7BkyjZcSmxs")
        self.assert_participant_jwt(token, identity=identity, alias=alias, t0=t0, t1=t1)
        self.assert_one_userinfo(self.hs, self.token)
        self.assert_create_room(self.lk, alias)

    @defer.inlineCallbacks
    def test_get_token_token_needing_query_escaping(self):
        """The access token reaches the homeserver intact through form-encoding."""
        odd = "a+b/c=d &e%f?g#h\u00e9"
        self.hs.add_token(odd, self.user)
        result = yield self.daemon.post_json("/get_token", get_token_body(self.hs.server_name, odd))
        self.assert_token_response(result, self.lk.url)
        self.assert_one_userinfo(self.hs, odd)

    @defer.inlineCallbacks
    def test_sfu_get_legacy(self):
        t0 = time.time()
        result = yield self.daemon.post_json("/sfu/get", sfu_get_body(self.hs.server_name, self.token))
        t1 = time.time()
        token = self.assert_token_response(result, self.lk.url)
        alias = lk_hash(ROOM_ID, "m.call#ROOM")
        self.assert_participant_jwt(token, identity=f"{self.user}:{DEVICE}", alias=alias, t0=t0, t1=t1)
        self.assert_one_userinfo(self.hs, self.token)
        self.assert_create_room(self.lk, alias)

    @defer.inlineCallbacks
    def test_sfu_get_without_device_id(self):
        body = sfu_get_body(self.hs.server_name, self.token)
        del body["device_id"]
        t0 = time.time()
        result = yield self.daemon.post_json("/sfu/get", body)
        token = self.assert_token_response(result, self.lk.url)
        self.assert_participant_jwt(token, identity=f"{self.user}:", alias=lk_hash(ROOM_ID, SLOT_ID),
                                    t0=t0, t1=time.time())

    @defer.inlineCallbacks
    def test_unknown_token(self):
        result = yield self.daemon.post_json("/get_token", get_token_body(self.hs.server_name, "syt_forged"))
        self.assert_matrix_error(result, 401, "M_UNAUTHORIZED", "The request could not be authorised.")
        self.assert_one_userinfo(self.hs, "syt_forged")
        self.assertEqual(self.lk.calls, [])

    @defer.inlineCallbacks
    def test_synapse_401_body_passed_through_as_401(self):
        """Whatever the homeserver's 401 says, the client gets the generic 401."""
        self.hs.answer_userinfo_with(*SYNAPSE_UNKNOWN_TOKEN)
        result = yield self.daemon.post_json("/sfu/get", sfu_get_body(self.hs.server_name, self.token))
        self.assertEqual((result.code, result.body), (401, UNAUTHORISED))
        self.assertEqual(self.lk.calls, [])

    @defer.inlineCallbacks
    def test_sub_on_another_server(self):
        host_only = self.hs.server_name.rsplit(":", 1)[0]
        for sub in ["@alice:evil.example", f"@alice:{host_only}", f"@alice:{self.hs.server_name}x"]:
            token = "syt_" + str(abs(hash(sub)))
            self.hs.add_token(token, sub)
            body = get_token_body(self.hs.server_name, token, user_id=sub)
            result = yield self.daemon.post_json("/get_token", body)
            self.assertEqual((result.code, result.body), (401, UNAUTHORISED), sub)
        self.assertEqual(len(self.hs.userinfo_requests), 3)
        self.assertEqual(self.lk.calls, [])

    @defer.inlineCallbacks
    def test_sfu_get_sub_on_another_server(self):
        """/sfu/get has no claimed user, so only the server check protects it."""
        self.hs.add_token("syt_evil", "@mallory:evil.example")
        result = yield self.daemon.post_json("/sfu/get", sfu_get_body(self.hs.server_name, "syt_evil"))
        self.assertEqual((result.code, result.body), (401, UNAUTHORISED))
        self.assertEqual(self.lk.calls, [])

    @defer.inlineCallbacks
    def test_claimed_user_mismatch(self):
        for claimed in [f"@bob:{self.hs.server_name}", f"@Alice:{self.hs.server_name}"]:
            body = get_token_body(self.hs.server_name, self.token, user_id=claimed)
            result = yield self.daemon.post_json("/get_token", body)
            self.assertEqual((result.code, result.body), (401, UNAUTHORISED), claimed)
        self.assertEqual(len(self.hs.userinfo_requests), 2)
        self.assertEqual(self.lk.calls, [])

    @defer.inlineCallbacks
    def test_sfu_failure(self):
        self.lk.fail_with(500)
        result = yield self.daemon.post_json("/get_token", get_token_body(self.hs.server_name, self.token))
        self.assert_matrix_error(result, 500, "M_UNKNOWN", "Unable to create room on SFU")
        self.assertGreaterEqual(len(self.lk.create_room_requests), 1)
        self.assertEqual(self.lk.create_room_requests[0].name, lk_hash(ROOM_ID, SLOT_ID))


class RestrictedTests(TokenAssertions, BlackBoxCase, unittest.TestCase):
    """A homeserver NOT in LIVEKIT_FULL_ACCESS_HOMESERVERS, on a loopback address."""

    def setUp(self):
        BlackBoxCase.setUp(self)
        self.hs = self.make_homeserver(host=RESTRICTED_HOST)
        self.lk = self.make_livekit()
        self.token = "syt_restricted"
        self.user = f"@alice:{self.hs.server_name}"
        self.hs.add_token(self.token, self.user)

    @defer.inlineCallbacks
    def test_allowlisted_loopback_gets_token_but_no_room(self):
        daemon = yield self.start_daemon(self.service_env(
            livekit_url=self.lk.url,
            full_access="full.example",
            RTCAUTH_FEDERATION_IP_RANGE_ALLOWLIST="127.0.0.0/8,::1/128",
        ))
        t0 = time.time()
        result = yield daemon.post_json("/get_token", get_token_body(self.hs.server_name, self.token))
        token = self.assert_token_response(result, self.lk.url)
        # subscribe-only: users of other homeservers may not publish (docs/authorization.md#access-rules)
        self.assert_participant_jwt(token, identity=lk_hash(self.user, DEVICE, MEMBER_ID),
                                    alias=lk_hash(ROOM_ID, SLOT_ID), t0=t0, t1=time.time(), can_publish=False)
        self.assert_one_userinfo(self.hs, self.token)
        self.assertEqual(self.lk.calls, [])

    @defer.inlineCallbacks
    def test_loopback_refused_by_default(self):
        """SSRF guard: a non-full-access server name on loopback is never contacted."""
        daemon = yield self.start_daemon(self.service_env(livekit_url=self.lk.url, full_access="full.example"))
        mark = daemon.mark()
        result = yield daemon.post_json("/get_token", get_token_body(self.hs.server_name, self.token))
        self.assert_matrix_error(result, 401, "M_UNAUTHORIZED", "The request could not be authorised.")
        self.assertEqual(self.hs.connections, [])
        self.assertEqual(self.hs.requests, [])
        self.assertEqual(self.lk.calls, [])
        yield daemon.wait_for_line(re.escape(RESTRICTED_HOST), r"refus|block|forbid|denied|not allowed|disallow",
                                   since=mark)


class TLSTests(TokenAssertions, BlackBoxCase, unittest.TestCase):
    """A full-access homeserver with a certificate nobody trusts (docs/federation.md#tls)."""

    def setUp(self):
        BlackBoxCase.setUp(self)
        self.hs = self.make_homeserver(self_signed=True)
        self.lk = self.make_livekit()
        self.token = "syt_tls"
        self.hs.add_token(self.token, f"@alice:{self.hs.server_name}")

    def env(self, **extra):
        env = self.service_env(livekit_url=self.lk.url, full_access=self.hs.server_name, **extra)
        del env["RTCAUTH_CA_FILE"]
        return env

    @defer.inlineCallbacks
    def test_self_signed_refused(self):
        daemon = yield self.start_daemon(self.env())
        result = yield daemon.post_json("/get_token", get_token_body(self.hs.server_name, self.token))
        self.assert_matrix_error(result, 401, "M_UNAUTHORIZED", "The request could not be authorised.")
        # it did connect (so the refusal is the handshake), yet no HTTP request got through
        self.assertGreaterEqual(len(self.hs.connections), 1)
        self.assertEqual(self.hs.requests, [])
        self.assertEqual(self.lk.calls, [])

    @defer.inlineCallbacks
    def test_insecure_switch_accepts_self_signed_and_warns(self):
        daemon = yield self.start_daemon(
            self.env(LIVEKIT_INSECURE_SKIP_VERIFY_TLS="YES_I_KNOW_WHAT_I_AM_DOING")
        )
        result = yield daemon.post_json("/get_token", get_token_body(self.hs.server_name, self.token))
        self.assert_token_response(result, self.lk.url)
        self.assertEqual(len(self.hs.userinfo_requests), 1)
        self.assertEqual(len(self.lk.create_room_requests), 1)
        yield daemon.wait_for_line("LIVEKIT_INSECURE_SKIP_VERIFY_TLS", "warn", INSECURE_BANNER)

    @defer.inlineCallbacks
    def test_insecure_switch_other_value_still_verifies(self):
        daemon = yield self.start_daemon(self.env(LIVEKIT_INSECURE_SKIP_VERIFY_TLS="true"))
        result = yield daemon.post_json("/get_token", get_token_body(self.hs.server_name, self.token))
        self.assert_matrix_error(result, 401, "M_UNAUTHORIZED", "The request could not be authorised.")
        self.assertGreaterEqual(len(self.hs.connections), 1)
        self.assertEqual(self.hs.requests, [])
        banner = [line for line in daemon.lines_since(0) if re.search(INSECURE_BANNER, line, re.I)]
        self.assertEqual(banner, [], "claims verification is off although the value is not the magic one")


class TimeoutTests(TokenAssertions, BlackBoxCase, unittest.TestCase):

    @defer.inlineCallbacks
    def test_homeserver_never_answers(self):
        hs = self.make_homeserver()
        hs.never_answer()
        hs.add_token("syt_slow", f"@alice:{hs.server_name}")
        lk = self.make_livekit()
        daemon = yield self.start_daemon(self.service_env(
            livekit_url=lk.url, full_access=hs.server_name, RTCAUTH_OUTBOUND_TIMEOUT_SECONDS="1",
        ))
        mark = daemon.mark()
        # bounded by this request's own deadline (well under the 30 s upstream default)
        result = yield daemon.post_json("/get_token", get_token_body(hs.server_name, "syt_slow"), timeout=8)
        self.assert_matrix_error(result, 401, "M_UNAUTHORIZED", "The request could not be authorised.")
        self.assertGreaterEqual(len(hs.userinfo_requests), 1)
        self.assertEqual(lk.calls, [])
        yield daemon.wait_for_line(r"timed?\s?out", since=mark)


class IPv6Tests(TokenAssertions, BlackBoxCase, unittest.TestCase):

    @defer.inlineCallbacks
    def test_everything_on_ipv6_loopback(self):
        hs = self.make_homeserver(host="::1")
        lk = self.make_livekit(host="::1")
        self.assertTrue(hs.server_name.startswith("[::1]:"), hs.server_name)
        self.assertTrue(lk.url.startswith("ws://[::1]:"), lk.url)
        user = f"@alice:{hs.server_name}"
        hs.add_token("syt_v6", user)
        daemon = yield self.start_daemon(
            self.service_env(livekit_url=lk.url, full_access=hs.server_name), listen_host="::1"
        )
        self.assertTrue(daemon.base_url.startswith("http://[::1]:"))
        t0 = time.time()
        result = yield daemon.post_json("/get_token", get_token_body(hs.server_name, "syt_v6"))
        token = self.assert_token_response(result, lk.url)
        alias = lk_hash(ROOM_ID, SLOT_ID)
        self.assert_participant_jwt(token, identity=lk_hash(user, DEVICE, MEMBER_ID), alias=alias,
                                    t0=t0, t1=time.time())
        req = self.assert_one_userinfo(hs, "syt_v6")
        self.assertEqual(req.peer_host, "::1")
        call = self.assert_create_room(lk, alias)
        self.assertEqual(call.call.peer_host, "::1")


class HTTPSurfaceTests(TokenAssertions, BlackBoxCase, unittest.TestCase):
    """Routing, CORS and body handling over the real process (docs/endpoints.md)."""

    POST_ENDPOINTS = ["/get_token", "/sfu/get", "/delegate_delayed_leave"]

    @defer.inlineCallbacks
    def setUp(self):
        BlackBoxCase.setUp(self)
        self.daemon = yield self.start_daemon(self.service_env(
            livekit_url=UNREACHABLE_SFU, full_access="example.com", RTCAUTH_MAX_BODY_BYTES="1024",
        ))

    @defer.inlineCallbacks
    def test_cors_preflight_and_wrong_methods(self):
        for path in self.POST_ENDPOINTS:
            result = yield self.daemon.request(
                "OPTIONS", path, headers={"Origin": "https://call.example", "Access-Control-Request-Method": "POST"}
            )
            self.assertEqual((result.code, result.body), (200, b""), path)
            self.assert_cors(result)
            for method in ["GET", "PUT", "DELETE", "PATCH"]:
                result = yield self.daemon.request(method, path)
                self.assertEqual((result.code, result.body), (405, b""), f"{method} {path}")
                self.assert_cors(result)
            result = yield self.daemon.request("HEAD", path)
            self.assertEqual(result.code, 405, f"HEAD {path}")
            self.assert_cors(result)

    @defer.inlineCallbacks
    def test_cors_on_errors(self):
        for path in self.POST_ENDPOINTS:
            result = yield self.daemon.request("POST", path, b"{}")
            self.assertEqual(result.code, 400, path)
            self.assert_cors(result)

    @defer.inlineCallbacks
    def test_healthz(self):
        for method in ["GET", "HEAD"]:
            result = yield self.daemon.request(method, "/healthz")
            self.assertEqual((result.code, result.body), (200, b""), method)
            self.assertIsNone(result.header("Access-Control-Allow-Origin"))
        for method in ["POST", "PUT", "DELETE", "OPTIONS"]:
            result = yield self.daemon.request(method, "/healthz", b"" if method != "OPTIONS" else None)
            self.assertEqual((result.code, result.body), (405, b""), method)
            self.assertIsNone(result.header("Access-Control-Allow-Origin"))

    @defer.inlineCallbacks
    def test_unknown_paths(self):
        for method, path in [("GET", "/"), ("GET", "/nope"), ("POST", "/get_token/"), ("POST", "/sfu/get/"),
                             ("GET", "/healthz/"), ("POST", "/GET_TOKEN"), ("POST", "/livekit/jwt/get_token")]:
            result = yield self.daemon.request(method, path, b"{}" if method == "POST" else None)
            self.assertEqual((result.code, result.body), (404, b"404 page not found\n"), f"{method} {path}")
            self.assertEqual(result.header("Content-Type"), "text/plain; charset=utf-8")
            self.assertIsNone(result.header("Access-Control-Allow-Origin"))

    @defer.inlineCallbacks
    def test_query_string_ignored_for_routing(self):
        result = yield self.daemon.request("GET", "/healthz?probe=1")
        self.assertEqual(result.code, 200)

    @defer.inlineCallbacks
    def test_bad_json(self):
        for body in [b"{not json", b"", b"[]", b'{"room_id": NaN}', b'{"unknown_key": 1}']:
            result = yield self.daemon.request("POST", "/get_token", body)
            self.assert_matrix_error(result, 400, "M_NOT_JSON", "Error reading request")

    @defer.inlineCallbacks
    def test_body_limit(self):
        # exactly at the limit: read and validated (400 M_BAD_JSON), not refused
        at_limit = b"{}" + b" " * (1024 - 2)
        result = yield self.daemon.request("POST", "/get_token", at_limit)
        self.assert_matrix_error(result, 400, "M_BAD_JSON", "The request body is missing `room_id` or `slot_id`")
        over = b"{}" + b" " * (1024 - 1)
        for path in self.POST_ENDPOINTS:
            result = yield self.daemon.request("POST", path, over)
            self.assertEqual(result.code, 413, path)
            obj = json.loads(result.body)
            self.assertEqual(list(obj), ["errcode", "error"])
            self.assertEqual(obj["errcode"], "M_TOO_LARGE")
            self.assertEqual(result.body, matrix_error_body("M_TOO_LARGE", obj["error"]))
            self.assert_cors(result)

