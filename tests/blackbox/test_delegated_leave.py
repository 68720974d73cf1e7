"""Black-box tests of delegated leave (project issue 3, items 5-7; docs/endpoints.md, docs/livekit.md#webhooks, docs/delegated-leave.md#client-server-api, docs/delegated-leave.md#msc4140, docs/delegated-leave.md#job-state-machine, docs/redis-format.md).

The real daemon runs as a process with a real redis-server; the fake homeserver records
every delayed-event call and the fake SFU answers GetParticipant.  Webhooks are signed
with ``livekit-api``'s own ``AccessToken`` (a ``sha256`` claim over the body), and Redis
records are written and checked byte-for-byte in lk-jwt-service's format, independently
of rtcauthd's code.  Effects are polled for with bounded deadlines; the only durations
asserted are lower bounds that a slow machine cannot break.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
import time

import jwt
from google.protobuf.json_format import MessageToJson
from livekit.api import AccessToken, TokenVerifier
from livekit.protocol.models import DisconnectReason
from livekit.protocol.webhook import WebhookEvent
from twisted.internet import defer
from twisted.internet import reactor as global_reactor
from twisted.trial import unittest

from tests.blackbox.fake_homeserver import WELL_KNOWN_CLIENT_PATH, Answer
from tests.blackbox.harness import (
    CORS_HEADERS,
    BlackBoxCase,
    go_json_string_array,
    lk_hash,
    matrix_error_body,
    poll_until,
    string_array_json,
)
from tests.blackbox.test_token_service import get_token_body, sfu_get_body

ROOM_ID = "!room:example.com"
SLOT_ID = "m.call#ROOM"
JOBS_KEY = "lk-jwt:jobs"
DELAYED_EVENTS = "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/"

#: Bound for an effect that should follow within about a second (spec: poll ≥ 2 s).
EFFECT_DEADLINE = 8.0
#: Bound for effects that wait for a reconnect to Redis (txredisapi backs off up to 10 s).
REDIS_BACK_DEADLINE = 25.0

#: RFC 3339 as Go writes time.Time: fraction without trailing zeros, Z or a numeric offset.
GO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{0,8}[1-9])?(?:Z|[+-]\d\d:\d\d)")

E_DELEG = "Delegation of delayed events is only supported for full access users"
E_CSAPI = "Unable to resolve client-server API"


def go_string(text: str) -> str:
    """One Go-JSON string (HTML escaping on), as in the stored record."""
    return go_json_string_array([text]).decode("utf-8")[1:-1]


def job_field(room: str, identity: str) -> bytes:
    """The hash field: ``[room, identity]`` as v0.7 writes it (docs/redis-format.md#key-field-value)."""
    return string_array_json([room, identity])


def job_value(*, delay_id: str, timeout_ns: int, server_name: str, room: str, identity: str,
              restarted_at: str, owner: str | None = None) -> bytes:
    """The record value exactly as Go's json.Marshal writes the stored-job struct.

    ``owner`` None: a Go-era record (no ``OwnerUserId``); a string: v0.7's member, last in Params.
    """
    owner_member = "" if owner is None else ',"OwnerUserId":%s' % go_string(owner)
    return (
        '{"Params":{"DelayId":%s,"DelayTimeout":%d,"ServerName":%s,"LiveKitRoom":%s,"LiveKitIdentity":%s%s},'
        '"RestartedAt":%s}'
        % (go_string(delay_id), timeout_ns, go_string(server_name), go_string(room), go_string(identity),
           owner_member, go_string(restarted_at))
    ).encode("utf-8")


def parse_go_time(text: str) -> float:
    """Seconds since the epoch of an RFC 3339 timestamp with up to 9 fractional digits."""
    match = re.fullmatch(r"(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    assert match is not None, text
    whole, fraction, zone = match.groups()
    stamp = datetime.datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone))
    return stamp.timestamp() + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)


