"""LiveKit webhook verification (docs/livekit.md#webhooks), checked against the official SDK too."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import time
from typing import Any, Optional

from google.protobuf.json_format import MessageToJson
from jwt.warnings import InsecureKeyLengthWarning
from livekit import api as lkapi
from livekit.protocol import models as lkmodels
from livekit.protocol import webhook as lkwebhook
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.trial import util as trial_util

from rtcauthd.livekit import webhooks
from rtcauthd.livekit.webhooks import (
    WebhookEvent,
    WebhookRejected,
    WebhookVerifier,
    signal_for,
)

KEY, SECRET = "devkey", "devsecret"
NOW = 1785000000

#: docs/livekit.md#sfu-configuration, exact bytes
EXAMPLE_BODY = (
    b'{"event":"participant_left","room":{"name":"O8437W3+jmzMVjoIP3tNwbm+XxHQk2iKpOA7aqw3qSc"},'
    b'"participant":{"identity":"J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU",'
    b'"disconnectReason":"CLIENT_INITIATED"},"id":"EV_1","createdAt":"1785000000"}'
)
EXAMPLE_SHA = "wvKT4X+zYDkysFGr6eLIcxsGTNntqT7jn8fOHuLQDXU="
EXAMPLE_PAYLOAD = (
    '{"iss":"devkey","exp":1785000300,"nbf":1785000000,"iat":1785000000,'
    '"sha256":"wvKT4X+zYDkysFGr6eLIcxsGTNntqT7jn8fOHuLQDXU="}'
)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def body_sha(body: bytes) -> str:
    return base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")


def sign(
    payload: "dict[str, Any] | str",
    *,
    secret: str = SECRET,
    header: "dict[str, Any] | str" = '{"alg":"HS256","typ":"JWT"}',
) -> str:
    """A compact JWS built by hand, so tests control every byte."""
    head = header if isinstance(header, str) else json.dumps(header)
    body = payload if isinstance(payload, str) else json.dumps(payload)
    signing_input = b64url(head.encode()) + "." + b64url(body.encode())
    mac = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(mac)


def claims_for(body: bytes, now: float = NOW, **overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": KEY,
        "exp": int(now) + 300,
        "nbf": int(now),
        "iat": int(now),
        "sha256": body_sha(body),
    }
    for name, value in overrides.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def event_body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


class VerifierMixin:
    # The SDK (through PyJWT) warns about the short docs/livekit.md#sfu-configuration example secret.
    suppress = [trial_util.suppress(category=InsecureKeyLengthWarning)]

    def make(self, now: float = NOW) -> WebhookVerifier:
        self.clock = Clock()
        self.clock.advance(now)
        return WebhookVerifier(api_key=KEY, api_secret=SECRET, clock=self.clock)

    def verify_signed(self, body: bytes, **claim_overrides: Any) -> WebhookEvent:
        return self.make().verify(sign(claims_for(body, **claim_overrides)), body)

    def assertRejected(self, reason: str, authorization: Optional[str], body: bytes, now: float = NOW) -> None:
        with self.assertRaises(WebhookRejected) as ctx:  # type: ignore[attr-defined]
            self.make(now).verify(authorization, body)
        self.assertEqual(ctx.exception.reason, reason)  # type: ignore[attr-defined]


class WorkedExampleTests(VerifierMixin, SynchronousTestCase):
    def test_body_hash_matches_document(self) -> None:
        self.assertEqual(body_sha(EXAMPLE_BODY), EXAMPLE_SHA)

    def test_example_verifies_at_its_time(self) -> None:
        token = sign(EXAMPLE_PAYLOAD)
        event = self.make(NOW).verify(token, EXAMPLE_BODY)
        self.assertEqual(
            event,
            WebhookEvent(
                event="participant_left",
                room_name="O8437W3+jmzMVjoIP3tNwbm+XxHQk2iKpOA7aqw3qSc",
                participant_identity="J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU",
                disconnect_reason=1,
                id="EV_1",
            ),
        )
        self.assertEqual(signal_for(event), "ParticipantDisconnectedIntentionally")

    def test_example_token_is_valid_for_the_sdk_too(self) -> None:
        token = sign(EXAMPLE_PAYLOAD)
        claims = lkapi.TokenVerifier(KEY, SECRET).verify(token, verify_signature=False)
        self.assertEqual(claims.sha256, EXAMPLE_SHA)
        # the SDK checks against the wall clock; give it enough leeway to reach 2026-07
        leeway = datetime.timedelta(seconds=max(0, time.time() - NOW) + 3600)
        receiver = lkapi.WebhookReceiver(lkapi.TokenVerifier(KEY, SECRET, leeway=leeway))
        self.assertEqual(receiver.receive(EXAMPLE_BODY.decode(), token).participant.identity,
                         "J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU")

    def test_example_expires_after_the_leeway(self) -> None:
        token = sign(EXAMPLE_PAYLOAD)
        self.make(NOW + 300 + 60).verify(token, EXAMPLE_BODY)  # exp + 60 s: still inside
        self.assertRejected(webhooks.R_EXPIRED, token, EXAMPLE_BODY, now=NOW + 300 + 60.5)

    def test_example_not_yet_valid_before_the_leeway(self) -> None:
        token = sign(EXAMPLE_PAYLOAD)
        self.make(NOW - 60).verify(token, EXAMPLE_BODY)
        self.assertRejected(webhooks.R_NOT_YET, token, EXAMPLE_BODY, now=NOW - 60.5)


class OfficialSDKTests(VerifierMixin, SynchronousTestCase):
    """Bodies and tokens produced by livekit-api / livekit-protocol, not by us."""

    def sdk_event(self, reason: int = lkmodels.CLIENT_INITIATED) -> lkwebhook.WebhookEvent:
        e = lkwebhook.WebhookEvent(event="participant_left", id="EV_sdk", created_at=NOW)
        e.room.name = "room-alias"
        e.room.sid = "RM_x"
        e.participant.identity = "ident"
        e.participant.sid = "PA_x"
        e.participant.disconnect_reason = reason
        return e

    def sdk_token(self, body: bytes, ttl: Optional[datetime.timedelta] = None) -> str:
        token = lkapi.AccessToken(KEY, SECRET).with_sha256(body_sha(body))
        if ttl is not None:
            token = token.with_ttl(ttl)
        return token.to_jwt()

    def test_sdk_signed_camel_case_body(self) -> None:
        body = MessageToJson(self.sdk_event()).encode()
        self.assertIn(b'"disconnectReason": "CLIENT_INITIATED"', body)
        self.assertIn(b'"createdAt": "1785000000"', body)
        # the SDK stamps nbf/exp from the wall clock, so our clock starts there
        event = self.make(time.time()).verify(self.sdk_token(body), body)
        self.assertEqual(
            (event.event, event.room_name, event.participant_identity, event.disconnect_reason, event.id),
            ("participant_left", "room-alias", "ident", 1, "EV_sdk"),
        )

    def test_sdk_snake_case_numeric_enum_body(self) -> None:
        body = MessageToJson(
            self.sdk_event(lkmodels.CONNECTION_TIMEOUT),
            preserving_proto_field_name=True,
            use_integers_for_enums=True,
        ).encode()
        self.assertIn(b'"disconnect_reason": 14', body)
        event = self.make(time.time()).verify(self.sdk_token(body), body)
        self.assertEqual((event.participant_identity, event.disconnect_reason), ("ident", 14))
        self.assertEqual(signal_for(event), "ParticipantConnectionAborted")

    def test_sdk_token_expired_past_leeway(self) -> None:
        body = MessageToJson(self.sdk_event()).encode()
        token = self.sdk_token(body, ttl=datetime.timedelta(seconds=-120))
        self.assertRejected(webhooks.R_EXPIRED, token, body, now=time.time())

    def test_sdk_token_with_other_body(self) -> None:
        body = MessageToJson(self.sdk_event()).encode()
        self.assertRejected(webhooks.R_CHECKSUM, self.sdk_token(body), body + b" ", now=time.time())

    def test_sdk_accepts_our_test_signer(self) -> None:
        # The hand-made tokens used below are what the SDK considers valid webhooks.
        body = MessageToJson(self.sdk_event()).encode()
        now = int(time.time())
        token = sign(claims_for(body, now=now))
        receiver = lkapi.WebhookReceiver(lkapi.TokenVerifier(KEY, SECRET))
        self.assertEqual(receiver.receive(body.decode(), token).participant.identity, "ident")
        self.assertEqual(self.make(now).verify(token, body).participant_identity, "ident")


BODY = event_body(event="participant_joined", room={"name": "r"}, participant={"identity": "i"})


class RejectionTests(VerifierMixin, SynchronousTestCase):
    def test_missing_header(self) -> None:
        self.assertRejected(webhooks.R_NO_AUTH, None, BODY)
        self.assertRejected(webhooks.R_NO_AUTH, "", BODY)

    def test_bearer_prefix_is_not_accepted(self) -> None:
        self.assertRejected(webhooks.R_MALFORMED, "Bearer " + sign(claims_for(BODY)), BODY)

    def test_malformed_tokens(self) -> None:
        good = sign(claims_for(BODY))
        head, payload, mac = good.split(".")
        for token in (
            "garbage",
            head + "." + payload,
            good + ".",
            head + "=." + payload + "." + mac,  # padding is not base64url-raw
            head + "." + payload + "." + mac + "=",
            "!!." + payload + "." + mac,
            b64url(b"not json") + "." + payload + "." + mac,
            b64url(b"[1]") + "." + payload + "." + mac,
        ):
            with self.subTest(token=token):
                self.assertRejected(webhooks.R_MALFORMED, token, BODY)

    def test_wrong_algorithm(self) -> None:
        for header in ({"alg": "HS512"}, {"alg": "none"}, {"alg": "hs256"}, {"typ": "JWT"}):
            with self.subTest(header=header):
                self.assertRejected(webhooks.R_ALG, sign(claims_for(BODY), header=header), BODY)

    def test_wrong_or_missing_issuer(self) -> None:
        self.assertRejected(webhooks.R_NO_SECRET, sign(claims_for(BODY, iss="otherkey")), BODY)
        self.assertRejected(webhooks.R_NO_SECRET, sign(claims_for(BODY, iss=None)), BODY)

    def test_issuer_is_checked_before_the_signature(self) -> None:
        token = sign(claims_for(BODY, iss="otherkey"), secret="othersecret")
        self.assertRejected(webhooks.R_NO_SECRET, token, BODY)

    def test_forged_signature(self) -> None:
        self.assertRejected(webhooks.R_SIGNATURE, sign(claims_for(BODY), secret="guess"), BODY)
        head, payload, _mac = sign(claims_for(BODY)).split(".")
        tampered = b64url(json.dumps(claims_for(BODY, iat=NOW - 1)).encode())
        self.assertRejected(webhooks.R_SIGNATURE, head + "." + tampered + "." + _mac, BODY)

    def test_forged_and_expired_reports_the_signature(self) -> None:
        token = sign(claims_for(BODY, exp=NOW - 1000), secret="guess")
        self.assertRejected(webhooks.R_SIGNATURE, token, BODY)

    def test_expired_beyond_leeway(self) -> None:
        self.assertRejected(webhooks.R_EXPIRED, sign(claims_for(BODY, exp=NOW - 61)), BODY)
        self.assertEqual(self.verify_signed(BODY, exp=NOW - 59).event, "participant_joined")

    def test_expired_is_checked_before_the_body_hash(self) -> None:
        token = sign(claims_for(b"other", exp=NOW - 61))
        self.assertRejected(webhooks.R_EXPIRED, token, BODY)

    def test_not_yet_valid_beyond_leeway(self) -> None:
        self.assertRejected(webhooks.R_NOT_YET, sign(claims_for(BODY, nbf=NOW + 61)), BODY)
        self.assertEqual(self.verify_signed(BODY, nbf=NOW + 59).event, "participant_joined")

    def test_issued_in_the_future_beyond_leeway(self) -> None:
        # go-jose refuses iat > now + leeway as well
        self.assertRejected(webhooks.R_FUTURE_IAT, sign(claims_for(BODY, nbf=None, iat=NOW + 61)), BODY)

    def test_nbf_and_iat_are_optional(self) -> None:
        event = self.verify_signed(BODY, nbf=None, iat=None)
        self.assertEqual(event.participant_identity, "i")

    def test_exp_is_required_unlike_upstream(self) -> None:
        # upstream (go-jose) accepts a token without exp; a captured one would then replay forever
        self.assertRejected(webhooks.R_NO_EXPIRY, sign(claims_for(BODY, exp=None, nbf=None, iat=None)), BODY)
        self.assertRejected(webhooks.R_NO_EXPIRY, sign(claims_for(BODY, exp=None)), BODY)

    def test_fractional_time_claims_truncate(self) -> None:
        self.assertEqual(self.verify_signed(BODY, exp=NOW - 60 + 0.9).event, "participant_joined")
        self.assertRejected(webhooks.R_EXPIRED, sign(claims_for(BODY, exp=NOW - 61.5)), BODY)

    def test_malformed_claims(self) -> None:
        for overrides in ({"exp": "1785000300"}, {"nbf": True}, {"iss": 5}, {"aud": 5}, {"sub": []}, {"sha256": 5}):
            with self.subTest(overrides=overrides):
                self.assertRejected(webhooks.R_CLAIMS, sign(claims_for(BODY, **overrides)), BODY)
        self.assertRejected(webhooks.R_CLAIMS, sign("[1,2]"), BODY)

    def test_body_mismatch(self) -> None:
        token = sign(claims_for(BODY))
        self.assertRejected(webhooks.R_CHECKSUM, token, BODY + b"\n")
        self.assertRejected(webhooks.R_CHECKSUM, token, b"")

    def test_checksum_must_match_exactly(self) -> None:
        unpadded = body_sha(BODY).rstrip("=")
        self.assertRejected(webhooks.R_CHECKSUM, sign(claims_for(BODY, sha256=unpadded)), BODY)
        urlsafe = base64.urlsafe_b64encode(hashlib.sha256(BODY).digest()).decode()
        if urlsafe != body_sha(BODY):
            self.assertRejected(webhooks.R_CHECKSUM, sign(claims_for(BODY, sha256=urlsafe)), BODY)
        hexdigest = hashlib.sha256(BODY).hexdigest()
        self.assertRejected(webhooks.R_CHECKSUM, sign(claims_for(BODY, sha256=hexdigest)), BODY)
        self.assertRejected(webhooks.R_CHECKSUM, sign(claims_for(BODY, sha256=None)), BODY)

    def test_unparsable_signed_body(self) -> None:
        for body in (
            b"{not json",
            b"[]",
            b"null",
            b'"x"',
            b'{"event":5}',
            b'{"room":"r"}',
            b'{"participant":[]}',
            b'{"event":"participant_left","event":"participant_joined"}',
            b'{"participant":{"disconnectReason":1,"disconnect_reason":1}}',
            b'{"participant":{"disconnectReason":1.5}}',
            b'{"participant":{"disconnectReason":true}}',
            b'{"participant":{"disconnectReason":4294967296}}',
            b'{"createdAt":"abc"}',
            b'{"createdAt":" 1"}',
            b'{"createdAt":1.5}',
            b'{"numDropped":4294967296}',
            b'{"track":"t"}',
            b'{"event":"participant_left"} x',
            b'{"id":NaN}',
            b'{"event":"\xff"}',
            b'{"event":"\\ud800"}',
        ):
            with self.subTest(body=body):
                self.assertRejected(webhooks.R_BODY, sign(claims_for(body)), body)

    def test_empty_secret_never_verifies(self) -> None:
        clock = Clock()
        clock.advance(NOW)
        verifier = WebhookVerifier(api_key=KEY, api_secret="", clock=clock)
        with self.assertRaises(WebhookRejected) as ctx:
            verifier.verify(sign(claims_for(BODY), secret=""), BODY)
        self.assertEqual(ctx.exception.reason, webhooks.R_NO_SECRET)


class ProtojsonParsingTests(VerifierMixin, SynchronousTestCase):
    def parse(self, body: bytes) -> WebhookEvent:
        return self.verify_signed(body)

    def test_camel_and_snake_case(self) -> None:
        camel = self.parse(b'{"event":"participant_left","participant":{"identity":"i","disconnectReason":1}}')
        snake = self.parse(b'{"event":"participant_left","participant":{"identity":"i","disconnect_reason":1}}')
        self.assertEqual(camel, snake)
        self.assertEqual(camel.disconnect_reason, 1)

    def test_enum_names_and_numbers(self) -> None:
        for literal, expected in (
            (b'"CLIENT_INITIATED"', 1),
            (b'"SERVER_SHUTDOWN"', 3),
            (b'"AGENT_ERROR"', 16),
            (b"1", 1),
            (b"1.0", 1),
            (b"1e0", 1),
            (b"99", 99),
            (b'"NOT_A_REASON"', 0),  # unknown names are discarded
            (b'"client_initiated"', 0),  # names are case-sensitive
            (b"null", 0),
        ):
            with self.subTest(literal=literal):
                body = b'{"participant":{"disconnectReason":' + literal + b"}}"
                self.assertEqual(self.parse(body).disconnect_reason, expected)

    def test_int64_as_string_or_number(self) -> None:
        for literal in (b'"1785000000"', b"1785000000", b'"-5"', b'"1e3"', b"null"):
            with self.subTest(literal=literal):
                self.assertEqual(self.parse(b'{"event":"e","createdAt":' + literal + b"}").event, "e")

    def test_missing_room_and_participant_are_empty(self) -> None:
        event = self.parse(b'{"event":"participant_joined"}')
        self.assertEqual(event, WebhookEvent(event="participant_joined"))
        event = self.parse(b'{"event":"participant_left","room":null,"participant":{}}')
        self.assertEqual((event.room_name, event.participant_identity, event.disconnect_reason), ("", "", 0))

    def test_empty_object(self) -> None:
        self.assertEqual(self.parse(b"{}"), WebhookEvent())

    def test_unknown_fields_ignored(self) -> None:
        body = (
            b'{"event":"participant_joined","futureField":{"x":[1,2]},"room":{"name":"r","sid":"RM",'
            b'"emptyTimeout":300,"whatever":null},"participant":{"identity":"i","state":"ACTIVE",'
            b'"permission":{"canPublish":true},"unknown":1},"numDropped":0,"egressInfo":null}'
        )
        event = self.parse(body)
        self.assertEqual((event.event, event.room_name, event.participant_identity), ("participant_joined", "r", "i"))

    def test_non_ascii_strings_kept(self) -> None:
        body = json.dumps({"event": "participant_joined", "participant": {"identity": "é\u2028"}}).encode()
        self.assertEqual(self.parse(body).participant_identity, "é\u2028")


class SignalMappingTests(SynchronousTestCase):
    """Every row of docs/livekit.md#webhook-signals."""

    def test_rows(self) -> None:
        rows = [
            ("participant_joined", 0, "ParticipantConnected"),
            ("participant_joined", 1, "ParticipantConnected"),
            ("participant_joined", 14, "ParticipantConnected"),
            ("participant_left", 1, "ParticipantDisconnectedIntentionally"),
            ("participant_left", 0, "ParticipantConnectionAborted"),
            ("participant_left", 2, "ParticipantConnectionAborted"),
            ("participant_left", 14, "ParticipantConnectionAborted"),
            ("participant_connection_aborted", 1, "ParticipantDisconnectedIntentionally"),
            ("participant_connection_aborted", 0, "ParticipantConnectionAborted"),
            ("participant_connection_aborted", 9, "ParticipantConnectionAborted"),
            ("room_started", 0, None),
            ("room_finished", 1, None),
            ("track_published", 0, None),
            ("track_unpublished", 0, None),
            ("egress_started", 0, None),
            ("egress_ended", 0, None),
            ("ingress_started", 0, None),
            ("", 1, None),
            ("participant_updated", 1, None),
            ("PARTICIPANT_JOINED", 0, None),
        ]
        for name, reason, expected in rows:
            with self.subTest(event=name, reason=reason):
                event = WebhookEvent(event=name, room_name="r", participant_identity="i", disconnect_reason=reason)
                self.assertEqual(signal_for(event), expected)

    def test_end_to_end_from_body(self) -> None:
        clock = Clock()
        clock.advance(NOW)
        verifier = WebhookVerifier(api_key=KEY, api_secret=SECRET, clock=clock)
        for event_name, reason, expected in (
            ("participant_joined", None, "ParticipantConnected"),
            ("participant_left", "CLIENT_INITIATED", "ParticipantDisconnectedIntentionally"),
            ("participant_left", None, "ParticipantConnectionAborted"),
            ("participant_connection_aborted", "CLIENT_INITIATED", "ParticipantDisconnectedIntentionally"),
            ("participant_connection_aborted", "SIGNAL_CLOSE", "ParticipantConnectionAborted"),
            ("room_finished", None, None),
        ):
            participant: dict[str, Any] = {"identity": "i"}
            if reason is not None:
                participant["disconnectReason"] = reason
            body = event_body(event=event_name, room={"name": "r"}, participant=participant)
            with self.subTest(event=event_name, reason=reason):
                self.assertEqual(signal_for(verifier.verify(sign(claims_for(body)), body)), expected)


