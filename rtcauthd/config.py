"""Configuration: lk-jwt-service's environment variables, parsed purely (no I/O of our own).

``load_config(environ, read_file=...)`` returns a frozen :class:`Config` or raises
:class:`ConfigError` whose message is the one line an operator sees before the process exits
with status 1. Parsing order, defaults and messages follow upstream (docs/configuration.md) so that
an operator can swap services without touching their environment file. Additions are prefixed
``RTCAUTH_`` and are all optional.

Every variable is one row of :data:`SETTINGS` (name, default, reader, help), which also
feeds ``twistd rtcauth --help`` and the check of debian/rtcauthd.env. The files behind
the values are read in :mod:`rtcauthd.config_sources`, single values checked in
:mod:`rtcauthd.config_values`, and the readers the table names live in
:mod:`rtcauthd.config_readers`.
"""

from __future__ import annotations

import textwrap
from typing import Callable, Mapping, Optional

import attr

from rtcauthd.config_sources import (
    CREDENTIAL_AS_TOKEN,
    CREDENTIAL_HS_TOKEN,
    CREDENTIAL_KEY,
    CREDENTIAL_SECRET,
    ConfigError,
    parse_env_file,
    read_source,
    read_text_file,
)
from rtcauthd.config_readers import (
    INSECURE_MAGIC,
    DEFAULT_BIND,
    DEFAULT_OUTBOUND_TIMEOUT,
    DEFAULT_MAX_BODY_BYTES,
    LOG_FORMATS,
    APPSERVICE_ALL_OR_NONE,
    _numeric,
    Setting,
    _Reading,
    _read_log_level,
    _read_log_format,
    _read_insecure,
    _read_livekit,
    _read_full_access,
    _read_listeners,
    _read_sanity_interval,
    _read_membership_interval,
    _read_overrides,
    _read_ca_file,
    _read_blocklist,
    _read_allowlist,
    _read_max_connections,
    _read_trusted_proxies,
    _read_sentinels,
    _read_instance_name,
    _read_metrics_listen,
    _read_appservice,
    _read_redis_url,
    _read_own_metadata,
)

__all__ = [
    "APPSERVICE_ALL_OR_NONE",
    "DEFAULT_BIND",
    "KNOWN_VARIABLES",
    "SETTINGS",
    "Config",
    "ConfigError",
    "Setting",
    "load_config",
    "settings_help",
]

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
