"""Configuration: lk-jwt-service's environment variables, parsed purely (no I/O of our own).

``load_config(environ, read_file=...)`` returns a frozen :class:`Config` or raises
:class:`ConfigError` whose message is the one line an operator sees before the process exits
with status 1. Parsing order, defaults and messages follow upstream (docs/configuration.md) so that
an operator can swap services without touching their environment file. Additions are prefixed
``RTCAUTH_`` and are all optional.

Every variable is one row of :data:`SETTINGS` (name, default, reader, help), which also
feeds ``twistd rtcauth --help`` and the check of debian/rtcauthd.env. Longer than most
modules because the table and the readers it names belong together.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import textwrap
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
CREDENTIAL_AS_TOKEN = "livekit_as_token"
CREDENTIAL_HS_TOKEN = "livekit_hs_token"

#: upstream's start-up error when application-service mode is half configured
APPSERVICE_ALL_OR_NONE = (
    "The app service token(s) (LIVEKIT_AS_TOKEN/LIVEKIT_HS_TOKEN or LIVEKIT_AS_REGISTRATION_FILE) "
    "and LIVEKIT_HS_SERVER_NAME must either all be set or all be left empty"
)
REGISTRATION_ERROR = "Could not parse app service registration file: "

#: ``--dev``: LiveKit's own development credentials (``livekit-server --dev``).
DEV_DEFAULTS = {
    "LIVEKIT_URL": "ws://localhost:7880",
    "LIVEKIT_KEY": "devkey",
    "LIVEKIT_SECRET": "secret",
    "LIVEKIT_FULL_ACCESS_HOMESERVERS": "localhost",
}

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
    as_token: str = attr.ib(default="", repr=False)
    hs_token: str = attr.ib(default="", repr=False)
    hs_server_name: str = ""
    can_update_own_metadata: bool = False
    ratelimit_per_second: float = 5.0
    ratelimit_burst: int = 50
    trusted_proxies: tuple[str, ...] = ("127.0.0.0/8", "::1/128")  # RTCAUTH_TRUSTED_PROXIES
    request_timeout: float = 10.0
    max_connections: Optional[int] = None  # None: derived from the open-file limit at start
    federation_max_inflight: int = 256
    federation_max_per_server: int = 8
    token_ttl: int = 3600  # RTCAUTH_TOKEN_TTL_SECONDS
    max_delay_seconds: float = 86400.0  # RTCAUTH_MAX_DELAY_SECONDS
    warnings: tuple[str, ...] = ()

    @property
    def appservice(self) -> bool:
        """Both tokens and the server name: AS mode (docs/configuration.md#application-service-mode)."""
        return bool(self.as_token and self.hs_token and self.hs_server_name)

    @property
    def secrets(self) -> tuple[str, ...]:
        """What the log scrubber must never let through."""
        from rtcauthd.store.redis_url import redis_password

        values = (self.api_secret, self.as_token, self.hs_token, redis_password(self.redis_url))
        return tuple(s for s in values if s)

    def is_full_access(self, server_name: str) -> bool:
        """Exact, case-sensitive membership; a lone ``*`` admits everyone (docs/authorization.md#access-rules)."""
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
    """Key/secret sources in upstream's precedence (docs/configuration.md#key-and-secret), plus systemd credentials."""
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


def _number(variable: str, value: str, default: float, kind: type, *, zero_allowed: bool = False) -> float:
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


def _positive_number(variable: str, value: str, default: float, kind: type) -> float:
    return _number(variable, value, default, kind)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Setting:
    """One environment variable, written once: it feeds load_config, ``--help`` and the
    env file's check (tests/unit/test_config.py reads debian/rtcauthd.env against it)."""

    name: str
    default: str  # as an operator would write it; "" = none
    help: str
    #: Reads this setting (and the ones it belongs with) into ``_Reading.fields``. None: read
    #: with an earlier setting of its group (e.g. LIVEKIT_SECRET with LIVEKIT_URL).
    parse: Optional[Callable[["_Reading", "Setting"], None]] = None
    documented: bool = True  # False: not the operator's to set (systemd sets it)


@attr.s(slots=True, auto_attribs=True)
class _Reading:
    """What the parsers share while one Config is read."""

    env: Mapping[str, str]
    read_file: Callable[[str], str]
    listen: tuple[str, ...]
    warnings: list[str]
    fields: dict = attr.Factory(dict)

    def raw(self, setting: Setting) -> str:
        return self.env.get(setting.name, "")


def _read_log_level(r: _Reading, s: Setting) -> None:
    # upstream: a bad value is a warning, not an error
    raw = r.raw(s)
    r.fields["log_level"] = LOG_LEVELS.get(raw.strip().lower(), s.default)
    if raw and raw.strip().lower() not in LOG_LEVELS:
        r.warnings.append(f"Invalid log level in {s.name}, defaulting to {s.default}")


def _read_log_format(r: _Reading, s: Setting) -> None:
    log_format = r.raw(s).strip().lower() or s.default
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"{s.name} must be one of {', '.join(LOG_FORMATS)}, got {go_quote(log_format)}")
    r.fields["log_format"] = log_format


