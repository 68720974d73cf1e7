"""Prometheus metrics: what each request, call and job changes, and the /metrics listener."""

from __future__ import annotations

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
import treq

from rtcauthd.config import load_config
from rtcauthd.config_values import metrics_endpoint
from rtcauthd.leave.machine import State
from rtcauthd.leave.record import JobParams
from rtcauthd.leave.manager import JobManager
from rtcauthd.metrics import Metrics, reason_label
from rtcauthd.store.memory import MemoryStore
from rtcauthd.tap import metrics_site
from tests.unit.test_app import AppTestCase, token_body


class TokenMetricsTests(AppTestCase):
    def value(self, name, **labels):
        return self.metrics.registry.get_sample_value(name, labels) or 0

    def test_tokens_counted_by_endpoint_and_access(self):
        self.request("POST", "/get_token", token_body())
        self.request(
            "POST",
            "/get_token",
            token_body(
                openid_token={"access_token": "remote-token", "matrix_server_name": "other.org"},
                member={"claimed_user_id": "@bob:other.org"},
            ),
        )
        self.assertEqual(self.value("rtcauthd_tokens_issued_total", endpoint="/get_token", access="full"), 1)
        self.assertEqual(self.value("rtcauthd_tokens_issued_total", endpoint="/get_token", access="restricted"), 1)
        self.assertEqual(self.value("rtcauthd_homeserver_lookup_seconds_count", result="ok"), 2)

    def test_openid_failures_by_reason(self):
        self.request("POST", "/get_token", token_body(openid_token={"access_token": "forged"}))
        self.assertEqual(self.value("rtcauthd_openid_failures_total", reason="status"), 1)
        self.assertEqual(self.value("rtcauthd_homeserver_lookup_seconds_count", result="error"), 1)
        self.assertEqual(self.value("rtcauthd_tokens_issued_total", endpoint="/get_token", access="full"), 0)


class HelperTests(SynchronousTestCase):
    def test_reason_labels_are_bounded(self):
        self.assertEqual(reason_label("status 401"), "status")
        self.assertEqual(reason_label("sub mismatch"), "sub")
        self.assertEqual(reason_label("<script>"), "other")
        self.assertEqual(reason_label(""), "unknown")

    def test_metrics_listen_values(self):
        self.assertEqual(metrics_endpoint("9100"), "tcp:9100:interface=127.0.0.1")
        self.assertEqual(metrics_endpoint("tcp6:9100:interface=\\:\\:1"), "tcp6:9100:interface=\\:\\:1")
        env = {
            "LIVEKIT_URL": "ws://x",
            "LIVEKIT_KEY": "k",
            "LIVEKIT_SECRET": "s",
            "LIVEKIT_FULL_ACCESS_HOMESERVERS": "x",
        }
        self.assertIsNone(load_config(env).metrics_listen)
        self.assertEqual(
            load_config(dict(env, RTCAUTH_METRICS_LISTEN="9100")).metrics_listen, "tcp:9100:interface=127.0.0.1"
        )


class JobsGaugeTests(SynchronousTestCase):
    def test_jobs_by_state_and_served_as_text(self):
        clock = Clock()
        metrics = Metrics()
        manager = JobManager(
            clock=clock,
            store=MemoryStore(),
            restart=lambda p: succeed(None),
            send=lambda p: succeed(None),
            lookup_participant=lambda p: Deferred(),
        )
        metrics.watch_jobs(lambda: (job.state.value for job in manager), (s.value for s in State))
        for i in range(3):
            manager.add(JobParams(f"d{i}", 10**10, "example.com", f"room{i}", "who"))
        self.assertEqual(
            metrics.registry.get_sample_value("rtcauthd_jobs", {"state": "WaitingForInitialConnect"}), 3
        )
        self.assertEqual(metrics.registry.get_sample_value("rtcauthd_jobs", {"state": "Connected"}), 0)

        site = metrics_site(metrics, MemoryReactorClock())
        agent = RequestTraversalAgent(site.resource)
        d = agent.request(b"GET", b"http://127.0.0.1/metrics")
        agent.flush()
        body = self.successResultOf(treq.content(self.successResultOf(d))).decode()
        self.assertIn('rtcauthd_jobs{state="WaitingForInitialConnect"} 3.0', body)
        manager.stop()
        self.assertEqual(clock.getDelayedCalls(), [])


