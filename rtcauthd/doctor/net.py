"""Network plumbing for ``rtcauth doctor``: agents, probes, and tidy shutdown.

Why a reactor wrapper: every TCP connection doctor opens (HTTP, federation, raw TCP and
TLS probes) goes through :class:`DoctorReactor`, which resolves names with
``--dns-server`` when given and keeps track of the connection, so that the report can close
whatever is still open before it returns (nothing outlives a run, not even in tests).

Why a port-mapping agent: ``--https-port N`` moves every ``https://host/`` URL doctor
derives (server name, well-known, service and SFU URLs) to port N, so a whole deployment
can be staged on one loopback TLS port.
"""

from __future__ import annotations

import re
from typing import Callable, Optional
from urllib.parse import urlsplit

import attr
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorPluggableNameResolver, IReactorTCP, IReactorTime
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent
from zope.interface import implementer

from rtcauthd.outbound.errors import OutboundError, kind_of, reason

HTTPS_PORT = 443
#: How long to wait for aborted connections to report themselves closed.
CLOSE_GRACE = 1.0


# -- URLs -----------------------------------------------------------------------------------


@attr.s(frozen=True, slots=True, auto_attribs=True)
class URL:
    """An http(s)/ws(s) URL split without hyperlink (IPv6 literals stay intact)."""

    scheme: str
    host: str  # no brackets
    port: Optional[int]  # explicit port, if any
    path: str  # path + query, may be ""

    @property
    def bracketed_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    def port_or(self, https_port: int) -> int:
        """The port a connection goes to (``--https-port`` for https/wss without one)."""
        if self.port is not None:
            return self.port
        return https_port if self.scheme in ("https", "wss") else 80

    def origin(self) -> str:
        port = f":{self.port}" if self.port is not None else ""
        return f"{self.scheme}://{self.bracketed_host}{port}"


def parse_url(url: str) -> URL:
    """Split ``url``; ValueError if it has no host or an invalid port."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.hostname:
        raise ValueError(f"{url!r} is not an absolute URL")
    port = parts.port  # raises ValueError for a bad port
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return URL(scheme=parts.scheme.lower(), host=parts.hostname, port=port, path=path)


_AUTHORITY = re.compile(rb"^(https|wss)://([^/?#]*)(.*)$", re.IGNORECASE | re.DOTALL)


def with_https_port(url: bytes, port: int) -> bytes:
    """Put ``port`` into an https/wss URL that has none (``--https-port``)."""
    if port == HTTPS_PORT:
        return url
    match = _AUTHORITY.match(url)
    if match is None:
        return url
    scheme, authority, rest = match.groups()
    host_part = authority.rsplit(b"@", 1)[-1]
    has_port = host_part.rfind(b":") > host_part.rfind(b"]")
    if has_port or not host_part:
        return url
    return scheme + b"://" + authority + b":" + str(port).encode("ascii") + rest


# -- failures ---------------------------------------------------------------------------


@implementer(IAgent)
class ExplainingAgent:
    """Turns raw transport failures of an agent into OutboundError: their kind, a short reason."""

    def __init__(self, agent: IAgent) -> None:
        self._agent = agent

    def request(self, method, uri, headers=None, bodyProducer=None):
        def failed(failure: Failure) -> Failure:
            if failure.check(OutboundError, CancelledError):
                return failure
            why = reason(failure.value)
            raise OutboundError(kind_of(failure.value), "connect", why, reason=why)

        return self._agent.request(method, uri, headers, bodyProducer).addErrback(failed)


@implementer(IAgent)
class PortMappingAgent:
    """Sends https URLs without a port to ``https_port`` (see the module docstring)."""

    def __init__(self, agent: IAgent, https_port: int) -> None:
        self._agent = agent
        self._port = https_port

    def request(self, method, uri, headers=None, bodyProducer=None):
        return self._agent.request(method, with_https_port(uri, self._port), headers, bodyProducer)


# -- connection tracking -------------------------------------------------------------------


class _TrackedProtocol(ProtocolWrapper):
    pass


class _TrackingFactory(WrappingFactory):
    protocol = _TrackedProtocol

    def __init__(self, tracker: "ConnectionTracker", wrapped) -> None:
        super().__init__(wrapped)
        self._tracker = tracker

    def registerProtocol(self, p) -> None:
        self._tracker._opened(p)

    def unregisterProtocol(self, p) -> None:
        self._tracker._closed(p)


class ConnectionTracker:
    """Knows every open connection, so that :meth:`close_all` can end them."""

    def __init__(self) -> None:
        self._open: set = set()
        self._idle: list[Deferred] = []

    def wrap(self, factory):
        return _TrackingFactory(self, factory)

    @property
    def open_count(self) -> int:
        return len(self._open)

    def _opened(self, p) -> None:
        self._open.add(p)

    def _closed(self, p) -> None:
        self._open.discard(p)
        if not self._open:
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                if not waiter.called:
                    waiter.callback(None)

    def close_all(self, clock: IReactorTime, grace: float = CLOSE_GRACE) -> Deferred:
        """Abort every open connection; fires once they are closed (or after ``grace``)."""
        if not self._open:
            return succeed(None)
        waiter: Deferred = Deferred()
        self._idle.append(waiter)
        for p in list(self._open):
            transport = p.transport
            if transport is not None:
                transport.abortConnection()
        timer = clock.callLater(grace, lambda: waiter.called or waiter.callback(None))

        def done(result):
            if timer.active():
                timer.cancel()
            return result

        return waiter.addBoth(done)


@implementer(IReactorTCP, IReactorTime, IReactorPluggableNameResolver)
class DoctorReactor:
    """The real reactor, with doctor's name resolver and connection tracking."""

    def __init__(self, reactor, *, tracker: ConnectionTracker, name_resolver=None) -> None:
        self._reactor = reactor
        self._tracker = tracker
        self._name_resolver = name_resolver

    @property
    def nameResolver(self):
        return self._name_resolver if self._name_resolver is not None else self._reactor.nameResolver

    def installNameResolver(self, resolver):
        raise NotImplementedError("doctor's reactor wrapper has a fixed resolver")

    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None):
        return self._reactor.connectTCP(host, port, self._tracker.wrap(factory), timeout, bindAddress)

    def __getattr__(self, name):
        return getattr(self._reactor, name)