def _read_insecure(r: _Reading, s: Setting) -> None:
    # only the exact magic value counts
    insecure = r.raw(s) == INSECURE_MAGIC
    if r.raw(s) and not insecure:
        r.warnings.append(f"{s.name} is set but not to {INSECURE_MAGIC}; TLS certificates are verified")
    r.fields["insecure_skip_verify_tls"] = insecure


def _read_livekit(r: _Reading, s: Setting) -> None:
    key, secret, key_source, secret_source = _key_and_secret(r.env, r.read_file, r.warnings)
    livekit_url = r.raw(s)
    if not key or not secret or not livekit_url:
        raise ConfigError("LIVEKIT_KEY* / LIVEKIT_SECRET* and LIVEKIT_URL must be set")
    r.fields.update(
        livekit_url=livekit_url,
        api_key=key,
        api_secret=secret,
        key_source=key_source or "LIVEKIT_KEY",
        secret_source=secret_source or "LIVEKIT_SECRET",
    )


def _read_full_access(r: _Reading, s: Setting) -> None:
    raw = r.raw(s)
    if raw == "":
        raise ConfigError(
            f"{s.name} environment variable must be set to the homeserver(s) "
            "you intend to serve \u2014 see README for guidance"
        )
    full_access = tuple(raw.replace(",", " ").split())
    if not full_access:
        r.warnings.append(f"{s.name} lists no server: every user is restricted")
    if "*" in full_access and len(full_access) > 1:
        r.warnings.append(f"{s.name}: '*' is only a wildcard on its own; here it matches nothing")
    r.fields["full_access_homeservers"] = full_access


def _read_listeners(r: _Reading, s: Setting) -> None:
    """LIVEKIT_JWT_BIND, LIVEKIT_JWT_PORT and RTCAUTH_LISTEN; ``--listen`` wins over all."""
    bind, port = r.raw(s), r.env.get("LIVEKIT_JWT_PORT", "")
    if bind and port:
        raise ConfigError("LIVEKIT_JWT_BIND and LIVEKIT_JWT_PORT must not be set together")
    bind_variable = s.name
    if port:
        r.warnings.append("LIVEKIT_JWT_PORT is deprecated, use LIVEKIT_JWT_BIND (e.g. :8080) instead")
        bind, bind_variable = ":" + port, "LIVEKIT_JWT_PORT"
    if r.listen:
        endpoints = tuple(r.listen)
    elif r.env.get("RTCAUTH_LISTEN", "").strip():
        endpoints = tuple(e.strip() for e in r.env["RTCAUTH_LISTEN"].split(" ") if e.strip())
    else:
        endpoints = bind_to_endpoints(bind or s.default, bind_variable)
    r.fields["listen"] = endpoints


def _read_sanity_interval(r: _Reading, s: Setting) -> None:
    raw = r.raw(s)
    sanity = int(s.default)
    if raw != "":
        # Go's strconv.Atoi: optional sign, digits, int64 range.
        if not re.fullmatch(r"[+-]?[0-9]+", raw) or not 0 <= int(raw) <= INT64_MAX:
            raise ConfigError(f"{s.name} must be a non-negative integer, got {go_quote(raw)}")
        sanity = int(raw)
    r.fields["sanity_check_interval"] = sanity


def _read_overrides(r: _Reading, s: Setting) -> None:
    r.fields["cs_api_url_overrides"] = parse_cs_api_overrides(r.raw(s))


def _read_ca_file(r: _Reading, s: Setting) -> None:
    r.fields["ca_file"] = r.raw(s).strip() or None


