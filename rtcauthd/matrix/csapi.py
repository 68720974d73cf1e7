"""The client-server API of a homeserver: discovery (docs/delegated-leave.md#client-server-api) and MSC4140 calls (docs/delegated-leave.md#restart-and-send-calls).

Delegated leave needs the user's homeserver *client* API to restart and send the delayed
leave. Its base URL comes from ``LIVEKIT_CS_API_URL_OVERRIDES`` or from
``https://<server_name>/.well-known/matrix/client`` (cached exactly 4 h, as upstream; failures
are not cached). The delay ID is percent-encoded as one path segment so that no ID can
reach another URL than the one intended.
"""

from __future__ import annotations

import json
from typing import Callable, Mapping, Optional
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from rtcauthd.gojson import reject_constant
from rtcauthd.outbound.client import HTTPClient, OutboundError
from rtcauthd.metrics import Metrics
from rtcauthd.matrix.delayed_events import CsApiUnresolvable, Outcome, classify_delayed_event_response

log = Logger()

WELL_KNOWN_CACHE_SECONDS = 4 * 3600
#: mautrix-go refuses a body of 64 KiB or more.
WELL_KNOWN_MAX_BODY = 64 * 1024 - 1
DELAYED_EVENT_TIMEOUT = 5.0
DELAYED_EVENTS_PATH = "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/"


def delayed_event_url(base_url: str, delay_id: str, action: str) -> str:
    """``<base>/_matrix/client/unstable/org.matrix.msc4140/delayed_events/<id>/<action>``.

    A trailing ``/`` of the base is dropped (upstream collapses it), a path prefix is kept.
    The ID is one path segment: everything but unreserved characters is escaped, and the
    dot-segments ``.`` and ``..`` are escaped too, so path normalisation cannot move it.
    """
    segment = quote(delay_id, safe="")
    if segment in (".", ".."):
        segment = segment.replace(".", "%2E")
    return base_url.rstrip("/") + DELAYED_EVENTS_PATH + segment + "/" + action


def _well_known_base_url(body: bytes) -> str:
    """``m.homeserver.base_url`` from a client well-known document, checked like mautrix."""
    try:
        document = json.loads(body.decode("utf-8"), parse_constant=reject_constant)
    except (ValueError, UnicodeDecodeError):
        raise CsApiUnresolvable("well-known body is not JSON") from None
    if not isinstance(document, dict):
        raise CsApiUnresolvable("well-known body is not a JSON object")
    for key in ("m.homeserver", "m.identity_server"):
        if key in document and document[key] is not None:
            entry = document[key]
            url = entry.get("base_url") if isinstance(entry, dict) else None
            if not isinstance(entry, dict) or (url is not None and not isinstance(url, str)):  # null: Go keeps ""
                raise CsApiUnresolvable(f"well-known {key} is malformed")
    homeserver = document.get("m.homeserver") or {}
    base_url = homeserver.get("base_url") or ""
    if not base_url:
        raise CsApiUnresolvable("well-known has no m.homeserver.base_url")
    return base_url



