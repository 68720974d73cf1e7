"""The client-server API of a homeserver: discovery (docs/delegated-leave.md#client-server-api) and MSC4140 calls (docs/delegated-leave.md#restart-and-send-calls).

Delegated leave needs the user's homeserver *client* API to restart and send the delayed
leave. Its base URL comes from ``LIVEKIT_CS_API_URL_OVERRIDES`` or from
``https://<server_name>/.well-known/matrix/client`` (cached exactly 4 h, as upstream; failures
are not cached). The delay ID is percent-encoded as one path segment so that no ID can
reach another URL than the one intended.

Jobs with an owner act as that user with the application-service token, and only they
(and the delay look-up) use the stable MSC4140 paths when ``/versions`` advertises them
(docs/delegated-leave.md#acting-as-the-user); everything else is the unauthenticated
unstable call upstream makes.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Optional
from urllib.parse import quote, urlencode

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from rtcauthd.gojson import reject_constant
from rtcauthd.outbound.client import HTTPClient, OutboundError
from rtcauthd.outbound.errors import FailureKind
from rtcauthd.metrics import Metrics
from rtcauthd.matrix.delayed_events import (
    CsApiUnresolvable,
    DelayedEventUnknown,
    Outcome,
    classify_delayed_event_response,
    delay_from_lookup,
)

__all__ = [
    "ClientAPIResolver",
    "DelayedEventClient",
    "DelayedEventUnknown",
    "StableDelayedEvents",
    "advertises_stable_delayed_events",
    "delayed_event_url",
]

log = Logger()

WELL_KNOWN_CACHE_SECONDS = 4 * 3600
#: mautrix-go refuses a body of 64 KiB or more.
WELL_KNOWN_MAX_BODY = 64 * 1024 - 1
DELAYED_EVENT_TIMEOUT = 5.0
DELAYED_EVENT_MAX_BODY = 64 * 1024
DELAYED_EVENTS_PATH = "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/"
STABLE_DELAYED_EVENTS_PATH = "/_matrix/client/v1/delayed_events/"
#: the ``unstable_features`` flag a server sets while serving the stable paths before a spec release
STABLE_FLAG = "org.matrix.msc4140.stable"
VERSIONS_CACHE_SECONDS = 3600
#: how long an unusable ``/versions`` answer means "unstable" before it is asked again
VERSIONS_FAILURE_SECONDS = 60
VERSIONS_MAX_BODY = 64 * 1024


def delayed_event_url(
    base_url: str, delay_id: str, action: str = "", *, stable: bool = False, user_id: Optional[str] = None
) -> str:
    """``<base>/_matrix/client/unstable/org.matrix.msc4140/delayed_events/<id>/<action>``.

    A trailing ``/`` of the base is dropped (upstream collapses it), a path prefix is kept.
    The ID is one path segment: everything but unreserved characters is escaped, and the
    dot-segments ``.`` and ``..`` are escaped too, so path normalisation cannot move it.
    ``stable`` picks ``/_matrix/client/v1/delayed_events/``; no ``action`` is the event
    itself (the look-up); ``user_id`` is the form-encoded identity assertion.
    """
    segment = quote(delay_id, safe="")
    if segment in (".", ".."):
        segment = segment.replace(".", "%2E")
    path = STABLE_DELAYED_EVENTS_PATH if stable else DELAYED_EVENTS_PATH
    url = base_url.rstrip("/") + path + segment + ("/" + action if action else "")
    if user_id is not None:
        url += "?" + urlencode({"user_id": user_id})
    return url


def advertises_stable_delayed_events(body: bytes) -> bool:
    """Whether a ``/versions`` body sets ``unstable_features["org.matrix.msc4140.stable"]`` to true.

    No spec version includes MSC4140 yet, so ``versions`` is not consulted. Raises
    ValueError for a body that is not a JSON object.
    """
    try:
        document = json.loads(body.decode("utf-8"), parse_constant=reject_constant)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("/versions body is not JSON") from None
    if not isinstance(document, dict):
        raise ValueError("/versions body is not a JSON object")
    features = document.get("unstable_features")
    return isinstance(features, dict) and features.get(STABLE_FLAG) is True


class StableDelayedEvents:
    """Which MSC4140 path form a client-server API serves, from its ``/versions`` (docs/delegated-leave.md#path-form).

    Answers are cached per base URL for an hour (as upstream caches ``/versions``); an
    unusable answer means "unstable" for a minute, so a down homeserver is not asked once
    per attempt. Concurrent questions about one base URL share one request.
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        timeout: float = DELAYED_EVENT_TIMEOUT,
        cache_seconds: float = VERSIONS_CACHE_SECONDS,
        failure_seconds: float = VERSIONS_FAILURE_SECONDS,
    ) -> None:
        self._clock = clock
        self._timeout = timeout
        self._cache_seconds = cache_seconds
        self._failure_seconds = failure_seconds
        self._cache: dict[str, tuple[bool, float]] = {}
        self._waiting: dict[str, list[Deferred]] = {}

    def stable(self, http: HTTPClient, base_url: str) -> "Deferred[bool]":
        """True when ``base_url`` advertises the stable paths; never fails."""
        key = base_url.rstrip("/")
        cached = self._cache.get(key)
        if cached is not None and self._clock.seconds() < cached[1]:
            return succeed(cached[0])
        waiting = self._waiting.get(key)
        if waiting is not None:
            d: Deferred = Deferred()
            waiting.append(d)
            return d
        waiting = self._waiting[key] = []

        def fan_out(result: Any) -> Any:
            del self._waiting[key]
            for d in waiting:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(result)
            return result

        return Deferred.fromCoroutine(self._fetch(http, key)).addBoth(fan_out)

    async def _fetch(self, http: HTTPClient, key: str) -> bool:
        try:
            response = await http.request(
                b"GET",
                key + "/_matrix/client/versions",
                headers={"Accept": "application/json"},
                timeout=self._timeout,
                max_body=VERSIONS_MAX_BODY,
                step="client versions",
            )
            if not 200 <= response.code < 300:
                raise ValueError(f"/versions answered HTTP {response.code}")
            stable = advertises_stable_delayed_events(response.body)
        except (OutboundError, ValueError) as e:
            log.info(
                "Cannot tell the MSC4140 path form of {base_url} ({error}); using the unstable "
                "paths for {seconds} s",
                base_url=key,
                error=str(e),
                seconds=self._failure_seconds,
            )
            self._cache[key] = (False, self._clock.seconds() + self._failure_seconds)
            return False
        self._cache[key] = (stable, self._clock.seconds() + self._cache_seconds)
        log.debug("{base_url} serves the {form} MSC4140 paths", base_url=key, form="stable" if stable else "unstable")
        return stable


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
    """One ``restart`` or ``send`` attempt each; the job owns retries (docs/delegated-leave.md#retry-policy).

    With ``as_token`` set, a job with an owner acts as that user (docs/delegated-leave.md#acting-as-the-user)
    and :meth:`lookup_delay` is available; the token is sent only in the Authorization
    header, never logged.
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        resolver: ClientAPIResolver,
        timeout: float = DELAYED_EVENT_TIMEOUT,
        metrics: Optional[Metrics] = None,
        as_token: str = "",
        path_form: Optional[StableDelayedEvents] = None,
    ) -> None:
        """Calls go out through ``resolver.client_for(server_name)`` (SSRF-filtered where
        the operator did not name the server)."""
        self._metrics = metrics if metrics is not None else Metrics()
        self._clock = clock
        self._resolver = resolver
        self._timeout = timeout
        self._as_token = as_token
        self._path_form = path_form if path_form is not None else StableDelayedEvents(clock=clock, timeout=timeout)

    def __repr__(self) -> str:
        return f"<DelayedEventClient as_token={'set' if self._as_token else 'unset'}>"

    def restart(self, params) -> "Deferred[Outcome]":
        return Deferred.fromCoroutine(self._act(params, "restart"))

    def send(self, params) -> "Deferred[Outcome]":
        return Deferred.fromCoroutine(self._act(params, "send"))

    def lookup_delay(
        self, server_name: str, user_id: str, delay_id: str, *, room_id: Optional[str] = None
    ) -> "Deferred[int]":
        """The delay in ms of ``user_id``'s pending delayed event ``delay_id`` (docs/delegated-leave.md#the-delay-look-up).

        One attempt, 5 s. Fails with :class:`DelayedEventUnknown` when the homeserver has
        no such event for that user (or, with ``room_id``, that room) or it has no
        positive delay, and with another :class:`OutboundError` for anything else.
        """
        return Deferred.fromCoroutine(self._lookup(server_name, user_id, delay_id, room_id))

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": "Bearer " + self._as_token}

    async def _lookup(self, server_name: str, user_id: str, delay_id: str, room_id: Optional[str]) -> int:
        step = "delayed event lookup"
        actions = self._metrics.delayed_event_actions
        if not self._as_token:
            raise OutboundError(FailureKind.INVALID, step, "no application-service token configured")
        try:
            base_url = await self._resolver.resolve(server_name)
        except CsApiUnresolvable as e:
            actions.labels(action="lookup", status="unresolvable").inc()
            raise OutboundError(FailureKind.RESOLVE, step, str(e)) from None
        http = self._resolver.client_for(server_name)
        stable = await self._path_form.stable(http, base_url)
        try:
            response = await http.request(
                b"GET",
                delayed_event_url(base_url, delay_id, stable=stable, user_id=user_id),
                headers={"Accept": "application/json", **self._auth_headers()},
                timeout=self._timeout,
                max_body=DELAYED_EVENT_MAX_BODY,
                step=step,
            )
        except OutboundError:
            actions.labels(action="lookup", status="error").inc()
            raise
        actions.labels(action="lookup", status=str(response.code)).inc()
        return delay_from_lookup(response.code, response.body, room_id)

    async def _act(self, params, action: str) -> Outcome:
        actions = self._metrics.delayed_event_actions
        try:
            base_url = await self._resolver.resolve(params.server_name)
        except CsApiUnresolvable:
            actions.labels(action=action, status="unresolvable").inc()
            raise
        http = self._resolver.client_for(params.server_name)
        headers = {"Content-Type": "application/json"}
        owner = params.owner_user_id
        if owner and self._as_token:
            stable = await self._path_form.stable(http, base_url)
            url = delayed_event_url(base_url, params.delay_id, action, stable=stable, user_id=owner)
            headers.update(self._auth_headers())
        else:
            url = delayed_event_url(base_url, params.delay_id, action)
        try:
            response = await http.request(
                b"POST",
                url,
                headers=headers,
                body=b"{}",
                timeout=self._timeout,
                max_body=DELAYED_EVENT_MAX_BODY,
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
