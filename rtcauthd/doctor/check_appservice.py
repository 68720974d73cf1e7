"""Application-service mode: does Synapse do what the service's registration promises?

Each mistake of this family is silent until a call fails: Synapse ignores registration
keys it does not know, a flag left off removes an endpoint, a token pair that differs
between the two sides turns every request into a 401. So the doctor asks Synapse itself,
with the service's as_token (sent only where the service sends it): whoami, the AS ping,
is_joined, delayed-event restarts, and one proxied ``get_token`` for a made-up room whose
only correct answer — 403 "not a member" — can come from the service alone.
"""

from __future__ import annotations

import json
from typing import Optional
from urllib.parse import quote

from rtcauthd import errors
from rtcauthd.doctor.answers import errcode_of, json_object, status_text
from rtcauthd.doctor.as_config import (
    PROXY_URL_KEY,
    Registration,
    flags_yaml,
    judge_registration,
    registration_keys_yaml,
    service_homeserver_url,
    transports_yaml,
)
from rtcauthd.doctor.check_discovery import find_focus, find_transports, find_well_known
from rtcauthd.doctor.check_token_flow import (
    PROBE_DELAY_ID,
    PROBE_MEMBER_ID,
    PROBE_SLOT_ID,
    RATE_PROBE_REQUESTS,
    WHOAMI_PATH,
)
from rtcauthd.doctor.check_transports import livekit_transport
from rtcauthd.doctor.context import Context, gather
from rtcauthd.doctor.report import Result, Status
from rtcauthd.outbound.client import HTTPResponse, OutboundError

CS_GET_TOKEN_PATH = "/_matrix/client/unstable/io.element.msc4195/rtc/livekit/get_token"
IS_JOINED_PATH = "/_matrix/client/unstable/io.element.msc4502/rooms/{room}/is_joined"
PING_PATH = "/_matrix/client/v1/appservice/{id}/ping"
PROBE_ROOM_LOCALPART = "rtcauth-doctor-probe"


def probe_room(server_name: str) -> str:
    """A room no server knows: the service must answer it with 403 "not a member"."""
    return f"!{PROBE_ROOM_LOCALPART}:{server_name}"


def _same_file_fix(reg: Optional[Registration]) -> list[str]:
    path = reg.path if reg is not None else "/etc/matrix-synapse/rtcauthd-registration.yaml"
    return [
        "Give Synapse and the service the same registration file, then restart both:",
        f"  # homeserver.yaml\n  app_service_config_files:\n    - {path}\n"
        f"  # the service's env file\n  LIVEKIT_AS_REGISTRATION_FILE={path}",
    ]


async def find_registration(ctx: Context) -> Optional[Registration]:
    """The registration file the service was given (None when it got tokens from variables)."""
    config = ctx.options.config
    path = config.registration_file if config is not None else None
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        return Registration(path=path, error=e.strerror or str(e))
    return judge_registration(path, text, server_name=config.hs_server_name)


class _Calls:
    """Requests to the homeserver with the service's as_token (never logged, never printed)."""

    def __init__(self, ctx: Context, base: str) -> None:
        self.ctx, self.base = ctx, base
        self._auth = {"Authorization": "Bearer " + ctx.options.config.as_token, "Accept": "application/json"}

    async def call(self, method: bytes, path: str, body=None) -> HTTPResponse:
        headers = dict(self._auth)
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode("utf-8")
        return await self.ctx.fetch(method, self.base + path, headers=headers, body=data, step=method.decode())


async def check_appservice(ctx: Context) -> list[Result]:
    """Registration, tokens, ping, proxy, is_joined and rate limits of application-service mode."""
    config = ctx.options.config
    transports = await ctx.finding(find_transports)
    transport = livekit_transport(transports) or {}
    advertised = transport.get("url") if isinstance(transport.get("url"), str) else None
    info = await ctx.finding(find_well_known)
    if config is None or not config.appservice:
        if advertised and ctx.options.access_token and info.base_url:
            # Clients will use the proxied endpoints: check them as a client would.
            return [await _proxy_probe(ctx, info.base_url, ctx.options.access_token, "--access-token",
                                       advertised, None)]
        return []

    reg = await ctx.finding(find_registration)
    mode = _mode_result(ctx, reg)
    base = service_homeserver_url(ctx, info.base_url)
    if mode.status is Status.FAIL:
        return [mode]
    if base is None:
        return [mode, Result("as-token", "AS token", Status.SKIP,
                             "not checked: no client-server API URL for the service's homeserver (see Client "
                             "discovery; or set LIVEKIT_CS_API_URL_OVERRIDES)")]
    calls = _Calls(ctx, base)
    url = advertised or config.livekit_url
    if ctx.options.access_token and info.base_url:
        proxy = _proxy_probe(ctx, info.base_url, ctx.options.access_token, "--access-token", url, reg)
    else:
        proxy = _proxy_probe(ctx, base, config.as_token, "the service's as_token", url, reg)
    results = await gather([_as_token(ctx, calls, reg), _ping(calls, reg), proxy,
                            _is_joined(ctx, calls, reg), _delayed_events(calls)])
    return [mode, _registration_result(reg)] + results


