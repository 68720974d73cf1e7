"""``LIVEKIT_REDIS_URL``: go-redis URL forms parsed into a :class:`RedisTarget`.

The accepted forms, the ignored go-redis options and the error texts follow go-redis
``ParseURL`` so that an upstream configuration keeps working and fails the same way. The
password never appears in a message or a ``repr``. :func:`url_syntax_error` and
:func:`with_password` are the start-up half (``LIVEKIT_REDIS_PASSWORD``,
docs/configuration.md#redis-password).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Optional
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import attr

from rtcauthd.gojson import go_quote

__all__ = [
    "DEFAULT_PORT",
    "RedisTarget",
    "RedisURLError",
    "parse_redis_url",
    "redact_url",
    "url_syntax_error",
    "with_password",
]

DEFAULT_PORT = 6379


class RedisURLError(ValueError):
    """``LIVEKIT_REDIS_URL`` cannot be used; the message is upstream's, minus the password."""

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(f"store: invalid Redis URL {go_quote(redact_url(url))}: {detail}")
        self.detail = detail


@attr.s(frozen=True, slots=True, auto_attribs=True)
class RedisTarget:
    """Where and how to connect, parsed from a go-redis style URL."""

    transport: str  # "tcp", "tls" or "unix"
    host: str = ""
    port: int = DEFAULT_PORT
    path: str = ""
    db: int = 0
    username: str = ""
    password: str = attr.ib(default="", repr=False)
    skip_verify: bool = False
    redacted: str = ""
    #: RTCAUTH_REDIS_SENTINELS / _MASTER: ask these for the master instead of host:port
    sentinels: tuple = ()
    sentinel_master: str = ""

    @property
    def address(self) -> str:
        """For log lines; never contains the password."""
        if self.sentinels:
            return f"Sentinel master {self.sentinel_master!r}"
        if self.transport == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``xxxxx`` (as Go's ``URL.Redacted``)."""
    scheme_end = url.find("://")
    if scheme_end < 0:
        return url
    start = scheme_end + 3
    end = len(url)
    for stop in "/?#":
        i = url.find(stop, start)
        if i >= 0:
            end = min(end, i)
    at = url.rfind("@", start, end)  # the userinfo ends at the last "@" of the authority
    colon = url.find(":", start, at) if at >= 0 else -1
    if colon < 0:
        return url
    return url[: colon + 1] + "xxxxx" + url[at:]


# go-redis query options: accepted so that upstream URLs keep working; only ``db`` and
# ``skip_verify`` mean anything here (timeouts and pool sizes are rtcauthd's own).
_KNOWN_OPTIONS = frozenset(
    {
        "db",
        "protocol",
        "client_name",
        "max_retries",
        "min_retry_backoff",
        "max_retry_backoff",
        "dial_timeout",
        "read_timeout",
        "write_timeout",
        "pool_fifo",
        "pool_size",
        "pool_timeout",
        "min_idle_conns",
        "max_idle_conns",
        "max_active_conns",
        "conn_max_idle_time",
        "conn_max_lifetime",
        "idle_timeout",
        "idle_check_frequency",
        "max_conn_age",
        "skip_verify",
        "context_timeout_enabled",
        "identity_suffix",
        "unstable_resp3",
        "disable_identity",
    }
)
_ATOI = re.compile(r"[+-]?[0-9]+", re.ASCII)
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def _atoi(text: str) -> Optional[int]:
    return int(text) if _ATOI.fullmatch(text) else None


def parse_redis_url(url: str) -> RedisTarget:
    """Parse ``redis://``, ``rediss://`` or ``unix://`` the way go-redis ``ParseURL`` does.

    ``redis://[[user]:password@]host[:port][/db]``, ``rediss://…`` (TLS),
    ``unix://[[user]:password@]/path?db=N``. Raises :class:`RedisURLError`.
    """
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise RedisURLError(url, f"parse error: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise RedisURLError(url, f"redis: invalid URL scheme: {parts.scheme}")

    username = unquote(parts.username or "")
    password = unquote(parts.password or "")
    query_db: Optional[int] = None
    skip_verify = False
    seen: set[str] = set()
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in _KNOWN_OPTIONS:
            raise RedisURLError(url, f"redis: unexpected option: {name}")
        if name in seen:
            continue  # go-redis reads the first value of each option
        seen.add(name)
        if name == "db" and value != "":
            number = _atoi(value)
            if number is None:
                raise RedisURLError(
                    url, f'redis: invalid database number: strconv.Atoi: parsing "{value}": invalid syntax'
                )
            query_db = number
        elif name == "skip_verify" and value != "":
            if value in _TRUE:
                skip_verify = True
            elif value not in _FALSE:
                raise RedisURLError(url, f'redis: invalid skip_verify boolean value: "{value}"')

    if scheme == "unix":
        if not parts.path.strip():
            raise RedisURLError(url, "redis: empty unix socket path")
        return RedisTarget(
            transport="unix",
            path=unquote(parts.path),
            db=query_db or 0,
            username=username,
            password=password,
            redacted=redact_url(url),
        )

    try:
        port = parts.port
    except ValueError:
        raise RedisURLError(url, "invalid port after host") from None
    host = parts.hostname or "localhost"
    segments = [s for s in parts.path.split("/") if s]
    db = 0
    if len(segments) == 1:
        number = _atoi(segments[0])
        if number is None:
            raise RedisURLError(url, f'redis: invalid database number: "{segments[0]}"')
        db = number
    elif len(segments) > 1:
        raise RedisURLError(url, f"redis: invalid URL path: {parts.path}")
    if query_db is not None:  # ?db= wins over the path, as in go-redis
        db = query_db
    return RedisTarget(
        transport="tls" if scheme == "rediss" else "tcp",
        host=host,
        port=port if port is not None else DEFAULT_PORT,
        db=db,
        username=username,
        password=password,
        skip_verify=skip_verify and scheme == "rediss",
        redacted=redact_url(url),
    )


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
# WHATWG forbidden host code points ("%" aside: it is allowed in an opaque host).
_FORBIDDEN_HOST = frozenset("\x00\t\n\r #/<>?@[\\]^|")
_SPECIAL_SCHEMES = frozenset({"http", "https", "ws", "wss", "ftp", "file"})
# Kept literal in userinfo; everything else is percent-encoded (RFC 3986 sub-delims).
_USERINFO_SAFE = "!$&'()*+,"


def _authority(url: str) -> Optional[tuple[int, int]]:
    """Start and end of the authority in ``scheme://authority/...``; None without ``//``."""
    match = _SCHEME.match(url)
    if match is None or not url.startswith("//", match.end()):
        return None
    start = match.end() + 2
    end = len(url)
    for stop in "/?#":
        i = url.find(stop, start)
        if i >= 0:
            end = min(end, i)
    return start, end


def _split_host_port(hostport: str) -> tuple[str, Optional[str]]:
    if hostport.startswith("["):
        close = hostport.find("]")
        if close < 0:
            return hostport, None
        rest = hostport[close + 1 :]
        return hostport[: close + 1], rest[1:] if rest.startswith(":") else (rest or None)
    host, sep, port = hostport.partition(":")
    return host, port if sep else None


def url_syntax_error(url: str) -> Optional[str]:
    """Why ``url`` is not a URL at all (upstream parses it at start-up), else None.

    Only syntax: whether it is a usable Redis URL is :func:`parse_redis_url`'s question, at
    connect time as before. Texts are those of the URL parser upstream uses.
    """
    match = _SCHEME.match(url)
    if match is None:
        return "relative URL without a base"
    span = _authority(url)
    if span is None:
        return None
    authority = url[span[0] : span[1]]
    hostport = authority[authority.rfind("@") + 1 :]
    host, port = _split_host_port(hostport)
    if host.startswith("["):
        try:
            if not host.endswith("]"):
                raise ValueError
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return "invalid IPv6 address"
    elif any(ch in _FORBIDDEN_HOST for ch in host):
        return "invalid domain character"
    elif host == "" and match.group()[:-1].lower() in _SPECIAL_SCHEMES - {"file"}:
        return "empty host"
    if port is not None and port != "":
        if not port.isascii() or not port.isdigit() or int(port) > 65535:
            return "invalid port number"
    return None


def with_password(url: str, password: str) -> Optional[str]:
    """``url`` with its password set to ``password`` (user name kept, old password
    replaced), or None when the URL has no host to carry one (``unix:///path``).

    Every character outside RFC 3986's unreserved and sub-delims is percent-encoded, ``%``
    included, so :func:`parse_redis_url` hands Redis the password exactly as configured.
    """
    span = _authority(url)
    if span is None:
        return None
    start, end = span
    authority = url[start:end]
    at = authority.rfind("@")
    hostport = authority[at + 1 :]
    host, _ = _split_host_port(hostport)
    if host == "":
        return None
    username = authority[:at].partition(":")[0] if at >= 0 else ""
    encoded = quote(password.encode("utf-8", "surrogateescape"), safe=_USERINFO_SAFE)
    userinfo = f"{username}:{encoded}"
    return f"{url[:start]}{userinfo}@{hostport}{url[end:]}"


def redis_password(url: str) -> str:
    """The password a Redis URL carries ("" without one), for the log scrubber."""
    try:
        return unquote(urlsplit(url).password or "")
    except ValueError:
        return ""
