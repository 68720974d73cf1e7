"""Federation server-name resolution: which address, which Host, which certificate.

Implements the Matrix "Resolving server names" algorithm (docs/federation.md#resolution) in two
halves, because the ``Host`` header must be known before a request is issued while
the addresses are only needed when a new connection is opened (pooled connections
skip them):

- :meth:`ServerResolver.delegate`: IP literal / explicit port / ``.well-known``
  (cached) -> the name to connect to, the ``Host`` value and the TLS name.
- :meth:`ServerResolver.targets`: that name -> ``[(host, port)]`` via SRV
  (``_matrix-fed._tcp`` then ``_matrix._tcp``) or port 8448. Only one level of
  delegation: a delegated name never gets another well-known lookup.

The well-known fetch goes through the injected :class:`HTTPClient`, whose agent is
expected to apply the same SSRF filter as federation connections (see
federation_agent.build_federation_agent). Upstream caches nothing; we cache
well-known answers as the spec asks, with Synapse's periods (docs/differences.md).
"""

from __future__ import annotations

import datetime
import email.utils
import json
import random
from collections import OrderedDict
from typing import Callable, Optional, Union

import attr
from twisted.internet.defer import CancelledError, Deferred, fail, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import AuthoritativeDomainError, DNSNameError, DomainError
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from rtcauthd.gojson import reject_constant
from rtcauthd.outbound.errors import FailureKind
from rtcauthd.outbound.client import HTTPClient, HTTPResponse, OutboundError
from rtcauthd.matrix.servername import InvalidServerName, ServerName, parse_server_name

log = Logger()

DEFAULT_FEDERATION_PORT = 8448
#: Looked up in this order; the second only if the first does not exist.
SRV_SERVICES = ("_matrix-fed._tcp", "_matrix._tcp")
#: Per-try timeouts handed to the DNS resolver (twisted.names retries with each).
SRV_LOOKUP_TIMEOUTS = (1, 3, 5)

WELL_KNOWN_PATH = "/.well-known/matrix/server"
WELL_KNOWN_MAX_BODY = 50 * 1024
WELL_KNOWN_TIMEOUT = 10.0
#: Cache period for a valid answer without caching headers, +- the jitter fraction.
WELL_KNOWN_DEFAULT_CACHE_PERIOD = 24 * 3600.0
WELL_KNOWN_CACHE_JITTER = 0.1
#: Bounds applied to periods taken from Cache-Control / Expires.
WELL_KNOWN_MIN_CACHE_PERIOD = 5 * 60.0
WELL_KNOWN_MAX_CACHE_PERIOD = 48 * 3600.0
#: A reachable server answering something that is not a usable well-known.
WELL_KNOWN_INVALID_CACHE_PERIOD = 3600.0
#: The host is down (transport error, timeout, 5xx): doubled per consecutive failure.
WELL_KNOWN_DOWN_CACHE_PERIOD = 2 * 60.0
WELL_KNOWN_DOWN_CACHE_PERIOD_MAX = 3600.0
#: Server names are chosen by anonymous clients, so the cache is bounded.
WELL_KNOWN_CACHE_SIZE = 10_000

Target = tuple[str, int]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ServerDelegation:
    """Outcome of the well-known step: what to resolve next and how to address it."""

    server_name: ServerName
    host_header: str
    tls_name: str


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Resolution:
    """Everything needed to talk to a homeserver (one row of docs/federation.md#resolution)."""

    targets: tuple[Target, ...]
    host_header: str
    tls_name: str


@attr.s(slots=True, auto_attribs=True)
class _WellKnownEntry:
    expires_at: float
    delegate: Optional[ServerName]
    error: Optional[str]  # set when the lookup must fail (invalid m.server)
    down_failures: int = 0


class _Invalid(Exception):
    """The well-known answer is unusable: fall back to SRV, cache for the invalid period."""


def _delegation_for(name: ServerName) -> ServerDelegation:
    return ServerDelegation(server_name=name, host_header=name.original, tls_name=name.host)