class CallMetricsTests(SynchronousTestCase):
    """Twirp calls, delayed-event actions and webhooks each leave a count."""

    def test_twirp_and_delayed_events_and_webhooks(self):
        from twisted.web.resource import Resource

        from rtcauthd.outbound.client import HTTPClient
        from rtcauthd.leave.delegation import DelegatedLeave
        from rtcauthd.livekit.tokens import TokenMinter
        from rtcauthd.livekit.twirp import RoomServiceClient
        from rtcauthd.livekit.webhooks import WebhookVerifier
        from rtcauthd.matrix.csapi import ClientAPIResolver, DelayedEventClient
        from tests.unit.test_delegation import FakeManager, sign_webhook

        class Answer(Resource):
            isLeaf = True

            def render_POST(self, request):
                if b"GetParticipant" in request.path:
                    request.setResponseCode(404)
                    return b'{"code":"not_found","msg":"participant not found"}'
                if b"CreateRoom" in request.path:
                    request.setResponseCode(500)
                    return b"oops"
                request.setResponseCode(429)
                request.setHeader(b"Retry-After", b"3")
                return b"{}"

        clock = Clock()
        clock.advance(1785000000)
        metrics = Metrics()
        agent = RequestTraversalAgent(Answer())
        http = HTTPClient(clock=clock, agent=agent)
        rooms = RoomServiceClient(
            livekit_url="ws://127.0.0.1:7880",
            http=http,
            tokens=TokenMinter(api_key="k", api_secret="s", clock=clock),
            metrics=metrics,
        )
        d1 = rooms.create_room("R")
        d2 = rooms.get_participant("R", "I")
        events = DelayedEventClient(
            clock=clock,
            resolver=ClientAPIResolver(clock=clock, http=http, overrides={"hs": "http://127.0.0.1"}),
            metrics=metrics,
        )
        d3 = events.restart(JobParams("syd", 10**10, "hs", "R", "I"))
        agent.flush()
        self.failureResultOf(d1)
        self.successResultOf(d2)
        self.successResultOf(d3)
        delegation = DelegatedLeave(
            manager=FakeManager(),
            resolver=None,
            webhooks=WebhookVerifier(api_key="devkey", api_secret="devsecret", clock=clock),
            metrics=metrics,
        )
        body = b'{"event":"participant_joined","room":{"name":"R"},"participant":{"identity":"I"}}'
        delegation.handle(sign_webhook(body), body)
        delegation.handle("forged", body)
        value = metrics.registry.get_sample_value
        self.assertEqual(value("rtcauthd_twirp_calls_total", {"method": "CreateRoom", "outcome": "error"}), 1)
        self.assertEqual(value("rtcauthd_twirp_calls_total", {"method": "GetParticipant", "outcome": "absent"}), 1)
        self.assertEqual(value("rtcauthd_delayed_event_actions_total", {"action": "restart", "status": "429"}), 1)
        self.assertEqual(value("rtcauthd_webhook_events_total", {"event": "participant_joined", "signature": "valid"}), 1)
        self.assertEqual(value("rtcauthd_webhook_events_total", {"event": "unverified", "signature": "rejected"}), 1)


class PoolMetrics(SynchronousTestCase):
    def test_pools_are_read_at_scrape_time(self):
        from rtcauthd.outbound.pool import BoundedConnectionPool

        metrics = Metrics()
        pool = BoundedConnectionPool(Clock())
        metrics.watch_pools({"strangers": pool})
        pool.opened = 3
        sample = metrics.registry.get_sample_value
        self.assertEqual(sample("rtcauthd_outbound_connections_opened_total", {"pool": "strangers"}), 3)
        self.assertEqual(sample("rtcauthd_outbound_connections_idle", {"pool": "strangers"}), 0)
