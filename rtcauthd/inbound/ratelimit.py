"""Per-client rate limits on the token endpoints: a token bucket per address, on the injected clock.

A client may make ``burst`` requests at once and ``rate`` per second after that; the
request over the limit is answered ``429 M_LIMIT_EXCEEDED`` with ``retry_after_ms`` and a
``Retry-After`` header (CORS headers come from the route, as on every answer). The bucket
table is bounded: past ``max_clients`` the least recently seen client is forgotten, which
at worst hands an idle attacker a fresh burst — memory stays bounded under a flood from
many addresses. Synapse's ``Ratelimiter`` is not importable on its own, and txratelimit-style
packages are unmaintained; the bucket is a dozen lines.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterable, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from zope.interface import implementer

from rtcauthd.inbound.client_address import ClientAddresses
from rtcauthd import errors
from rtcauthd.errors import MatrixError
from rtcauthd.inbound.policy import IRequestPolicy, Verdict
from rtcauthd.metrics import Metrics

log = Logger()

#: The routes a stranger can make us do work for (an outbound verification each).
LIMITED_ENDPOINTS = frozenset({"get_token", "sfu_get", "delegate_delayed_leave"})
#: Buckets kept; each is a few hundred bytes, so the table stays in the tens of MiB.
DEFAULT_MAX_CLIENTS = 65536


class TokenBuckets:
    """One token bucket per key; ``take(key)`` answers 0 (allowed) or the seconds to wait."""

    def __init__(self, clock: IReactorTime, *, rate: float, burst: int, max_clients: int = DEFAULT_MAX_CLIENTS) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self._clock = clock
        self._rate = rate
        self._burst = float(burst)
        self._max = max_clients
        self._buckets: "OrderedDict[str, tuple[float, float]]" = OrderedDict()  # key -> (tokens, at)

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float:
        now = self._clock.seconds()
        tokens, at = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + max(0.0, now - at) * self._rate)
        if tokens >= 1.0:
            wait, tokens = 0.0, tokens - 1.0
        else:
            wait = (1.0 - tokens) / self._rate
        self._buckets[key] = (tokens, now)  # most recently seen last
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return wait


def limit_exceeded(wait_seconds: float) -> MatrixError:
    """The 429 a limited client gets (``retry_after_ms`` and ``Retry-After`` come with it)."""
    return MatrixError(429, errors.M_LIMIT_EXCEEDED, errors.E_LIMIT, retry_after_ms=max(1, math.ceil(wait_seconds * 1000)))


@implementer(IRequestPolicy)
class RateLimitPolicy:
    """Limits ``endpoints`` per client address; every other route goes through untouched."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        rate: float,
        burst: int,
        clients: ClientAddresses,
        metrics: Optional[Metrics] = None,
        endpoints: Iterable[str] = LIMITED_ENDPOINTS,
        max_clients: int = DEFAULT_MAX_CLIENTS,
    ) -> None:
        self._buckets = TokenBuckets(clock, rate=rate, burst=burst, max_clients=max_clients)
        self._clients = clients
        self._metrics = metrics if metrics is not None else Metrics()
        self._endpoints = frozenset(endpoints)

    def check(self, request: IRequest, endpoint: str) -> Verdict:
        client = self._clients.client_of(request)
        if endpoint not in self._endpoints:
            return None
        wait = self._buckets.take(client)
        if wait <= 0:
            return None
        self._metrics.rate_limited.labels(endpoint=endpoint).inc()
        log.debug("Rate limit: {client} on {endpoint}, retry in {wait:.3f} s", client=client, endpoint=endpoint, wait=wait)
        return limit_exceeded(wait)
