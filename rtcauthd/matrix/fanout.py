"""Bounded outbound fan-out for OpenID verification, with the operator's users kept apart.

Every token request makes us connect to a server the caller names. :class:`VerificationGate`
sits in front of the federation client and makes that cost bounded:

- strangers (server names outside ``LIVEKIT_FULL_ACCESS_HOMESERVERS``) share one budget of
  concurrent verifications (``RTCAUTH_FEDERATION_MAX_INFLIGHT``) and each name has a
  smaller one (``RTCAUTH_FEDERATION_MAX_INFLIGHT_PER_SERVER``); over either, the request
  is answered at once with ``503 M_UNKNOWN`` and ``Retry-After`` rather than queued;
- full-access homeservers have a budget of their own, so no flood of made-up names can
  starve the operator's users;
- a stranger that could not be reached (no address, refused, TLS, timeout) is remembered
  with a doubling back-off (30 s up to 10 min, as Synapse backs off federation
  destinations), so a made-up name costs one lookup per window, not one per request.

Full-access names are never backed off: a blip on the operator's own homeserver must not
outlast itself.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

import attr
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from rtcauthd import errors
from rtcauthd.errors import MatrixError
from rtcauthd.metrics import Metrics
from rtcauthd.outbound.errors import FailureKind, OutboundError

log = Logger()

DEFAULT_MAX_INFLIGHT = 256
DEFAULT_MAX_PER_SERVER = 8
BACKOFF_MIN = 30.0
BACKOFF_MAX = 600.0
#: Server names remembered as unreachable, at most (the oldest are forgotten first).
MAX_REMEMBERED = 10000
#: What a client is told to wait when the gate is full.
BUSY_RETRY_MS = 1000
#: Failures that say the server could not be reached (as opposed to "it answered no").
UNREACHABLE = frozenset(
    {FailureKind.RESOLVE, FailureKind.REFUSED, FailureKind.CONNECT, FailureKind.TLS, FailureKind.TIMEOUT}
)


@attr.s(slots=True, auto_attribs=True)
class _Backoff:
    until: float
    interval: float
    error: OutboundError


class VerificationGate:
    """A UserInfoVerifier in front of another one (see the module docstring)."""

    def __init__(
        self,
        verifier,
        *,
        clock: IReactorTime,
        is_full_access: Callable[[str], bool],
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        max_per_server: int = DEFAULT_MAX_PER_SERVER,
        metrics: Optional[Metrics] = None,
    ) -> None:
        self._verifier = verifier
        self._clock = clock
        self._is_full_access = is_full_access
        self._max = max_inflight
        self._max_per_server = max_per_server
        self._metrics = metrics if metrics is not None else Metrics()
        self.strangers_inflight = 0
        self.full_access_inflight = 0
        self._per_server: dict[str, int] = {}
        self._backoff: "OrderedDict[str, _Backoff]" = OrderedDict()

    def userinfo(self, server_name: str, access_token: str) -> "Deferred[str]":
        if isinstance(server_name, str) and self._is_full_access(server_name):
            return self._full_access(server_name, access_token)
        return self._stranger(server_name, access_token)

    def _full_access(self, server_name: str, access_token: str) -> "Deferred[str]":
        if self.full_access_inflight >= self._max:
            return self._busy("full_access")
        self.full_access_inflight += 1

        def release(result):
            self.full_access_inflight -= 1
            return result

        return maybeDeferred(self._verifier.userinfo, server_name, access_token).addBoth(release)

    def _stranger(self, server_name: str, access_token: str) -> "Deferred[str]":
        key = server_name if isinstance(server_name, str) else repr(server_name)
        now = self._clock.seconds()
        remembered = self._backoff.get(key)
        if remembered is not None and remembered.until > now:
            self._metrics.verifications_refused.labels(reason="backoff").inc()
            error = remembered.error
            return fail(
                OutboundError(
                    error.kind,
                    error.step,
                    f"{error.detail} (remembered; tried again in {remembered.until - now:.0f} s)",
                    status=error.status,
                    reason=error.reason,
                )
            )
        if self.strangers_inflight >= self._max:
            return self._busy("busy")
        if self._per_server.get(key, 0) >= self._max_per_server:
            return self._busy("server_busy")
        self.strangers_inflight += 1
        self._per_server[key] = self._per_server.get(key, 0) + 1

        def release(result):
            self.strangers_inflight -= 1
            left = self._per_server[key] - 1
            if left:
                self._per_server[key] = left
            else:
                del self._per_server[key]
            return result

        def succeeded(user_id: str) -> str:
            self._backoff.pop(key, None)
            return user_id

        def failed(failure: Failure) -> Failure:
            error = failure.value
            if isinstance(error, OutboundError) and error.kind in UNREACHABLE:
                self._remember(key, error)
            elif isinstance(error, OutboundError):
                self._backoff.pop(key, None)  # it answered: reachable after all
            return failure

        d = maybeDeferred(self._verifier.userinfo, server_name, access_token)
        return d.addBoth(release).addCallbacks(succeeded, failed)

    def _remember(self, key: str, error: OutboundError) -> None:
        previous = self._backoff.pop(key, None)
        interval = min(BACKOFF_MAX, previous.interval * 2) if previous is not None else BACKOFF_MIN
        self._backoff[key] = _Backoff(self._clock.seconds() + interval, interval, error)
        while len(self._backoff) > MAX_REMEMBERED:
            self._backoff.popitem(last=False)

    def _busy(self, reason: str) -> "Deferred[str]":
        self._metrics.verifications_refused.labels(reason=reason).inc()
        return fail(MatrixError(503, errors.M_UNKNOWN, errors.E_BUSY, retry_after_ms=BUSY_RETRY_MS))
