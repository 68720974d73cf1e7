"""The HTTP-facing side of delegated leave: job registration errors and webhook routing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.leave.record import NS_PER_MS, JobParams
from rtcauthd.errors import MatrixError
from rtcauthd.leave.delegation import DelegatedLeave
from rtcauthd.leave.manager import ShuttingDown
from rtcauthd.livekit.webhooks import WebhookVerifier

NOW = 1785000000


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_webhook(body: bytes, *, key="devkey", secret="devsecret", now=NOW) -> str:
    """An Authorization value made the way the SFU makes it (docs/livekit.md#webhook-signature)."""
    header = b64url(b'{"alg":"HS256","typ":"JWT"}')
    claims = {
        "iss": key,
        "exp": now + 300,
        "nbf": now,
        "iat": now,
        "sha256": base64.b64encode(hashlib.sha256(body).digest()).decode(),
    }
    payload = b64url(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(signature)}"


class FakeManager:
    def __init__(self):
        self.added = []
        self.routed = []
        self.stopping = False

    def add(self, params):
        if self.stopping:
            raise ShuttingDown()
        self.added.append(params)
        return succeed(None)

    def route(self, room, identity, signal):
        self.routed.append((room, identity, signal))
        return True


class DelegatedLeaveTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.manager = FakeManager()
        self.delegation = DelegatedLeave(
            manager=self.manager,
            resolver=None,
            webhooks=WebhookVerifier(api_key="devkey", api_secret="devsecret", clock=self.clock),
        )

    def job(self, ms=10000):
        return JobParams(delay_id="syd_1", delay_timeout_ns=ms * NS_PER_MS, server_name="example.com", room="R", identity="I")

    def test_add_hands_the_record_to_the_manager(self):
        self.successResultOf(self.delegation.add_job(self.job(8000)))
        [params] = self.manager.added
        self.assertEqual((params.delay_timeout_ns, params.room, params.identity), (8_000_000_000, "R", "I"))

    def test_shutting_down_is_503(self):
        self.manager.stopping = True
        error = self.failureResultOf(self.delegation.add_job(self.job()), MatrixError).value
        self.assertEqual((error.status, error.errcode, error.message), (503, "M_UNKNOWN", "Service is shutting down"))

    def test_overflowing_timeout_is_400(self):
        error = self.failureResultOf(self.delegation.add_job(self.job(9_223_372_036_855)), MatrixError).value
        self.assertEqual((error.status, error.errcode), (400, "M_BAD_JSON"))
        self.assertTrue(error.message.startswith("invalid delay timeout for delayed event job: "))
        self.assertEqual(self.manager.added, [])
        self.successResultOf(self.delegation.add_job(self.job(9_223_372_036_854)))

    def test_signed_webhook_is_routed(self):
        body = (
            b'{"event":"participant_left","room":{"name":"O8437W3+jmzMVjoIP3tNwbm+XxHQk2iKpOA7aqw3qSc"},'
            b'"participant":{"identity":"J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU",'
            b'"disconnectReason":"CLIENT_INITIATED"},"id":"EV_1","createdAt":"1785000000"}'
        )
        self.delegation.handle(sign_webhook(body), body)
        self.assertEqual(
            self.manager.routed,
            [
                (
                    "O8437W3+jmzMVjoIP3tNwbm+XxHQk2iKpOA7aqw3qSc",
                    "J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU",
                    "ParticipantDisconnectedIntentionally",
                )
            ],
        )

    def test_forged_or_mismatched_webhooks_change_nothing(self):
        body = b'{"event":"participant_joined","room":{"name":"R"},"participant":{"identity":"I"}}'
        for authorization, sent in (
            (None, body),
            ("", body),
            (sign_webhook(body, secret="wrong"), body),
            (sign_webhook(body, key="otherkey"), body),
            (sign_webhook(body, now=NOW - 400), body),  # expired past the 60 s leeway
            (sign_webhook(body), body + b" "),
            ("Bearer " + sign_webhook(body), body),
        ):
            self.delegation.handle(authorization, sent)
        self.assertEqual(self.manager.routed, [])

    def test_ignored_event_types(self):
        body = b'{"event":"room_started","room":{"name":"R"}}'
        self.delegation.handle(sign_webhook(body), body)
        self.assertEqual(self.manager.routed, [])


class DelayCapTests(SynchronousTestCase):
    """RTCAUTH_MAX_DELAY_SECONDS (issue 12): longer delays are a 400 and register nothing."""

    def setUp(self):
        self.manager = FakeManager()
        self.delegation = DelegatedLeave(
            manager=self.manager,
            resolver=None,
            webhooks=WebhookVerifier(api_key="devkey", api_secret="devsecret", clock=Clock()),
            max_delay_seconds=86400,
        )

    def job(self, ms):
        return JobParams(delay_id="d", delay_timeout_ns=ms * NS_PER_MS, server_name="example.com", room="R", identity="I")

    def test_at_the_cap_is_accepted_beyond_is_400(self):
        self.successResultOf(self.delegation.add_job(self.job(86_400_000)))
        error = self.failureResultOf(self.delegation.add_job(self.job(86_400_001)), MatrixError).value
        self.assertEqual((error.status, error.errcode), (400, "M_BAD_JSON"))
        self.assertEqual(
            error.message, "invalid delay timeout for delayed event job: 86400001ms is longer than the 86400s this service accepts"
        )
        self.assertEqual(len(self.manager.added), 1)
