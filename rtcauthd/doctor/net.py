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
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import error as net_error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferTimeout, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent
from zope.interface import implementer

from rtcauthd.outbound.errors import FailureKind
from rtcauthd.outbound.client import OutboundError

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


# -- describing failures -----------------------------------------------------------------


def _openssl_reason(error: SSL.Error) -> str:
    reasons = []
    for item in error.args[0] if error.args and isinstance(error.args[0], list) else []:
        if isinstance(item, tuple) and item:
            reasons.append(str(item[-1]))
    return ", ".join(r for r in reasons if r) or str(error) or "handshake failed"


def explain(failure: Failure) -> str:
    """A short, human reason for a transport failure (no tracebacks, no URLs)."""
    value = failure.value
    reasons = getattr(value, "reasons", None)
    if reasons:
        texts: list[str] = []
        for reason in reasons:
            text = explain(reason) if isinstance(reason, Failure) else str(reason)
            if text not in texts:
                texts.append(text)
        return "; ".join(texts)
    if isinstance(value, OutboundError) and value.kind is FailureKind.TIMEOUT:
        return value.detail
    if isinstance(value, OutboundError):
        return simplify(value.detail)
    if isinstance(value, VerificationError):
        return "TLS: the certificate does not cover this host name"
    if isinstance(value, SSL.Error):
        reason = _openssl_reason(value)
        if "certificate verify failed" in reason:
            return "TLS: certificate verify failed (not signed by a trusted CA, or expired)"
        return f"TLS handshake failed ({reason})"
    if isinstance(value, net_error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(value, (net_error.TCPTimedOutError, net_error.TimeoutError, DeferTimeout)):
        return "connection timed out"
    if isinstance(value, net_error.DNSLookupError):
        return "the host name does not resolve to an address"
    if isinstance(value, net_error.NoRouteError):
        return "no route to host"
    if isinstance(value, (net_error.ConnectionDone, net_error.ConnectionLost)):
        return "the connection was closed without an answer"
    if isinstance(value, CancelledError):
        return "cancelled"
    text = str(value)
    return f"{type(value).__name__}: {text}" if text else type(value).__name__


_SIMPLIFY = (
    (re.compile(r"ConnectionRefusedError:[^;]*"), "connection refused"),
    (re.compile(r"(TCPTimedOutError|TimeoutError):[^;]*"), "connection timed out"),
    (re.compile(r"DNSLookupError:[^;]*"), "the host name does not resolve to an address"),
    (re.compile(r"DNS lookup failed:[^;]*"), "the host name does not resolve to an address"),
    (re.compile(r"VerificationError:[^;]*"), "TLS: the certificate does not cover this host name"),
    (re.compile(r"Error: \[\(.*certificate verify failed.*\)\]"), "TLS: certificate verify failed"),
)


def simplify(detail: str) -> str:
    """Shorten the verbose exception text some shared clients put into errors."""
    for pattern, replacement in _SIMPLIFY:
        detail = pattern.sub(replacement, detail)
    return detail


@implementer(IAgent)
class ExplainingAgent:
    """Turns raw transport failures of an agent into OutboundError with a short reason."""

    def __init__(self, agent: IAgent) -> None:
        self._agent = agent

    def request(self, method, uri, headers=None, bodyProducer=None):
        def failed(failure: Failure) -> Failure:
            if failure.check(OutboundError, CancelledError):
                return failure
            raise OutboundError(FailureKind.CONNECT, "connect", explain(failure))

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


# -- probes --------------------------------------------------------------------------------


class ProbeError(Exception):
    """A TCP or TLS probe failed; ``stage`` is "connect" or "tls", ``detail`` says why."""

    def __init__(self, stage: str, detail: str, *, timed_out: bool = False) -> None:
        super().__init__(stage, detail)
        self.stage = stage
        self.detail = detail
        self.timed_out = timed_out

    def __str__(self) -> str:
        return self.detail


@implementer(IOpenSSLClientConnectionCreator)
class _NoVerification:
    """TLS that accepts any certificate (only to *describe* one that failed), with SNI."""

    def __init__(self, name: str) -> None:
        self._context = CertificateOptions().getContext()
        literal = isIPAddress(name) or isIPv6Address(name)
        self._sni = None if literal else name.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        return connection


@implementer(IHandshakeListener)
class _HandshakeProbe(Protocol):
    """Reports the peer certificate once the handshake (and verification) succeeded."""

    def __init__(self, done: Deferred) -> None:
        self._done = done

    def handshakeCompleted(self) -> None:
        if self.transport.disconnecting:
            # Verification failed inside the handshake: connectionLost brings the reason.
            return
        certificate = self.transport.getPeerCertificate()
        if not self._done.called:
            self._done.callback(certificate.to_cryptography() if certificate is not None else None)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        if not self._done.called:
            self._done.errback(ProbeError("tls", explain(reason)))


class _ProbeFactory(Factory):
    def __init__(self, done: Deferred) -> None:
        self._done = done

    def buildProtocol(self, addr):
        p = _HandshakeProbe(self._done)
        p.factory = self
        return p


class Probes:
    """Raw TCP and TLS checks below HTTP (reachability per address, certificates)."""

    def __init__(self, *, reactor, clock: IReactorTime, tls_policy, timeout: float) -> None:
        self._reactor = reactor
        self._clock = clock
        self._policy = tls_policy
        self._timeout = timeout

    def tcp_connect(self, address: str, port: int) -> "Deferred[None]":
        """Open (and close) a TCP connection to one IP address; ProbeError if impossible."""
        kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        endpoint = kind(self._reactor, address, port, timeout=self._timeout)
        d = endpoint.connect(Factory.forProtocol(Protocol))
        expired = []

        def expire() -> None:
            expired.append(True)
            d.cancel()

        timer = self._clock.callLater(self._timeout, expire)

        def connected(p) -> None:
            p.transport.loseConnection()

        def failed(failure: Failure) -> Failure:
            if expired or failure.check(net_error.TimeoutError):
                raise ProbeError("connect", f"no connection within {self._timeout:g} s", timed_out=True)
            raise ProbeError("connect", explain(failure))

        def stop(result):
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(stop).addCallbacks(connected, failed)

    def certificate(self, host: str, port: int, *, verify: bool = True) -> Deferred:
        """TLS handshake with ``host``; the peer's cryptography certificate.

        With ``verify`` the policy's trust roots and a host-name check apply, as for every
        other connection; without, any certificate is accepted so that it can be described.
        """
        creator = self._policy.options_for(host) if verify else _NoVerification(host)
        holder: list = []

        def cancel(_d: Deferred) -> None:
            if holder:
                holder[0].transport.abortConnection()
            else:
                connecting.cancel()

        done: Deferred = Deferred(cancel)
        endpoint = wrapClientTLS(
            creator, HostnameEndpoint(self._reactor, host, port, timeout=self._timeout)
        )
        connecting = endpoint.connect(_ProbeFactory(done))

        def connected(p):
            holder.append(p)

        def connect_failed(failure: Failure) -> None:
            if not done.called:
                done.errback(ProbeError("connect", explain(failure)))

        connecting.addCallbacks(connected, connect_failed)

        def expire() -> None:
            if done.called:
                return
            if holder:
                done.errback(ProbeError("tls", f"no TLS handshake within {self._timeout:g} s", timed_out=True))
                holder[0].transport.abortConnection()
            else:
                done.errback(ProbeError("connect", f"no connection within {self._timeout:g} s", timed_out=True))
                connecting.cancel()

        timer = self._clock.callLater(self._timeout, expire)

        def finished(result):
            if timer.active():
                timer.cancel()
            return result

        return done.addBoth(finished)


@attr.s(auto_attribs=True)
class Network:
    """Everything doctor talks to the world with (tests substitute their own)."""

    dns: object  # DNSClient-like: lookup(name, kind), addresses(name)
    http: object  # HTTPClient for plain HTTPS (port-mapped)
    federation: object  # HTTPClient over the federation agent
    resolver: object  # ServerResolver (shares its well-known cache with ``federation``)
    probes: Probes
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
