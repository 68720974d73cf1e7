"""An IAgent for ``matrix-federation://<server_name>/<path>`` URLs, and the plain agent.

Why a custom agent: a federation request connects to one place (well-known / SRV /
8448, docs/federation.md#resolution), sends a ``Host`` header naming another, and verifies a
certificate for a third; and it must never reach addresses an anonymous client should
not be able to make us connect to (SSRF).

How the pieces fit:

- :class:`FederationAgent` parses the server name, runs the well-known step (for the
  ``Host`` header), then hands the request to an ordinary ``Agent`` whose endpoint
  factory connects by SRV / 8448 target. Connections are pooled per delegated name and
  trust tier, in two bounded pools (docs/connection-pooling.md).
- Every TCP connection goes through ``HostnameEndpoint`` (happy eyeballs over all
  A/AAAA answers) with a reactor wrapper whose ``nameResolver`` drops each resolved
  address that :class:`IPRangeFilter` refuses (:mod:`rtcauthd.matrix.guarded_connect`). The check is therefore made on the
  address actually connected to (no DNS-rebinding window), and IP literals go
  through the same filter. Names listed as full-access (``is_trusted``) are exempt.
- URLs never pass through hyperlink (it breaks IPv6 literals, docs/federation.md#tls): we split the
  URL ourselves and Twisted's ``URI.fromBytes`` handles ``[::1]`` correctly.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from rtcauthd.outbound.errors import FailureKind, describe, reason
from rtcauthd.outbound.client import (
    GoRedirectAgent,
    HTTPClient,
    OutboundError,
    connection_pool,
)
from rtcauthd.outbound.pool import ReusedEndpoints, full_access_pool, strangers_pool
from rtcauthd.twisted_private import standard_endpoint_factory
from rtcauthd.matrix.guarded_connect import ConnectionGuard, as_outbound, classify_failure
from rtcauthd.matrix.ipfilter import IPRangeFilter
from rtcauthd.matrix.resolver import (
    WELL_KNOWN_MAX_BODY,
    WELL_KNOWN_TIMEOUT,
    ServerDelegation,
    ServerResolver,
)
from rtcauthd.matrix.servername import InvalidServerName, ServerName, parse_server_name
from rtcauthd.tls import TLSPolicy

log = Logger()

FEDERATION_SCHEME = b"matrix-federation"
#: TCP connect timeout per attempted address (upstream: 5 s).
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Redirects followed for ``/.well-known/matrix/server`` (Go's default client: 10).
WELL_KNOWN_REDIRECT_LIMIT = 10

# Internal schemes of the inner Agent: the pool key includes the scheme, so filtered
# and trusted connections to the same delegated name are never shared.
_INNER_FILTERED = b"matrix-federation-filtered"
_INNER_TRUSTED = b"matrix-federation-trusted"


# -- connecting to resolved targets -------------------------------------------------------


class _TargetsInTurn:
    """Connect to SRV targets one after another; the first connection wins."""

    def __init__(self, endpoints: list[tuple[str, int, IStreamClientEndpoint]], factory) -> None:
        self._endpoints = endpoints
        self._factory = factory
        self._errors: list[tuple[str, int, Failure]] = []
        self._current: Optional[Deferred] = None
        self._cancelled = False
        self.result: Deferred = Deferred(self._cancel)
        self._attempt(0)

    def _cancel(self, _result: Deferred) -> None:
        self._cancelled = True
        if self._current is not None:
            self._current.cancel()

    def _attempt(self, index: int) -> None:
        if index >= len(self._endpoints):
            self.result.errback(self._combined())
            return
        host, port, endpoint = self._endpoints[index]
        self._current = endpoint.connect(self._factory)

        def succeeded(protocol):
            self._current = None
            if not self._cancelled:
                self.result.callback(protocol)
            return None

        def failed(failure: Failure) -> None:
            self._current = None
            if self._cancelled:
                return None
            self._errors.append((host, port, failure))
            self._attempt(index + 1)
            return None

        self._current.addCallbacks(succeeded, failed)

    def _combined(self) -> Failure:
        errors = [
            (h, p, as_outbound(f) or OutboundError(FailureKind.CONNECT, "connect", describe(f), reason=reason(f.value)))
            for h, p, f in self._errors
        ]
        if len(errors) == 1:
            return Failure(errors[0][2])
        kinds = {e.kind for _, _, e in errors}
        kind = kinds.pop() if len(kinds) == 1 else FailureKind.CONNECT
        detail = "; ".join(f"{hostport(h, p)}: {e.detail}" for h, p, e in errors)
        why = "; ".join(f"{hostport(h, p)}: {e.reason}" for h, p, e in errors)
        step = "resolve" if kind is FailureKind.RESOLVE else "connect"
        return Failure(OutboundError(kind, step, detail, reason=why))


def hostport(host: str, port: int) -> str:
    """``host:port`` with an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@implementer(IStreamClientEndpoint)
