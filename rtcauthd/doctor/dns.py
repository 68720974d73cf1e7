"""DNS for ``rtcauth doctor``: raw A/AAAA/SRV answers, and name resolution for its connections.

Why twisted.names rather than getaddrinfo: the DNS check has to tell "no such name" from
"the name exists but has no address" (a ``*`` wildcard does not cover the zone apex), and
``--dns-server HOST:PORT`` must steer *every* connection doctor makes, so that tests and
staging users can point real-looking names at loopback without touching /etc/hosts.
Every query is bounded: the per-try timeouts given to twisted.names add up to less than
the doctor's ``--timeout``.
"""

from __future__ import annotations

import re
import socket
from typing import Optional, Sequence

import attr
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, TimeoutError as DeferTimeout, gatherResults
from twisted.internet.interfaces import IHostnameResolver
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import (
    DNSNameError,
    DNSQueryRefusedError,
    DNSQueryTimeoutError,
    DNSServerError,
)
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

DNS_PORT = 53
RESOLV_CONF = "/etc/resolv.conf"

_KINDS = {"A": dns.A, "AAAA": dns.AAAA}
_LOOKUPS = {"A": "lookupAddress", "AAAA": "lookupIPV6Address"}
from rtcauthd.matrix.guarded_connect import HostResolution


class DNSServerSyntaxError(ValueError):
    """``--dns-server`` is not ``HOST`` or ``HOST:PORT`` with an IP address as host."""


def parse_dns_server(text: str) -> tuple[str, int]:
    """``127.0.0.1``, ``127.0.0.1:5353``, ``::1``, ``[::1]:5353`` → (ip, port)."""
    text = text.strip()
    host, port = text, DNS_PORT
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise DNSServerSyntaxError(f"{text!r}: unbalanced '['")
        host, rest = text[1:close], text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise DNSServerSyntaxError(f"{text!r}: expected :PORT after ]")
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _port(port_text, text)
    if not (isIPAddress(host) or isIPv6Address(host)):
        raise DNSServerSyntaxError(f"{text!r}: the DNS server must be an IP address (HOST:PORT)")
    return host, port


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise DNSServerSyntaxError(f"{whole!r}: {text!r} is not a port number")
    return int(text)


def system_dns_servers(path: str = RESOLV_CONF) -> list[tuple[str, int]]:
    """The ``nameserver`` lines of resolv.conf (glibc's default, 127.0.0.1, if none).

    Read once here instead of handing the path to twisted.names, which would start a
    re-read timer that outlives the report.
    """
    servers: list[tuple[str, int]] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                match = re.match(r"\s*nameserver\s+(\S+)", line)
                if match:
                    address = match.group(1).split("%", 1)[0]
                    if isIPAddress(address) or isIPv6Address(address):
                        servers.append((address, DNS_PORT))
    except OSError:
        pass
    return servers or [("127.0.0.1", DNS_PORT)]


def query_timeouts(timeout: float) -> tuple[float, ...]:
    """Per-try timeouts for twisted.names: one quick retry, 80 % of ``timeout`` in total."""
    return (timeout * 0.2, timeout * 0.6)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Answer:
    """The addresses of one name and record type, or why there are none.

    ``error`` is None for a normal answer (which may be empty: the name exists but has no
    record of this type); ``nxdomain`` says the name does not exist at all.
    """

    name: str
    kind: str  # "A" or "AAAA"
    addresses: tuple[str, ...] = ()
    nxdomain: bool = False
    error: Optional[str] = None

    @property
    def nodata(self) -> bool:
        return not self.addresses and not self.nxdomain and self.error is None

    def describe_absence(self) -> str:
        if self.error is not None:
            return f"{self.kind} lookup failed ({self.error})"
        if self.nxdomain:
            return "no such name (NXDOMAIN)"
        return f"no {self.kind} record"