def go_time(moment: datetime.datetime, nanos: int = 0) -> str:
    """``moment`` the way Go formats a time.Time in its zone, with 9-digit precision."""
    base = moment.strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{moment.microsecond * 1000 + nanos:09d}".rstrip("0")
    offset = moment.utcoffset()
    if offset == datetime.timedelta(0):
        zone = "Z"
    else:
        minutes = int(offset.total_seconds() // 60)
        zone = "%s%02d:%02d" % ("+" if minutes >= 0 else "-", abs(minutes) // 60, abs(minutes) % 60)
    return base + ("." + fraction if fraction else "") + zone


def webhook_body(event: str, room: str, identity: str, reason: str | None = None) -> bytes:
    """A ``livekit.WebhookEvent`` in protojson, as the SFU posts it (docs/livekit.md#webhook-signature)."""
    event_id = "EV_" + hashlib.sha1(f"{event}{identity}{time.time()}".encode()).hexdigest()[:12]
    message = WebhookEvent(event=event, id=event_id, created_at=int(time.time()))
    message.room.name = room
    message.room.sid = "RM_fake"
    message.participant.identity = identity
    message.participant.sid = "PA_fake"
    if reason is not None:
        message.participant.disconnect_reason = DisconnectReason.Value(reason)
    return MessageToJson(message, indent=None).encode("utf-8")


def sign_webhook(body: bytes, key: str, secret: str) -> str:
    """The ``Authorization`` value (raw JWT, no ``Bearer``) made with livekit-api's token code."""
    digest = base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")
    return AccessToken(key, secret).with_sha256(digest).with_ttl(datetime.timedelta(minutes=5)).to_jwt()


class Participant:
    """A Matrix user with a device and MatrixRTC membership, and the identity it joins as."""

    def __init__(self, *, name: str, server_name: str, room_id: str = ROOM_ID, slot_id: str = SLOT_ID) -> None:
        self.user = f"@{name}:{server_name}"
        self.device = f"DEV_{name.upper()}"
        self.member_id = f"member-{name}"
        self.token = f"syt_{name}_openid"
        self.server_name = server_name
        self.room_id = room_id
        self.slot_id = slot_id
        self.room = lk_hash(room_id, slot_id)
        self.identity = lk_hash(self.user, self.device, self.member_id)

    def body(self, delay_id: str | None = None, delay_timeout_ms: int | None = None) -> dict:
        body = get_token_body(self.server_name, self.token, user_id=self.user, room_id=self.room_id,
                              slot_id=self.slot_id, member_id=self.member_id, device=self.device)
        if delay_id is not None:
            body["delay_id"] = delay_id
        if delay_timeout_ms is not None:
            body["delay_timeout"] = delay_timeout_ms
        return body

    def legacy_body(self, delay_id: str, delay_timeout_ms: int) -> dict:
        body = sfu_get_body(self.server_name, self.token, room=self.room_id, device=self.device)
        body.update(delay_id=delay_id, delay_timeout=delay_timeout_ms)
        return body


class LeaveCase(BlackBoxCase):
    """A full-access fake homeserver (also the CS API, via LIVEKIT_CS_API_URL_OVERRIDES), a
    fake SFU and a redis-server (created, not started) per test."""

    def setUp(self):
        BlackBoxCase.setUp(self)
        self.hs = self.make_homeserver()
        self.lk = self.make_livekit()
        self.redis = self.make_redis()
        self.daemon = None

    # -- set-up -------------------------------------------------------------------------

    def leave_env(self, *, overrides: bool = True, **extra: str) -> dict[str, str]:
        env = self.service_env(
            livekit_url=self.lk.url,
            full_access=self.hs.server_name,
            LIVEKIT_REDIS_URL=f"{self.redis.url}/0",
            LIVEKIT_LOG_LEVEL="debug",
        )
        if overrides:
            env["LIVEKIT_CS_API_URL_OVERRIDES"] = f"{self.hs.server_name}={self.hs.client_api_url}"
        env.update(extra)
        return env

    @defer.inlineCallbacks
    def start_all(self, *, overrides: bool = True, **extra: str):
        """Redis first (so the daemon's start-up restore finds it), then the daemon."""
        yield self.redis.start()
        self.daemon = yield self.start_daemon(self.leave_env(overrides=overrides, **extra))
        return self.daemon

    def participant(self, name: str, *delay_ids: str) -> Participant:
        """A user the homeserver knows, with its delayed events scheduled."""
        p = Participant(name=name, server_name=self.hs.server_name)
        self.hs.add_token(p.token, p.user)
        for delay_id in delay_ids:
            self.hs.schedule_delayed_event(delay_id)
        return p

    # -- requests -----------------------------------------------------------------------

    @defer.inlineCallbacks
    def delegate_via_get_token(self, p: Participant, delay_id: str, delay_timeout_ms: int):
        result = yield self.daemon.post_json("/get_token", p.body(delay_id, delay_timeout_ms))
        self.assertEqual(result.code, 200, f"{result.body!r}\n{self.describe()}")
        self.assertEqual(list(result.json()), ["url", "jwt"])
        return result

    @defer.inlineCallbacks
    def webhook(self, event: str, p: Participant, reason: str | None = None):
        """A correctly signed webhook; return the Authorization value used."""
        body = webhook_body(event, p.room, p.identity, reason)
        auth = sign_webhook(body, self.key, self.secret)
        # the signature really is what LiveKit's own verifier accepts
        self.assertEqual(TokenVerifier(self.key, self.secret).verify(auth).sha256,
                         base64.b64encode(hashlib.sha256(body).digest()).decode())
        yield self.post_webhook(body, auth)
        return auth

    @defer.inlineCallbacks
    def post_webhook(self, body: bytes, auth: str | None):
        """POST /sfu_webhook: always 200 with an empty body (docs/endpoints.md#webhook-endpoint)."""
        headers = {"Content-Type": "application/webhook+json"}
        if auth is not None:
            headers["Authorization"] = auth
        result = yield self.daemon.request("POST", "/sfu_webhook", body, headers)
        self.assertEqual((result.code, result.body), (200, b""), self.describe())
        return result

    # -- observing ----------------------------------------------------------------------

    def describe(self) -> str:
        calls = "\n".join(
            f"  {c.at:.3f} {c.action} {c.delay_id!r} -> {c.status} ({c.request.path})"
            for c in self.hs.delayed_event_calls
        ) or "  (none)"
        lookups = "\n".join(
            f"  {c.at:.3f} GetParticipant {c.identity} present={c.present}" for c in self.lk.get_participant_requests
        ) or "  (none)"
        return f"delayed-event calls:\n{calls}\nSFU lookups:\n{lookups}\n{self.daemon_logs()}"

    def wait_for(self, check, what: str, timeout: float = EFFECT_DEADLINE):
        return poll_until(global_reactor, check, timeout=timeout, what=what, describe=self.describe)

    def stored(self):
        """``lk-jwt:jobs`` as {field bytes: value bytes}."""
        return self.redis.hgetall(JOBS_KEY)

    def wait_record_gone(self, p: Participant, timeout: float = EFFECT_DEADLINE):
        field = job_field(p.room, p.identity)
        return self.wait_for(lambda: self.stored().addCallback(lambda m: field not in m),
                             f"the Redis record of {p.user} to be deleted", timeout)

    def wait_calls(self, delay_id: str, action: str, count: int = 1, timeout: float = EFFECT_DEADLINE):
        return self.wait_for(lambda: len(self.hs.delayed_calls(delay_id, action)) >= count,
                             f"{count} {action} call(s) for {delay_id!r}", timeout)

    # -- assertions ---------------------------------------------------------------------

    def assert_record(self, records: dict, p: Participant, *, delay_id: str, delay_timeout_ms: int,
                      after: float | None = None, before: float | None = None) -> str:
        """The record of ``p`` is upstream v0.7's exact bytes (no owner: legacy route); return its RestartedAt."""
        field = job_field(p.room, p.identity)
        self.assertIn(field, records, self.describe())
        value = records[field]
        restarted_at = json.loads(value).get("RestartedAt", "")
        self.assertRegex(restarted_at, GO_TIME)
        self.assertEqual(value, job_value(delay_id=delay_id, timeout_ns=delay_timeout_ms * 1_000_000,
                                          server_name=p.server_name, room=p.room, identity=p.identity,
                                          restarted_at=restarted_at, owner=""))
        if after is not None:
            self.assertTrue(after - 1 <= parse_go_time(restarted_at) <= before + 1, (after, restarted_at, before))
        return restarted_at

    def assert_delayed_call(self, call, delay_id: str, action: str, prefix: str = "") -> None:
        """POST <base>/…/delayed_events/<escaped id>/<action>, body ``{}``, no credentials."""
        req = call.request
        self.assertEqual((call.delay_id, call.action, call.prefix), (delay_id, action, prefix))
        self.assertEqual(req.method, "POST")
        self.assertEqual(req.path, prefix + DELAYED_EVENTS + call.segment + "/" + action)
        self.assertEqual(req.body, b"{}")
        self.assertEqual(req.headers.get("content-type"), ["application/json"])
        self.assertNotIn("authorization", req.headers)
        self.assertIsNone(req.access_token)
        self.assertEqual(req.query, {})

    def assert_lookup(self, lookup, p: Participant) -> None:
        """GetParticipant in protobuf with a roomAdmin token for that room (docs/livekit.md#admin-tokens, docs/livekit.md#getparticipant)."""
        self.assertEqual((lookup.room, lookup.identity), (p.room, p.identity))
        self.assertEqual(lookup.call.path, "/twirp/livekit.RoomService/GetParticipant")
        self.assertEqual(lookup.call.content_type, "application/protobuf")
        claims = jwt.decode(lookup.bearer, self.secret, algorithms=["HS256"], issuer=self.key,
                            options={"require": ["exp"]})
        self.assertEqual(claims["video"], {"roomAdmin": True, "room": p.room})

    @defer.inlineCallbacks
    def stop_daemon(self):
        """SIGTERM → exit 0 within 10 s; afterwards nothing can call the fakes any more."""
        yield self.daemon.stop()


class WebhookDrivenTests(LeaveCase, unittest.TestCase):
    """Jobs driven by signed webhooks (docs/livekit.md#webhooks, docs/delegated-leave.md#job-state-machine)."""

    @defer.inlineCallbacks
    def test_webhook_disconnect_sends_leave_once(self):
        yield self.start_all()
        alice = self.participant("alice", "syd_alice")
        t0 = time.time()
        yield self.delegate_via_get_token(alice, "syd_alice", 10000)
        t1 = time.time()
        # stored before the response (P7), in upstream's exact format
        records = yield self.stored()
        self.assertEqual(list(records), [job_field(alice.room, alice.identity)])
        self.assert_record(records, alice, delay_id="syd_alice", delay_timeout_ms=10000, after=t0, before=t1)
        self.assertEqual([c.name for c in self.lk.create_room_requests], [alice.room])
        self.assertEqual(self.hs.delayed_event_calls, [])

        yield self.webhook("participant_joined", alice)
        yield self.wait_calls("syd_alice", "restart")
        self.assert_delayed_call(self.hs.restarts("syd_alice")[0], "syd_alice", "restart")
        self.assertEqual(self.hs.sends("syd_alice"), [])

        auth = yield self.webhook("participant_left", alice, "CLIENT_INITIATED")
        yield self.wait_calls("syd_alice", "send")
        yield self.wait_record_gone(alice)
        yield self.stop_daemon()
        [send] = self.hs.sends("syd_alice")
        self.assert_delayed_call(send, "syd_alice", "send")
        self.assertEqual(send.status, 200)
        self.assertTrue(all(r.at <= send.at for r in self.hs.restarts("syd_alice")))
        self.assertEqual({c.delay_id for c in self.hs.delayed_event_calls}, {"syd_alice"})
        # a whole delegated-leave cycle at debug level leaks no credentials into the log
        output = self.daemon.output
        for name, value in [("secret", self.secret), ("OpenID token", alice.token), ("webhook JWT", auth),
                            ("webhook JWT signature", auth.rsplit(".", 1)[1])]:
            self.assertNotIn(value, output, f"the {name} appears in the daemon's output")

    @defer.inlineCallbacks
    def test_unverifiable_webhooks_change_nothing(self):
        """Missing, forged, foreign-key, expired or body-mismatched signatures are ignored (docs/livekit.md#webhook-verification)."""
        yield self.start_all()
        alice = self.participant("alice", "syd_alice")
        bob = self.participant("bob", "syd_bob")
        yield self.delegate_via_get_token(alice, "syd_alice", 10000)
        yield self.delegate_via_get_token(bob, "syd_bob", 10000)
        body = webhook_body("participant_joined", alice.room, alice.identity)
        other = webhook_body("participant_joined", bob.room, bob.identity)
        digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
        expired = (AccessToken(self.key, self.secret).with_sha256(digest)
                   .with_ttl(datetime.timedelta(minutes=-10)).to_jwt())
        forged = [
            None,
            "",
            sign_webhook(body, self.key, self.secret + "x"),  # wrong secret
            sign_webhook(body, "otherkey", self.secret),  # unknown key
            expired,
            sign_webhook(other, self.key, self.secret),  # sha256 of another body
            "Bearer " + sign_webhook(body, self.key, self.secret[::-1]),
        ]
        for auth in forged:
            yield self.post_webhook(body, auth)
        # a valid webhook for bob, sent after all of them, acts; none of alice's did
        yield self.webhook("participant_joined", bob)
        yield self.wait_calls("syd_bob", "restart")
        yield self.stop_daemon()
        self.assertEqual(self.hs.delayed_calls("syd_alice"), [], self.describe())
        records = yield self.stored()
        self.assertEqual(len(records), 2)

    @defer.inlineCallbacks
    def test_participant_never_connecting_gets_leave_after_waiting_bound(self):
        yield self.start_all()
        bob = self.participant("bob", "syd_bob")
        t0 = global_reactor.seconds()
        yield self.delegate_via_get_token(bob, "syd_bob", 1000)
        yield self.wait_calls("syd_bob", "send")
        yield self.wait_record_gone(bob)
        yield self.stop_daemon()
        [send] = self.hs.sends("syd_bob")
        self.assert_delayed_call(send, "syd_bob", "send")
        # not before the waiting bound min(1 h, delay_timeout) = 1 s (a lower bound only)
        self.assertGreaterEqual(send.at - t0, 0.95, self.describe())
        self.assertEqual(self.hs.restarts("syd_bob"), [])
        # the SFU was asked (phase-1 lookup, immediately) and said "absent"
        lookups = self.lk.lookups(bob.room, bob.identity)
        self.assertGreaterEqual(len(lookups), 1, self.describe())
        self.assertFalse(any(c.present for c in lookups))
        self.assert_lookup(lookups[0], bob)
        self.assertEqual(self.lk.rejected, [])

    @defer.inlineCallbacks
    def test_replacement_affects_only_latest_job(self):
        yield self.start_all()
        alice = self.participant("alice", "syd_first", "syd_second")
        yield self.delegate_via_get_token(alice, "syd_first", 10000)
        yield self.delegate_via_get_token(alice, "syd_second", 10000)
        records = yield self.stored()
        self.assertEqual(len(records), 1)
        self.assert_record(records, alice, delay_id="syd_second", delay_timeout_ms=10000)

        yield self.webhook("participant_joined", alice)
        yield self.wait_calls("syd_second", "restart")
        yield self.webhook("participant_left", alice, "CLIENT_INITIATED")
        yield self.wait_calls("syd_second", "send")
        yield self.wait_record_gone(alice)
        yield self.stop_daemon()
        self.assertEqual(self.hs.delayed_calls("syd_first"), [], self.describe())
        self.assertEqual(len(self.hs.sends("syd_second")), 1)

    @defer.inlineCallbacks
    def test_two_jobs_in_parallel_do_not_interfere(self):
        yield self.start_all()
        alice = self.participant("alice", "syd_a")
        bob = self.participant("bob", "syd_b")
        self.assertEqual(alice.room, bob.room)  # same call, different identities
        yield self.delegate_via_get_token(alice, "syd_a", 10000)
        yield self.delegate_via_get_token(bob, "syd_b", 1500)
        records = yield self.stored()
        self.assertEqual(len(records), 2)
        self.assert_record(records, alice, delay_id="syd_a", delay_timeout_ms=10000)
        self.assert_record(records, bob, delay_id="syd_b", delay_timeout_ms=1500)

        yield self.webhook("participant_joined", alice)
        yield self.webhook("participant_joined", bob)
        yield self.wait_calls("syd_a", "restart")
        yield self.wait_calls("syd_b", "restart")

        yield self.webhook("participant_left", alice, "CLIENT_INITIATED")
        yield self.wait_calls("syd_a", "send")
        yield self.wait_record_gone(alice)
        records = yield self.stored()
        self.assertIn(job_field(bob.room, bob.identity), records)
        self.assertEqual(self.hs.sends("syd_b"), [])
        # bob's job is still alive: it keeps restarting (every 80 % of 1.5 s)
        seen = len(self.hs.restarts("syd_b"))
        yield self.wait_calls("syd_b", "restart", seen + 1)

        # an aborted connection after being connected also sends
        yield self.webhook("participant_left", bob, "SIGNAL_CLOSE")
        yield self.wait_calls("syd_b", "send")
        yield self.wait_record_gone(bob)
        yield self.stop_daemon()
        self.assertEqual(len(self.hs.sends("syd_a")), 1)
        self.assertEqual(len(self.hs.sends("syd_b")), 1)
        a_sent = self.hs.sends("syd_a")[0].at
        self.assertTrue(all(c.at <= a_sent for c in self.hs.delayed_calls("syd_a")))


class SanityCheckTests(LeaveCase, unittest.TestCase):

    @defer.inlineCallbacks
    def test_missed_webhook_caught_by_sanity_check(self):
        yield self.start_all(LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS="1")
        carol = self.participant("carol", "syd_carol")
        self.lk.set_present(carol.room, carol.identity)
        yield self.delegate_via_get_token(carol, "syd_carol", 10000)
        # phase-1 lookup finds her: connected without any webhook, so the event is restarted
        yield self.wait_calls("syd_carol", "restart")
        self.assertEqual(self.hs.sends("syd_carol"), [])
        # she vanishes from the SFU and the webhook never comes
        gone_at = global_reactor.seconds()
        self.lk.set_present(carol.room, carol.identity, False)
        yield self.wait_calls("syd_carol", "send")
        yield self.wait_record_gone(carol)
        yield self.stop_daemon()
        self.assertEqual(len(self.hs.sends("syd_carol")), 1)
        absent = [c for c in self.lk.lookups(carol.room, carol.identity) if not c.present]
        self.assertGreaterEqual(len(absent), 1)
        self.assertTrue(absent[0].at >= gone_at and absent[0].at <= self.hs.sends("syd_carol")[0].at)
        self.assert_lookup(absent[0], carol)


class RestartTests(LeaveCase, unittest.TestCase):
    """Stopping and restarting the daemon (issue 3 items 6 and 7; docs/redis-format.md#start-up-restore)."""

    @defer.inlineCallbacks
    def test_job_survives_sigterm_and_restart(self):
        yield self.start_all()
        alice = self.participant("alice", "syd_alice")
        yield self.delegate_via_get_token(alice, "syd_alice", 30000)
        yield self.webhook("participant_joined", alice)
        yield self.wait_calls("syd_alice", "restart")

        yield self.daemon.stop()  # exit 0 within 10 s
        before = yield self.stored()
        self.assert_record(before, alice, delay_id="syd_alice", delay_timeout_ms=30000)

        restarts = len(self.hs.restarts("syd_alice"))
        yield self.daemon.restart()
        after = yield self.stored()
        self.assertEqual(after, before, "restoring must neither purge nor rewrite a live record")

        # the restored job waits for the participant again; a webhook reconnects it
        yield self.webhook("participant_joined", alice)
        yield self.wait_calls("syd_alice", "restart", restarts + 1)
        yield self.webhook("participant_left", alice, "CLIENT_INITIATED")
        yield self.wait_calls("syd_alice", "send")
        yield self.wait_record_gone(alice)
        yield self.stop_daemon()
        self.assertEqual(len(self.hs.sends("syd_alice")), 1)

    @defer.inlineCallbacks
    def test_kill_9_with_connected_participant_sends_exactly_once(self):
        yield self.start_all()
        alice = self.participant("alice", "syd_alice")
        self.lk.set_present(alice.room, alice.identity)
        yield self.delegate_via_get_token(alice, "syd_alice", 30000)
        yield self.wait_calls("syd_alice", "restart")

        code, sig = yield self.daemon.kill()
        self.assertEqual(sig, 9, self.daemon.describe())
        records = yield self.stored()
        self.assert_record(records, alice, delay_id="syd_alice", delay_timeout_ms=30000)

        restarts = len(self.hs.restarts("syd_alice"))
        yield self.daemon.restart()
        # still on the SFU: the restored job's lookup reconnects it
        yield self.wait_calls("syd_alice", "restart", restarts + 1)
        self.lk.set_present(alice.room, alice.identity, False)
        yield self.webhook("participant_left", alice, "CLIENT_INITIATED")
        yield self.wait_calls("syd_alice", "send")
        yield self.wait_record_gone(alice)
        yield self.stop_daemon()
        self.assertEqual(len(self.hs.sends("syd_alice")), 1, self.describe())

    @defer.inlineCallbacks
    def test_expired_jobs_purged_at_start(self):
        yield self.redis.start()
        alice = self.participant("alice", "syd_fresh")
        bob = self.participant("bob", "syd_expired")
        # bob's record is long expired; were it resumed, its lookup would find him present
        self.lk.set_present(bob.room, bob.identity)
        expired = job_value(delay_id="syd_expired", timeout_ns=1_000_000_000, server_name=self.hs.server_name,
                            room=bob.room, identity=bob.identity, restarted_at="2020-01-02T03:04:05.123456789Z")
        # alice's is live, written the way a Go process in UTC+2 writes it (nanoseconds, offset)
        now = datetime.datetime.now(datetime.timezone(datetime.timedelta(hours=2)))
        fresh = job_value(delay_id="syd_fresh", timeout_ns=60_000_000_000, server_name=self.hs.server_name,
                          room=alice.room, identity=alice.identity, restarted_at=go_time(now, 789))
        garbage_field, garbage = b'["x","y"]', b"not a job"
        yield self.redis.command("HSET", JOBS_KEY, job_field(bob.room, bob.identity), expired,
                                 job_field(alice.room, alice.identity), fresh, garbage_field, garbage)

        self.daemon = yield self.start_daemon(self.leave_env())
        # recovery is finished before the first /healthz 200 (docs/endpoints.md#health-endpoint)
        records = yield self.stored()
        self.assertEqual(records, {job_field(alice.room, alice.identity): fresh, garbage_field: garbage})

        # alice's job was resumed (lookup); bob's, restored at the same time, would have
        # been looked up by now too
        yield self.wait_for(lambda: self.lk.lookups(alice.room, alice.identity), "alice's resumed job to look her up")
        self.assertEqual(self.lk.lookups(bob.room, bob.identity), [])

        yield self.webhook("participant_joined", alice)
        yield self.wait_calls("syd_fresh", "restart")
        yield self.webhook("participant_left", alice, "CLIENT_INITIATED")
        yield self.wait_calls("syd_fresh", "send")
        yield self.wait_record_gone(alice)
        yield self.stop_daemon()
        self.assertEqual(self.hs.delayed_calls("syd_expired"), [], self.describe())
        self.assertEqual(self.lk.lookups(bob.room, bob.identity), [])
        records = yield self.stored()
        self.assertEqual(records, {garbage_field: garbage}, "an unparsable record is left in place")


class RedisOutageTests(LeaveCase, unittest.TestCase):
    """Redis going away or absent never blocks tokens; changes land once it is back (item 5)."""

    @defer.inlineCallbacks
    def test_changes_made_while_redis_is_down_land_when_it_is_back(self):
        yield self.start_all()
        alice = self.participant("alice", "syd_a")
        bob = self.participant("bob", "syd_b")
        yield self.delegate_via_get_token(alice, "syd_a", 30000)
        yield self.webhook("participant_joined", alice)
        yield self.wait_calls("syd_a", "restart")

        # Redis goes away, keeping its data on disk (alice's record comes back with it)
        yield self.redis.stop(save=True)

        # a new job and a finished job while it is down; tokens keep coming
        yield self.delegate_via_get_token(bob, "syd_b", 30000)
        yield self.webhook("participant_left", alice, "CLIENT_INITIATED")
        yield self.wait_calls("syd_a", "send")
        self.assertEqual(len(self.lk.create_room_requests), 2)

        mark = self.redis.mark()
        yield self.redis.restart()
        # the saved data set (with alice's now stale record) is back
        yield self.redis.wait_for_line(r"DB loaded from disk", since=mark)

        def landed(records):
            return job_field(alice.room, alice.identity) not in records and job_field(bob.room, bob.identity) in records

        yield self.wait_for(lambda: self.stored().addCallback(landed),
                            "bob's new record and alice's deletion to reach Redis", REDIS_BACK_DEADLINE)
        records = yield self.stored()
        self.assertEqual(list(records), [job_field(bob.room, bob.identity)])
        self.assert_record(records, bob, delay_id="syd_b", delay_timeout_ms=30000)
        yield self.stop_daemon()
        self.assertEqual(len(self.hs.sends("syd_a")), 1)
        self.assertEqual(self.hs.delayed_calls("syd_b"), [])

    @defer.inlineCallbacks
    def test_redis_down_at_start(self):
        carol = self.participant("carol", "syd_old")
        alice = self.participant("alice", "syd_new")
        # a job stored by an earlier process, saved to disk, then Redis is down
        yield self.redis.start()
        now = datetime.datetime.now(datetime.timezone.utc)
        stored = job_value(delay_id="syd_old", timeout_ns=60_000_000_000, server_name=self.hs.server_name,
                           room=carol.room, identity=carol.identity, restarted_at=go_time(now))
        yield self.redis.command("HSET", JOBS_KEY, job_field(carol.room, carol.identity), stored)
        yield self.redis.stop(save=True)

        self.daemon = yield self.start_daemon(self.leave_env())
        # tokens are served without Redis, with and without delegation
        result = yield self.daemon.post_json("/get_token", alice.body())
        self.assertEqual(result.code, 200, self.describe())
        t0 = time.time()
        yield self.delegate_via_get_token(alice, "syd_new", 30000)
        t1 = time.time()

        self.lk.set_present(carol.room, carol.identity)
        yield self.redis.restart()

        def landed(records):
            return job_field(alice.room, alice.identity) in records

        yield self.wait_for(lambda: self.stored().addCallback(landed),
                            "the job added while Redis was down to reach Redis", REDIS_BACK_DEADLINE)
        records = yield self.stored()
        self.assert_record(records, alice, delay_id="syd_new", delay_timeout_ms=30000, after=t0, before=t1)
        # the job stored before the outage is resumed once Redis is readable (and, found
        # on the SFU, restarted: its record then carries the new RestartedAt)
        yield self.wait_calls("syd_old", "restart", timeout=REDIS_BACK_DEADLINE)
        yield self.stop_daemon()
        records = yield self.stored()
        self.assert_record(records, carol, delay_id="syd_old", delay_timeout_ms=60000)
        self.assertEqual(len(records), 2)


class HomeserverAnswerTests(LeaveCase, unittest.TestCase):
    """What the job does with the homeserver's answers (docs/delegated-leave.md#answer-classification, docs/delegated-leave.md#timelines)."""

    @defer.inlineCallbacks
    def test_restart_404_aborts_without_sending(self):
        yield self.start_all()
        gina = self.participant("gina")  # her delayed event is unknown to the homeserver
        yield self.delegate_via_get_token(gina, "syd_gone", 10000)
        yield self.webhook("participant_joined", gina)
        yield self.wait_calls("syd_gone", "restart")
        yield self.wait_record_gone(gina)
        yield self.stop_daemon()
        self.assertEqual([c.status for c in self.hs.restarts("syd_gone")], [404])
        self.assertEqual(self.hs.sends("syd_gone"), [])

    @defer.inlineCallbacks
    def test_send_404_counts_as_already_sent(self):
        yield self.start_all()
        hank = self.participant("hank", "syd_hank")
        yield self.delegate_via_get_token(hank, "syd_hank", 10000)
        yield self.webhook("participant_joined", hank)
        yield self.wait_calls("syd_hank", "restart")
        self.hs.fire_delayed_event("syd_hank")
        yield self.webhook("participant_left", hank, "SIGNAL_CLOSE")
        yield self.wait_calls("syd_hank", "send")
        yield self.wait_record_gone(hank)
        yield self.stop_daemon()
        self.assertEqual([c.status for c in self.hs.sends("syd_hank")], [404])

    @defer.inlineCallbacks
    def test_rate_limited_restart_waits_for_retry_after(self):
        yield self.start_all()
        ivy = self.participant("ivy", "syd_ivy")
        self.hs.script_delayed_event("syd_ivy", Answer.rate_limited(retry_after_seconds=2, retry_after_ms=1))
        yield self.delegate_via_get_token(ivy, "syd_ivy", 10000)
        yield self.webhook("participant_joined", ivy)
        yield self.wait_calls("syd_ivy", "restart", 2)
        first, second = self.hs.restarts("syd_ivy")[:2]
        self.assertEqual((first.status, second.status), (429, 200))
        # the header wins over retry_after_ms and over the 0.5-1.5 s back-off (lower bound only)
        self.assertGreaterEqual(second.at - first.at, 1.95, self.describe())
        yield self.webhook("participant_left", ivy, "CLIENT_INITIATED")
        yield self.wait_calls("syd_ivy", "send")
        yield self.wait_record_gone(ivy)
        yield self.stop_daemon()
        self.assertEqual(len(self.hs.sends("syd_ivy")), 1)


class DelegationErrorTests(LeaveCase, unittest.TestCase):
    """The 400/403 cases of docs/authorization.md#token-procedure P3/P5 and docs/authorization.md#delegation-procedure G3/G5, through the real process."""

    def assert_error(self, result, status: int, errcode: str, message: str) -> None:
        self.assertEqual((result.code, result.body), (status, matrix_error_body(errcode, message)), self.describe())
        for name, value in CORS_HEADERS.items():
            self.assertEqual(result.header(name), value)

    @defer.inlineCallbacks
    def test_restricted_user_cannot_delegate(self):
        restricted = self.make_homeserver(host="127.0.0.2")
        yield self.redis.start()
        self.daemon = yield self.start_daemon(self.service_env(
            livekit_url=self.lk.url, full_access="full.example",
            LIVEKIT_REDIS_URL=f"{self.redis.url}/0",
            RTCAUTH_FEDERATION_IP_RANGE_ALLOWLIST="127.0.0.0/8,::1/128",
            LIVEKIT_CS_API_URL_OVERRIDES=f"{restricted.server_name}={restricted.client_api_url}",
        ))
        p = Participant(name="dave", server_name=restricted.server_name)
        restricted.add_token(p.token, p.user)
        restricted.schedule_delayed_event("syd_dave")

        result = yield self.daemon.post_json("/delegate_delayed_leave", p.body("syd_dave", 10000))
        self.assert_error(result, 403, "M_FORBIDDEN", E_DELEG)
        result = yield self.daemon.post_json("/get_token", p.body("syd_dave", 10000))
        self.assert_error(result, 400, "M_BAD_JSON", E_DELEG)
        result = yield self.daemon.post_json("/sfu/get", p.legacy_body("syd_dave", 10000))
        self.assert_error(result, 400, "M_BAD_JSON", E_DELEG)

        # each was checked with the homeserver first (docs/authorization.md#access-rules), nothing else happened
        self.assertEqual(len(restricted.userinfo_requests), 3)
        self.assertEqual(restricted.delayed_event_calls, [])
        self.assertEqual(self.lk.calls, [])
        records = yield self.stored()
        self.assertEqual(records, {})

    @defer.inlineCallbacks
    def test_unresolvable_client_api_refused_before_any_room(self):
        yield self.start_all(overrides=False)  # and no .well-known/matrix/client: 404
        p = self.participant("erin", "syd_erin")
        for path, body in [("/get_token", p.body("syd_erin", 10000)),
                           ("/sfu/get", p.legacy_body("syd_erin", 10000)),
                           ("/delegate_delayed_leave", p.body("syd_erin", 10000))]:
            result = yield self.daemon.post_json(path, body)
            self.assert_error(result, 400, "M_BAD_JSON", E_CSAPI)
            self.assertEqual(self.lk.calls, [], path)
        well_known = [r for r in self.hs.requests if r.path == WELL_KNOWN_CLIENT_PATH]
        self.assertGreaterEqual(len(well_known), 1)
        self.assertEqual(well_known[0].method, "GET")
        self.assertEqual(self.hs.delayed_event_calls, [])
        records = yield self.stored()
        self.assertEqual(records, {})
        # without delegation the same user still gets a token and a room
        result = yield self.daemon.post_json("/get_token", p.body())
        self.assertEqual(result.code, 200, self.describe())
        self.assertEqual([c.name for c in self.lk.create_room_requests], [p.room])


class DiscoveryTests(LeaveCase, unittest.TestCase):
    """/delegate_delayed_leave with the CS API from .well-known and an awkward delay ID."""

    @defer.inlineCallbacks
    def test_delegate_endpoint_well_known_prefix_and_escaped_delay_id(self):
        self.hs.publish_client_well_known({"m.homeserver": {"base_url": self.hs.client_api_url + "/prefix"}})
        yield self.start_all(overrides=False)
        delay_id = "syd/../x?y=1#z%2F\u00e9 "
        frank = self.participant("frank", delay_id)
        self.lk.set_present(frank.room, frank.identity)  # already in the call

        result = yield self.daemon.post_json("/delegate_delayed_leave", frank.body(delay_id, 10000))
        self.assertEqual((result.code, result.body), (200, b"{}\n"), self.describe())
        self.assertEqual(result.header("Access-Control-Allow-Origin"), "*")
        self.assertEqual(self.lk.create_room_requests, [])  # this endpoint creates no room
        records = yield self.stored()
        self.assert_record(records, frank, delay_id=delay_id, delay_timeout_ms=10000)

        yield self.wait_calls(delay_id, "restart")
        restart = self.hs.restarts(delay_id)[0]
        self.assert_delayed_call(restart, delay_id, "restart", prefix="/prefix")
        # one path segment: only unreserved characters and %XX escapes
        self.assertRegex(restart.segment, r"\A(?:[A-Za-z0-9._~-]|%[0-9A-F]{2})+\Z")
        self.assertNotIn(restart.segment, {".", ".."})

        yield self.webhook("participant_left", frank, "CLIENT_INITIATED")
        yield self.wait_calls(delay_id, "send")
        yield self.wait_record_gone(frank)
        yield self.stop_daemon()
        [send] = self.hs.sends(delay_id)
        self.assert_delayed_call(send, delay_id, "send", prefix="/prefix")
        # nothing reached any other delayed-event URL
        self.assertEqual({c.delay_id for c in self.hs.delayed_event_calls}, {delay_id})
        self.assertEqual([r.path for r in self.hs.requests if "delayed_events" in r.path and
                          not r.path.startswith("/prefix" + DELAYED_EVENTS)], [])
