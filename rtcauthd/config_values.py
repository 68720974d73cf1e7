"""One setting's value, checked: listen addresses, CIDR lists, CS-API overrides, numbers.

Pure functions; each bad value is a :class:`ConfigError` with the one line the operator
sees (upstream's text where upstream has one). :mod:`rtcauthd.config` calls them from its
settings table; the healthcheck reuses ``bind_to_endpoints``.
"""

from __future__ import annotations

import ipaddress
import math
import re

from rtcauthd.config_sources import ConfigError
from rtcauthd.gojson import go_quote


def parse_cs_api_overrides(value: str) -> dict[str, str]:
    """``server=url`` entries separated by commas; any malformed entry is fatal (docs/delegated-leave.md#client-server-api)."""
    overrides: dict[str, str] = {}
    if value == "":
        return overrides
    for entry in value.split(","):
        server, sep, url = entry.partition("=")
        server, url = server.strip(), url.strip()
        if not sep or not server or not url:
            raise ConfigError(
                f"failed parsing LIVEKIT_CS_API_URL_OVERRIDES: invalid entry {go_quote(entry)}, "
                "expected server_name=url"
            )
        overrides[server] = url
    return overrides


def parse_cidrs(variable: str, value: str) -> tuple[str, ...]:
    """Comma-separated CIDRs (bare addresses allowed); one bad entry is fatal."""
    from rtcauthd.matrix.ipfilter import parse_cidr_list

    try:
        return tuple(parse_cidr_list(value, variable))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def bind_to_endpoints(bind: str, variable: str = "LIVEKIT_JWT_BIND") -> tuple[str, ...]:
    """Map a Go listen address (``host:port``, ``:port``, ``[v6]:port``) onto endpoint strings.

    ``:port`` means every interface of both families, so it becomes a dual-stack ``::``
    listener (the listener service falls back to IPv4 ``0.0.0.0`` on IPv4-only hosts).
    ``localhost`` binds 127.0.0.1, the address Go's listener picks for it.
    """
    host, sep, port = bind.rpartition(":")
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise ConfigError(f"{variable}: {go_quote(bind)} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host in ("", "::"):
        return (f"tcp6:{port}:interface=\\:\\:",)
    if host == "localhost":
        return (f"tcp:{port}:interface=127.0.0.1",)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"{variable}: {go_quote(bind)}: the host must be an IP address, localhost or empty"
        ) from None
    if address.version == 6:
        return (f"tcp6:{port}:interface={str(address).replace(':', chr(92) + ':')}",)
    return (f"tcp:{port}:interface={address}",)


def metrics_endpoint(value: str) -> str:
    """``RTCAUTH_METRICS_LISTEN``: a port alone means loopback; anything else is an endpoint."""
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,5}", value):
        return f"tcp:{value}:interface=127.0.0.1"
    return value


def number(variable: str, value: str, default: float, kind: type, *, zero_allowed: bool = False) -> float:
    """``value`` as ``kind``, ``default`` when empty; anything else is a one-line ConfigError."""
    if value == "":
        return default
    try:
        number = kind(value)
    except ValueError:
        number = -1
    if not math.isfinite(number) or number < 0 or (number == 0 and not zero_allowed):
        wanted = "a number >= 0" if zero_allowed else "a positive number"
        raise ConfigError(f"{variable} must be {wanted}, got {go_quote(value)}")
    return number


def host_port_list(variable: str, value: str) -> tuple[tuple[str, int], ...]:
    """``host:port,[v6]:port`` (comma or space separated) as (host, port) pairs."""
    pairs = []
    for item in value.replace(",", " ").split():
        host, sep, port = item.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{variable}: {item!r} is not host:port")
        pairs.append((host, int(port)))
    return tuple(pairs)
