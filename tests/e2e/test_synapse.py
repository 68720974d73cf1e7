"""End to end: the real rtcauthd daemon against real Synapse homeservers (issue 6).

Two Synapses run for the whole test run (``tests.e2e.synapse``): "full" is listed in
LIVEKIT_FULL_ACCESS_HOMESERVERS, "restricted" is not (loopback is allowed for it with
RTCAUTH_FEDERATION_IP_RANGE_ALLOWLIST, as an operator with a LAN homeserver would).  The
daemon runs as a process per test; LiveKit is an in-process Twirp fake (protobuf only)
that also answers GetParticipant; webhooks are signed with livekit-api's AccessToken the
way the SFU signs them (docs/livekit.md#webhook-signature).  Expected identities and aliases are computed
here (tests.blackbox.harness.lk_hash), never taken from rtcauthd.

Opt out explicitly with RTCAUTH_SKIP_SYNAPSE=1; otherwise a missing Synapse virtualenv
is created (scripts/synapse-venv) and a failed install fails the tests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from typing import Optional

import jwt
from google.protobuf.json_format import MessageToJson
from livekit.api import AccessToken, TokenVerifier
from livekit.protocol.models import DisconnectReason, ParticipantInfo, Room
from livekit.protocol.room import RoomParticipantIdentity
from livekit.protocol.webhook import WebhookEvent
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest
from twisted.trial.unittest import FailTest

from tests.blackbox.fake_livekit import PROTOBUF, FakeLiveKit, twirp_error
from tests.blackbox.harness import JOSE_HEADER_B64, BlackBoxCase, lk_hash, matrix_error_body, string_array_json
from tests.e2e.synapse import CALL_MEMBER, MatrixClient, MatrixUser, get_cluster, skip_reason

SLOT_ID = "m.call#ROOM"
UNAUTHORISED = matrix_error_body("M_UNAUTHORIZED", "The request could not be authorised.")
DELEGATION_REFUSED = "Delegation of delayed events is only supported for full access users"
USERINFO = "/_matrix/federation/v1/openid/userinfo"
REDIS_JOBS = "lk-jwt:jobs"

#: How long a webhook may take to turn into room state (issue 6: "within 2 s").
LEAVE_DEADLINE = 2.0


# ---------------------------------------------------------------------------------------
# LiveKit side


class E2ELiveKit(FakeLiveKit):
    """The shared Twirp fake plus GetParticipant (docs/livekit.md#getparticipant): ``not_found`` until the
    test marks the participant as joined, as a real SFU answers."""

    def __init__(self) -> None:
        super().__init__()
        #: the same set RemoveParticipant and DeleteRoom take participants out of
        self.joined: set[tuple[str, str]] = self.present
        self.lookups: list[tuple[str, str, bool]] = []
        self._lookup_calls: list = []
        self.methods["GetParticipant"] = self._e2e_get_participant

    def _e2e_get_participant(self, call):
        try:
            req = RoomParticipantIdentity.FromString(call.body)
        except Exception as e:
            return twirp_error(400, "malformed", f"cannot decode RoomParticipantIdentity: {e}")
        present = (req.room, req.identity) in self.joined
        self.lookups.append((req.room, req.identity, present))
        self._lookup_calls.append(call)
        if not present:
            return twirp_error(404, "not_found", "participant not found")
        info = ParticipantInfo(sid="PA_e2e", identity=req.identity, state=ParticipantInfo.State.ACTIVE)
        return 200, info.SerializeToString(), PROTOBUF

    @property
    def rejected(self):
        decoded = {id(c.call) for c in self.create_room_requests}
        decoded.update(id(c) for c in self._lookup_calls)
        decoded.update(id(c.call) for c in self.removal_requests)
        return [c for c in self.calls if id(c) not in decoded]


def signed_webhook(event: str, *, room: str, identity: str, key: str, secret: str,
                   reason: Optional[int] = None) -> tuple[bytes, str]:
    """(body, Authorization) as LiveKit sends it: protojson WebhookEvent, raw JWT with sha256."""
    participant = ParticipantInfo(sid="PA_e2e", identity=identity, state=ParticipantInfo.State.ACTIVE)
    if reason is not None:
        participant.disconnect_reason = reason
    msg = WebhookEvent(event=event, room=Room(sid="RM_e2e", name=room), participant=participant,
                       id="EV_" + secrets.token_hex(6), created_at=int(time.time()))
    body = MessageToJson(msg, indent=None).encode("utf-8")
    digest = base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")
    return body, AccessToken(key, secret).with_sha256(digest).to_jwt()


# ---------------------------------------------------------------------------------------
# request bodies


def get_token_body(openid: dict, user: MatrixUser, room_id: str, member_id: str, **delay) -> dict:
    body = {
        "room_id": room_id,
        "slot_id": SLOT_ID,
        "openid_token": openid,
        "member": {"id": member_id, "claimed_user_id": user.user_id, "claimed_device_id": user.device_id},
    }
    body.update(delay)
    return body


def sfu_get_body(openid: dict, user: MatrixUser, room_id: str) -> dict:
    return {"room": room_id, "openid_token": openid, "device_id": user.device_id}


def membership_state_key(user: MatrixUser) -> str:
    """The legacy MatrixRTC state key (docs/delegated-leave.md#scheduling)."""
    return f"_{user.user_id}_{user.device_id}_m.call"


def membership_content(user: MatrixUser, focus_url: str) -> dict:
    return {
        "application": "m.call", "call_id": "", "scope": "m.room", "device_id": user.device_id,
        "expires": 14_400_000, "focus_active": {"type": "livekit", "focus_selection": "oldest_membership"},
        "foci_preferred": [{"type": "livekit", "livekit_service_url": focus_url, "livekit_alias": "x"}],
    }


# ---------------------------------------------------------------------------------------
# the base case


class E2ECase(BlackBoxCase, unittest.TestCase):
    """Shared Synapses, a fake SFU and helpers; each test starts its own daemon."""

    skip = skip_reason()
    timeout = 300  # the first test may create the Synapse virtualenv

    @defer.inlineCallbacks
    def setUp(self):
        BlackBoxCase.setUp(self)
        self.cluster = yield get_cluster(reactor)
        self.ca_file = self.cluster.ca_file  # the daemon must trust the Synapses' CA
        self.full = self.cluster.full
        self.restricted = self.cluster.restricted
        self.full_client = MatrixClient(reactor, self.full)
        self.addCleanup(self.full_client.close)
        self.restricted_client = MatrixClient(reactor, self.restricted)
        self.addCleanup(self.restricted_client.close)
        self.lk = E2ELiveKit()
        self.lk.listen(host="127.0.0.1")
        self.addCleanup(self.lk.stop)

    def daemon_env(self, **extra: str) -> dict:
        return self.service_env(livekit_url=self.lk.url, full_access=self.full.server_name,
                                RTCAUTH_FEDERATION_IP_RANGE_ALLOWLIST="127.0.0.0/8", **extra)

    def new_localpart(self, stem: str) -> str:
        return f"{stem}-{secrets.token_hex(4)}"

    def everything(self) -> str:
        """Daemon output, SFU calls and Synapse logs for failure messages."""
        return "\n".join([
            self.daemon_logs(),
            f"SFU calls: {[(c.path, c.content_type) for c in self.lk.calls]}",
            f"SFU lookups: {self.lk.lookups}",
            self.full.describe(),
        ])

    @defer.inlineCallbacks
    def poll(self, check, *, timeout: float, what: str, interval: float = 0.1):
        """Until ``check()`` (may return a Deferred) is truthy; a deadline, not a measurement."""
        deadline = reactor.seconds() + timeout
        while True:
            value = yield defer.maybeDeferred(check)
            if value:
                return value
            if reactor.seconds() > deadline:
                raise FailTest(f"gave up after {timeout:g}s waiting for {what}\n" + self.everything())
            yield deferLater(reactor, interval, lambda: None)

    def wait_access(self, hs, mark: int, containing: str, *, status: Optional[int] = None, count: int = 1,
                    timeout: float = 5.0):
        """At least ``count`` access-log lines (after ``mark``) for ``containing`` with ``status``."""
        def check():
            lines = hs.access_lines(mark, containing=containing)
            if status is not None:
                lines = [line for line in lines if f" {status} \"" in line]
            return lines if len(lines) >= count else None
        return self.poll(check, timeout=timeout, what=f"{count}x {containing} ({status}) at Synapse {hs.name}")

    # -- assertions -----------------------------------------------------------------------

    def assert_token_response(self, result) -> str:
        self.assertEqual(result.code, 200, f"{result.body!r}\n{self.everything()}")
        self.assertEqual(result.header("Access-Control-Allow-Origin"), "*")
        obj = json.loads(result.body)
        self.assertEqual(list(obj), ["url", "jwt"])
        self.assertEqual(result.body, json.dumps({"url": self.lk.url, "jwt": obj["jwt"]},
                                                 separators=(",", ":")).encode() + b"\n")
        return obj["jwt"]

    def assert_participant_jwt(self, token: str, *, identity: str, alias: str, t0: float, t1: float,
                               can_publish: bool = True) -> None:
        """docs/authorization.md#participant-token, with PyJWT and with LiveKit's own verifier."""
        self.assertEqual(token.split(".")[0], JOSE_HEADER_B64)
        claims = jwt.decode(token, self.secret, algorithms=["HS256"], issuer=self.key,
                            options={"require": ["exp", "nbf", "iat", "iss", "sub"]})
        self.assertEqual(set(claims), {"iss", "sub", "exp", "nbf", "iat", "identity", "video"})
        self.assertEqual((claims["sub"], claims["identity"]), (identity, identity))
        self.assertEqual(claims["video"], {"roomCreate": False, "roomJoin": True, "room": alias,
                                           "canPublish": can_publish, "canSubscribe": True, "canPublishData": True,
                                           "canUpdateOwnMetadata": False, "hidden": False})
        self.assertEqual(claims["exp"] - claims["nbf"], 3600)
        self.assertEqual(claims["iat"], claims["nbf"])
        self.assertTrue(int(t0) - 1 <= claims["nbf"] <= t1 + 1, (t0, claims["nbf"], t1))
        verified = TokenVerifier(self.key, self.secret).verify(token)
        self.assertEqual((verified.identity, verified.video.room), (identity, alias))
        self.assertIs(verified.video.room_create, False)
        self.assertIs(verified.video.can_publish, can_publish)

    def assert_unauthorised(self, result) -> None:
        self.assertEqual((result.code, result.body), (401, UNAUTHORISED), self.daemon_logs())

    # -- a call member with a scheduled leave ---------------------------------------------

    @defer.inlineCallbacks
    def join_call(self, client: MatrixClient, user: MatrixUser, room_id: str, *, delay_ms: int):
        """Send the membership, then schedule its empty-content replacement (the leave)."""
        key = membership_state_key(user)
        yield client.put_state(user, room_id, CALL_MEMBER, key, membership_content(user, "http://x"))
        got = yield client.put_state(user, room_id, CALL_MEMBER, key, {}, delay_ms=delay_ms)
        self.assertEqual(list(got), ["delay_id"], got)
        return got["delay_id"]

    def membership(self, client: MatrixClient, user: MatrixUser, room_id: str):
        return client.get_state(user, room_id, CALL_MEMBER, membership_state_key(user))

    @defer.inlineCallbacks
    def wait_left(self, client, user, room_id, what):
        """The membership state becomes ``{}`` within LEAVE_DEADLINE."""
        def left():
            return self.membership(client, user, room_id).addCallback(lambda c: c == {})
        yield self.poll(left, timeout=LEAVE_DEADLINE, what=what, interval=0.05)

    @defer.inlineCallbacks
    def assert_one_leave(self, client, user, room_id, delay_id):
        """The timeline holds the membership and exactly one leave, sent by that delay ID."""
        events = yield client.state_events(user, room_id, CALL_MEMBER, membership_state_key(user))
        leaves = [e for e in events if e["content"] == {}]
        self.assertEqual(len(leaves), 1, events)
        self.assertEqual(leaves[0]["unsigned"].get("org.matrix.msc4140.delay_id"), delay_id, leaves[0])
        self.assertEqual(events[-1]["event_id"], leaves[0]["event_id"])

    @defer.inlineCallbacks
    def webhook(self, daemon, event: str, *, alias: str, identity: str, reason: Optional[int] = None):
        body, auth = signed_webhook(event, room=alias, identity=identity, key=self.key, secret=self.secret,
                                    reason=reason)
        result = yield daemon.request("POST", "/sfu_webhook", body,
                                      {"Authorization": auth, "Content-Type": "application/webhook+json"})
        self.assertEqual((result.code, result.body), (200, b""))


# ---------------------------------------------------------------------------------------
# 1. tokens


class TokenTests(E2ECase):
    """OpenID tokens minted by Synapse, verified by rtcauthd over real federation TLS."""

    @defer.inlineCallbacks
    def setUp(self):
        yield E2ECase.setUp(self)
        self.daemon = yield self.start_daemon(self.daemon_env())

    @defer.inlineCallbacks
    def test_full_access_get_token_and_sfu_get(self):
        user = yield self.full_client.register(self.new_localpart("alice"))
        room_id = yield self.full_client.create_call_room(user)
        openid = yield self.full_client.openid_token(user)
        self.assertEqual(openid["matrix_server_name"], self.full.server_name)
        alias = lk_hash(room_id, SLOT_ID)
        mark = self.full.log_mark()

        t0 = time.time()
        result = yield self.daemon.post_json("/get_token", get_token_body(openid, user, room_id, "member-1"))
        t1 = time.time()
        token = self.assert_token_response(result)
        self.assert_participant_jwt(token, identity=lk_hash(user.user_id, user.device_id, "member-1"),
                                    alias=alias, t0=t0, t1=t1)
        lines = yield self.wait_access(self.full, mark, USERINFO, status=200)
        self.assertEqual(len(self.full.access_lines(mark, containing=USERINFO)), 1, lines)
        self.assertIn("synapse.access.https.", lines[0])  # over the TLS federation listener
        self.assertNotIn(openid["access_token"], "".join(self.full.access_lines(mark)))

        # the legacy endpoint: identity <user>:<device>, same room for slot m.call#ROOM
        t0 = time.time()
        result = yield self.daemon.post_json("/sfu/get", sfu_get_body(openid, user, room_id))
        t1 = time.time()
        token = self.assert_token_response(result)
        self.assert_participant_jwt(token, identity=f"{user.user_id}:{user.device_id}", alias=alias, t0=t0, t1=t1)

        self.assertEqual(self.lk.rejected, [])
        self.assertEqual([(c.name, c.empty_timeout, c.departure_timeout, c.max_participants)
                          for c in self.lk.create_room_requests], [(alias, 300, 20, 0)] * 2)
        admin = jwt.decode(self.lk.create_room_requests[0].bearer, self.secret, algorithms=["HS256"],
                           issuer=self.key)
        self.assertEqual(admin["video"], {"roomCreate": True})

    @defer.inlineCallbacks
    def test_restricted_homeserver_gets_join_only_token(self):
        client = self.restricted_client
        user = yield client.register(self.new_localpart("bob"))
        room_id = yield client.create_call_room(user)
        openid = yield client.openid_token(user)
        self.assertEqual(openid["matrix_server_name"], self.restricted.server_name)
        mark = self.restricted.log_mark()
        full_mark = self.full.log_mark()

        t0 = time.time()
        result = yield self.daemon.post_json("/get_token", get_token_body(openid, user, room_id, "m-1"))
        t1 = time.time()
        token = self.assert_token_response(result)
        # subscribe-only (docs/authorization.md#access-rules), and no room is created
        self.assert_participant_jwt(token, identity=lk_hash(user.user_id, user.device_id, "m-1"),
                                    alias=lk_hash(room_id, SLOT_ID), t0=t0, t1=t1, can_publish=False)
        yield self.wait_access(self.restricted, mark, USERINFO, status=200)

        # nor may a restricted user delegate a (real) delayed leave
        delay_id = yield self.join_call(client, user, room_id, delay_ms=60_000)
        result = yield self.daemon.post_json("/get_token", get_token_body(
            openid, user, room_id, "m-1", delay_id=delay_id, delay_timeout=60_000))
        self.assertEqual((result.code, result.body), (400, matrix_error_body("M_BAD_JSON", DELEGATION_REFUSED)))
        result = yield self.daemon.post_json("/delegate_delayed_leave", get_token_body(
            openid, user, room_id, "m-1", delay_id=delay_id, delay_timeout=60_000))
        self.assertEqual((result.code, result.body), (403, matrix_error_body("M_FORBIDDEN", DELEGATION_REFUSED)))

        self.assertEqual(self.lk.create_room_requests, [])
        self.assertEqual(self.lk.calls, [])
        self.assertEqual(self.full.access_lines(full_mark, containing=USERINFO), [])

    @defer.inlineCallbacks
    def test_forged_mismatched_and_expired_tokens(self):
        client = self.full_client
        user = yield client.register(self.new_localpart("carol"))
        other = yield client.register(self.new_localpart("dave"))
        room_id = yield client.create_call_room(user)
        mark = self.full.log_mark()

        # a token Synapse never issued
        forged = {"access_token": secrets.token_urlsafe(18), "token_type": "Bearer",
                  "matrix_server_name": self.full.server_name, "expires_in": 3600}
        result = yield self.daemon.post_json("/get_token", get_token_body(forged, user, room_id, "m"))
        self.assert_unauthorised(result)
        yield self.wait_access(self.full, mark, USERINFO, status=401)

        # a real token, but for somebody else than the claimed user
        openid_other = yield client.openid_token(other)
        result = yield self.daemon.post_json("/get_token", get_token_body(openid_other, user, room_id, "m"))
        self.assert_unauthorised(result)

        # a real token of the restricted server presented as one of the full-access server
        restricted_user = yield self.restricted_client.register(self.new_localpart("eve"))
        openid_r = yield self.restricted_client.openid_token(restricted_user)
        claimed = MatrixUser(f"@{restricted_user.user_id[1:].split(':')[0]}:{self.full.server_name}",
                             "", restricted_user.device_id)
        result = yield self.daemon.post_json("/get_token", get_token_body(
            dict(openid_r, matrix_server_name=self.full.server_name), claimed, room_id, "m"))
        self.assert_unauthorised(result)

        # a real token that has expired (as Synapse sees it an hour later)
        expired = yield client.openid_token(user)
        self.full.expire_openid_token(expired["access_token"])
        result = yield self.daemon.post_json("/get_token", get_token_body(expired, user, room_id, "m"))
        self.assert_unauthorised(result)
        result = yield self.daemon.post_json("/sfu/get", sfu_get_body(expired, user, room_id))
        self.assert_unauthorised(result)
        yield self.wait_access(self.full, mark, USERINFO, status=401, count=4)

        self.assertEqual(self.lk.create_room_requests, [])
        # control: a fresh token of the same user is accepted by the same daemon
        fresh = yield client.openid_token(user)
        result = yield self.daemon.post_json("/get_token", get_token_body(fresh, user, room_id, "m"))
        self.assert_token_response(result)
        self.assertEqual(len(self.lk.create_room_requests), 1)
        output = self.daemon.output
        for secret in (forged["access_token"], openid_other["access_token"], expired["access_token"],
                       fresh["access_token"], self.secret):
            self.assertNotIn(secret, output)


# ---------------------------------------------------------------------------------------
# 2. delegated leave


class DelegatedLeaveTests(E2ECase):
    """MSC4140 delayed leave kept alive by rtcauthd while the participant is connected.

    The daemon gets no LIVEKIT_CS_API_URL_OVERRIDES here: it discovers Synapse's
    client-server API from ``https://<server_name>/.well-known/matrix/client`` (served by
    Synapse itself, certificate from RTCAUTH_CA_FILE).
    """

    DELAY_MS = 4000

    @defer.inlineCallbacks
    def test_full_cycle_via_get_token_and_delegate_delayed_leave(self):
        daemon_started = self.start_daemon(self.daemon_env())
        client = self.full_client
        alice = yield client.register(self.new_localpart("alice"))
        bob = yield client.register(self.new_localpart("bob"))
        room_id = yield client.create_call_room(alice)
        yield client.join(bob, room_id)
        openid_a = yield client.openid_token(alice)
        openid_b = yield client.openid_token(bob)
        daemon = yield daemon_started
        alias = lk_hash(room_id, SLOT_ID)
        id_a = lk_hash(alice.user_id, alice.device_id, "ma")
        id_b = lk_hash(bob.user_id, bob.device_id, "mb")

        scheduled_at = reactor.seconds()
        delay_a = yield self.join_call(client, alice, room_id, delay_ms=self.DELAY_MS)
        delay_b = yield self.join_call(client, bob, room_id, delay_ms=self.DELAY_MS)
        mark = self.full.log_mark()

        # Alice: delegation through the (deprecated) /get_token delay parameters
        result = yield daemon.post_json("/get_token", get_token_body(
            openid_a, alice, room_id, "ma", delay_id=delay_a, delay_timeout=self.DELAY_MS))
        self.assert_token_response(result)
        # Bob: a plain token, then /delegate_delayed_leave
        result = yield daemon.post_json("/get_token", get_token_body(openid_b, bob, room_id, "mb"))
        self.assert_token_response(result)
        result = yield daemon.post_json("/delegate_delayed_leave", get_token_body(
            openid_b, bob, room_id, "mb", delay_id=delay_b, delay_timeout=self.DELAY_MS))
        self.assertEqual((result.code, result.body), (200, b"{}\n"), self.everything())

        # both connect to the SFU.  GetParticipant keeps answering not_found for Alice, so
        # only the signed participant_joined webhook can connect her job; Bob's job may also
        # find him by polling (what makes /delegate_delayed_leave work, docs/delegated-leave.md#participant-lookup).
        self.lk.joined.add((alias, id_b))
        for identity in (id_a, id_b):
            yield self.webhook(daemon, "participant_joined", alias=alias, identity=identity)
        for delay_id in (delay_a, delay_b):
            yield self.wait_access(self.full, mark, f"/delayed_events/{delay_id}/restart", status=200)

        # well past the original deadline both are still members: rtcauthd kept restarting
        yield deferLater(reactor, max(0.0, scheduled_at + self.DELAY_MS / 1000 + 2.5 - reactor.seconds()),
                         lambda: None)
        for user in (alice, bob):
            content = yield self.membership(client, user, room_id)
            self.assertEqual(content.get("application"), "m.call", self.everything())
        for delay_id in (delay_a, delay_b):
            restarts = self.full.access_lines(mark, containing=f"/delayed_events/{delay_id}/restart")
            self.assertGreaterEqual(len(restarts), 2, restarts)
            self.assertEqual(self.full.access_lines(mark, containing=f"/delayed_events/{delay_id}/send"), [])

        # Alice hangs up; Bob's connection breaks: both leaves land promptly
        self.lk.joined.clear()
        yield self.webhook(daemon, "participant_left", alias=alias, identity=id_a,
                           reason=DisconnectReason.CLIENT_INITIATED)
        yield self.wait_left(client, alice, room_id, "Alice's leave after participant_left")
        yield self.webhook(daemon, "participant_left", alias=alias, identity=id_b,
                           reason=DisconnectReason.SIGNAL_CLOSE)
        yield self.wait_left(client, bob, room_id, "Bob's leave after participant_left (SIGNAL_CLOSE)")

        yield self.assert_one_leave(client, alice, room_id, delay_a)
        yield self.assert_one_leave(client, bob, room_id, delay_b)
        for delay_id in (delay_a, delay_b):
            sends = yield self.wait_access(self.full, mark, f"/delayed_events/{delay_id}/send", status=200)
            self.assertEqual(len(sends), 1, sends)
        self.assertEqual(self.lk.rejected, [])


# ---------------------------------------------------------------------------------------
# 3. crash safety


class CrashSafetyTests(E2ECase):
    """kill -9 with a connected participant: the job comes back from Redis."""

    DELAY_MS = 10_000  # Element Call's default; the test never waits for it to pass

    @defer.inlineCallbacks
    def test_kill_9_restart_then_leave_lands_exactly_once(self):
        redis = yield self.start_redis()
        daemon_started = self.start_daemon(self.daemon_env(
            LIVEKIT_REDIS_URL=redis.url + "/0",
            LIVEKIT_CS_API_URL_OVERRIDES=f"{self.full.server_name}={self.full.client_url}",
        ))
        client = self.full_client
        user = yield client.register(self.new_localpart("frank"))
        room_id = yield client.create_call_room(user)
        openid = yield client.openid_token(user)
        daemon = yield daemon_started
        alias = lk_hash(room_id, SLOT_ID)
        identity = lk_hash(user.user_id, user.device_id, "mf")
        field = string_array_json([alias, identity])

        delay_id = yield self.join_call(client, user, room_id, delay_ms=self.DELAY_MS)
        mark = self.full.log_mark()
        result = yield daemon.post_json("/get_token", get_token_body(
            openid, user, room_id, "mf", delay_id=delay_id, delay_timeout=self.DELAY_MS))
        self.assert_token_response(result)
        jobs = yield redis.hgetall(REDIS_JOBS)
        self.assertEqual(list(jobs), [field], jobs)
        self.assertEqual(json.loads(jobs[field])["Params"]["DelayId"], delay_id)

        self.lk.joined.add((alias, identity))
        yield self.webhook(daemon, "participant_joined", alias=alias, identity=identity)
        yield self.wait_access(self.full, mark, f"/delayed_events/{delay_id}/restart", status=200)

        yield daemon.kill()
        self.assertEqual(daemon.exit_signal, 9, daemon.describe())
        jobs = yield redis.hgetall(REDIS_JOBS)
        self.assertEqual(list(jobs), [field], "the job must survive kill -9 in Redis")

        restart_mark = self.full.log_mark()
        yield daemon.restart()
        # the restored job finds the participant on the SFU and keeps the leave alive
        yield self.wait_access(self.full, restart_mark, f"/delayed_events/{delay_id}/restart", status=200)
        content = yield self.membership(client, user, room_id)
        self.assertEqual(content.get("application"), "m.call")

        self.lk.joined.clear()
        yield self.webhook(daemon, "participant_left", alias=alias, identity=identity,
                           reason=DisconnectReason.CLIENT_INITIATED)
        yield self.wait_left(client, user, room_id, "the leave after restart + participant_left")
        yield self.poll(lambda: redis.hgetall(REDIS_JOBS).addCallback(lambda j: j == {}),
                        timeout=5, what="the job's Redis record to be deleted")
        yield self.assert_one_leave(client, user, room_id, delay_id)
        sends = self.full.access_lines(mark, containing=f"/delayed_events/{delay_id}/send")
        self.assertEqual(len(sends), 1, sends)
        self.assertIn(" 200 \"", sends[0])
        yield daemon.stop()