class _FederationEndpoint:
    """Resolves a delegated name to targets at connect time, then connects with TLS."""

    def __init__(self, agent: "FederationAgent", name: ServerName, trusted: bool) -> None:
        self._agent = agent
        self._name = name
        self._trusted = trusted

    def connect(self, protocolFactory) -> Deferred:
        agent = self._agent
        guard = agent.guard
        creator = guard.tls_policy.options_for(self._name.host)

        def got_targets(targets: list[tuple[str, int]]) -> Deferred:
            endpoints = [
                (host, port, wrapClientTLS(creator, guard.endpoint(host, port, trusted=self._trusted)))
                for host, port in targets
            ]
            return _TargetsInTurn(endpoints, protocolFactory).result

        return agent._resolver.targets(self._name).addCallback(got_targets)


@implementer(IAgentEndpointFactory)
class _FederationEndpointFactory:
    def __init__(self, agent: "FederationAgent") -> None:
        self._agent = agent

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme not in (_INNER_FILTERED, _INNER_TRUSTED):
            raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")
        host = uri.host.decode("ascii")
        port = uri.port or None  # port 0 encodes "no explicit port"
        is_ip = isIPAddress(host) or isIPv6Address(host)
        bracketed = f"[{host}]" if ":" in host else host
        original = bracketed if port is None else f"{bracketed}:{port}"
        name = ServerName(host=host, port=port, is_ip=is_ip, original=original)
        return _FederationEndpoint(self._agent, name, uri.scheme == _INNER_TRUSTED)


# -- the agents -------------------------------------------------------------------------------


def _split_federation_url(uri: bytes) -> tuple[ServerName, bytes]:
    prefix = FEDERATION_SCHEME + b"://"
    if not uri.startswith(prefix):
        raise InvalidServerName("URL does not start with matrix-federation://")
    rest = uri[len(prefix) :]
    cut = len(rest)
    for sep in (b"/", b"?", b"#"):
        position = rest.find(sep)
        if position >= 0:
            cut = min(cut, position)
    netloc, path = rest[:cut], rest[cut:]
    if not path.startswith(b"/"):
        path = b"/" + path
    try:
        text = netloc.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidServerName("server name contains non-ASCII characters") from None
    return parse_server_name(text), path


@implementer(IAgent)
class FederationAgent:
    """IAgent for ``matrix-federation://<server_name>/<path>?<query>`` (see module doc)."""

    def __init__(
        self,
        reactor,
        *,
        resolver: ServerResolver,
        tls_policy: TLSPolicy,
        ip_filter: IPRangeFilter,
        is_trusted: Callable[[str], bool],
        pool: Optional[HTTPConnectionPool] = None,
        stranger_pool: Optional[HTTPConnectionPool] = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        _name_resolver=None,
    ) -> None:
        self._resolver = resolver
        self.guard = ConnectionGuard(reactor, tls_policy, ip_filter, is_trusted, connect_timeout, _name_resolver)
        if pool is None:
            pool = full_access_pool(reactor)
        if stranger_pool is None:
            stranger_pool = strangers_pool(reactor, ip_filter)
        self.pool = pool
        self.stranger_pool = stranger_pool
        factory = ReusedEndpoints(_FederationEndpointFactory(self))
        self._agent = Agent.usingEndpointFactory(reactor, factory, pool=pool)
        # Servers anyone can name get their own pool, bounded in total with a short idle
        # time, so made-up names can neither exhaust descriptors nor evict the
        # operator's connections (docs/connection-pooling.md).
        self._filtered_agent = Agent.usingEndpointFactory(reactor, factory, pool=stranger_pool)

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Optional[Headers] = None,
        bodyProducer: Optional[IBodyProducer] = None,
    ) -> "Deferred[IResponse]":
        try:
            server_name, path = _split_federation_url(uri)
        except InvalidServerName as e:
            return fail(OutboundError(FailureKind.INVALID, "server name", e.reason))
        trusted = bool(self.guard.is_trusted(server_name.original))

        def send(delegation: ServerDelegation) -> Deferred:
            target = delegation.server_name
            netloc = f"{target.bracketed_host}:{target.port or 0}".encode("ascii")
            scheme = _INNER_TRUSTED if trusted else _INNER_FILTERED
            request_headers = headers.copy() if headers is not None else Headers()
            request_headers.setRawHeaders(b"Host", [delegation.host_header.encode("ascii")])
            agent = self._agent if trusted else self._filtered_agent
            return agent.request(method, scheme + b"://" + netloc + path, request_headers, bodyProducer)

        d = self._resolver.delegate(server_name)
        d.addCallback(send)
        d.addErrback(classify_failure)
        return d


