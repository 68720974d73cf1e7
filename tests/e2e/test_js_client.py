"""End to end with a real client: matrix-js-sdk 43 (from npm) against Synapse and rtcauthd.

``tests/e2e/js/client.mjs`` does what Element Call does (docs/appservice-synapse.md#real-client):
the SDK reads the homeserver's ``/rtc/transports``, then either fetches an OpenID token and
POSTs it to the transport's ``livekit_service_url`` + ``/get_token`` (the legacy flow), or
asks the homeserver's proxied MSC4195 ``get_token`` (the C-S flow, skipped until the
daemon serves the AS routes).  Both end with the JWT checked here, and with Element
Call's delegation probe of both URLs.
"""

from __future__ import annotations

import time

import jwt
from livekit.api import TokenVerifier
from twisted.internet import defer, reactor

from tests.blackbox.harness import lk_hash
from tests.e2e.jsclient import run_client
from tests.e2e.test_appservice import AppServiceCase, v07_hash
from tests.e2e.test_synapse import SLOT_ID


class JSClientCase(AppServiceCase):
    @defer.inlineCallbacks
    def setUp(self):
        yield AppServiceCase.setUp(self)
        self.daemon = yield self.as_daemon(self.full).start()

    @defer.inlineCallbacks
    def client(self, user, room_id: str, member_id: str, **options):
        ok, result, output = yield run_client(
            reactor, baseUrl=self.full.client_url, userId=user.user_id, accessToken=user.access_token,
            deviceId=user.device_id, roomId=room_id, memberId=member_id, **options)
        return ok, result, f"{output}\n{self.everything()}"

    def check_claims(self, token: str, *, identity: str, alias: str, t0: float, t1: float) -> dict:
        claims = jwt.decode(token, self.secret, algorithms=["HS256"], issuer=self.key,
                            options={"require": ["exp", "nbf", "iss", "sub"]})
        self.assertEqual(claims["sub"], identity)
        video = claims["video"]
        self.assertEqual((video["room"], video["roomJoin"], video["canSubscribe"], video["canPublish"]),
                         (alias, True, True, True), video)
        self.assertFalse(video.get("roomCreate", False), video)
        self.assertEqual(claims["exp"] - claims["nbf"], 3600)
        self.assertTrue(int(t0) - 1 <= claims["nbf"] <= t1 + 1, (t0, claims["nbf"], t1))
        verified = TokenVerifier(self.key, self.secret).verify(token)
        self.assertEqual((verified.identity, verified.video.room), (identity, alias))
        return claims

    def check_probes(self, probe: dict) -> None:
        """Both probes say "delegation supported": not 404, and readable cross-origin."""
        self.assertEqual(probe["homeserver"], {"status": 401, "allowOrigin": "*"}, probe)
        self.assertEqual(probe["service"], {"status": 400, "allowOrigin": "*"}, probe)


class LegacyFlowTests(JSClientCase):
    @defer.inlineCallbacks
    def test_openid_get_token_as_element_call_does(self):
        alice = yield self.full_client.register(self.new_localpart("alice"))
        room_id = yield self.full_client.create_call_room(alice)
        alias = lk_hash(room_id, SLOT_ID)
        t0 = time.time()
        ok, result, output = yield self.client(alice, room_id, "member-js", flow="openid")
        t1 = time.time()
        self.assertTrue(ok, output)
        self.assertEqual(result["transport"], self.full.appservice.transport)
        self.assertEqual((result["keys"], result["url"]), (["url", "jwt"], self.full.appservice.sfu_url))
        self.check_claims(result["jwt"], identity=lk_hash(alice.user_id, alice.device_id, "member-js"),
                          alias=alias, t0=t0, t1=t1)
        self.assertEqual([c.name for c in self.lk.create_room_requests], [alias])
        self.check_probes(result["probe"])
        self.assertNotIn(alice.access_token, self.daemon.output)


class ProxiedFlowTests(JSClientCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.skip_if_as_routes_missing()
        yield JSClientCase.setUp(self)
        yield self.require_as_routes(self.daemon, self.full)

    @defer.inlineCallbacks
    def test_cs_get_token_through_synapse(self):
        alice = yield self.full_client.register(self.new_localpart("alice"))
        room_id = yield self.full_client.create_call_room(alice)
        alias = v07_hash(room_id, SLOT_ID)
        # the body as the SDK types it (member object), then as newer Element Call sends it
        for shape in ("member", "member_id"):
            t0 = time.time()
            ok, result, output = yield self.client(alice, room_id, "member-js", flow="cs", shape=shape)
            t1 = time.time()
            self.assertTrue(ok, output)
            self.assertEqual(result["keys"], ["jwt"], output)
            self.check_claims(result["jwt"], identity=v07_hash(alice.user_id, "member-js"), alias=alias,
                              t0=t0, t1=t1)
            self.check_probes(result["probe"])
        self.assertEqual([c.name for c in self.lk.create_room_requests], [alias, alias])

    @defer.inlineCallbacks
    def test_cs_get_token_for_a_room_the_user_is_not_in(self):
        alice = yield self.full_client.register(self.new_localpart("alice"))
        stranger = yield self.full_client.register(self.new_localpart("sam"))
        room_id = yield self.full_client.create_call_room(alice)
        ok, error, output = yield self.client(stranger, room_id, "member-js", flow="cs", shape="member_id")
        self.assertFalse(ok, output)
        self.assertEqual((error["httpStatus"], error["errcode"]), (403, "M_FORBIDDEN"), output)
        self.assertEqual(self.lk.calls, [])
