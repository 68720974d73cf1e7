"""Configuration: lk-jwt-service's environment variables, parsed purely (no I/O of our own).

``load_config(environ, read_file=...)`` returns a frozen :class:`Config` or raises
:class:`ConfigError` whose message is the one line an operator sees before the process exits
with status 1. Parsing order, defaults and messages follow upstream (docs/configuration.md) so that
an operator can swap services without touching their environment file. Additions are prefixed
``RTCAUTH_`` and are all optional.

Every variable is one row of :data:`SETTINGS` (name, default, reader, help), which also
feeds ``twistd rtcauth --help`` and the check of debian/rtcauthd.env. The files behind
the values are read in :mod:`rtcauthd.config_sources`, single values checked in
:mod:`rtcauthd.config_values`; the table and the readers it names stay here together.
"""

from __future__ import annotations

import re
import textwrap
from typing import Callable, Mapping, Optional

import attr

from rtcauthd.config_sources import (
    CREDENTIAL_AS_TOKEN,
    CREDENTIAL_HS_TOKEN,
    CREDENTIAL_KEY,
    CREDENTIAL_SECRET,
    ConfigError,
    key_and_secret,
    parse_env_file,
    read_registration,
    read_source,
    read_text_file,
    read_token,
)
from rtcauthd.config_values import (
    number,
    bind_to_endpoints,
    metrics_endpoint,
    parse_cidrs,
    parse_cs_api_overrides,
)
from rtcauthd.gojson import INT64_MAX, go_quote

INSECURE_MAGIC = "YES_I_KNOW_WHAT_I_AM_DOING"
DEFAULT_BIND = ":8080"
DEFAULT_OUTBOUND_TIMEOUT = 10.0
DEFAULT_MAX_BODY_BYTES = 64 * 1024
LOG_LEVELS = {"debug": "debug", "info": "info", "warn": "warn", "warning": "warn", "error": "error"}
LOG_FORMATS = ("auto", "text", "json")

#: systemd credential names (LoadCredential=livekit_key:..., livekit_secret:...)
#: upstream's start-up error when application-service mode is half configured
APPSERVICE_ALL_OR_NONE = (
    "The app service token(s) (LIVEKIT_AS_TOKEN/LIVEKIT_HS_TOKEN or LIVEKIT_AS_REGISTRATION_FILE) "
    "and LIVEKIT_HS_SERVER_NAME must either all be set or all be left empty"
)

#: ``--dev``: LiveKit's own development credentials (``livekit-server --dev``).
DEV_DEFAULTS = {
    "LIVEKIT_URL": "ws://localhost:7880",
    "LIVEKIT_KEY": "devkey",
    "LIVEKIT_SECRET": "secret",
    "LIVEKIT_FULL_ACCESS_HOMESERVERS": "localhost",
}

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
    registration_file: Optional[str] = None  # LIVEKIT_AS_REGISTRATION_FILE, for rtcauth doctor
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
    membership_check_interval: int = 30  # LIVEKIT_MEMBERSHIP_CHECK_INTERVAL_SECONDS (AS mode only)
    job_lease_seconds: float = 10.0  # RTCAUTH_JOB_LEASE_SECONDS
    instance_name: str = ""  # RTCAUTH_INSTANCE_NAME; "" = host name + pid
    redis_sentinels: tuple[tuple[str, int], ...] = ()  # RTCAUTH_REDIS_SENTINELS
    redis_sentinel_master: str = ""  # RTCAUTH_REDIS_SENTINEL_MASTER
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


def _numeric(field: str, kind: type, *, zero_allowed: bool = False):
    """The reader of a plain number setting: ``Config.<field>``, the row's default when unset."""

    def read(r: "_Reading", s: "Setting") -> None:
        r.fields[field] = number(s.name, r.raw(s).strip(), kind(s.default), kind, zero_allowed=zero_allowed)

    return read


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
    key, secret, key_source, secret_source = key_and_secret(r.env, r.read_file, r.warnings)
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


