"""``LIVEKIT_REDIS_URL``: go-redis URL forms parsed into a :class:`RedisTarget`.

The accepted forms, the ignored go-redis options and the error texts follow go-redis
``ParseURL`` so that an upstream configuration keeps working and fails the same way. The
password never appears in a message or a ``repr``.
"""

from __future__ import annotations

import re
from typing import Optional
from urllib.parse import parse_qsl, unquote, urlsplit

import attr

from rtcauthd.gojson import go_quote

__all__ = ["DEFAULT_PORT", "RedisTarget", "RedisURLError", "parse_redis_url", "redact_url"]

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

    @property
    def address(self) -> str:
        """For log lines; never contains the password."""
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