def _mode_result(ctx: Context, reg: Optional[Registration]) -> Result:
    title = "AS mode"
    config = ctx.options.config
    source = f"registration {reg.path}" if reg is not None else "LIVEKIT_AS_TOKEN/LIVEKIT_HS_TOKEN"
    if config.hs_server_name != ctx.server.original:
        return Result(
            "appservice", title, Status.FAIL,
            f"LIVEKIT_HS_SERVER_NAME is {config.hs_server_name!r}, not {ctx.server.original!r}: the "
            "service treats this server's users as remote and sends its as_token elsewhere",
            fix=[f"LIVEKIT_HS_SERVER_NAME={ctx.server.original} (exactly as in user IDs)"],
        )
    override = config.cs_api_url_overrides.get(config.hs_server_name)
    where = f"{override} (LIVEKIT_CS_API_URL_OVERRIDES)" if override else "the client well-known's base URL"
    return Result("appservice", title, Status.PASS,
                  f"the service is the application service of {config.hs_server_name} (tokens from {source}); "
                  f"it calls the homeserver at {where}")


def _registration_result(reg: Optional[Registration]) -> Result:
    title = "AS registration"
    if reg is None:
        return Result("as-registration", title, Status.SKIP,
                      "not checked: the service got its tokens from variables, not LIVEKIT_AS_REGISTRATION_FILE",
                      fix=["Point LIVEKIT_AS_REGISTRATION_FILE at the file Synapse loads, so that both "
                           "read the same tokens and the doctor can check its keys."])
    if reg.error is not None:
        return Result("as-registration", title, Status.FAIL, f"{reg.path} cannot be read: {reg.error}")
    if not reg.problems:
        return Result("as-registration", title, Status.PASS,
                      f"{reg.path}: id {reg.id!r}, the namespaced proxy and is_joined keys Synapse reads")
    (message, fix), rest = reg.problems[0], reg.problems[1:]
    return Result("as-registration", title, Status.FAIL, message, [m for m, _f in rest],
                  list(fix) + [f for _m, fs in rest for f in fs])


async def _as_token(ctx: Context, calls: _Calls, reg: Optional[Registration]) -> Result:
    title = "AS token"
    try:
        response = await calls.call(b"GET", WHOAMI_PATH)
    except OutboundError as e:
        return Result("as-token", title, Status.FAIL, f"the homeserver at {calls.base} is unreachable: {e.reason}")
    user = json_object(response).get("user_id")
    if response.code == 200 and isinstance(user, str):
        return Result("as-token", title, Status.PASS, f"Synapse knows the service's as_token (it acts as {user})")
    if response.code == 401:
        return Result("as-token", title, Status.FAIL,
                      f"Synapse does not know the service's as_token ({status_text(response)}): the "
                      "registration Synapse loaded has another as_token, or Synapse did not load it",
                      fix=_same_file_fix(reg))
    return Result("as-token", title, Status.FAIL, f"whoami with the service's as_token answers {status_text(response)}")


async def _ping(calls: _Calls, reg: Optional[Registration]) -> Result:
    title = "AS ping"
    if reg is None or reg.id is None:
        why = ("the registration has no id" if reg is not None
               else "it needs the registration's id (LIVEKIT_AS_REGISTRATION_FILE)")
        return Result("as-ping", title, Status.SKIP, f"not checked: {why}")
    try:
        response = await calls.call(b"POST", PING_PATH.format(id=quote(reg.id, safe="")), {})
    except OutboundError as e:
        return Result("as-ping", title, Status.FAIL, f"the homeserver's AS ping failed: {e.reason}")
    body, errcode = json_object(response), errcode_of(response)
    if response.code == 200:
        ms = body.get("duration_ms")
        return Result("as-ping", title, Status.PASS,
                      f"Synapse reached the service at {reg.url} and it accepted the hs_token"
                      + (f" ({ms} ms)" if isinstance(ms, int) else ""))
    if errcode == "M_URL_NOT_SET":
        return Result("as-ping", title, Status.SKIP,
                      "not checked: the registration's url is null, so Synapse never pings the service "
                      "(the AS proxy line checks the hs_token instead)")
    if errcode == "M_BAD_STATUS":
        status = body.get("status")
        if status in (401, 403):
            return Result("as-ping", title, Status.FAIL,
                          f"the service refused Synapse's hs_token (HTTP {status}): Synapse's registration "
                          "and the service have different hs_tokens", fix=_same_file_fix(reg))
        return Result("as-ping", title, Status.FAIL,
                      f"Synapse's ping of {reg.url} got HTTP {status}: the registration's url is not this "
                      "service in application-service mode",
                      ["Right after the service was down, Synapse may still be re-sending old "
                       "transactions: then try again a few seconds later."],
                      [f"url: the service's origin, as {PROXY_URL_KEY} (or null: no pings, no transactions)"])
    if errcode in ("M_CONNECTION_FAILED", "M_CONNECTION_TIMEOUT"):
        return Result("as-ping", title, Status.FAIL,
                      f"Synapse cannot reach the registration's url {reg.url} ({errcode})",
                      fix=[f"url must be where Synapse reaches the service, like {PROXY_URL_KEY}; or null."])
    if response.code == 403:
        return Result("as-ping", title, Status.FAIL,
                      f"Synapse's registration for this as_token is not {reg.id!r} ({status_text(response)})",
                      fix=_same_file_fix(reg))
    return Result("as-ping", title, Status.FAIL, f"the AS ping answers {status_text(response)}")


