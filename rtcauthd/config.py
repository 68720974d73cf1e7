"""Configuration: lk-jwt-service's environment variables, parsed purely (no I/O of our own).

``load_config(environ, read_file=...)`` returns a frozen :class:`Config` or raises
:class:`ConfigError` whose message is the one line an operator sees before the process exits
with status 1. Parsing order, defaults and messages follow upstream (protocol.md §14) so that
an operator can swap services without touching their environment file. Additions are prefixed
``RTCAUTH_`` and are all optional.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from typing import Callable, Mapping, Optional

import attr

from rtcauthd.gojson import INT64_MAX, go_quote

INSECURE_MAGIC = "YES_I_KNOW_WHAT_I_AM_DOING"
DEFAULT_BIND = ":8080"
DEFAULT_OUTBOUND_TIMEOUT = 10.0
DEFAULT_MAX_BODY_BYTES = 64 * 1024
LOG_LEVELS = {"debug": "debug", "info": "info", "warn": "warn", "warning": "warn", "error": "error"}
LOG_FORMATS = ("auto", "text", "json")

#: systemd credential names (LoadCredential=livekit_key:..., livekit_secret:...)
CREDENTIAL_KEY = "livekit_key"
CREDENTIAL_SECRET = "livekit_secret"

#: ``--dev``: LiveKit's own development credentials (``livekit-server --dev``).
DEV_DEFAULTS = {
    "LIVEKIT_URL": "ws://localhost:7880",
    "LIVEKIT_KEY": "devkey",
    "LIVEKIT_SECRET": "secret",
    "LIVEKIT_FULL_ACCESS_HOMESERVERS": "localhost",
}

#: Every variable we understand; other LIVEKIT_*/RTCAUTH_* names get a warning (likely typos).
KNOWN_VARIABLES = frozenset(
    {
        "LIVEKIT_URL",
        "LIVEKIT_KEY",
        "LIVEKIT_SECRET",
        "LIVEKIT_KEY_FROM_FILE",
        "LIVEKIT_SECRET_FROM_FILE",
        "LIVEKIT_KEY_FILE",
        "LIVEKIT_JWT_BIND",
        "LIVEKIT_JWT_PORT",
        "LIVEKIT_FULL_ACCESS_HOMESERVERS",
        "LIVEKIT_LOG_LEVEL",
        "LIVEKIT_CS_API_URL_OVERRIDES",
        "LIVEKIT_INSECURE_SKIP_VERIFY_TLS",
        "LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS",
        "LIVEKIT_REDIS_URL",
        "RTCAUTH_CA_FILE",
        "RTCAUTH_FEDERATION_IP_RANGE_BLOCKLIST",
        "RTCAUTH_FEDERATION_IP_RANGE_ALLOWLIST",
        "RTCAUTH_OUTBOUND_TIMEOUT_SECONDS",
        "RTCAUTH_MAX_BODY_BYTES",
        "RTCAUTH_LOG_FORMAT",
        "RTCAUTH_LISTEN",
        "RTCAUTH_METRICS_LISTEN",
    }
)


class ConfigError(Exception):
    """A start-up configuration problem; ``str()`` is the single line to print."""


def _trim_secret(value: str) -> str:
    """Upstream trims spaces, CR and LF only (tabs survive), whatever the source."""
    return value.strip(" \r\n")


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Config:
    """Everything the daemon needs, validated. Secrets are hidden from ``repr``."""

    livekit_url: str
    api_key: str
    api_secret: str = attr.ib(repr=False)
    key_source: str
    secret_source: str
    full_access_homeservers: tuple[str, ...]
    listen: tuple[str, ...]
    sanity_check_interval: int
    log_level: str
    cs_api_url_overrides: Mapping[str, str]
    redis_url: str = attr.ib(repr=False)  # may carry a password
    insecure_skip_verify_tls: bool
    ca_file: Optional[str]
    ip_blocklist: Optional[tuple[str, ...]]
    ip_allowlist: tuple[str, ...]
    outbound_timeout: float
    max_body_bytes: int
    log_format: str
    metrics_listen: Optional[str]
    dev: bool
    warnings: tuple[str, ...] = ()

    def is_full_access(self, server_name: str) -> bool:
        """Exact, case-sensitive membership; a lone ``*`` admits everyone (protocol.md §4)."""
        if self.full_access_homeservers == ("*",):
            return True
        return server_name in self.full_access_homeservers

    def is_named_full_access(self, server_name: str) -> bool:
        """Listed by name: trusted to live on private addresses (the ``*`` wildcard is not)."""
        return server_name != "*" and server_name in self.full_access_homeservers


def read_text_file(path: str) -> str:
    """File content as os.environ holds values: undecodable bytes kept as surrogates, so a
    secret that is not UTF-8 still signs with its exact bytes (``encode(..., "surrogateescape")``)."""
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="surrogateescape")


def _env_file_value(raw: str) -> str:
    """A value as systemd's EnvironmentFile= reads it, so ``--config`` and the unit agree.

    Unquoted: ``\\x`` is ``x``, trailing blanks dropped. ``'…'``: literal. ``"…"``: only
    ``\\"``, ``\\\\``, ``\\$`` and ``\\``` lose their backslash. Pieces concatenate.
    """
    out: list[str] = []
    i, n = 0, len(raw)
    trailing_blanks = 0
    while i < n:
        ch = raw[i]
        if ch == "'":
            end = raw.find("'", i + 1)
            end = n if end < 0 else end
            out.append(raw[i + 1 : end])
            i, trailing_blanks = end + 1, 0
        elif ch == '"':
            i += 1
            while i < n and raw[i] != '"':
                if raw[i] == "\\" and i + 1 < n and raw[i + 1] in '"\\`$':
                    i += 1
                out.append(raw[i])
                i += 1
            i, trailing_blanks = i + 1, 0
        elif ch == "\\" and i + 1 < n:
            out.append(raw[i + 1])
            i, trailing_blanks = i + 2, 0
        else:
            out.append(ch)
            trailing_blanks = trailing_blanks + 1 if ch in " \t" else 0
            i += 1
    value = "".join(out)
    return value[: len(value) - trailing_blanks] if trailing_blanks else value


def parse_env_file(text: str) -> dict[str, str]:
    """``KEY=value`` lines with systemd EnvironmentFile= rules (comments, quotes, escapes)."""
    result: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.lstrip()
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"--config: line {lineno} is not KEY=value")
        result[name] = _env_file_value(value.lstrip(" \t"))
    return result


def _read_source(variable: str, path: str, read_file: Callable[[str], str]) -> str:
    try:
        return read_file(path)
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(f"{variable}: cannot read {path}: {reason}") from None


def _key_and_secret(
    env: Mapping[str, str], read_file: Callable[[str], str], warnings: list[str]
) -> tuple[str, str, str, str]:
    """Key/secret sources in upstream's precedence (protocol.md §14.3), plus systemd credentials."""
    key, secret = env.get("LIVEKIT_KEY", ""), env.get("LIVEKIT_SECRET", "")
    key_source = "LIVEKIT_KEY" if key else ""
    secret_source = "LIVEKIT_SECRET" if secret else ""
    key_file = env.get("LIVEKIT_KEY_FILE", "")
    if key_file:
        ignored = [
            n
            for n in ("LIVEKIT_KEY", "LIVEKIT_SECRET", "LIVEKIT_KEY_FROM_FILE", "LIVEKIT_SECRET_FROM_FILE")
            if env.get(n)
        ]
        if ignored:
            warnings.append(f"LIVEKIT_KEY_FILE is set, so {', '.join(ignored)} is ignored")
        parts = _read_source("LIVEKIT_KEY_FILE", key_file, read_file).split(":")
        if len(parts) != 2:
            raise ConfigError("LIVEKIT_KEY_FILE: invalid key secret file format!")
        key, secret = parts
        key_source = secret_source = f"LIVEKIT_KEY_FILE ({key_file})"
    else:
        for variable, is_key in (("LIVEKIT_KEY_FROM_FILE", True), ("LIVEKIT_SECRET_FROM_FILE", False)):
            path = env.get(variable, "")
            if not path:
                continue
            value = _read_source(variable, path, read_file)
            plain = "LIVEKIT_KEY" if is_key else "LIVEKIT_SECRET"
            if env.get(plain):
                warnings.append(f"{variable} is set, so {plain} is ignored")
            if is_key:
                key, key_source = value, f"{variable} ({path})"
            else:
                secret, secret_source = value, f"{variable} ({path})"
    credentials = env.get("CREDENTIALS_DIRECTORY", "")
    if credentials:
        for name, is_key in ((CREDENTIAL_KEY, True), (CREDENTIAL_SECRET, False)):
            if (key if is_key else secret):
                continue
            path = os.path.join(credentials, name)
            try:
                value = read_file(path)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise ConfigError(
                    f"CREDENTIALS_DIRECTORY: cannot read credential {name}: {e.strerror or e}"
                ) from None
            if is_key:
                key, key_source = value, f"systemd credential {name}"
            else:
                secret, secret_source = value, f"systemd credential {name}"
    return _trim_secret(key), _trim_secret(secret), key_source, secret_source


