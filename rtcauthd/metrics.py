"""Prometheus metrics (``rtcauthd_*``), served on a separate listener that is off by default.

One :class:`Metrics` object owns a private registry and is handed to the components that
count things; tests give each component a fresh one and read values back from its
registry. Nothing here is global, so two daemons in one process (tests) never mix counts.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.web.resource import Resource

#: seconds; a federation lookup is one TLS connect plus one small request.
LOOKUP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Every metric rtcauthd exports; see README "Metrics" for what each one means."""

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.tokens_issued = Counter(
            "rtcauthd_tokens_issued", "LiveKit tokens issued", ["endpoint", "access"], registry=r
        )
        self.openid_failures = Counter(
            "rtcauthd_openid_failures", "OpenID verifications that failed, by failing step", ["reason"], registry=r
        )
        self.homeserver_lookup_seconds = Histogram(
            "rtcauthd_homeserver_lookup_seconds",
            "Time to verify an OpenID token with the user's homeserver (resolution included)",
            ["result"],
            buckets=LOOKUP_BUCKETS,
            registry=r,
        )
        self.twirp_calls = Counter(
            "rtcauthd_twirp_calls", "LiveKit RoomService calls", ["method", "outcome"], registry=r
        )
        self.delayed_event_actions = Counter(
            "rtcauthd_delayed_event_actions",
            "MSC4140 delayed-event calls to homeservers, by action and HTTP status",
            ["action", "status"],
            registry=r,
        )
        self.webhook_events = Counter(
            "rtcauthd_webhook_events", "LiveKit webhooks received", ["event", "signature"], registry=r
        )
        self.rate_limited = Counter(
            "rtcauthd_rate_limited", "Requests answered 429 by the per-client rate limit", ["endpoint"], registry=r
        )
        self.inbound_dropped = Counter(
            "rtcauthd_inbound_dropped",
            "Inbound connections dropped: too slow to send a request, or over the connection cap",
            ["reason"],
            registry=r,
        )
        self.inbound_queued = Gauge(
            "rtcauthd_inbound_queued",
            "Requests read and waiting their turn to be handled (the admission queue; /healthz never waits)",
            registry=r,
        )
        self.verifications_refused = Counter(
            "rtcauthd_verifications_refused",
            "OpenID verifications not attempted: the outbound budget was full (busy, server_busy, "
            "full_access) or the server is in back-off after being unreachable (backoff)",
            ["reason"],
            registry=r,
        )
        self.redis_errors = Counter(
            "rtcauthd_redis_errors", "Redis operations that failed", ["operation"], registry=r
        )
        self.membership_checks = Counter(
            "rtcauthd_membership_checks",
            "Membership checks against the homeserver (sweep: joined_members; join: is_joined), by outcome",
            ["kind", "outcome"],
            registry=r,
        )
        self.membership_removals = Counter(
            "rtcauthd_membership_removals",
            "Participants removed (remove_participant) and LiveKit rooms closed (delete_room) for membership",
            ["action", "outcome"],
            registry=r,
        )

    def watch_jobs(self, states: Callable[[], Iterable[str]], all_states: Iterable[str]) -> None:
        """Export ``rtcauthd_jobs{state}``, counted from ``states()`` at scrape time."""
        self.registry.register(_JobsCollector(states, tuple(all_states)))


    def watch_pools(self, pools: dict) -> None:
        """Export the outbound connection pools (name -> BoundedConnectionPool) at scrape
        time: connections opened so far and idle now. In steady state ``opened`` stays put."""
        self.registry.register(_PoolsCollector(dict(pools)))


class _PoolsCollector:
    def __init__(self, pools: dict) -> None:
        self._pools = pools

    def collect(self):
        opened = CounterMetricFamily(
            "rtcauthd_outbound_connections_opened", "Outbound connections opened, by pool", labels=["pool"]
        )
        idle = GaugeMetricFamily("rtcauthd_outbound_connections_idle", "Idle pooled connections", labels=["pool"])
        for name, pool in self._pools.items():
            opened.add_metric([name], pool.opened)
            idle.add_metric([name], pool.idle_count)
        yield opened
        yield idle


class _JobsCollector:
    def __init__(self, states: Callable[[], Iterable[str]], all_states: tuple[str, ...]) -> None:
        self._states = states
        self._all_states = all_states

    def collect(self):
        counts = dict.fromkeys(self._all_states, 0)
        for state in self._states():
            counts[state] = counts.get(state, 0) + 1
        family = GaugeMetricFamily("rtcauthd_jobs", "Delegated-leave jobs by state", labels=["state"])
        for state, count in counts.items():
            family.add_metric([state], count)
        yield family


def reason_label(step: str) -> str:
    """A bounded label value from a failure step ("status 401" → "status")."""
    word = step.split(" ", 1)[0].strip().lower() or "unknown"
    return word if word.replace("_", "").isalnum() else "other"


class MetricsPage(Resource):
    """``GET /metrics`` in the Prometheus text format, rendered in the reactor thread.

    prometheus_client's own Twisted resource renders through a WSGI thread pool; a scrape
    is a few milliseconds of string building, so a thread buys nothing here.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._registry)