def _read_blocklist(r: _Reading, s: Setting) -> None:
    raw = r.raw(s)
    r.fields["ip_blocklist"] = None if raw.strip() == "" else parse_cidrs(s.name, raw)


def _read_allowlist(r: _Reading, s: Setting) -> None:
    r.fields["ip_allowlist"] = parse_cidrs(s.name, r.raw(s))


def _read_timeout(r: _Reading, s: Setting) -> None:
    r.fields["outbound_timeout"] = _positive_number(s.name, r.raw(s).strip(), float(s.default), float)


def _read_max_body(r: _Reading, s: Setting) -> None:
    r.fields["max_body_bytes"] = int(_positive_number(s.name, r.raw(s).strip(), int(s.default), int))


def _non_negative(variable: str, value: str, default: float, kind: type) -> float:
    return _number(variable, value, default, kind, zero_allowed=True)


def _read_ratelimit_rate(r: _Reading, s: Setting) -> None:
    r.fields["ratelimit_per_second"] = _non_negative(s.name, r.raw(s).strip(), float(s.default), float)


def _read_ratelimit_burst(r: _Reading, s: Setting) -> None:
    r.fields["ratelimit_burst"] = int(_non_negative(s.name, r.raw(s).strip(), int(s.default), int))


def _read_request_timeout(r: _Reading, s: Setting) -> None:
    r.fields["request_timeout"] = _non_negative(s.name, r.raw(s).strip(), float(s.default), float)


def _read_max_connections(r: _Reading, s: Setting) -> None:
    raw = r.raw(s).strip()
    r.fields["max_connections"] = int(_positive_number(s.name, raw, 0, int)) if raw else None


def _read_federation_max_inflight(r: _Reading, s: Setting) -> None:
    r.fields["federation_max_inflight"] = int(_positive_number(s.name, r.raw(s).strip(), int(s.default), int))


def _read_federation_max_per_server(r: _Reading, s: Setting) -> None:
    r.fields["federation_max_per_server"] = int(_positive_number(s.name, r.raw(s).strip(), int(s.default), int))


def _read_token_ttl(r: _Reading, s: Setting) -> None:
    r.fields["token_ttl"] = int(_positive_number(s.name, r.raw(s).strip(), int(s.default), int))


def _read_max_delay(r: _Reading, s: Setting) -> None:
    r.fields["max_delay_seconds"] = _positive_number(s.name, r.raw(s).strip(), float(s.default), float)


def _read_trusted_proxies(r: _Reading, s: Setting) -> None:
    raw = r.raw(s)
    r.fields["trusted_proxies"] = parse_cidrs(s.name, raw if raw.strip() else s.default)


def _read_metrics_listen(r: _Reading, s: Setting) -> None:
    raw = r.raw(s)
    r.fields["metrics_listen"] = metrics_endpoint(raw) if raw.strip() else None


def _yaml_error_text(error: Exception) -> str:
    """PyYAML's message on one line, without the snippet of the file it quotes (a token)."""
    import yaml

    if isinstance(error, yaml.MarkedYAMLError):
        parts = []
        for text, mark in ((error.context, error.context_mark), (error.problem, error.problem_mark)):
            if text:
                where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
                parts.append(text + where)
        return ": ".join(parts) or type(error).__name__
    if isinstance(error, yaml.reader.ReaderError):
        return f"unacceptable character #x{error.character:04x}: {error.reason} (position {error.position})"
    return " ".join(str(error).split())


def read_registration(text: str) -> tuple[str, str]:
    """as_token and hs_token of a Synapse AS registration (docs/configuration.md#application-service-mode)."""
    import yaml

    try:
        root = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(REGISTRATION_ERROR + _yaml_error_text(e)) from None
    if not isinstance(root, dict):
        raise ConfigError(REGISTRATION_ERROR + "invalid root element")
    tokens = []
    for key in ("as_token", "hs_token"):
        if key not in root:
            raise ConfigError(f"{REGISTRATION_ERROR}no {key} property")
        value = root[key]
        # an unquoted 12345 or yes is no string for upstream's YAML library either
        if not isinstance(value, str):
            raise ConfigError(f"{REGISTRATION_ERROR}invalid value for {key} property")
        tokens.append(value.strip())
    return tokens[0], tokens[1]