def _interval(s: Setting, raw: str) -> int:
    """Whole seconds, the row's default when empty; upstream's one-line error otherwise."""
    if raw == "":
        return int(s.default)
    # Go's strconv.Atoi: optional sign, digits, int64 range.
    if not re.fullmatch(r"[+-]?[0-9]+", raw) or not 0 <= int(raw) <= INT64_MAX:
        raise ConfigError(f"{s.name} must be a non-negative integer, got {go_quote(raw)}")
    return int(raw)


def _read_sanity_interval(r: _Reading, s: Setting) -> None:
    r.fields["sanity_check_interval"] = _interval(s, r.raw(s))


def _read_membership_interval(r: _Reading, s: Setting) -> None:
    """After the AS settings: the check needs the as_token (docs/membership.md#configuration)."""
    raw = r.raw(s)
    interval = _interval(s, raw)
    appservice = bool(r.fields.get("as_token") and r.fields.get("hs_token") and r.fields.get("hs_server_name"))
    if raw != "" and interval > 0 and not appservice:
        # Only when set: the default of 30 would otherwise warn on every standalone start.
        r.warnings.append(f"{s.name} has no effect unless running as an application service")
    r.fields["membership_check_interval"] = interval


def _read_overrides(r: _Reading, s: Setting) -> None:
    r.fields["cs_api_url_overrides"] = parse_cs_api_overrides(r.raw(s))


def _read_ca_file(r: _Reading, s: Setting) -> None:
    r.fields["ca_file"] = r.raw(s).strip() or None


def _read_blocklist(r: _Reading, s: Setting) -> None:
    raw = r.raw(s)
    r.fields["ip_blocklist"] = None if raw.strip() == "" else parse_cidrs(s.name, raw)


def _read_allowlist(r: _Reading, s: Setting) -> None:
    r.fields["ip_allowlist"] = parse_cidrs(s.name, r.raw(s))







def _read_max_connections(r: _Reading, s: Setting) -> None:
    raw = r.raw(s).strip()
    r.fields["max_connections"] = number(s.name, raw, 0, int) if raw else None






def _read_trusted_proxies(r: _Reading, s: Setting) -> None:
    raw = r.raw(s)
    r.fields["trusted_proxies"] = parse_cidrs(s.name, raw if raw.strip() else s.default)


def _read_sentinels(r: _Reading, s: Setting) -> None:
    """RTCAUTH_REDIS_SENTINELS with RTCAUTH_REDIS_SENTINEL_MASTER: both or neither, and only
    with a redis:// URL (docs/several-instances.md#redis-sentinel)."""
    from rtcauthd.config_values import host_port_list

    raw, master = r.raw(s).strip(), r.env.get("RTCAUTH_REDIS_SENTINEL_MASTER", "").strip()
    if not raw and not master:
        return
    if not raw or not master:
        raise ConfigError("RTCAUTH_REDIS_SENTINELS and RTCAUTH_REDIS_SENTINEL_MASTER go together: set both or neither")
    if not r.fields.get("redis_url", "").startswith("redis://"):
        raise ConfigError(f"{s.name} needs LIVEKIT_REDIS_URL=redis://… (its password and db are used; no TLS or unix socket)")
    r.fields["redis_sentinels"] = host_port_list(s.name, raw)
    r.fields["redis_sentinel_master"] = master


def _read_instance_name(r: _Reading, s: Setting) -> None:
    r.fields["instance_name"] = r.raw(s).strip()


def _read_metrics_listen(r: _Reading, s: Setting) -> None:
    raw = r.raw(s)
    r.fields["metrics_listen"] = metrics_endpoint(raw) if raw.strip() else None


