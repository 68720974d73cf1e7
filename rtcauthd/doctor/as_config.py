"""What the doctor knows about an application-service deployment without the network.

The registration file the service was given (``LIVEKIT_AS_REGISTRATION_FILE``) is judged
as Synapse 1.163 reads it: only the namespaced ``io.element.msc4502.*`` and
``io.element.msc4512.*`` keys count, so unprefixed twins are silently ignored there — the
most expensive mistake of this family, because nothing fails until a call does. The YAML
snippets every fix quotes are built here, so that the transports and application-service
lines tell the operator the same thing.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

import attr

from rtcauthd.doctor.net import parse_url

IS_JOINED_SCOPE = "urn:matrix:client:io.element.msc4502:rooms:is_joined"
PROXY_PREFIX = "rtc/livekit"
SCOPES_KEY = "io.element.msc4502.scopes"
PROXY_PREFIX_KEY = "io.element.msc4512.proxy_prefix"
PROXY_URL_KEY = "io.element.msc4512.proxy_url"
#: Spellings Synapse 1.163 does not read, with the key it does read.
IGNORED_SPELLINGS = {
    "scopes": SCOPES_KEY,
    "io.element.msc4502.scope": SCOPES_KEY,
    "proxy_prefix": PROXY_PREFIX_KEY,
    "proxy_url": PROXY_URL_KEY,
}
#: Synapse's experimental flags, by what each one switches on.
FLAGS = {
    "msc4502_enabled": "is_joined (membership checks)",
    "msc4512_enabled": "the rtc/livekit proxy and fed_proxy",
    "msc4143_enabled": "/rtc/transports",
}
PLACEHOLDER_SFU = "wss://sfu.example.com"
PLACEHOLDER_PROXY_URL = "http://127.0.0.1:8080"


def quoted(value: str) -> str:
    """A YAML double-quoted scalar (JSON strings are YAML)."""
    return json.dumps(value)


def flags_yaml(flags=tuple(FLAGS)) -> str:
    """The ``experimental_features`` lines of homeserver.yaml for ``flags``."""
    return "  experimental_features:\n" + "".join(f"    {flag}: true\n" for flag in flags).rstrip("\n")


def transports_yaml(url: Optional[str], service_url: Optional[str]) -> str:
    """homeserver.yaml's ``matrix_rtc`` with one livekit transport (clients' view of the SFU)."""
    lines = ["  matrix_rtc:", "    transports:", "      - type: livekit",
             f"        url: {quoted(url or PLACEHOLDER_SFU)}"]
    if service_url:
        lines.append(f"        livekit_service_url: {quoted(service_url)}")
    return "\n".join(lines)


def registration_keys_yaml(proxy_url: Optional[str]) -> str:
    """The namespaced registration keys Synapse 1.163 reads."""
    return (
        f"  {SCOPES_KEY}:\n"
        f"    - {quoted(IS_JOINED_SCOPE)}\n"
        f"  {PROXY_PREFIX_KEY}: {quoted(PROXY_PREFIX)}\n"
        f"  {PROXY_URL_KEY}: {quoted(proxy_url or PLACEHOLDER_PROXY_URL)}"
    )


def namespace_yaml(server_name: str) -> str:
    return (
        "  namespaces:\n"
        "    users:\n"
        "      - exclusive: false\n"
        f"        regex: '@.*:{re.escape(server_name)}'"
    )


def service_homeserver_url(ctx, well_known_base: Optional[str]) -> Optional[str]:
    """Where the service sends its as_token: its CS-API override, else the client well-known
    of LIVEKIT_HS_SERVER_NAME (the doctor sends the token nowhere else)."""
    config = ctx.options.config
    if config is None or not config.appservice:
        return None
    override = config.cs_api_url_overrides.get(config.hs_server_name)
    if override:
        return override.rstrip("/")
    if config.hs_server_name == ctx.server.original:
        return well_known_base
    return None


def url_difference(configured: str, advertised: str) -> str:
    """How two URLs that must be equal byte for byte differ, in words."""
    if configured.rstrip("/") == advertised.rstrip("/"):
        return "only a trailing '/' differs"
    if configured.lower() == advertised.lower():
        return "only upper/lower case differs"
    for index, (a, b) in enumerate(zip(configured, advertised)):
        if a != b:
            return f"they differ from character {index + 1} on ({a!r} vs {b!r})"
    return f"one is {abs(len(configured) - len(advertised))} character(s) longer"


@attr.s(auto_attribs=True)
class Registration:
    """The registration file the service was given, as Synapse would read it."""

    path: str
    error: Optional[str] = None
    id: Optional[str] = None
    url: Any = None  # None also for ``url: null``
    proxy_url: Optional[str] = None  # namespaced, or the ignored spelling's value
    problems: list = attr.Factory(list)  # (message, fix paragraphs)
    missing: list = attr.Factory(list)  # namespaced keys Synapse needs and does not find
    rate_limited: bool = True

    @property
    def proxy_claimed(self) -> bool:
        """Whether Synapse would route rtc/livekit to this registration."""
        return not any(key in (PROXY_PREFIX_KEY, PROXY_URL_KEY) for key in self.missing)


def _string(value: Any) -> Optional[str]:
    return value.strip().rstrip("/") if isinstance(value, str) and value.strip() else None


def judge_registration(path: str, text: str, *, server_name: str) -> Registration:
    """Parse ``text`` (the file at ``path``) and list what Synapse 1.163 would not do with it."""
    import yaml

    reg = Registration(path=path)
    try:
        root = yaml.safe_load(text)
    except yaml.YAMLError as e:
        reg.error = " ".join(str(e).split())
        return reg
    if not isinstance(root, dict):
        reg.error = "the top level is not a mapping"
        return reg
    reg.id = root.get("id") if isinstance(root.get("id"), str) else None
    reg.url = root.get("url") if isinstance(root.get("url"), str) else None
    reg.rate_limited = root.get("rate_limited") is not False
    reg.proxy_url = _string(root.get(PROXY_URL_KEY)) or _string(root.get("proxy_url"))
    ignored = sorted(key for key in IGNORED_SPELLINGS if key in root and IGNORED_SPELLINGS[key] not in root)
    scopes = root.get(SCOPES_KEY)
    if not (isinstance(scopes, list) and IS_JOINED_SCOPE in scopes):
        reg.missing.append(SCOPES_KEY)
    for key in (PROXY_PREFIX_KEY, PROXY_URL_KEY):
        if _string(root.get(key)) is None:
            reg.missing.append(key)
    keys_fix = ["Write the namespaced keys in the registration (and restart Synapse):",
                registration_keys_yaml(reg.proxy_url)]
    if ignored:
        reg.problems.append((
            f"{path} uses {', '.join(ignored)}, which Synapse ignores (it reads only "
            f"{', '.join(sorted({IGNORED_SPELLINGS[k] for k in ignored}))}): "
            + _consequence(reg.missing),
            keys_fix,
        ))
    elif reg.missing:
        reg.problems.append((f"{path} lacks {', '.join(reg.missing)}: " + _consequence(reg.missing), keys_fix))
    prefix = _string(root.get(PROXY_PREFIX_KEY))
    if prefix is not None and prefix != PROXY_PREFIX and not prefix.startswith(PROXY_PREFIX + "/"):
        reg.problems.append((
            f"{PROXY_PREFIX_KEY} is {prefix!r}: Synapse refuses any prefix but {PROXY_PREFIX!r} (or below it)",
            [f"  {PROXY_PREFIX_KEY}: {quoted(PROXY_PREFIX)}"],
        ))
    if reg.proxy_url is not None:
        try:
            parsed = parse_url(reg.proxy_url)
        except ValueError:
            parsed = None
        if parsed is None or parsed.scheme not in ("http", "https"):
            reg.problems.append((f"{PROXY_URL_KEY} {reg.proxy_url!r} is not an http(s):// URL", []))
        elif parsed.path not in ("", "/"):
            origin = reg.proxy_url[: len(reg.proxy_url) - len(parsed.path)]
            reg.problems.append((
                f"{PROXY_URL_KEY} {reg.proxy_url} has a path: Synapse appends the whole "
                "/_matrix/... path to it, and the service serves those paths at its root",
                [f"  {PROXY_URL_KEY}: {quoted(origin)}"],
            ))
    probe_user = f"@rtcauth-doctor:{server_name}"
    if not _namespace_covers(root.get("namespaces"), probe_user):
        reg.problems.append((
            f"its user namespace does not cover local users such as {probe_user}: Synapse lets "
            "the service act as a user (delegated leave) only inside it",
            [namespace_yaml(server_name)],
        ))
    return reg


def _consequence(missing: list) -> str:
    parts = []
    if PROXY_PREFIX_KEY in missing or PROXY_URL_KEY in missing:
        parts.append("Synapse proxies nothing to the service (404 for clients)")
    if SCOPES_KEY in missing:
        parts.append("is_joined answers 403, so every token request fails with 502")
    return "; ".join(parts) or "nothing"


def _namespace_covers(namespaces: Any, user_id: str) -> bool:
    users = namespaces.get("users") if isinstance(namespaces, dict) else None
    for entry in users if isinstance(users, list) else []:
        regex = entry.get("regex") if isinstance(entry, dict) else None
        if isinstance(regex, str):
            try:
                if re.match(regex, user_id):
                    return True
            except re.error:
                continue
    return False