def _token(r: _Reading, variable: str, credential: str) -> str:
    """One token: ``<variable>_FROM_FILE`` over ``<variable>``; a systemd credential fills in."""
    from_file = variable + "_FROM_FILE"
    value = r.env.get(variable, "")
    path = r.env.get(from_file, "")
    if path:
        value = _read_source(from_file, path, r.read_file)
        if r.env.get(variable):
            r.warnings.append(f"{from_file} is set, so {variable} is ignored")
    credentials = r.env.get("CREDENTIALS_DIRECTORY", "")
    if not value.strip() and credentials:
        try:
            value = r.read_file(os.path.join(credentials, credential))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ConfigError(
                f"CREDENTIALS_DIRECTORY: cannot read credential {credential}: {e.strerror or e}"
            ) from None
    return value.strip()


def _read_appservice(r: _Reading, s: Setting) -> None:
    """LIVEKIT_AS_TOKEN and its group, in upstream's order (docs/configuration.md#application-service-mode)."""
    server_name = r.env.get("LIVEKIT_HS_SERVER_NAME", "")  # verbatim, as upstream
    registration = r.env.get("LIVEKIT_AS_REGISTRATION_FILE", "")
    if registration:
        as_token, hs_token = read_registration(
            _read_source("LIVEKIT_AS_REGISTRATION_FILE", registration, r.read_file)
        )
        pair = ("LIVEKIT_AS_TOKEN", "LIVEKIT_AS_TOKEN_FROM_FILE", "LIVEKIT_HS_TOKEN", "LIVEKIT_HS_TOKEN_FROM_FILE")
        ignored = [n for n in pair if r.env.get(n)]
        if ignored:
            r.warnings.append(f"LIVEKIT_AS_REGISTRATION_FILE is set, so {', '.join(ignored)} is ignored")
    else:
        as_token = _token(r, s.name, CREDENTIAL_AS_TOKEN)
        hs_token = _token(r, "LIVEKIT_HS_TOKEN", CREDENTIAL_HS_TOKEN)
    values = (as_token, hs_token, server_name)
    if any(values) and not all(values):
        raise ConfigError(APPSERVICE_ALL_OR_NONE)
    r.fields.update(as_token=as_token, hs_token=hs_token, hs_server_name=server_name)


def _read_redis_url(r: _Reading, s: Setting) -> None:
    """LIVEKIT_REDIS_URL with LIVEKIT_REDIS_PASSWORD merged in (docs/configuration.md#redis-password)."""
    from rtcauthd.store.redis_url import redis_password, url_syntax_error, with_password

    url, password = r.raw(s), r.env.get("LIVEKIT_REDIS_PASSWORD", "")
    if url == "":
        if password:
            r.warnings.append(
                "LIVEKIT_REDIS_PASSWORD was set without setting LIVEKIT_REDIS_URL. Continuing without Redis support"
            )
        r.fields["redis_url"] = ""
        return
    problem = url_syntax_error(url)
    if problem is not None:
        raise ConfigError(f"Could not parse {s.name}: {problem}")
    if password:
        merged = with_password(url, password)
        if merged is None:
            raise ConfigError("LIVEKIT_REDIS_PASSWORD was set but couldn't be combined with LIVEKIT_REDIS_URL")
        if redis_password(url):
            r.warnings.append("LIVEKIT_REDIS_PASSWORD is set, so the password in LIVEKIT_REDIS_URL is ignored")
        url = merged
    r.fields["redis_url"] = url


def _read_own_metadata(r: _Reading, s: Setting) -> None:
    raw = r.raw(s)
    r.fields["can_update_own_metadata"] = raw == "true"  # exactly; True, 1 or yes leave it off
    if raw not in ("", "true", s.default):
        r.warnings.append(f"{s.name} is set but not to true; canUpdateOwnMetadata is not granted")