def _read_appservice(r: _Reading, s: Setting) -> None:
    """LIVEKIT_AS_TOKEN and its group, in upstream's order (docs/configuration.md#application-service-mode)."""
    server_name = r.env.get("LIVEKIT_HS_SERVER_NAME", "")  # verbatim, as upstream
    registration = r.env.get("LIVEKIT_AS_REGISTRATION_FILE", "")
    if registration:
        as_token, hs_token = read_registration(
            read_source("LIVEKIT_AS_REGISTRATION_FILE", registration, r.read_file)
        )
        pair = ("LIVEKIT_AS_TOKEN", "LIVEKIT_AS_TOKEN_FROM_FILE", "LIVEKIT_HS_TOKEN", "LIVEKIT_HS_TOKEN_FROM_FILE")
        ignored = [n for n in pair if r.env.get(n)]
        if ignored:
            r.warnings.append(f"LIVEKIT_AS_REGISTRATION_FILE is set, so {', '.join(ignored)} is ignored")
    else:
        as_token = read_token(r.env, r.read_file, r.warnings, s.name, CREDENTIAL_AS_TOKEN)
        hs_token = read_token(r.env, r.read_file, r.warnings, "LIVEKIT_HS_TOKEN", CREDENTIAL_HS_TOKEN)
    values = (as_token, hs_token, server_name)
    if any(values) and not all(values):
        raise ConfigError(APPSERVICE_ALL_OR_NONE)
    r.fields.update(as_token=as_token, hs_token=hs_token, hs_server_name=server_name,
                    registration_file=registration or None)


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
        "RTCAUTH_OUTBOUND_TIMEOUT_SECONDS", f"{DEFAULT_OUTBOUND_TIMEOUT:g}", "bound on every outbound call", _numeric("outbound_timeout", float)
    ),
    Setting("RTCAUTH_MAX_BODY_BYTES", str(DEFAULT_MAX_BODY_BYTES), "request body limit, answered 413", _numeric("max_body_bytes", int)),
    Setting(
        "RTCAUTH_RATELIMIT_PER_SECOND",
        "5",
        "token requests per second per client (/get_token, /sfu/get, /delegate_delayed_leave); 0 = no limit",
        _numeric("ratelimit_per_second", float, zero_allowed=True),
    ),
    Setting("RTCAUTH_RATELIMIT_BURST", "50", "requests a client may make at once; 0 = no limit", _numeric("ratelimit_burst", int, zero_allowed=True)),
    Setting(
        "RTCAUTH_FEDERATION_MAX_INFLIGHT",
        "256",
        "concurrent OpenID verifications against homeservers outside the full-access list (the "
        "full-access ones have a budget of their own); over it, 503 + Retry-After",
        _numeric("federation_max_inflight", int),
    ),
    Setting(
        "RTCAUTH_FEDERATION_MAX_INFLIGHT_PER_SERVER",
        "8",
        "concurrent verifications against one such homeserver; also the keep-alive connections kept per host for them",
        _numeric("federation_max_per_server", int),
    ),
    Setting(
        "RTCAUTH_TOKEN_TTL_SECONDS",
        "3600",
        "lifetime of the LiveKit join tokens handed to clients (upstream: 3600)",
        _numeric("token_ttl", int),
    ),
    Setting(
        "RTCAUTH_MAX_DELAY_SECONDS",
        "86400",
        "longest delayed-leave timeout a client may hand over; longer ones are refused with 400",
        _numeric("max_delay_seconds", float),
    ),
    Setting(
        "RTCAUTH_REQUEST_TIMEOUT_SECONDS",
        "10",
        "a request must arrive whole (headers and body) within this many seconds, else the "
        "connection is dropped; 0 = off",
        _numeric("request_timeout", float, zero_allowed=True),
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
        "LIVEKIT_MEMBERSHIP_CHECK_INTERVAL_SECONDS",
        "30",
        "application-service mode: every N s remove call participants no longer joined to the "
        "Matrix room; 0 = off",
        _read_membership_interval,
    ),
    Setting(
        "RTCAUTH_REDIS_SENTINELS",
        "",
        "host:port,host:port of Redis Sentinels: the master named by RTCAUTH_REDIS_SENTINEL_MASTER "
        "is asked of them and followed through failovers (password and db from LIVEKIT_REDIS_URL)",
        _read_sentinels,
    ),
    Setting("RTCAUTH_REDIS_SENTINEL_MASTER", "", "the Sentinel service name of the Redis master"),
    Setting(
        "RTCAUTH_JOB_LEASE_SECONDS",
        "10",
        "with several instances on one Redis: how long a dead instance's jobs wait at most "
        "before another instance takes them over",
        _numeric("job_lease_seconds", float),
    ),
    Setting(
        "RTCAUTH_INSTANCE_NAME",
        "",
        "this instance's name in logs, metrics and Redis (default: host name and pid)",
        _read_instance_name,
    ),
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
        env.update(parse_env_file(read_source("--config", config_file, read_file)))
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
