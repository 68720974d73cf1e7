"""End to end: rtcauthd as Synapse's application service (docs/appservice-synapse.md).

Both shared Synapses register rtcauthd (``tests.e2e.synapse.AppService``) with the
namespaced keys Synapse 1.163.2 reads, enable MSC4502/MSC4512/MSC4143 and advertise a
``matrix_rtc`` transport; they federate with each other over TLS (test CA, loopback
allowed).  Each homeserver's daemon and fake SFU run on ports reserved before Synapse
started, because the registration and the transport name them.

Two kinds of tests:

- ``RigTests`` prove the deployment itself and pass whatever the daemon serves: Synapse
  loads the registration, answers ``/rtc/transports`` with the configured transport,
  grants the AS its is_joined scope, proxies C-S and (through fed_proxy and the other
  Synapse) S-S ``rtc/livekit`` paths to the daemon's port, and answers Element Call's
  delegation probe.
- ``FlowTests`` drive the application-service flows through Synapse.  They skip, with the
  reason, while the daemon does not serve the AS routes (probed with an hs_token-
  authenticated ``POST /_matrix/app/v1/ping``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import time
from typing import Optional
from urllib.parse import quote

import jwt
from livekit.api import TokenVerifier
from livekit.protocol.models import DisconnectReason
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest

from tests.blackbox.harness import DaemonProcess
from tests.e2e.synapse import MatrixClient, MatrixUser, SynapseServer
from tests.e2e.test_synapse import SLOT_ID, E2ECase, E2ELiveKit

CS_PREFIX = "/_matrix/client/unstable/io.element.msc4195/rtc/livekit"
SS_PREFIX = "/_matrix/federation/unstable/io.element.msc4195/rtc/livekit"
IS_JOINED = "/_matrix/client/unstable/io.element.msc4502/rooms/{room}/is_joined"
FED_PROXY = "/_matrix/client/unstable/io.element.msc4512/appservice/fed_proxy"
TRANSPORTS = "/_matrix/client/unstable/org.matrix.msc4143/rtc/transports"
DAEMON_404 = b"404 page not found\n"
#: Bounds for Synapse's AS ping, which can answer 502 while it still re-sends old transactions.
PING_DEADLINE = 30.0

#: Why the AS flow tests skip, once a probe found the routes missing (None: not known).
_as_routes_missing: Optional[str] = None


def v07_hash(*items: str) -> str:
    """H(...) as v0.7 computes it (docs/authorization.md#hash-function): no HTML escaping."""
    data = json.dumps(list(items), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii").rstrip("=")


def as_env(hs: SynapseServer, *, registration_file: bool) -> dict[str, str]:
    """What an operator sets for AS mode: the registration file or the token pair."""
    env = {"LIVEKIT_HS_SERVER_NAME": hs.server_name,
           "LIVEKIT_CS_API_URL_OVERRIDES": f"{hs.server_name}={hs.client_url}"}
    if registration_file:
        env["LIVEKIT_AS_REGISTRATION_FILE"] = hs.registration_path
    else:
        env.update(LIVEKIT_AS_TOKEN=hs.appservice.as_token, LIVEKIT_HS_TOKEN=hs.appservice.hs_token)
    return env


class AppServiceCase(E2ECase):
    """The shared Synapses plus, per homeserver, a fake SFU on its advertised port."""

    @defer.inlineCallbacks
    def setUp(self):
        yield E2ECase.setUp(self)
        # the base case's SFU listens on a random port; the transports name fixed ones
        yield self.lk.stop()
        self.lk = self.sfu(self.full)
        self.lk_remote = self.sfu(self.restricted)

    def sfu(self, hs: SynapseServer) -> E2ELiveKit:
        lk = E2ELiveKit()
        lk.listen(host="127.0.0.1", port=hs.appservice.sfu_port)
        self.addCleanup(lk.stop)
        self.assertEqual(lk.url, hs.appservice.sfu_url)
        return lk

    def as_daemon(self, hs: SynapseServer, *, registration_file: bool = True, **extra: str) -> DaemonProcess:
        """The daemon Synapse proxies to: both modes on one port (legacy routes too)."""
        env = self.service_env(livekit_url=hs.appservice.sfu_url, full_access=self.full.server_name,
                               RTCAUTH_FEDERATION_IP_RANGE_ALLOWLIST="127.0.0.0/8",
                               **as_env(hs, registration_file=registration_file), **extra)
        daemon = DaemonProcess(workdir=os.path.join(self.workdir, f"daemon-{hs.name}"), env=env,
                               port=hs.appservice.service_port)
        self.addCleanup(daemon.cleanup)
        self.__dict__.setdefault("_daemons", []).append(daemon)
        return daemon

    @staticmethod
    def skip_if_as_routes_missing() -> None:
        """Skip at once when an earlier probe in this run found no AS routes (the daemon's
        code does not change during a run; this saves a daemon start per skipped test)."""
        if _as_routes_missing is not None:
            raise SkipTest(_as_routes_missing)

    @defer.inlineCallbacks
    def require_as_routes(self, daemon: DaemonProcess, hs: SynapseServer):
        """Skip unless the daemon answers Synapse's ping the AS way (docs/appservice-synapse.md#tests)."""
        global _as_routes_missing
        got = yield daemon.request("POST", "/_matrix/app/v1/ping", b"{}",
                                   {"Authorization": "Bearer " + hs.appservice.hs_token,
                                    "Content-Type": "application/json"})
        if got.code == 404:
            _as_routes_missing = ("rtcauthd does not serve the application-service routes yet "
                                  "(POST /_matrix/app/v1/ping with the hs_token answered 404)")
            raise SkipTest(_as_routes_missing)
        self.assertEqual((got.code, got.json()), (200, {}), daemon.describe())

    def client_for(self, hs: SynapseServer) -> MatrixClient:
        return self.full_client if hs is self.full else self.restricted_client

    @defer.inlineCallbacks
    def federated_room(self):
        """Alice (full) creates a call room; Bob (restricted) joins it over federation."""
        alice = yield self.full_client.register(self.new_localpart("alice"))
        bob = yield self.restricted_client.register(self.new_localpart("bob"))
        room_id = yield self.full_client.create_call_room(alice)
        yield self.restricted_client.call("POST", f"/_matrix/client/v3/join/{quote(room_id, safe='')}", {},
                                          user=bob, query={"server_name": self.full.server_name})
        return alice, bob, room_id

    def is_joined(self, hs: SynapseServer, room_id: str, **subject: str):
        return self.client_for(hs).fetch("GET", IS_JOINED.format(room=quote(room_id, safe="")),
                                         token=hs.appservice.as_token, query=subject)

    def proxied(self, hs: SynapseServer, user: Optional[MatrixUser], endpoint: str, body: Optional[dict]):
        """A client's POST to Synapse's proxied MSC4195 endpoint."""
        return self.client_for(hs).fetch(
            "POST", f"{CS_PREFIX}/{endpoint}", json.dumps(body).encode() if body is not None else None,
            token=user.access_token if user is not None else None,
            headers={"Content-Type": "application/json"} if body is not None else None)


# ---------------------------------------------------------------------------------------
# the deployment itself (passes with any daemon)


class RigTests(AppServiceCase):
    @defer.inlineCallbacks
    def test_synapse_loads_the_registration(self):
        for hs in (self.full, self.restricted):
            client = self.client_for(hs)
            got = yield client.fetch("GET", "/_matrix/client/v3/account/whoami", token=hs.appservice.as_token)
            self.assertEqual((got.code, got.json().get("user_id")), (200, hs.appservice.sender), got.body)
            # the flags show in /versions (is_joined's feature detection reads the first);
            # with msc4502_enabled off Synapse 1.163.2 advertises it as false
            got = yield client.fetch("GET", "/_matrix/client/versions")
            features = got.json()["unstable_features"]
            self.assertEqual((features.get("io.element.msc4502"), features.get("org.matrix.msc4143")), (True, True),
                             features)
        # "restricted" is registered with url: null, as in production: no ping
        got = yield self.restricted_client.fetch("POST", "/_matrix/client/v1/appservice/rtcauthd/ping", b"{}",
                                                 token=self.restricted.appservice.as_token)
        self.assertEqual((got.code, got.json()["errcode"]), (400, "M_URL_NOT_SET"), got.body)
        # "full" has url set; with no daemon listening Synapse reports the connection failure
        got = yield self.full_client.fetch("POST", "/_matrix/client/v1/appservice/rtcauthd/ping", b"{}",
                                           token=self.full.appservice.as_token)
        self.assertEqual(got.code, 502, got.body)
        self.assertIn(got.json()["errcode"], ("M_CONNECTION_FAILED", "M_BAD_STATUS"), got.body)

    @defer.inlineCallbacks
    def test_rtc_transports_answer_the_configured_transport(self):
        for hs in (self.full, self.restricted):
            user = yield self.client_for(hs).register(self.new_localpart("tina"))
            got = yield self.client_for(hs).call("GET", TRANSPORTS, user=user)
            self.assertEqual(got, {"rtc_transports": [{
                "type": "livekit", "url": hs.appservice.sfu_url, "livekit_service_url": hs.appservice.service_url,
            }]})

    @defer.inlineCallbacks
    def test_is_joined_scope_and_federation_between_the_homeservers(self):
        alice, bob, room_id = yield self.federated_room()
        stranger = yield self.full_client.register(self.new_localpart("sam"))
        for hs, subject, joined in [
            (self.full, {"mxid": alice.user_id}, True),
            (self.full, {"mxid": bob.user_id}, True),  # remote member, from the room state
            (self.full, {"mxid": stranger.user_id}, False),
            (self.full, {"server_name": self.restricted.server_name}, True),
            (self.restricted, {"mxid": bob.user_id}, True),
            (self.restricted, {"server_name": self.full.server_name}, True),
        ]:
            got = yield self.is_joined(hs, room_id, **subject)
            self.assertEqual((got.code, got.json()), (200, {"joined": joined}), (hs.name, subject, got.body))
        # a user's own token has no is_joined scope: only the registration grants it
        got = yield self.full_client.fetch("GET", IS_JOINED.format(room=quote(room_id, safe="")),
                                           token=alice.access_token, query={"mxid": alice.user_id})
        self.assertEqual(got.code, 403, got.body)

    @defer.inlineCallbacks
    def test_synapse_proxies_cs_and_ss_paths_to_the_daemon(self):
        """A path no daemon serves comes back as the daemon's own 404 text, not Synapse's
        JSON 404: the request went through Synapse's proxy to the daemon's port."""
        daemon_full = yield self.as_daemon(self.full).start()
        daemon_restricted = yield self.as_daemon(self.restricted, registration_file=False).start()
        user = yield self.full_client.register(self.new_localpart("pia"))
        for path in (f"{CS_PREFIX}/rig_probe", "/_matrix/client/v1/rtc/livekit/rig_probe"):
            mark = daemon_full.mark()
            got = yield self.full_client.fetch("POST", path, b"{}", token=user.access_token,
                                               headers={"Content-Type": "application/json"})
            self.assertEqual((got.code, got.body), (404, DAEMON_404), f"{path}\n{self.everything()}")
            yield daemon_full.wait_for_output(path, since=mark)
            self.assertNotIn(user.access_token, daemon_full.output)

        # S-S: full's fed_proxy → restricted's federation listener → restricted's daemon.
        # (Synapse 1.163.2's fed_proxy sends no body for an empty ``body`` object, which
        # the receiving Synapse answers with M_NOT_JSON, hence a non-empty one.)
        mark = daemon_restricted.mark()
        got = yield self.full_client.fetch("POST", FED_PROXY, json.dumps({
            "destination": self.restricted.server_name, "method": "POST",
            "path": f"{SS_PREFIX}/rig_probe", "body": {"probe": True},
        }).encode(), token=self.full.appservice.as_token, headers={"Content-Type": "application/json"})
        self.assertEqual((got.code, got.json()), (200, {"status": 404, "content": None}),
                         f"{got.body!r}\n{self.everything()}\n{self.restricted.describe()}")
        yield daemon_restricted.wait_for_output(f"{SS_PREFIX}/rig_probe", since=mark)
        self.assertNotIn(f"{SS_PREFIX}/rig_probe", daemon_full.output)

    @defer.inlineCallbacks
    def test_delegation_probe_through_synapse(self):
        """Element Call's probe: empty, unauthenticated POST; anything but 404, with CORS."""
        for hs in (self.full, self.restricted):
            got = yield self.proxied(hs, None, "delegate_delayed_leave", None)
            self.assertNotEqual(got.code, 404)
            self.assertEqual((got.code, got.json()["errcode"]), (401, "M_MISSING_TOKEN"), got.body)
            self.assertEqual(got.header("Access-Control-Allow-Origin"), "*")


# ---------------------------------------------------------------------------------------
# the application-service flows through Synapse


class FlowTests(AppServiceCase):
    DELAY_MS = 4000

    @defer.inlineCallbacks
    def setUp(self):
        self.skip_if_as_routes_missing()
        yield AppServiceCase.setUp(self)
        self.daemon = yield self.as_daemon(self.full).start()
        yield self.require_as_routes(self.daemon, self.full)

    def token_body(self, room_id: str, member_id: str, **extra) -> dict:
        return dict({"url": self.full.appservice.sfu_url, "room_id": room_id, "slot_id": SLOT_ID,
                     "member_id": member_id}, **extra)

    def assert_as_jwt(self, got, *, identity: str, alias: str, can_publish: bool, t0: float, t1: float):
        """docs/authorization.md#participant-token with the v0.7 grants."""
        self.assertEqual(got.code, 200, f"{got.body!r}\n{self.everything()}")
        obj = got.json()
        self.assertEqual(list(obj), ["jwt"], obj)
        token = obj["jwt"]
        claims = jwt.decode(token, self.secret, algorithms=["HS256"], issuer=self.key,
                            options={"require": ["exp", "nbf", "iss", "sub"]})
        self.assertEqual(claims["sub"], identity)
        video = claims["video"]
        self.assertEqual((video["room"], video["roomJoin"], video["canSubscribe"]), (alias, True, True), video)
        self.assertIs(video["canPublish"], can_publish, video)  # explicit: LiveKit reads a missing one as true
        self.assertIs(video["canUpdateOwnMetadata"], False, video)  # opt-in, off by default
        self.assertFalse(video.get("roomCreate", False), video)
        self.assertFalse(video.get("hidden", False), video)
        self.assertEqual(claims["exp"] - claims["nbf"], 3600)
        self.assertTrue(int(t0) - 1 <= claims["nbf"] <= t1 + 1, (t0, claims["nbf"], t1))
        verified = TokenVerifier(self.key, self.secret).verify(token)
        self.assertEqual((verified.identity, verified.video.room), (identity, alias))
        return claims

    def assert_matrix_error(self, got, status: int, errcode: str, message: str):
        self.assertEqual((got.code, got.json()), (status, {"errcode": errcode, "error": message}),
                         self.everything())

    @defer.inlineCallbacks
    def test_joined_local_user_gets_a_jwt_through_synapse(self):
        alice = yield self.full_client.register(self.new_localpart("alice"))
        room_id = yield self.full_client.create_call_room(alice)
        alias = v07_hash(room_id, SLOT_ID)
        t0 = time.time()
        got = yield self.proxied(self.full, alice, "get_token", self.token_body(room_id, "ma"))
        t1 = time.time()
        self.assert_as_jwt(got, identity=v07_hash(alice.user_id, "ma"), alias=alias, can_publish=True, t0=t0, t1=t1)
        self.assertEqual(got.header("Access-Control-Allow-Origin"), "*")
        self.assertEqual([(c.name, c.empty_timeout, c.departure_timeout, c.max_participants)
                          for c in self.lk.create_room_requests], [(alias, 300, 20, 0)])
        self.assertEqual(self.lk_remote.calls, [])
        self.assertNotIn(alice.access_token, self.daemon.output)
        self.assertNotIn(self.full.appservice.hs_token, self.daemon.output)
        self.assertNotIn(self.full.appservice.as_token, self.daemon.output)

    @defer.inlineCallbacks
    def test_user_not_joined_is_403(self):
        alice = yield self.full_client.register(self.new_localpart("alice"))
        stranger = yield self.full_client.register(self.new_localpart("sam"))
        room_id = yield self.full_client.create_call_room(alice)
        got = yield self.proxied(self.full, stranger, "get_token", self.token_body(room_id, "ms"))
        self.assert_matrix_error(got, 403, "M_FORBIDDEN", "The requesting user is not a member of the room")
        self.assertEqual(self.lk.calls, [])

    @defer.inlineCallbacks
    def test_wrong_url_is_400(self):
        alice = yield self.full_client.register(self.new_localpart("alice"))
        room_id = yield self.full_client.create_call_room(alice)
        mark = self.full.log_mark()
        got = yield self.proxied(self.full, alice, "get_token",
                                 self.token_body(room_id, "ma", url="wss://sfu.elsewhere.example"))
        self.assert_matrix_error(got, 400, "M_INVALID_PARAM",
                                 "The request `url` does not match this service's LiveKit URL")
        self.assertEqual(self.full.access_lines(mark, containing="is_joined"), [])
        self.assertEqual(self.lk.calls, [])

    @defer.inlineCallbacks
    def test_synapse_as_ping_succeeds(self):
        """Synapse may answer 502 while it re-sends transactions that failed before the
        daemon listened; it settles once they are through."""
        deadline = reactor.seconds() + PING_DEADLINE
        while True:
            got = yield self.full_client.fetch(
                "POST", "/_matrix/client/v1/appservice/rtcauthd/ping",
                json.dumps({"transaction_id": "e2e-" + secrets.token_hex(4)}).encode(),
                token=self.full.appservice.as_token, headers={"Content-Type": "application/json"})
            if got.code == 200 or reactor.seconds() > deadline:
                break
            yield deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(got.code, 200, f"{got.body!r}\n{self.everything()}")
        self.assertEqual(list(got.json()), ["duration_ms"], got.body)
        self.assertIsInstance(got.json()["duration_ms"], int)

    @defer.inlineCallbacks
    def test_delegation_through_synapse_sends_the_leave_once(self):
        client = self.full_client
        alice = yield client.register(self.new_localpart("alice"))
        room_id = yield client.create_call_room(alice)
        alias = v07_hash(room_id, SLOT_ID)
        identity = v07_hash(alice.user_id, "ma")
        delay_id = yield self.join_call(client, alice, room_id, delay_ms=self.DELAY_MS)
        mark = self.full.log_mark()

        got = yield self.proxied(self.full, alice, "delegate_delayed_leave",
                                 self.token_body(room_id, "ma", delay_id=delay_id))
        self.assertEqual((got.code, got.json()), (200, {}), self.everything())
        # the delay was looked up as Alice, with the as_token
        lookups = self.full.access_lines(mark, containing=f"/delayed_events/{delay_id}")
        self.assertTrue(any(" 200 \"" in line for line in lookups), lookups)

        self.lk.joined.add((alias, identity))
        yield self.webhook(self.daemon, "participant_joined", alias=alias, identity=identity)
        restarts = yield self.wait_access(self.full, mark, f"/delayed_events/{delay_id}/restart", status=200)
        self.assertIn("user_id=", restarts[0])  # made as the user (identity assertion)
        yield deferLater(reactor, self.DELAY_MS / 1000 + 1.0, lambda: None)
        content = yield self.membership(client, alice, room_id)
        self.assertEqual(content.get("application"), "m.call", self.everything())

        self.lk.joined.clear()
        yield self.webhook(self.daemon, "participant_left", alias=alias, identity=identity,
                           reason=DisconnectReason.CLIENT_INITIATED)
        yield self.wait_left(client, alice, room_id, "the leave after participant_left")
        yield self.assert_one_leave(client, alice, room_id, delay_id)
        sends = yield self.wait_access(self.full, mark, f"/delayed_events/{delay_id}/send", status=200)
        self.assertEqual(len(sends), 1, sends)
        self.assertIn("user_id=", sends[0])

    @defer.inlineCallbacks
    def test_remote_user_token_across_the_two_homeservers(self):
        """Bob (restricted) asks his homeserver for a token on full's SFU: his daemon checks
        him and full's server, relays through fed_proxy; full's daemon checks Bob and
        itself, creates the room and mints a subscribe-only token."""
        remote = yield self.as_daemon(self.restricted, registration_file=False).start()
        yield self.require_as_routes(remote, self.restricted)
        alice, bob, room_id = yield self.federated_room()
        alias = v07_hash(room_id, SLOT_ID)
        t0 = time.time()
        got = yield self.proxied(self.restricted, bob, "get_token",
                                 self.token_body(room_id, "mb", server_name=self.full.server_name))
        t1 = time.time()
        self.assert_as_jwt(got, identity=v07_hash(bob.user_id, "mb"), alias=alias, can_publish=False, t0=t0, t1=t1)
        self.assertEqual([c.name for c in self.lk.create_room_requests], [alias])
        self.assertEqual(self.lk_remote.calls, [])

        # a member of nothing on the restricted side never reaches the relay
        carol = yield self.restricted_client.register(self.new_localpart("carol"))
        got = yield self.proxied(self.restricted, carol, "get_token",
                                 self.token_body(room_id, "mc", server_name=self.full.server_name))
        self.assert_matrix_error(got, 403, "M_FORBIDDEN", "The requesting user is not a member of the room")
        self.assertEqual(len(self.lk.create_room_requests), 1)