class ClientAPIResolver:
    """Finds a homeserver's client-server API base URL: override, cache, then well-known."""

    def __init__(
        self,
        *,
        clock: IReactorTime,
        http: HTTPClient,
        overrides: Mapping[str, str],
        cache_seconds: float = WELL_KNOWN_CACHE_SECONDS,
        guarded_http: Optional[HTTPClient] = None,
        is_trusted: Callable[[str], bool] = lambda server_name: True,
    ) -> None:
        """``http`` serves servers the operator named (``is_trusted``) and overrides;
        ``guarded_http`` (SSRF-filtered) serves the rest, e.g. servers admitted by ``*``."""
        self._clock = clock
        self._http = http
        self._guarded_http = guarded_http if guarded_http is not None else http
        self._is_trusted = is_trusted
        self._overrides = dict(overrides)
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[str, float]] = {}

    def client_for(self, server_name: str) -> HTTPClient:
        """The HTTP client for calls to ``server_name``'s client-server API."""
        if server_name in self._overrides or self._is_trusted(server_name):
            return self._http
        return self._guarded_http

    async def _resolve(self, server_name: str) -> str:
        override = self._overrides.get(server_name)
        if override is not None:
            return override
        cached = self._cache.get(server_name)
        if cached is not None:
            url, expires = cached
            if self._clock.seconds() < expires:
                return url
            del self._cache[server_name]
        if "/" in server_name or "?" in server_name or "#" in server_name or "@" in server_name:
            raise CsApiUnresolvable(f"{server_name!r} is not a server name")
        try:
            response = await self.client_for(server_name).request(
                b"GET",
                f"https://{server_name}/.well-known/matrix/client",
                headers={"Accept": "application/json"},
                max_body=WELL_KNOWN_MAX_BODY,
                step="client well-known",
            )
        except OutboundError as e:
            raise CsApiUnresolvable(str(e)) from None
        if response.code == 404:
            raise CsApiUnresolvable("no .well-known/matrix/client (404)")
        base_url = _well_known_base_url(response.body)  # any other status: parsed anyway
        self._cache[server_name] = (base_url, self._clock.seconds() + self._cache_seconds)
        log.info(
            "Client-server API of {server_name} is {base_url} (cached {hours} h)",
            server_name=server_name,
            base_url=base_url,
            hours=self._cache_seconds / 3600,
        )
        return base_url

    def resolve(self, server_name: str) -> "Deferred[str]":
        """The base URL, or a failure with CsApiUnresolvable (never cached)."""
        return Deferred.fromCoroutine(self._resolve(server_name))


class DelayedEventClient:
    """One ``restart`` or ``send`` attempt each; the job owns retries (docs/delegated-leave.md#retry-policy)."""

    def __init__(
        self,
        *,
        clock: IReactorTime,
        resolver: ClientAPIResolver,
        timeout: float = DELAYED_EVENT_TIMEOUT,
        metrics: Optional[Metrics] = None,
    ) -> None:
        """Calls go out through ``resolver.client_for(server_name)`` (SSRF-filtered where
        the operator did not name the server)."""
        self._metrics = metrics if metrics is not None else Metrics()
        self._clock = clock
        self._resolver = resolver
        self._timeout = timeout

    def restart(self, params) -> "Deferred[Outcome]":
        return Deferred.fromCoroutine(self._act(params, "restart"))

    def send(self, params) -> "Deferred[Outcome]":
        return Deferred.fromCoroutine(self._act(params, "send"))

    async def _act(self, params, action: str) -> Outcome:
        actions = self._metrics.delayed_event_actions
        try:
            base_url = await self._resolver.resolve(params.server_name)
        except CsApiUnresolvable:
            actions.labels(action=action, status="unresolvable").inc()
            raise
        url = delayed_event_url(base_url, params.delay_id, action)
        try:
            response = await self._resolver.client_for(params.server_name).request(
                b"POST",
                url,
                headers={"Content-Type": "application/json"},
                body=b"{}",
                timeout=self._timeout,
                step=f"delayed event {action}",
            )
        except OutboundError as e:
            log.warn(
                "Delayed event {action} for {room}/{identity} failed: {error}",
                action=action,
                room=params.room,
                identity=params.identity,
                error=str(e),
            )
            actions.labels(action=action, status="error").inc()
            return Outcome.retry(detail=str(e))
        actions.labels(action=action, status=str(response.code)).inc()
        outcome = classify_delayed_event_response(
            response.code, response.headers, response.body, self._clock.seconds()
        )
        log.debug(
            "Delayed event {action} for {room}/{identity}: HTTP {status} -> {outcome}",
            action=action,
            room=params.room,
            identity=params.identity,
            status=response.code,
            outcome=outcome.kind.name,
        )
        return outcome
