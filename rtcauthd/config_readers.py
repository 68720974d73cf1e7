"""The readers behind :data:`rtcauthd.config.SETTINGS`: one function per setting (or group).

Each reads its raw environment value(s) from a :class:`_Reading`, checks it (upstream's
messages and defaults, docs/configuration.md) and writes ``Config`` fields; a setting that
cannot be used raises :class:`ConfigError`. Kept apart from the table so that
``rtcauthd/config.py`` stays the one readable list of variables.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Optional

import attr

from rtcauthd.config_sources import (
    CREDENTIAL_AS_TOKEN,
    CREDENTIAL_HS_TOKEN,
    ConfigError,
    key_and_secret,
    read_registration,
    read_source,
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
