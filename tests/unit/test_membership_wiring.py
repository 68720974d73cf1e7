"""Where membership enforcement plugs in (docs/membership.md#tracking): tokens minted on the
AS routes register their participant, verified webhooks reach the monitor, a removal stops
the delegated leave, and the daemon builds the monitor only in AS mode with an interval."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.leave.delegation import DelegatedLeave
from rtcauthd.livekit.webhooks import WebhookVerifier
from rtcauthd.outbound.errors import FailureKind, OutboundError
from tests.support.daemon import build_test_daemon
from tests.unit.test_appservice_routes import (
    ALIAS,
    ALICE_IDENTITY,
    BOB_IDENTITY,
    CS,
    Harness,
    cs_body,
    ss_body,
)
from tests.unit.test_delegation import NOW, FakeManager, sign_webhook
from tests.unit.test_manager import ManagerTestCase, params


class Registrations:
    def __init__(self):
        self.registered = []

    def register(self, **participant):
        self.registered.append(participant)


class TokenRegistrationTests(Harness):
    def setUp(self):
        Harness.setUp(self)
        self.participants = Registrations()
        self.authorizer._participants = self.participants

    def test_local_and_server_tokens_register_their_participant(self):
        response, body = self.post(CS + "/get_token", cs_body())
        self.assertEqual(response.code, 200, body)
        response, body = self.post_ss(ss_body())
        self.assertEqual(response.code, 200, body)
        self.assertEqual(
            self.participants.registered,
            [
                dict(matrix_room_id="!roomid:example.com", matrix_user_id="@alice:example.com",
                     livekit_room=ALIAS, livekit_identity=ALICE_IDENTITY),
                dict(matrix_room_id="!roomid:example.com", matrix_user_id="@bob:remote.example",
                     livekit_room=ALIAS, livekit_identity=BOB_IDENTITY),
            ],
        )

    def test_no_token_no_registration(self):
        self.homeserver.not_joined.add("@alice:example.com")
        self.post(CS + "/get_token", cs_body())
        self.homeserver.not_joined.clear()
        self.rooms.error = OutboundError(FailureKind.HTTP_STATUS, "CreateRoom", "HTTP 500", status=500)
        self.post(CS + "/get_token", cs_body())
        self.rooms.error = None
        # a token relayed from another server is that server's to enforce
        response, body = self.post(CS + "/get_token", cs_body(server_name="remote.example"))
        self.assertEqual(response.code, 200, body)
        self.assertEqual(self.participants.registered, [])


class WebhookObserverTests(SynchronousTestCase):
    def test_verified_webhooks_only_reach_the_observers(self):
        seen = []
        from twisted.internet.task import Clock

        clock = Clock()
        clock.advance(NOW)
        delegation = DelegatedLeave(
            manager=FakeManager(), resolver=None,
            webhooks=WebhookVerifier(api_key="devkey", api_secret="devsecret", clock=clock),
            observers=[seen.append],
        )
        body = b'{"event":"participant_joined","room":{"name":"R"},"participant":{"identity":"I"}}'
        delegation.handle(sign_webhook(body, secret="wrong"), body)
        self.assertEqual(seen, [])
        delegation.handle(sign_webhook(body), body)
        self.assertEqual([(e.event, e.room_name, e.participant_identity) for e in seen],
                         [("participant_joined", "R", "I")])
        # a failing observer is logged and does not stop the job routing
        delegation.observers.insert(0, lambda event: 1 / 0)
        delegation.handle(sign_webhook(body), body)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(len(seen), 2)


class DiscardTests(ManagerTestCase):
    def test_discard_stops_the_job_without_sending_and_deletes_its_record(self):
        self.manager.add(params())
        self.assertTrue(self.manager.discard("room", "alice"))
        self.assertIsNone(self.manager.get("room", "alice"))
        self.assertEqual(self.deletes(), [("room", "alice")])
        self.at(7200)
        self.assertEqual(self.hs.of("send", "d1"), [])
        self.assertFalse(self.manager.discard("room", "alice"))


class DaemonWiringTests(SynchronousTestCase):
    ENV = {
        "LIVEKIT_URL": "wss://sfu.example.com",
        "LIVEKIT_KEY": "devkey",
        "LIVEKIT_SECRET": "secret-secret-secret-secret-secret",
        "LIVEKIT_FULL_ACCESS_HOMESERVERS": "example.com",
    }
    AS = {"LIVEKIT_AS_TOKEN": "as-token-123456", "LIVEKIT_HS_TOKEN": "hs-token-123456",
          "LIVEKIT_HS_SERVER_NAME": "example.com"}

    def test_built_only_in_appservice_mode_with_an_interval(self):
        for env, built in ((self.ENV, False), ({**self.ENV, **self.AS}, True),
                           ({**self.ENV, **self.AS, "LIVEKIT_MEMBERSHIP_CHECK_INTERVAL_SECONDS": "0"}, False)):
            daemon = build_test_daemon(env, MemoryReactorClock())
            self.assertEqual(daemon.membership is not None, built, env)
            if built:
                self.assertIn(daemon.membership.on_webhook, daemon.delegation.observers)
                self.assertIs(daemon.appservice._authorizer._participants, daemon.membership)

    def test_the_participants_store_uses_the_job_stores_redis_target_sentinels_included(self):
        from rtcauthd.membership import store as store_module

        connected = []
        fake_sentinel = object()
        self.patch(store_module, "sentinel_manager", lambda target: fake_sentinel if target.sentinels else None)
        self.patch(store_module, "connect", lambda target, **kw: connected.append((target, kw["sentinel"])) or object())
        env = {**self.ENV, **self.AS, "LIVEKIT_REDIS_URL": "redis://127.0.0.1:1/3",
               "RTCAUTH_REDIS_SENTINELS": "127.0.0.1:26379,127.0.0.1:26380", "RTCAUTH_REDIS_SENTINEL_MASTER": "calls"}
        daemon = build_test_daemon(env, MemoryReactorClock())
        [(target, sentinel)] = connected
        self.assertEqual((target.db, target.sentinel_master), (3, "calls"))
        self.assertEqual(list(target.sentinels), [("127.0.0.1", 26379), ("127.0.0.1", 26380)])
        self.assertIs(sentinel, fake_sentinel)
        self.assertIsNotNone(daemon.membership)