class HostileSignedBodyTests(SynchronousTestCase):
    """Bodies signed with the right secret but built to break the parser: rejected, never raised."""

    def test_huge_integers_and_surrogate_checksums_are_rejections(self):
        import base64
        import hashlib
        import hmac
        import json

        from twisted.internet.task import Clock

        from rtcauthd.livekit.webhooks import WebhookRejected, WebhookVerifier

        def b64u(data):
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        def sign(claims):
            header = b64u(b'{"alg":"HS256","typ":"JWT"}')
            payload = b64u(json.dumps(claims).encode())
            sig = b64u(hmac.new(b"devsecret", f"{header}.{payload}".encode(), hashlib.sha256).digest())
            return f"{header}.{payload}.{sig}"

        clock = Clock()
        clock.advance(1785000000)
        verifier = WebhookVerifier(api_key="devkey", api_secret="devsecret", clock=clock)
        base = {"iss": "devkey", "exp": 1785000300, "nbf": 1785000000}
        for field in ("createdAt", "numDropped"):
            body = json.dumps({"event": "participant_left", "room": {"name": "r"}, field: "1" * 5000}).encode()
            claims = dict(base, sha256=base64.b64encode(hashlib.sha256(body).digest()).decode())
            with self.assertRaises(WebhookRejected):
                verifier.verify(sign(claims), body)
        with self.assertRaises(WebhookRejected):
            verifier.verify(sign(dict(base, sha256="\ud800")), b'{"event":"participant_joined"}')