class ServerResolver:
    """Resolves server names per the Matrix spec, caching well-known answers."""

    def __init__(
        self,
        *,
        clock: IReactorTime,
        http: HTTPClient,
        srv_resolver,
        well_known_timeout: float = WELL_KNOWN_TIMEOUT,
        guarded_http: Optional[HTTPClient] = None,
        is_trusted: Callable[[str], bool] = lambda server_name: False,
        _random: Optional[random.Random] = None,
    ) -> None:
        """``srv_resolver`` is a twisted.names IResolver (only ``lookupService`` is used).

        The well-known of a server name the operator trusts is fetched with ``http``; any
        other with ``guarded_http``, which filters every address *and every redirect hop*
        — trust is decided once, from the name being resolved, never from where a
        redirect points (a redirect to a trusted private host must not open the filter).
        """
        self._clock = clock
        self._http = http
        self._guarded_http = guarded_http if guarded_http is not None else http
        self._is_trusted = is_trusted
        self._srv = srv_resolver
        self._well_known_timeout = well_known_timeout
        self._random = _random if _random is not None else random.Random()
        self._cache: "OrderedDict[str, _WellKnownEntry]" = OrderedDict()
        self._inflight: dict[str, list[Deferred]] = {}

    # -- public API ---------------------------------------------------------------

    def resolve(self, server_name: Union[str, ServerName]) -> "Deferred[Resolution]":
        """The whole algorithm: targets, Host header and certificate name."""
        d = self.delegate(server_name)

        def got_delegation(delegation: ServerDelegation) -> Deferred:
            return self.targets(delegation.server_name).addCallback(
                lambda targets: Resolution(
                    targets=tuple(targets),
                    host_header=delegation.host_header,
                    tls_name=delegation.tls_name,
                )
            )

        return d.addCallback(got_delegation)

    def delegate(self, server_name: Union[str, ServerName]) -> "Deferred[ServerDelegation]":
        """Steps 1-3 of docs/federation.md#resolution: IP literal or explicit port as is, else ``.well-known``."""
        if isinstance(server_name, str):
            try:
                server_name = parse_server_name(server_name)
            except InvalidServerName as e:
                return fail(OutboundError(FailureKind.INVALID, "server name", e.reason))
        if server_name.is_ip or server_name.port is not None:
            return succeed(_delegation_for(server_name))

        def got_delegate(delegate: Optional[ServerName]) -> ServerDelegation:
            return _delegation_for(delegate if delegate is not None else server_name)

        return self._well_known(server_name.host).addCallback(got_delegate)

    def targets(self, name: ServerName) -> "Deferred[list[Target]]":
        """Where to connect for a (possibly delegated) name; never does well-known."""
        if name.is_ip:
            return succeed([(name.host, name.port or DEFAULT_FEDERATION_PORT)])
        if name.port is not None:
            return succeed([(name.host, name.port)])
        return self._srv_targets(name.host)

    # -- well-known -----------------------------------------------------------------

    def _well_known(self, hostname: str) -> "Deferred[Optional[ServerName]]":
        entry = self._cache.get(hostname)
        if entry is not None and self._clock.seconds() < entry.expires_at:
            return self._entry_result(entry)
        waiting: Deferred = Deferred()
        waiters = self._inflight.get(hostname)
        if waiters is not None:
            waiters.append(waiting)
            return waiting
        self._inflight[hostname] = [waiting]
        previous_down = entry.down_failures if entry is not None else 0

        def store(new_entry: _WellKnownEntry) -> None:
            self._cache[hostname] = new_entry
            self._cache.move_to_end(hostname)
            while len(self._cache) > WELL_KNOWN_CACHE_SIZE:
                self._cache.popitem(last=False)
            for waiter in self._inflight.pop(hostname, []):
                self._entry_result(new_entry).chainDeferred(waiter)

        def unexpected(failure: Failure) -> None:
            log.failure("Well-known lookup for {hostname} crashed", failure, hostname=hostname)
            for waiter in self._inflight.pop(hostname, []):
                waiter.errback(OutboundError(FailureKind.RESOLVE, "well-known", "internal error"))

        self._fetch_well_known(hostname, previous_down).addCallbacks(store, unexpected)
        return waiting

    @staticmethod
    def _entry_result(entry: _WellKnownEntry) -> Deferred:
        if entry.error is not None:
            return fail(OutboundError(FailureKind.RESOLVE, "well-known", entry.error))
        return succeed(entry.delegate)

    def _fetch_well_known(self, hostname: str, previous_down: int) -> "Deferred[_WellKnownEntry]":
        url = f"https://{hostname}{WELL_KNOWN_PATH}".encode("ascii")
        http = self._http if self._is_trusted(hostname) else self._guarded_http
        d = http.request(
            b"GET",
            url,
            timeout=self._well_known_timeout,
            max_body=WELL_KNOWN_MAX_BODY,
            step="well-known",
        )

        def got_response(response: HTTPResponse) -> _WellKnownEntry:
            now = self._clock.seconds()
            if 500 <= response.code < 600:
                return self._down(hostname, previous_down, f"HTTP {response.code}")
            try:
                delegate = _parse_well_known(response)
            except _Invalid as e:
                log.debug(
                    "No usable well-known for {hostname}: {reason}; using SRV/8448",
                    hostname=hostname,
                    reason=str(e),
                )
                return _WellKnownEntry(now + WELL_KNOWN_INVALID_CACHE_PERIOD, None, None)
            except InvalidServerName as e:
                reason = f"m.server of {hostname} is not a valid server name: {e.reason}"
                log.warn("Well-known lookup failed: {reason}", reason=reason)
                return _WellKnownEntry(now + WELL_KNOWN_INVALID_CACHE_PERIOD, None, reason)
            period = self._cache_period(response.headers, now)
            log.debug(
                "Well-known for {hostname} delegates to {delegate} (cached {period:.0f} s)",
                hostname=hostname,
                delegate=delegate.original,
                period=period,
            )
            return _WellKnownEntry(now + period, delegate, None)

        def failed(failure: Failure) -> _WellKnownEntry:
            if failure.check(OutboundError) and failure.value.kind is FailureKind.TOO_LARGE:
                log.debug("Well-known of {hostname} is too large", hostname=hostname)
                return _WellKnownEntry(
                    self._clock.seconds() + WELL_KNOWN_INVALID_CACHE_PERIOD, None, None
                )
            if failure.check(OutboundError):
                return self._down(hostname, previous_down, str(failure.value))
            return failure

        return d.addCallbacks(got_response, failed)

    def _down(self, hostname: str, previous_down: int, reason: str) -> _WellKnownEntry:
        failures = previous_down + 1
        period = min(
            WELL_KNOWN_DOWN_CACHE_PERIOD * 2 ** (failures - 1), WELL_KNOWN_DOWN_CACHE_PERIOD_MAX
        )
        log.debug(
            "Well-known of {hostname} unreachable ({reason}); using SRV/8448 for {period:.0f} s",
            hostname=hostname,
            reason=reason,
            period=period,
        )
        return _WellKnownEntry(self._clock.seconds() + period, None, None, failures)

    def _cache_period(self, headers: Headers, now: float) -> float:
        period = _period_from_headers(headers, now)
        if period is None:
            jitter = self._random.uniform(-WELL_KNOWN_CACHE_JITTER, WELL_KNOWN_CACHE_JITTER)
            return WELL_KNOWN_DEFAULT_CACHE_PERIOD * (1 + jitter)
        return min(max(period, WELL_KNOWN_MIN_CACHE_PERIOD), WELL_KNOWN_MAX_CACHE_PERIOD)

    # -- SRV ------------------------------------------------------------------------

    @inlineCallbacks
    def _srv_targets(self, hostname: str):
        for service in SRV_SERVICES:
            query = f"{service}.{hostname}"
            try:
                answers, _authority, _additional = yield self._srv.lookupService(
                    query, timeout=SRV_LOOKUP_TIMEOUTS
                )
            except (DNSNameError, AuthoritativeDomainError) as e:
                log.debug("No SRV records for {query}: {error}", query=query, error=type(e).__name__)
                continue
            except DomainError as e:
                if type(e) is DomainError:  # "no records of this type"
                    continue
                log.info(
                    "SRV lookup for {query} failed ({error}); using port {port}",
                    query=query,
                    error=type(e).__name__,
                    port=DEFAULT_FEDERATION_PORT,
                )
                break
            except CancelledError:
                raise
            except Exception as e:
                log.info(
                    "SRV lookup for {query} failed ({error}); using port {port}",
                    query=query,
                    error=f"{type(e).__name__}: {e}",
                    port=DEFAULT_FEDERATION_PORT,
                )
                break
            records = [a.payload for a in answers if a.type == dns.SRV]
            if not records:
                continue
            targets = _srv_order(records, self._random)
            if not targets:
                raise OutboundError(FailureKind.RESOLVE, "resolve", f"SRV {query} says the service is not offered")
            log.debug("SRV {query} -> {targets}", query=query, targets=targets)
            return targets
        return [(hostname, DEFAULT_FEDERATION_PORT)]