def parse_cs_api_overrides(value: str) -> dict[str, str]:
    """``server=url`` entries separated by commas; any malformed entry is fatal (§10)."""
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


def _positive_number(variable: str, value: str, default: float, kind: type) -> float:
    if value == "":
        return default
    try:
        number = kind(value)
    except ValueError:
        number = -1
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{variable} must be a positive number, got {go_quote(value)}")
    return number


def load_config(
    environ: Mapping[str, str],
    *,
    read_file: Callable[[str], str] = read_text_file,
    config_file: Optional[str] = None,
    listen: tuple[str, ...] = (),
    dev: bool = False,
) -> Config:
    """Build the Config: defaults < ``--config`` file < environment < command line."""
    env: dict[str, str] = {}
    if config_file:
        env.update(parse_env_file(_read_source("--config", config_file, read_file)))
    env.update(environ)
    warnings: list[str] = []
    if dev:
        for name, value in DEV_DEFAULTS.items():
            if not env.get(name) and not (
                name in ("LIVEKIT_KEY", "LIVEKIT_SECRET")
                and (env.get("LIVEKIT_KEY_FILE") or env.get(name + "_FROM_FILE"))
            ):
                env[name] = value
        warnings.append(
            "DEVELOPMENT MODE (--dev): LiveKit dev credentials devkey/secret, "
            "ws://localhost:7880, full access for localhost. Never use this in production."
        )

    # 1. log level (upstream: a bad value is a warning, not an error)
    raw_level = env.get("LIVEKIT_LOG_LEVEL", "")
    log_level = LOG_LEVELS.get(raw_level.strip().lower(), "info")
    if raw_level and raw_level.strip().lower() not in LOG_LEVELS:
        warnings.append("Invalid log level in LIVEKIT_LOG_LEVEL, defaulting to info")
    log_format = env.get("RTCAUTH_LOG_FORMAT", "auto").strip().lower() or "auto"
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"RTCAUTH_LOG_FORMAT must be one of auto, text, json, got {go_quote(log_format)}")

    # 2. insecure TLS: only the exact magic value counts
    insecure = env.get("LIVEKIT_INSECURE_SKIP_VERIFY_TLS", "") == INSECURE_MAGIC
    if env.get("LIVEKIT_INSECURE_SKIP_VERIFY_TLS") and not insecure:
        warnings.append(
            "LIVEKIT_INSECURE_SKIP_VERIFY_TLS is set but not to "
            f"{INSECURE_MAGIC}; TLS certificates are verified"
        )

    # 3./4. key, secret, URL
    key, secret, key_source, secret_source = _key_and_secret(env, read_file, warnings)
    livekit_url = env.get("LIVEKIT_URL", "")
    if not key or not secret or not livekit_url:
        raise ConfigError("LIVEKIT_KEY* / LIVEKIT_SECRET* and LIVEKIT_URL must be set")

    # 5. full-access homeservers
    full_access_raw = env.get("LIVEKIT_FULL_ACCESS_HOMESERVERS", "")
    if full_access_raw == "":
        raise ConfigError(
            "LIVEKIT_FULL_ACCESS_HOMESERVERS environment variable must be set to the homeserver(s) "
            "you intend to serve \u2014 see README for guidance"
        )
    full_access = tuple(full_access_raw.replace(",", " ").split())
    if not full_access:
        warnings.append("LIVEKIT_FULL_ACCESS_HOMESERVERS lists no server: every user is restricted")
    if "*" in full_access and len(full_access) > 1:
        warnings.append("LIVEKIT_FULL_ACCESS_HOMESERVERS: '*' is only a wildcard on its own; here it matches nothing")

    # 6. listeners
    bind, port = env.get("LIVEKIT_JWT_BIND", ""), env.get("LIVEKIT_JWT_PORT", "")
    if bind and port:
        raise ConfigError("LIVEKIT_JWT_BIND and LIVEKIT_JWT_PORT must not be set together")
    bind_variable = "LIVEKIT_JWT_BIND"
    if port:
        warnings.append("LIVEKIT_JWT_PORT is deprecated, use LIVEKIT_JWT_BIND (e.g. :8080) instead")
        bind, bind_variable = ":" + port, "LIVEKIT_JWT_PORT"
    if listen:
        endpoints = tuple(listen)
    elif env.get("RTCAUTH_LISTEN", "").strip():
        endpoints = tuple(e.strip() for e in env["RTCAUTH_LISTEN"].split(" ") if e.strip())
    else:
        endpoints = bind_to_endpoints(bind or DEFAULT_BIND, bind_variable)

    # 7. sanity-check interval
    sanity_raw = env.get("LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS", "")
    sanity = 0
    if sanity_raw != "":
        # Go's strconv.Atoi: optional sign, digits, int64 range.
        if not re.fullmatch(r"[+-]?[0-9]+", sanity_raw) or not 0 <= int(sanity_raw) <= INT64_MAX:
            raise ConfigError(
                "LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS must be a non-negative integer, "
                f"got {go_quote(sanity_raw)}"
            )
        sanity = int(sanity_raw)

    # 8. client-server API overrides
    overrides = parse_cs_api_overrides(env.get("LIVEKIT_CS_API_URL_OVERRIDES", ""))

    # rtcauthd additions
    ca_file = env.get("RTCAUTH_CA_FILE", "").strip() or None
    blocklist_raw = env.get("RTCAUTH_FEDERATION_IP_RANGE_BLOCKLIST")
    blocklist = (
        None
        if blocklist_raw is None or blocklist_raw.strip() == ""
        else parse_cidrs("RTCAUTH_FEDERATION_IP_RANGE_BLOCKLIST", blocklist_raw)
    )
    allowlist = parse_cidrs(
        "RTCAUTH_FEDERATION_IP_RANGE_ALLOWLIST", env.get("RTCAUTH_FEDERATION_IP_RANGE_ALLOWLIST", "")
    )
    timeout = _positive_number(
        "RTCAUTH_OUTBOUND_TIMEOUT_SECONDS",
        env.get("RTCAUTH_OUTBOUND_TIMEOUT_SECONDS", "").strip(),
        DEFAULT_OUTBOUND_TIMEOUT,
        float,
    )
    max_body = int(
        _positive_number(
            "RTCAUTH_MAX_BODY_BYTES",
            env.get("RTCAUTH_MAX_BODY_BYTES", "").strip(),
            DEFAULT_MAX_BODY_BYTES,
            int,
        )
    )

    for name in sorted(environ):
        if name.startswith(("LIVEKIT_", "RTCAUTH_")) and name not in KNOWN_VARIABLES:
            warnings.append(f"unknown variable {name} is ignored")

    return Config(
        livekit_url=livekit_url,
        api_key=key,
        api_secret=secret,
        key_source=key_source or "LIVEKIT_KEY",
        secret_source=secret_source or "LIVEKIT_SECRET",
        full_access_homeservers=full_access,
        listen=endpoints,
        sanity_check_interval=sanity,
        log_level=log_level,
        cs_api_url_overrides=overrides,
        redis_url=env.get("LIVEKIT_REDIS_URL", ""),
        insecure_skip_verify_tls=insecure,
        ca_file=ca_file,
        ip_blocklist=blocklist,
        ip_allowlist=allowlist,
        outbound_timeout=timeout,
        max_body_bytes=max_body,
        log_format=log_format,
        metrics_listen=metrics_endpoint(env["RTCAUTH_METRICS_LISTEN"])
        if env.get("RTCAUTH_METRICS_LISTEN", "").strip()
        else None,
        dev=dev,
        warnings=tuple(warnings),
    )
