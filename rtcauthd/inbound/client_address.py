"""Who is asking: the TCP peer, or — behind a trusted reverse proxy — the client it names.

Rate limits and the access log key on this address. A forwarding header is believed only
when the peer itself is a trusted proxy (``RTCAUTH_TRUSTED_PROXIES``, default loopback),
and then only from the right: each trusted hop is skipped and the right-most address
that is not a trusted proxy is the client, so a client cannot pick its own address by
sending the header itself (the proxy appends the peer it saw). ``Forwarded`` (RFC 7239)
wins over ``X-Forwarded-For`` when both are present. Written here because no library
Twisted daemons use does this (Synapse's ``XForwardedForRequest`` trusts the header whole).
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Optional, Union

from twisted.logger import Logger
from twisted.web.iweb import IRequest

log = Logger()

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

#: What RTCAUTH_TRUSTED_PROXIES defaults to: a reverse proxy on the same host.
DEFAULT_TRUSTED_PROXIES = ("127.0.0.0/8", "::1/128")
#: The request attribute the resolved address is kept in, for the access log.
ATTRIBUTE = "rtcauth_client"
#: /healthz answers with the address the rate limit uses for the caller (docs/endpoints.md#rate-limits).
CLIENT_ADDRESS_HEADER = b"X-Rtcauth-Client-Address"
#: Forwarding chains longer than this are cut from the left (a proxy appends on the right).
MAX_HOPS = 32


def parse_address(text: str) -> Optional[IPAddress]:
    """An address from a header element: ``1.2.3.4``, ``1.2.3.4:80``, ``[::1]:80``, ``::1``."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _forwarded_for(value: str) -> list[str]:
    """The ``for=`` elements of an RFC 7239 ``Forwarded`` header value, left to right."""
    hops = []
    for element in value.split(","):
        for pair in element.split(";"):
            name, _, item = pair.strip().partition("=")
            if name.strip().lower() == "for":
                hops.append(item.strip())
    return hops


def _header_values(request: IRequest, name: bytes) -> list[str]:
    raw = request.requestHeaders.getRawHeaders(name) or []
    return [value.decode("latin-1") if isinstance(value, bytes) else value for value in raw]


class ClientAddresses:
    """Resolves and remembers the client address of each request (see the module docstring)."""

    def __init__(self, trusted_proxies: Iterable[str] = DEFAULT_TRUSTED_PROXIES) -> None:
        self._trusted = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in trusted_proxies)
        self._warned_no_header = False

    def is_trusted(self, address: Optional[IPAddress]) -> bool:
        return address is not None and any(address in network for network in self._trusted)

    def client_of(self, request: IRequest) -> str:
        """The client's address as text; computed once per request."""
        known = getattr(request, ATTRIBUTE, None)
        if known is not None:
            return known
        client = self._resolve(request)
        setattr(request, ATTRIBUTE, client)
        return client

    def _resolve(self, request: IRequest) -> str:
        peer = request.getClientAddress()
        host = getattr(peer, "host", None)
        if not host:
            # A unix socket: only a local proxy can be there, so it is trusted like loopback.
            peer_text, peer_address = "unix", None
        else:
            peer_address = parse_address(host)
            peer_text = str(peer_address) if peer_address is not None else host
            if not self.is_trusted(peer_address):
                return peer_text
        hops = self._forwarding_chain(request)
        if not hops:
            self._warn_no_header(peer_text)
            return peer_text
        client = peer_text
        for hop in reversed(hops[-MAX_HOPS:]):
            address = parse_address(hop)
            if address is None:
                # "unknown" or an obfuscated name: stay with the last hop we can vouch for.
                return client
            client = str(address)
            if not self.is_trusted(address):
                return client
        return client

    def _forwarding_chain(self, request: IRequest) -> list[str]:
        forwarded = _header_values(request, b"Forwarded")
        if forwarded:
            return [hop for value in forwarded for hop in _forwarded_for(value)]
        return [
            hop.strip() for value in _header_values(request, b"X-Forwarded-For") for hop in value.split(",") if hop.strip()
        ]

    def _warn_no_header(self, peer: str) -> None:
        if self._warned_no_header:
            return
        self._warned_no_header = True
        log.warn(
            "Requests from the trusted proxy {peer} carry no X-Forwarded-For or Forwarded header, so "
            "all clients behind it share one rate-limit bucket. nginx: "
            "'proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;' (Caddy sends it by default). "
            "If {peer} is not a proxy, this is harmless; RTCAUTH_TRUSTED_PROXIES names the proxies.",
            peer=peer,
        )