def _srv_order(records: list, rng: random.Random) -> list[Target]:
    """RFC 2782 order: ascending priority, weighted-random within a priority.

    Targets of "." (service decidedly not available) are dropped.
    """
    result: list[Target] = []
    for priority in sorted({r.priority for r in records}):
        group = [r for r in records if r.priority == priority]
        remaining = sorted(group, key=lambda r: r.weight != 0)  # zero weights first, as the RFC says
        total = sum(r.weight for r in remaining)
        ordered = []
        while remaining:
            if total <= 0:
                ordered.extend(remaining)
                break
            pick = rng.randint(0, total)
            running = 0
            for index, record in enumerate(remaining):
                running += record.weight
                if running >= pick:
                    break
            chosen = remaining.pop(index)
            total -= chosen.weight
            ordered.append(chosen)
        for record in ordered:
            target = record.target.name.decode("ascii", "replace").rstrip(".")
            if target and _valid_srv_target(target):
                result.append((target, record.port))
    return result


def _valid_srv_target(target: str) -> bool:
    """SRV targets are DNS wire data chosen by whoever runs the zone: only host names of
    the server-name grammar are used (no control characters into logs or URLs)."""
    try:
        parse_server_name(target)
        return True
    except InvalidServerName:
        log.warn("Ignoring invalid SRV target {target!r}", target=target)
        return False