def _describe_dns_failure(failure: Failure) -> str:
    if failure.check(DNSQueryTimeoutError, DeferTimeout):
        return "the DNS server did not answer in time"
    if failure.check(DNSServerError):
        return "SERVFAIL"
    if failure.check(DNSQueryRefusedError):
        return "REFUSED"
    value = failure.value
    return f"{type(value).__name__}: {value}" if str(value) else type(value).__name__


def _address_of(record) -> Optional[str]:
    if record.type == dns.A:
        return record.payload.dottedQuad()
    if record.type == dns.AAAA:
        return socket.inet_ntop(socket.AF_INET6, record.payload.address)
    return None


class DNSClient:
    """A twisted.names resolver on given servers, with doctor's bounded timeouts."""

    def __init__(
        self, *, reactor, servers: Sequence[tuple[str, int]], timeout: float, _resolver=None
    ) -> None:
        if _resolver is None:
            from twisted.names.client import Resolver

            _resolver = Resolver(servers=list(servers), reactor=reactor)
        self._resolver = _resolver
        self._timeouts = query_timeouts(timeout)
        self.servers = tuple(servers)

    def lookup(self, name: str, kind: str) -> "Deferred[Answer]":
        """A or AAAA records of ``name``; never fails (problems are in the Answer)."""
        qtype = _KINDS[kind]
        d = getattr(self._resolver, _LOOKUPS[kind])(name, timeout=self._timeouts)

        def got(result) -> Answer:
            answers, _authority, _additional = result
            found = tuple(
                address
                for address in (_address_of(r) for r in answers if r.type == qtype)
                if address is not None
            )
            return Answer(name=name, kind=kind, addresses=found)

        def failed(failure: Failure) -> Answer:
            if failure.check(DNSNameError):
                return Answer(name=name, kind=kind, nxdomain=True)
            return Answer(name=name, kind=kind, error=_describe_dns_failure(failure))

        return d.addCallbacks(got, failed)

    def addresses(self, name: str) -> "Deferred[tuple[Answer, Answer]]":
        """(A answer, AAAA answer), looked up concurrently."""
        return gatherResults([self.lookup(name, "A"), self.lookup(name, "AAAA")]).addCallback(tuple)

    def lookupService(self, name, timeout=None):
        """SRV lookup for the federation resolver, with doctor's timeouts (not its own)."""
        return self._resolver.lookupService(name, timeout=self._timeouts)


@implementer(IHostnameResolver)
class NamesHostnameResolver:
    """IHostnameResolver over :class:`DNSClient`, so connections use ``--dns-server`` too.

    IPv6 addresses are delivered first, as getaddrinfo usually orders them; the
    HostnameEndpoint then races the families (happy eyeballs).
    """

    def __init__(self, dns_client: DNSClient) -> None:
        self._dns = dns_client

    def resolveHostName(
        self, resolutionReceiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"
    ):
        if isinstance(hostName, bytes):
            hostName = hostName.decode("ascii")
        receiver = resolutionReceiver
        receiver.resolutionBegan(HostResolution(hostName))
        wanted = tuple(addressTypes) if addressTypes else (IPv4Address, IPv6Address)

        def deliver(addresses: list[tuple[type, str]]) -> None:
            for kind, address in addresses:
                if kind in wanted:
                    receiver.addressResolved(kind("TCP", address, portNumber))
            receiver.resolutionComplete()

        if isIPv6Address(hostName):
            deliver([(IPv6Address, hostName)])
            return receiver
        if isIPAddress(hostName):
            deliver([(IPv4Address, hostName)])
            return receiver

        def got(answers: tuple[Answer, Answer]) -> None:
            v4, v6 = answers
            deliver([(IPv6Address, a) for a in v6.addresses] + [(IPv4Address, a) for a in v4.addresses])

        def failed(failure: Failure) -> None:
            log.failure("Resolving {name} crashed", failure, name=hostName)
            receiver.resolutionComplete()

        self._dns.addresses(hostName).addCallbacks(got, failed)
        return receiver


__all__ = [
    "Answer",
    "DNSClient",
    "DNSServerSyntaxError",
    "NamesHostnameResolver",
    "parse_dns_server",
    "query_timeouts",
    "system_dns_servers",
]