@attr.s(auto_attribs=True)
class Network:
    """Everything doctor talks to the world with (tests substitute their own)."""

    dns: object  # DNSClient-like: lookup(name, kind), addresses(name)
    http: object  # HTTPClient for plain HTTPS (port-mapped)
    federation: object  # HTTPClient over the federation agent
    resolver: object  # ServerResolver (shares its well-known cache with ``federation``)
    probes: object  # rtcauthd.doctor.probes.Probes
    close: Callable[[], Deferred]
    tls_policy: object = None


def build_network(
    reactor,
    *,
    timeout: float,
    https_port: int,
    dns_servers,
    custom_dns: bool,
    ca_file: Optional[str],
    user_agent: str,
) -> Network:
    """Wire the real agents and probes (the one place doctor builds network clients)."""
    from twisted.web.client import HTTPConnectionPool

    from rtcauthd.doctor.dns import DNSClient, NamesHostnameResolver
    from rtcauthd.doctor.probes import Probes
    from rtcauthd.outbound.client import HTTPClient
    from rtcauthd.matrix.federation_agent import (
        FederationAgent,
        build_plain_agent,
        build_well_known_agent,
    )
    from rtcauthd.matrix.ipfilter import IPRangeFilter
    from rtcauthd.matrix.resolver import WELL_KNOWN_MAX_BODY, ServerResolver
    from rtcauthd.tls import TLSPolicy

    tracker = ConnectionTracker()
    dns_client = DNSClient(reactor=reactor, servers=dns_servers, timeout=timeout)
    name_resolver = NamesHostnameResolver(dns_client) if custom_dns else None
    proxy = DoctorReactor(reactor, tracker=tracker, name_resolver=name_resolver)
    tls_policy = TLSPolicy(ca_file=ca_file)

    def pool() -> HTTPConnectionPool:
        return HTTPConnectionPool(proxy, persistent=False)

    plain = build_plain_agent(proxy, tls_policy=tls_policy, pool=pool(), connect_timeout=timeout)
    http = HTTPClient(
        clock=reactor,
        agent=PortMappingAgent(ExplainingAgent(plain), https_port),
        timeout=timeout,
        user_agent=user_agent,
    )
    # The operator checks their own deployment, so no address is off limits (no SSRF filter).
    trust_all: Callable[[str], bool] = lambda _name: True
    no_filter = IPRangeFilter(blocklist=())
    well_known = build_well_known_agent(
        proxy,
        tls_policy=tls_policy,
        ip_filter=no_filter,
        is_trusted=trust_all,
        connect_timeout=timeout,
        _name_resolver=name_resolver,
    )
    resolver = ServerResolver(
        clock=reactor,
        http=HTTPClient(
            clock=reactor,
            agent=PortMappingAgent(well_known, https_port),
            timeout=timeout,
            max_body=WELL_KNOWN_MAX_BODY,
            user_agent=user_agent,
        ),
        srv_resolver=dns_client,
        well_known_timeout=timeout,
    )
    federation_agent = FederationAgent(
        proxy,
        resolver=resolver,
        tls_policy=tls_policy,
        ip_filter=no_filter,
        is_trusted=trust_all,
        pool=pool(),
        connect_timeout=timeout,
        _name_resolver=name_resolver,
    )
    federation = HTTPClient(clock=reactor, agent=federation_agent, timeout=timeout, user_agent=user_agent)
    probes = Probes(reactor=proxy, clock=reactor, tls_policy=tls_policy, timeout=timeout)
    return Network(
        dns=dns_client,
        http=http,
        federation=federation,
        resolver=resolver,
        probes=probes,
        close=lambda: tracker.close_all(reactor),
        tls_policy=tls_policy,
    )