def _parse_well_known(response: HTTPResponse) -> ServerName:
    """The delegated server name; _Invalid (fall back) or InvalidServerName (fail)."""
    if response.code != 200:
        raise _Invalid(f"HTTP {response.code}")
    try:
        document = json.loads(response.body.decode("utf-8"), parse_constant=reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise _Invalid(f"body is not JSON: {e}") from None
    if not isinstance(document, dict):
        raise _Invalid("body is not a JSON object")
    value = document.get("m.server")
    if not isinstance(value, str):
        raise _Invalid("m.server is missing or not a string")
    if value == "":
        raise _Invalid("m.server is empty")
    return parse_server_name(value)



def _period_from_headers(headers: Headers, now: float) -> Optional[float]:
    """Cache lifetime from Cache-Control (max-age, no-store/no-cache) or Expires."""
    directives: dict[str, str] = {}
    for raw in headers.getRawHeaders(b"cache-control", []):
        for part in raw.decode("latin-1").split(","):
            key, _, value = part.strip().partition("=")
            directives[key.strip().lower()] = value.strip().strip('"')
    if "no-store" in directives or "no-cache" in directives:
        return 0.0
    if "max-age" in directives:
        try:
            return float(int(directives["max-age"]))
        except ValueError:
            pass
    expires = headers.getRawHeaders(b"expires")
    if expires:
        try:
            when = email.utils.parsedate_to_datetime(expires[0].decode("latin-1"))
        except (TypeError, ValueError, IndexError):
            when = None
        if when is None:
            return 0.0  # an invalid Expires means "already expired"
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        return when.timestamp() - now
    return None


__all__ = [
    "DEFAULT_FEDERATION_PORT",
    "ServerDelegation",
    "Resolution",
    "ServerResolver",
]