@implementer(IAgentEndpointFactory)
class _GuardedWebEndpointFactory:
    """http(s) endpoints whose addresses pass the IP filter unless the host is trusted."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")
        host = uri.host.decode("ascii")
        guard = self._guard
        endpoint = guard.endpoint(host, uri.port, trusted=bool(guard.is_trusted(host)))
        if uri.scheme == b"https":
            return wrapClientTLS(guard.tls_policy.options_for(host), endpoint)
        return endpoint


@implementer(IAgent)
class _ClassifyingAgent:
    """Gives transport failures of an inner agent their OutboundError class."""

    def __init__(self, agent: IAgent) -> None:
        self._agent = agent

    def request(self, method, uri, headers=None, bodyProducer=None):
        return self._agent.request(method, uri, headers, bodyProducer).addErrback(classify_failure)


def build_well_known_agent(
    reactor,
    *,
    tls_policy: TLSPolicy,
    ip_filter: IPRangeFilter,
    is_trusted: Callable[[str], bool],
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    _name_resolver=None,
) -> IAgent:
    """The agent for ``/.well-known/matrix/server``: SSRF-filtered, follows redirects.

    It has its own non-persistent pool: well-known answers are cached for hours, and
    sharing a pool with unfiltered agents could hand it an unchecked connection.
    """
    inner = Agent.usingEndpointFactory(
        reactor,
        _GuardedWebEndpointFactory(
            ConnectionGuard(reactor, tls_policy, ip_filter, is_trusted, connect_timeout, _name_resolver)
        ),
        pool=connection_pool(reactor, persistent=False),
    )
    return GoRedirectAgent(_ClassifyingAgent(inner), limit=WELL_KNOWN_REDIRECT_LIMIT)


def build_guarded_web_agent(
    reactor,
    *,
    tls_policy: TLSPolicy,
    ip_filter: IPRangeFilter,
    redirect_limit: int = 10,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    _name_resolver=None,
) -> IAgent:
    """Plain http(s) where every address (every redirect hop too) must pass ``ip_filter``.

    For URLs a homeserver chose that the operator did not vouch for: the client-server
    API base URL from the .well-known of a server admitted only by the ``*`` wildcard.
    Redirects follow Go's client (GoRedirectAgent). Own pool, as above.
    """
    inner = Agent.usingEndpointFactory(
        reactor,
        _GuardedWebEndpointFactory(
            ConnectionGuard(reactor, tls_policy, ip_filter, lambda _host: False, connect_timeout, _name_resolver)
        ),
        pool=connection_pool(reactor, persistent=False),
    )
    return GoRedirectAgent(_ClassifyingAgent(inner), limit=redirect_limit)


#: Where the system's DNS servers are listed (for SRV lookups).
RESOLV_CONF = "/etc/resolv.conf"


class _SystemDNSResolver:
    """twisted.names' resolver for the resolv.conf servers, created on the first SRV
    lookup: building it reads the file and starts a re-read timer, which merely
    wiring the service should not do."""

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._resolver = None

    def lookupService(self, name, timeout=None):
        if self._resolver is None:
            from twisted.names.client import Resolver

            self._resolver = Resolver(resolv=RESOLV_CONF, reactor=self._reactor)
        return self._resolver.lookupService(name, timeout=timeout)


def build_federation_agent(
    reactor,
    *,
    tls_policy: TLSPolicy,
    ip_filter: IPRangeFilter,
    is_trusted: Callable[[str], bool],
    dns_resolver=None,
    pool: Optional[HTTPConnectionPool] = None,
    stranger_pool: Optional[HTTPConnectionPool] = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    well_known_timeout: float = WELL_KNOWN_TIMEOUT,
    _name_resolver=None,
    _random=None,
) -> FederationAgent:
    """Wire a FederationAgent with its resolver and SSRF-filtered well-known client.

    ``dns_resolver`` (twisted.names IResolver, for SRV) defaults to the system's
    resolv.conf servers; A/AAAA lookups use ``reactor.nameResolver`` (getaddrinfo).
    """
    if dns_resolver is None:
        dns_resolver = _SystemDNSResolver(reactor)

    def well_known_client(trust_every_hop: bool) -> HTTPClient:
        return HTTPClient(
            clock=reactor,
            agent=build_well_known_agent(
                reactor,
                tls_policy=tls_policy,
                ip_filter=ip_filter,
                is_trusted=lambda _host: trust_every_hop,
                connect_timeout=connect_timeout,
                _name_resolver=_name_resolver,
            ),
            timeout=well_known_timeout,
            max_body=WELL_KNOWN_MAX_BODY,
        )

    resolver = ServerResolver(
        clock=reactor,
        http=well_known_client(True),
        guarded_http=well_known_client(False),
        is_trusted=is_trusted,
        srv_resolver=dns_resolver,
        well_known_timeout=well_known_timeout,
        _random=_random,
    )
    return FederationAgent(
        reactor,
        resolver=resolver,
        tls_policy=tls_policy,
        ip_filter=ip_filter,
        is_trusted=is_trusted,
        pool=pool,
        stranger_pool=stranger_pool,
        connect_timeout=connect_timeout,
        _name_resolver=_name_resolver,
    )


def build_plain_agent(
    reactor,
    *,
    tls_policy: TLSPolicy,
    pool: Optional[HTTPConnectionPool] = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> IAgent:
    """An ordinary Agent (happy eyeballs via HostnameEndpoint) for operator-configured
    URLs (LiveKit, client-server API): no SSRF filter, same TLS policy. Pass it
    bytes URLs through HTTPClient (IPv6 literals work; hyperlink is not involved)."""
    factory = ReusedEndpoints(standard_endpoint_factory(reactor, tls_policy, connect_timeout))
    return Agent.usingEndpointFactory(reactor, factory, pool=pool)
