"""Connecting through the SSRF guard, and naming what went wrong when it fails.

Every outbound TCP connection to a homeserver (federation, well-known, client-server
API) is a :class:`GuardedHostnameEndpoint`: ``HostnameEndpoint``'s happy eyeballs over all
A/AAAA answers, with a name resolver that drops each address the :class:`IPRangeFilter`
refuses, so the check is made on the address actually connected to (no DNS-rebinding
window) and IP literals go through the same filter. :func:`as_outbound` is the one place
a raw connection failure becomes an :class:`OutboundError` of the right kind.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import attr

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rtcauthd.matrix.ipfilter import IPRangeFilter
from rtcauthd.outbound.errors import FailureKind, OutboundError, describe, reason
from rtcauthd.tls import TLSPolicy

log = Logger()


# -- name resolution with the SSRF filter -----------------------------------------------


@implementer(IHostResolution)
class HostResolution:
    """The IHostResolution a custom IHostnameResolver hands its receiver (nothing to cancel)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IResolutionReceiver)
class _FilteringReceiver:
    """Passes on only the addresses the filter allows; remembers the refused ones."""

    def __init__(self, receiver, ip_filter: IPRangeFilter, refusals: list, host: str) -> None:
        self._receiver = receiver
        self._filter = ip_filter
        self._refusals = refusals
        self._host = host

    def resolutionBegan(self, resolutionInProgress) -> None:
        self._receiver.resolutionBegan(resolutionInProgress)

    def addressResolved(self, address) -> None:
        rule = self._filter.check(address.host)
        if rule is None:
            self._receiver.addressResolved(address)
            return
        self._refusals.append((address.host, rule))
        log.warn(
            "Refusing to connect to {address} for {host}: blocked by {rule}",
            address=address.host,
            host=self._host,
            rule=rule,
        )

    def resolutionComplete(self) -> None:
        self._receiver.resolutionComplete()


@implementer(IHostnameResolver)
class _GuardedNameResolver:
    """Resolves IP literals locally and DNS names through ``base``, then filters."""

    def __init__(self, base, ip_filter: Optional[IPRangeFilter], refusals: list) -> None:
        self._base = base
        self._filter = ip_filter
        self._refusals = refusals

    def resolveHostName(
        self, resolutionReceiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"
    ):
        receiver = resolutionReceiver
        if self._filter is not None:
            receiver = _FilteringReceiver(receiver, self._filter, self._refusals, hostName)
        if isIPAddress(hostName) or isIPv6Address(hostName):
            # No thread hop or DNS for literals; the filter still sees them.
            receiver.resolutionBegan(HostResolution(hostName))
            kind = IPv6Address if ":" in hostName else IPv4Address
            receiver.addressResolved(kind("TCP", hostName, portNumber))
            receiver.resolutionComplete()
            return resolutionReceiver
        self._base.resolveHostName(receiver, hostName, portNumber, addressTypes, transportSemantics)
        return resolutionReceiver


@implementer(IReactorTCP, IReactorTime, IReactorPluggableNameResolver)
class _ReactorWithResolver:
    """The real reactor with a different ``nameResolver`` (for HostnameEndpoint)."""

    def __init__(self, reactor, name_resolver) -> None:
        self._reactor = reactor
        self.nameResolver = name_resolver

    def installNameResolver(self, resolver):
        raise NotImplementedError("per-connection wrapper; install on the real reactor")

    def __getattr__(self, name):
        return getattr(self._reactor, name)


@implementer(IStreamClientEndpoint)
class GuardedHostnameEndpoint:
    """HostnameEndpoint (happy eyeballs) whose resolved addresses pass the IP filter."""

    def __init__(
        self,
        reactor,
        host: str,
        port: int,
        *,
        ip_filter: Optional[IPRangeFilter],
        connect_timeout: float,
        name_resolver=None,
    ) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        self._filter = ip_filter
        self._timeout = connect_timeout
        self._name_resolver = name_resolver

    def connect(self, protocolFactory) -> Deferred:
        refusals: list[tuple[str, str]] = []
        base = self._name_resolver if self._name_resolver is not None else self._reactor.nameResolver
        reactor = _ReactorWithResolver(self._reactor, _GuardedNameResolver(base, self._filter, refusals))
        endpoint = HostnameEndpoint(reactor, self._host, self._port, timeout=self._timeout)

        def failed(failure: Failure) -> Failure:
            if refusals and failure.check(DNSLookupError):
                raise OutboundError(FailureKind.REFUSED, "connect", _refusal_text(refusals))
            return failure

        return endpoint.connect(protocolFactory).addErrback(failed)


def _refusal_text(refusals: list[tuple[str, str]]) -> str:
    return "; ".join(f"refusing to connect to {address} (blocked by {rule})" for address, rule in refusals)


# -- error classification ----------------------------------------------------------------


def classify_failure(failure: Failure) -> Failure:
    """Turn transport failures into an OutboundError of the right kind, with a useful step."""
    if failure.check(OutboundError, CancelledError):
        return failure
    error = as_outbound(failure)
    if error is None:
        return failure
    raise error


def as_outbound(failure: Failure) -> Optional[OutboundError]:
    if failure.check(OutboundError):
        return failure.value
    why = reason(failure.value)
    if failure.check(DNSLookupError):
        return OutboundError(FailureKind.RESOLVE, "resolve", failure.getErrorMessage(), reason=why)
    if failure.check(ConnectError):
        return OutboundError(FailureKind.CONNECT, "connect", describe(failure), reason=why)
    if failure.check(SSL.Error, VerificationError):
        return OutboundError(FailureKind.TLS, "tls", describe(failure), reason=why)
    for inner in getattr(failure.value, "reasons", None) or ():
        if isinstance(inner, Failure) and inner.check(SSL.Error, VerificationError):
            return OutboundError(FailureKind.TLS, "tls", describe(inner), reason=reason(inner.value))
    return None


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ConnectionGuard:
    """How every homeserver connection is made, held once for the agents that make them.

    ``is_trusted`` names the full-access homeservers, which the IP filter does not apply
    to (they may well live on a private network); ``name_resolver`` replaces the
    reactor's for tests and the doctor.
    """

    reactor: Any
    tls_policy: TLSPolicy
    ip_filter: Optional[IPRangeFilter]
    is_trusted: Callable[[str], bool]
    connect_timeout: float
    name_resolver: Any = None

    def endpoint(self, host: str, port: int, *, trusted: bool) -> GuardedHostnameEndpoint:
        """A TCP endpoint to ``host:port``; its addresses pass the IP filter unless ``trusted``."""
        return GuardedHostnameEndpoint(
            self.reactor,
            host,
            port,
            ip_filter=None if trusted else self.ip_filter,
            connect_timeout=self.connect_timeout,
            name_resolver=self.name_resolver,
        )