async def _proxy_probe(ctx: Context, base: str, token: str, credential: str, url: str,
                       reg: Optional[Registration]) -> Result:
    """One proxied ``get_token`` for a made-up room; the service alone answers 403 "not a member"."""
    title = "AS proxy"
    server = ctx.options.config.hs_server_name if ctx.options.config is not None and ctx.options.config.appservice \
        else ctx.server.original
    body = {"url": url, "room_id": probe_room(server), "slot_id": PROBE_SLOT_ID, "member_id": PROBE_MEMBER_ID}
    headers = {"Authorization": "Bearer " + token, "Content-Type": "application/json", "Accept": "application/json"}
    try:
        response = await ctx.fetch(b"POST", base + CS_GET_TOKEN_PATH, headers=headers,
                                   body=json.dumps(body).encode("utf-8"), step="POST")
    except OutboundError as e:
        return Result("as-proxy", title, Status.FAIL, f"POST {base}{CS_GET_TOKEN_PATH} failed: {e.reason}")
    answer = json_object(response)
    errcode, text = errcode_of(response), answer.get("error")
    config = ctx.options.config
    sfu = config.livekit_url if config is not None else None
    focus = await ctx.finding(find_focus)
    if (response.code == 403 and text == errors.E7_NOT_MEMBER) or (response.code == 200 and "jwt" in answer):
        return Result("as-proxy", title, Status.PASS,
                      f"Synapse routes rtc/livekit/get_token to the service, which accepted the hs_token "
                      f"and the url {url} and asked is_joined (403 for the doctor's made-up room, as it "
                      f"should; sent with {credential})")
    if response.code == 404 and errcode is not None:
        if reg is not None and not reg.proxy_claimed:
            cause = "the registration lacks the io.element.msc4512 proxy keys (see AS registration)"
        else:
            cause = "msc4512_enabled is off, or Synapse did not load a registration claiming rtc/livekit"
        return Result("as-proxy", title, Status.FAIL,
                      f"Synapse does not route {CS_GET_TOKEN_PATH} ({status_text(response)}): {cause}; "
                      "clients get 404 and cannot join calls",
                      fix=["In homeserver.yaml:", flags_yaml(["msc4512_enabled"]), "and in the registration:",
                           registration_keys_yaml(reg.proxy_url if reg is not None else None)])
    if response.code == 404:
        not_as = config is not None and not config.appservice
        return Result("as-proxy", title, Status.FAIL,
                      f"Synapse forwards {CS_GET_TOKEN_PATH}, but behind its proxy_url something answers "
                      f"{status_text(response)}: "
                      + ("the service is not in application-service mode" if not_as else
                         "that is not this service in application-service mode, or proxy_url has a path"),
                      fix=["Give the service LIVEKIT_HS_SERVER_NAME and LIVEKIT_AS_REGISTRATION_FILE, and write "
                           f"{PROXY_URL_KEY} as its origin (no path)."])
    if response.code == 400 and text == errors.E7_URL:
        return Result("as-proxy", title, Status.FAIL,
                      f"the service refused the transport url {url} (400 M_INVALID_PARAM): it is not its "
                      "LIVEKIT_URL" + (f" {sfu}" if sfu else ""),
                      fix=["The transport url in homeserver.yaml must equal LIVEKIT_URL byte for byte:",
                           transports_yaml(sfu, focus.url)])
    if response.code == 401 and text in (errors.E7_HS_WRONG, errors.E7_HS_MISSING):
        return Result("as-proxy", title, Status.FAIL,
                      f"the service refused Synapse's hs_token ({errcode}): Synapse's registration and the "
                      "service have different hs_tokens", fix=_same_file_fix(reg))
    if response.code == 502 and text == errors.E7_MEMBERSHIP:
        return Result("as-proxy", title, Status.FAIL,
                      "the service cannot ask Synapse whether users are joined (502 "
                      f"\"{errors.E7_MEMBERSHIP}\"): msc4502_enabled is off or the registration lacks the "
                      "is_joined scope (see AS is_joined); every token request fails",
                      fix=["In homeserver.yaml:", flags_yaml(["msc4502_enabled"]), "and in the registration:",
                           registration_keys_yaml(reg.proxy_url if reg is not None else None)])
    if response.code == 500 and errcode == "M_UNKNOWN" and text != errors.E_INTERNAL:
        where = reg.proxy_url if reg is not None and reg.proxy_url else "the registration's proxy_url"
        return Result("as-proxy", title, Status.FAIL,
                      f"Synapse cannot reach the service at {where} ({status_text(response)})",
                      fix=[f"{PROXY_URL_KEY} must be where Synapse reaches the service's listener, e.g. "
                           "http://127.0.0.1:8080 when both run on one host."])
    if response.code == 401:
        return Result("as-proxy", title, Status.FAIL, f"the homeserver refused {credential} ({status_text(response)})")
    if response.code == 429:
        return Result("as-proxy", title, Status.WARN,
                      f"Synapse rate-limited the proxied request ({status_text(response)}); run the doctor again later")
    return Result("as-proxy", title, Status.FAIL,
                  f"the proxied get_token answers {status_text(response)} (expected 403 \"{errors.E7_NOT_MEMBER}\")")