class SecretAndHeaderRulesTests(SynchronousTestCase):
    """What PyJWT would do differently on its own: key rules, header JSON, detached payloads."""

    def verifier(self, secret: str) -> WebhookVerifier:
        clock = Clock()
        clock.advance(NOW)
        return WebhookVerifier(api_key=KEY, api_secret=secret, clock=clock)

    def test_any_secret_verifies_with_its_exact_bytes_and_without_warning(self) -> None:
        import warnings

        raw = b"secret\xff".decode("utf-8", "surrogateescape")  # as os.environ holds it
        for secret in ("-----BEGIN PUBLIC KEY-----\nx\n-----END PUBLIC KEY-----", '{"kty":"oct"}', "s", raw):
            head = b64url(b'{"alg":"HS256","typ":"JWT"}')
            payload = b64url(json.dumps(claims_for(BODY)).encode())
            key = secret.encode("utf-8", "surrogateescape")
            mac = hmac.new(key, f"{head}.{payload}".encode(), hashlib.sha256).digest()
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                event = self.verifier(secret).verify(f"{head}.{payload}.{b64url(mac)}", BODY)
            self.assertEqual(event.participant_identity, "i", secret)

    def assertMalformedHeader(self, header: str) -> None:
        with self.assertRaises(WebhookRejected) as ctx:
            self.verifier(SECRET).verify(sign(claims_for(BODY), header=header), BODY)
        self.assertEqual(ctx.exception.reason, webhooks.R_MALFORMED)

    def test_header_json_follows_go(self) -> None:
        self.assertMalformedHeader('{"alg":"HS256","x":NaN}')

    def test_unencoded_payload_header_is_refused(self) -> None:
        # PyJWT refuses RFC 7797's b64=false form here; go-jose refuses any crit header.
        self.assertMalformedHeader('{"alg":"HS256","b64":false,"crit":["b64"]}')

    def test_non_string_kid_is_refused(self) -> None:
        # PyJWT refuses it before anything else; go-jose fails to parse such a header too.
        self.assertMalformedHeader('{"alg":"HS256","kid":5}')