#: Every setting, in the order load_config reads them (so the first error reported, and the
#: order of warnings, stay upstream's). ``--help`` lists them in this order too.
SETTINGS: tuple[Setting, ...] = (
    Setting("LIVEKIT_LOG_LEVEL", "info", "debug, info, warn (or warning), error", _read_log_level),
    Setting(
        "RTCAUTH_LOG_FORMAT", LOG_FORMATS[0], "auto (JSON under journald, else text), text or json", _read_log_format
    ),
    Setting(
        "LIVEKIT_INSECURE_SKIP_VERIFY_TLS",
        "",
        f"{INSECURE_MAGIC} disables certificate checks; any other value is ignored",
        _read_insecure,
    ),
    Setting("LIVEKIT_URL", "", "SFU URL handed to clients (ws:// or wss://); required", _read_livekit),
    Setting("LIVEKIT_KEY", "", "LiveKit API key"),
    Setting("LIVEKIT_SECRET", "", "LiveKit API secret"),
    Setting("LIVEKIT_KEY_FROM_FILE", "", "file holding the key (overrides LIVEKIT_KEY)"),
    Setting("LIVEKIT_SECRET_FROM_FILE", "", "file holding the secret (overrides LIVEKIT_SECRET)"),
    Setting("LIVEKIT_KEY_FILE", "", 'LiveKit-style "key: secret" file (overrides the four above)'),
    Setting(
        "CREDENTIALS_DIRECTORY",
        "",
        f"systemd credentials: {CREDENTIAL_KEY}, {CREDENTIAL_SECRET}, {CREDENTIAL_AS_TOKEN}, "
        f"{CREDENTIAL_HS_TOKEN} fill in whatever their variables left empty",
        documented=False,
    ),
    Setting(
        "LIVEKIT_FULL_ACCESS_HOMESERVERS",
        "",
        "required; server names whose users may create rooms and delegate leaves "
        '(comma/space separated; "*" alone = all)',
        _read_full_access,
    ),
    Setting("LIVEKIT_JWT_BIND", DEFAULT_BIND, "listen address host:port (all interfaces, IPv4+IPv6)", _read_listeners),
    Setting("LIVEKIT_JWT_PORT", "", "deprecated: port only; not together with LIVEKIT_JWT_BIND"),
    Setting("RTCAUTH_LISTEN", "", "space-separated endpoint strings (like --listen)"),
    Setting(
        "LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS", "0", "SFU presence re-check interval, 0 = off", _read_sanity_interval
    ),
    Setting(
        "LIVEKIT_CS_API_URL_OVERRIDES", "", "server_name=https://client-api,... (skips .well-known)", _read_overrides
    ),
    Setting(
        "LIVEKIT_AS_TOKEN",
        "",
        "application-service mode: token sent to the homeserver (as_token)",
        _read_appservice,
    ),
    Setting("LIVEKIT_AS_TOKEN_FROM_FILE", "", "rtcauthd only: file holding the as_token (overrides LIVEKIT_AS_TOKEN)"),
    Setting("LIVEKIT_HS_TOKEN", "", "application-service mode: token the homeserver sends (hs_token)"),
    Setting("LIVEKIT_HS_TOKEN_FROM_FILE", "", "rtcauthd only: file holding the hs_token (overrides LIVEKIT_HS_TOKEN)"),
    Setting(
        "LIVEKIT_AS_REGISTRATION_FILE",
        "",
        "Synapse's registration YAML; its as_token and hs_token override the four above",
    ),
    Setting(
        "LIVEKIT_HS_SERVER_NAME",
        "",
        "server_name of the homeserver this service is an application service of; with both "
        "tokens it turns application-service mode on (all three or none)",
    ),
    Setting("RTCAUTH_CA_FILE", "", "PEM CA bundle trusted for outbound TLS (private PKI)", _read_ca_file),
    Setting(
        "RTCAUTH_FEDERATION_IP_RANGE_BLOCKLIST",
        "",
        "CIDRs homeservers may not resolve to (replaces the default: loopback, private, "
        "link-local, CGNAT, ...)",
        _read_blocklist,
    ),
    Setting(
        "RTCAUTH_FEDERATION_IP_RANGE_ALLOWLIST", "", "CIDRs exempt from the blocklist (wins over it)", _read_allowlist
    ),
    Setting(
        "RTCAUTH_OUTBOUND_TIMEOUT_SECONDS", f"{DEFAULT_OUTBOUND_TIMEOUT:g}", "bound on every outbound call", _read_timeout
    ),
    Setting("RTCAUTH_MAX_BODY_BYTES", str(DEFAULT_MAX_BODY_BYTES), "request body limit, answered 413", _read_max_body),
    Setting(
        "RTCAUTH_RATELIMIT_PER_SECOND",
        "5",
        "token requests per second per client (/get_token, /sfu/get, /delegate_delayed_leave); 0 = no limit",
        _read_ratelimit_rate,
    ),
    Setting("RTCAUTH_RATELIMIT_BURST", "50", "requests a client may make at once; 0 = no limit", _read_ratelimit_burst),
    Setting(
        "RTCAUTH_FEDERATION_MAX_INFLIGHT",
        "256",
        "concurrent OpenID verifications against homeservers outside the full-access list (the "
        "full-access ones have a budget of their own); over it, 503 + Retry-After",
        _read_federation_max_inflight,
    ),
    Setting(
        "RTCAUTH_FEDERATION_MAX_INFLIGHT_PER_SERVER",
        "8",
        "concurrent verifications against one such homeserver",
        _read_federation_max_per_server,
    ),
    Setting(
        "RTCAUTH_TOKEN_TTL_SECONDS",
        "3600",
        "lifetime of the LiveKit join tokens handed to clients (upstream: 3600)",
        _read_token_ttl,
    ),
    Setting(
        "RTCAUTH_MAX_DELAY_SECONDS",
        "86400",
        "longest delayed-leave timeout a client may hand over; longer ones are refused with 400",
        _read_max_delay,
    ),
    Setting(
        "RTCAUTH_REQUEST_TIMEOUT_SECONDS",
        "10",
        "a request must arrive whole (headers and body) within this many seconds, else the "
        "connection is dropped; 0 = off",
        _read_request_timeout,
    ),
    Setting(
        "RTCAUTH_MAX_CONNECTIONS",
        "",
        "open inbound connections at most; over it /healthz is still answered and the rest get "
        "503 (default: half the open-file limit, at most 16384)",
        _read_max_connections,
    ),
    Setting(
        "RTCAUTH_TRUSTED_PROXIES",
        "127.0.0.0/8,::1/128",
        "comma-separated CIDRs of reverse proxies whose X-Forwarded-For / Forwarded names the client",
        _read_trusted_proxies,
    ),
    Setting(
        "RTCAUTH_METRICS_LISTEN",
        "",
        "Prometheus /metrics listener: a port (loopback) or an endpoint string; off when unset",
        _read_metrics_listen,
    ),
    Setting(
        "LIVEKIT_REDIS_URL", "", "redis://[:password@]host[:port][/db] for delegated-leave jobs", _read_redis_url
    ),
    Setting("LIVEKIT_REDIS_PASSWORD", "", "Redis password, replacing any in LIVEKIT_REDIS_URL"),
    Setting(
        "LIVEKIT_CAN_UPDATE_OWN_METADATA",
        "false",
        "exactly true grants canUpdateOwnMetadata in every token; anything else does not",
        _read_own_metadata,
    ),
)

