"""Matrix server names: parse and validate before any network call (docs/federation.md#server-names).

Why strict: the server name comes straight from an unauthenticated request body and
ends up in DNS queries, URLs, ``Host`` headers and TLS checks. The grammar is the
Matrix spec's (``host[:port]`` with an IPv4 literal, a bracketed IPv6 literal or a DNS
name of ``A-Z a-z 0-9 - .``); on top of it we refuse names that cannot possibly be
resolved (empty, over-long or hyphen-edged labels, ``xn--`` labels that are not valid
IDNA) — every such name would only cost a DNS query to fail — and names that look like numeric IPv4 but are not
a valid dotted quad, because resolvers (glibc ``inet_aton``) may read ``127.1`` or
``2130706433`` as an address.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Optional

import attr
import idna

MAX_HOST_LENGTH = 255
MAX_LABEL_LENGTH = 63
MAX_PORT = 65535

_DNS_CHARS = re.compile(r"[A-Za-z0-9.\-]+")
_PORT = re.compile(r"[0-9]{1,5}")
# A final label that is a decimal or hexadecimal number makes the name look like an
# IPv4 literal to inet_aton-style parsers; real top-level domains never look like that.
_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0[xX][0-9A-Fa-f]*)")


class InvalidServerName(ValueError):
    """The string is not a Matrix server name; ``reason`` says why (safe to log)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ServerName:
    """A validated server name.

    ``host`` is the hostname or IP address (IPv6 without brackets), ``port`` the
    explicit port or None, ``original`` the exact string given (what ``sub`` and the
    full-access list are compared against).
    """

    host: str
    port: Optional[int]
    is_ip: bool
    original: str

    @property
    def is_ipv6(self) -> bool:
        return self.is_ip and ":" in self.host

    @property
    def bracketed_host(self) -> str:
        """The host as it appears in a URL authority (IPv6 in brackets)."""
        return f"[{self.host}]" if self.is_ipv6 else self.host

    def __str__(self) -> str:
        return self.original


#: Valid names remembered (each token request names one; attacker-chosen, so bounded).
PARSED_CACHE_SIZE = 4096


def parse_server_name(name: str) -> ServerName:
    """Parse ``host[:port]``; raise :class:`InvalidServerName` for anything else.

    Valid names are remembered (LRU, :data:`PARSED_CACHE_SIZE`): a token request
    parses its server name in more than one layer, and most requests name a few servers.
    """
    if type(name) is not str:
        if not isinstance(name, str):
            raise InvalidServerName("server name is not a string")
        name = str(name)
    return _parse_cached(name)


@functools.lru_cache(maxsize=PARSED_CACHE_SIZE)
def _parse_cached(name: str) -> ServerName:
    if name == "":
        raise InvalidServerName("server name is empty")
    if not name.isascii():
        raise InvalidServerName("server name contains non-ASCII characters")

    if name.startswith("["):
        close = name.find("]")
        if close < 0:
            raise InvalidServerName("unbalanced '[' in server name")
        literal = name[1:close]
        rest = name[close + 1 :]
        host = _parse_ipv6(literal)
        port = _parse_port_suffix(rest)
        return ServerName(host=host, port=port, is_ip=True, original=name)

    if "]" in name:
        raise InvalidServerName("unbalanced ']' in server name")

    host, sep, port_text = name.rpartition(":")
    if not sep:
        host, port = name, None
    else:
        if ":" in host:
            raise InvalidServerName("IPv6 literals must be enclosed in brackets")
        port = _parse_port(port_text)
    if host == "":
        raise InvalidServerName("server name has an empty host")

    if _looks_numeric(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise InvalidServerName(f"{host!r} looks like an IPv4 address but is not one") from None
        return ServerName(host=host, port=port, is_ip=True, original=name)

    _check_dns_name(host)
    return ServerName(host=host, port=port, is_ip=False, original=name)


def _parse_ipv6(literal: str) -> str:
    if literal == "":
        raise InvalidServerName("empty IPv6 literal")
    if "%" in literal:
        raise InvalidServerName("IPv6 zone identifiers are not allowed in server names")
    try:
        ipaddress.IPv6Address(literal)
    except ValueError:
        raise InvalidServerName(f"[{literal}] is not an IPv6 address") from None
    return literal


def _parse_port_suffix(rest: str) -> Optional[int]:
    if rest == "":
        return None
    if not rest.startswith(":"):
        raise InvalidServerName("unexpected characters after the IPv6 literal")
    return _parse_port(rest[1:])


def _parse_port(text: str) -> int:
    if not _PORT.fullmatch(text):
        raise InvalidServerName(f"port {text!r} is not a decimal number of 1-5 digits")
    port = int(text)
    if not 1 <= port <= MAX_PORT:
        raise InvalidServerName(f"port {port} is out of range 1-{MAX_PORT}")
    return port


def _looks_numeric(host: str) -> bool:
    last = host.rsplit(".", 1)[-1]
    return bool(_NUMERIC_LABEL.fullmatch(last))


def _valid_a_label(label: str) -> bool:
    """An ``xn--`` label must decode to a valid internationalised label (RFC 5891)."""
    try:
        idna.decode(label)
    except (idna.IDNAError, UnicodeError, ValueError):
        return False
    return True


def _check_dns_name(host: str) -> None:
    if len(host) > MAX_HOST_LENGTH:
        raise InvalidServerName(f"hostname is longer than {MAX_HOST_LENGTH} characters")
    if not _DNS_CHARS.fullmatch(host):
        raise InvalidServerName("hostname may only contain A-Z, a-z, 0-9, '-' and '.'")
    for label in host.split("."):
        if label == "":
            raise InvalidServerName("hostname has an empty label")
        if len(label) > MAX_LABEL_LENGTH:
            raise InvalidServerName(f"hostname has a label longer than {MAX_LABEL_LENGTH} characters")
        if label.startswith("-") or label.endswith("-"):
            raise InvalidServerName(f"hostname label {label!r} starts or ends with '-'")
        if label[:4].lower() == "xn--" and not _valid_a_label(label):
            raise InvalidServerName(f"hostname label {label!r} is not valid punycode (IDNA)")
