"""What the HTTP side sees of delegated leave: register a job, feed it webhooks.

The authorizer asks this object to resolve the client-server API (P5/G5) and to register
the job (P7/G6); the /sfu_webhook route hands it the raw Authorization header and body.
Turning job-manager exceptions into the client-visible Matrix errors happens here, so
neither the manager nor the HTTP app needs to know about the other.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from rtcauthd import errors
from rtcauthd.errors import MatrixError
from rtcauthd.gojson import INT64_MAX
from rtcauthd.leave.record import NS_PER_MS, NS_PER_SECOND, JobParams
from rtcauthd.leave.manager import JobManager, ShuttingDown
from rtcauthd.livekit.webhooks import WebhookEvent, WebhookRejected, WebhookVerifier, signal_for
from rtcauthd.matrix.csapi import ClientAPIResolver
from rtcauthd.metrics import Metrics

log = Logger()


class DelegatedLeave:
    """Implements the authorizer's ``LeaveJobSink`` and the app's ``WebhookSink``."""

    def __init__(
        self,
        *,
        manager: JobManager,
        resolver: ClientAPIResolver,
        webhooks: WebhookVerifier,
        metrics: Optional[Metrics] = None,
        max_delay_seconds: Optional[float] = None,
        observers: Sequence[Callable[[WebhookEvent], object]] = (),
    ) -> None:
        self._max_delay_ns = None if max_delay_seconds is None else int(max_delay_seconds * NS_PER_SECOND)
        self._metrics = metrics if metrics is not None else Metrics()
        self._manager = manager
        self._resolver = resolver
        self._webhooks = webhooks
        #: also told of every verified webhook (membership enforcement: docs/membership.md#webhooks)
        self.observers = list(observers)

    def resolve_cs_api(self, server_name: str) -> "Deferred[str]":
        return self._resolver.resolve(server_name)

    def add_job(self, job: JobParams) -> "Deferred[None]":
        """Register (replacing any job for the same key); fires once the job is stored."""
        if job.delay_timeout_ns > INT64_MAX:
            # Upstream's int64 nanoseconds would overflow; it answers with the job error text.
            return fail(
                errors.bad_json(
                    "invalid delay timeout for delayed event job: "
                    f"{job.delay_timeout_ns // NS_PER_MS}ms overflows a 64-bit duration"
                )
            )
        if self._max_delay_ns is not None and job.delay_timeout_ns > self._max_delay_ns:
            # rtcauthd only (RTCAUTH_MAX_DELAY_SECONDS): a days-long job is a resource held for days.
            return fail(
                errors.bad_json(
                    "invalid delay timeout for delayed event job: "
                    f"{job.delay_timeout_ns // NS_PER_MS}ms is longer than the "
                    f"{self._max_delay_ns // NS_PER_SECOND}s this service accepts"
                )
            )
        try:
            return self._manager.add(job)
        except ShuttingDown:
            return fail(MatrixError(503, errors.M_UNKNOWN, errors.E_SHUTDOWN))
        except ValueError as e:
            return fail(errors.bad_json(f"invalid delay timeout for delayed event job: {e}"))

    def handle(self, authorization: Optional[str], body: bytes) -> None:
        """Verify a LiveKit webhook and route its signal; every failure is only logged."""
        try:
            event = self._webhooks.verify(authorization, body)
        except WebhookRejected as e:
            log.warn("Rejected LiveKit webhook: {reason}", reason=e.reason)
            self._metrics.webhook_events.labels(event="unverified", signature="rejected").inc()
            return
        self._metrics.webhook_events.labels(event=_event_label(event.event), signature="valid").inc()
        for observer in self.observers:
            try:
                observer(event)
            except Exception:
                log.failure("A webhook observer failed on {event}", event=event.event)
        signal = signal_for(event)
        if signal is None:
            log.debug("Ignoring LiveKit webhook {event}", event=event.event)
            return
        routed = self._manager.route(event.room_name, event.participant_identity, signal)
        log.info(
            "LiveKit webhook {event} for {room}/{identity} -> {signal}{dropped}",
            event=event.event,
            room=event.room_name,
            identity=event.participant_identity,
            signal=signal,
            dropped="" if routed else " (no job here; handed to its owner if another instance runs it)",
        )


_KNOWN_EVENTS = frozenset(
    {
        "participant_joined",
        "participant_left",
        "participant_connection_aborted",
        "room_started",
        "room_finished",
        "track_published",
        "track_unpublished",
        "egress_started",
        "egress_updated",
        "egress_ended",
        "ingress_started",
        "ingress_ended",
    }
)


def _event_label(event: str) -> str:
    """Signed events only, and still a bounded label set."""
    return event if event in _KNOWN_EVENTS else "other"