#: Every variable we understand; other LIVEKIT_*/RTCAUTH_* names get a warning (likely typos).
KNOWN_VARIABLES = frozenset(s.name for s in SETTINGS if s.documented)  # the operator-set ones


def settings_help(width: int = 80) -> str:
    """The settings table as ``--help`` shows it: upstream's variables, then our additions."""
    lines = [
        "",
        "Configuration comes from the environment, exactly as lk-jwt-service reads it",
        "(an env file given with --config is read first; the environment wins over it):",
        "",
    ]
    column = 34
    for title, ours in (("", False), ("rtcauthd additions:", True)):
        if title:
            lines.append(title)
        for setting in SETTINGS:
            if setting.name.startswith("RTCAUTH_") != ours:
                continue
            # A no-break space keeps "(default X)" on one line; textwrap only splits ASCII blanks.
            text = setting.help + (f" (default\xa0{setting.default})" if setting.default else "")
            name = f"  {setting.name}"
            entry = textwrap.fill(
                text,
                width=width,
                initial_indent=name.ljust(column) if len(name) + 2 <= column else name + "  ",
                subsequent_indent=" " * column,
                break_on_hyphens=False,
            )
            lines.append(entry.replace("\xa0", " "))
    return "\n".join(lines) + "\n"


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

    reading = _Reading(env=env, read_file=read_file, listen=tuple(listen), warnings=warnings)
    for setting in SETTINGS:
        if setting.parse is not None:
            setting.parse(reading, setting)

    for name in sorted(environ):
        if name.startswith(("LIVEKIT_", "RTCAUTH_")) and name not in KNOWN_VARIABLES:
            warnings.append(f"unknown variable {name} is ignored")

    return Config(**reading.fields, dev=dev, warnings=tuple(warnings))