async def _is_joined(ctx: Context, calls: _Calls, reg: Optional[Registration]) -> Result:
    title = "AS is_joined"
    server = ctx.options.config.hs_server_name
    path = IS_JOINED_PATH.format(room=quote(probe_room(server), safe="")) + "?server_name=" + quote(server, safe="")
    try:
        response = await calls.call(b"GET", path)
    except OutboundError as e:
        return Result("as-is-joined", title, Status.FAIL, f"is_joined failed: {e.reason}")
    if response.code == 200:
        return Result("as-is-joined", title, Status.PASS, "the as_token may ask is_joined (MSC4502)")
    if response.code == 404:
        return Result("as-is-joined", title, Status.FAIL,
                      f"the homeserver has no is_joined endpoint ({status_text(response)}): msc4502_enabled is "
                      "off, so no membership can be verified and every token request fails with 502",
                      fix=["In homeserver.yaml (restart Synapse):", flags_yaml(["msc4502_enabled"])])
    if response.code == 403:
        return Result("as-is-joined", title, Status.FAIL,
                      f"Synapse refuses the service is_joined ({status_text(response)}): the registration "
                      "Synapse loaded lacks the is_joined scope",
                      fix=["In the registration (restart Synapse):",
                           registration_keys_yaml(reg.proxy_url if reg is not None else None)])
    return Result("as-is-joined", title, Status.FAIL, f"is_joined with the as_token answers {status_text(response)}")


async def _delayed_events(calls: _Calls) -> Result:
    """Restarts as the service sends them (as_token): throttled unless ``rate_limited: false``."""
    from rtcauthd.matrix.csapi import delayed_event_url

    title = "AS delayed events"
    path = delayed_event_url("", PROBE_DELAY_ID, "restart")
    for accepted in range(RATE_PROBE_REQUESTS):
        try:
            response = await calls.call(b"POST", path, {})
        except OutboundError as e:
            return Result("as-delayed-events", title, Status.FAIL, f"delayed-event restart failed: {e.reason}")
        if response.code == 429:
            return Result(
                "as-delayed-events", title, Status.WARN,
                f"Synapse throttled delayed-event restarts sent with the service's as_token after "
                f"{accepted} in a burst: rc_delayed_event_mgmt applies to the application service (per "
                "user it acts as), so a user with several calls or devices gets late or lost leave events",
                fix=["Exempt the service in its registration (restart Synapse):", "  rate_limited: false"],
            )
        if accepted == 0 and response.code in (400, 404, 405) and errcode_of(response) == "M_UNRECOGNIZED":
            return Result("as-delayed-events", title, Status.WARN,
                          "the homeserver has no MSC4140 delayed-event endpoints",
                          fix=["Synapse: set max_event_delay_duration: 24h in homeserver.yaml."])
        if accepted == 0 and response.code in (401, 403):
            return Result("as-delayed-events", title, Status.FAIL,
                          f"a delayed-event restart with the as_token answers {status_text(response)}")
    return Result("as-delayed-events", title, Status.PASS,
                  f"no throttling in a burst of {RATE_PROBE_REQUESTS} delayed-event restarts with the as_token")
