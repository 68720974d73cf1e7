"""Which IP addresses federation traffic may connect to (SSRF guard).

Why: the server name in an OpenID request is chosen by an anonymous client, so without
a filter anyone could make rtcauthd open connections to its own loopback, the LAN or a
cloud metadata service. The filter is applied to every address actually connected to
(see federation_agent.py), never to names, so DNS rebinding does not get around it.

IPv6 addresses that carry an IPv4 address (IPv4-mapped ``::ffff:0:0/96``, NAT64
``64:ff9b::/96`` and 6to4 ``2002::/16``) are judged by the embedded IPv4 address as
well: ``::ffff:10.0.0.5`` is refused by ``10.0.0.0/8``. These prefixes are not refused
wholesale, because on an IPv6-only host with DNS64 every IPv4-only homeserver is
reached through ``64:ff9b::/96``.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Optional, Sequence, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: Ranges refused unless allow-listed (first match is the one named in refusals).
DEFAULT_BLOCKLIST: tuple[str, ...] = (
    # IPv4
    "0.0.0.0/8",  # "this network", includes the unspecified address
    "10.0.0.0/8",  # RFC 1918
    "100.64.0.0/10",  # carrier-grade NAT
    "127.0.0.0/8",  # loopback
    "169.254.169.254/32",  # cloud metadata service (also inside 169.254.0.0/16)
    "169.254.0.0/16",  # link-local
    "172.16.0.0/12",  # RFC 1918
    "192.0.0.0/24",  # IETF protocol assignments
    "192.0.2.0/24",  # documentation (TEST-NET-1)
    "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
    "192.168.0.0/16",  # RFC 1918
    "198.18.0.0/15",  # benchmarking
    "198.51.100.0/24",  # documentation (TEST-NET-2)
    "203.0.113.0/24",  # documentation (TEST-NET-3)
    "224.0.0.0/4",  # multicast
    "255.255.255.255/32",  # limited broadcast (also inside 240.0.0.0/4)
    "240.0.0.0/4",  # reserved
    # IPv6
    "::1/128",  # loopback
    "::/128",  # unspecified
    "100::/64",  # discard-only
    "2001:db8::/32",  # documentation
    "fd00:ec2::254/128",  # AWS metadata service (also inside fc00::/7)
    "fc00::/7",  # unique local
    "fe80::/10",  # link-local
    "fec0::/10",  # site-local (deprecated)
    "ff00::/8",  # multicast
)

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def parse_cidr_list(text: Optional[str], variable_name: str) -> list[str]:
    """Parse a comma-separated list of CIDRs (bare addresses mean /32 or /128).

    Returns normalised CIDR strings; raises ValueError with a one-line message naming
    ``variable_name`` for the first bad entry.
    """
    if text is None:
        return []
    result = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        result.append(str(_network(entry, variable_name)))
    return result


def _network(entry: str, what: str) -> IPNetwork:
    try:
        if "%" in entry:  # zone IDs make no sense in a range
            raise ValueError(entry)
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        raise ValueError(f'{what}: "{entry}" is not an IP address or CIDR range') from None


def _networks(entries: Iterable[str], what: str) -> list[IPNetwork]:
    return [_network(entry.strip(), what) for entry in entries]


def _embedded_ipv4(address: IPAddress) -> Optional[ipaddress.IPv4Address]:
    """The IPv4 address an IPv6 address would actually reach, if any."""
    if address.version != 6:
        return None
    if address in _MAPPED:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


#: Addresses whose verdict is remembered before the memo starts over.
VERDICT_CACHE_SIZE = 4096


class IPRangeFilter:
    """Decides whether an address may be connected to: allowlist first, then blocklist."""

    def __init__(
        self,
        blocklist: Sequence[str] = DEFAULT_BLOCKLIST,
        allowlist: Sequence[str] = (),
    ) -> None:
        self._block = _networks(blocklist, "IP range blocklist")
        self._allow = _networks(allowlist, "IP range allowlist")
        #: Verdicts by address text: the lists never change, and a pooled connection's
        #: address is checked again on every reuse. Bounded (addresses come from DNS).
        self._verdicts: dict[str, Optional[str]] = {}

    def check(self, ip: str) -> Optional[str]:
        """None if ``ip`` may be connected to, else the rule (CIDR text) refusing it."""
        try:
            return self._verdicts[ip]
        except KeyError:
            pass
        verdict = self._check(ip)
        if len(self._verdicts) >= VERDICT_CACHE_SIZE:
            self._verdicts.clear()
        self._verdicts[ip] = verdict
        return verdict

    def _check(self, ip: str) -> Optional[str]:
        try:
            address = ipaddress.ip_address(ip.strip("[]"))
        except ValueError:
            return "unparseable address"
        candidates: list[IPAddress] = [address]
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            candidates.append(embedded)
        for candidate in candidates:
            if _matching(candidate, self._allow) is not None:
                return None
        for candidate in candidates:
            rule = _matching(candidate, self._block)
            if rule is not None:
                return str(rule)
        return None

    def __repr__(self) -> str:
        return f"IPRangeFilter(blocklist={len(self._block)} ranges, allowlist={[str(n) for n in self._allow]})"


def _matching(address: IPAddress, networks: list[IPNetwork]) -> Optional[IPNetwork]:
    for network in networks:
        if network.version == address.version and address in network:
            return network
    return None
