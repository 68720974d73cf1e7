"""With ``--access-token``: the whole token flow, the SFU URL, and delayed-event limits.

Access token → whoami → OpenID token → the service's ``/get_token`` → a LiveKit JWT
whose claims are checked against MSC4195; then the SFU URL the service hands out, and
whether the homeserver would throttle the service's delayed-event restarts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
from typing import Any, Optional
from urllib.parse import quote

import attr

from rtcauthd.doctor.answers import DOCTOR_ORIGIN, errcode_of, json_object, status_text
from rtcauthd.doctor.check_discovery import find_focus, find_well_known
from rtcauthd.doctor.context import Context
from rtcauthd.doctor.net import parse_url
from rtcauthd.doctor.report import Result, Status
from rtcauthd.outbound.client import HTTPResponse, OutboundError

WHOAMI_PATH = "/_matrix/client/v3/account/whoami"
PROBE_SLOT_ID = "m.call#ROOM"
PROBE_MEMBER_ID = "rtcauth-doctor"
PROBE_DELAY_ID = "rtcauth-doctor-probe"
#: Unauthenticated delayed-event restarts sent to look for a tight rate limit.
RATE_PROBE_REQUESTS = 10
#: Element Call schedules its leave 10 s ahead; the service restarts it at 80 %.
RESTART_INTERVAL_SECONDS = 8
#: Allowed clock difference when judging nbf/exp of the service's JWT.
JWT_LEEWAY = 60


@attr.s(auto_attribs=True)
class Flow:
    """Outcome of the ``--access-token`` flow (token → OpenID → service → JWT)."""

    results: list
    sfu_url: Optional[str] = None


def _b64url_json(segment: str) -> Any:
    padded = segment + "=" * (-len(segment) % 4)
    return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8"))


def _is_internal_host(host: str) -> bool:
    """A host only the service's own network can reach (clients get LIVEKIT_URL verbatim)."""
    if host == "localhost" or host.endswith(".localhost") or "." not in host and ":" not in host:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host.endswith((".local", ".internal", ".lan"))
    return address.is_private or address.is_loopback or address.is_link_local


async def run_token_flow(ctx: Context) -> Flow:
    """Access token → whoami → OpenID token → the service's /get_token → JWT claims."""
    from rtcauthd.livekit import naming

    title = "Token flow"
    info = await ctx.finding(find_well_known)
    focus = await ctx.finding(find_focus)
    if info.base_url is None or focus.url is None:
        missing = "homeserver base URL" if info.base_url is None else "service URL"
        return Flow([Result("token-flow", title, Status.SKIP, f"no {missing} (see above)")])
    base, service = info.base_url, focus.url
    auth = {"Authorization": "Bearer " + ctx.options.access_token, "Accept": "application/json"}

    def fail(message: str, fix=()) -> Flow:
        return Flow([Result("token-flow", title, Status.FAIL, message, fix=fix)])

    try:
        whoami = await ctx.fetch(b"GET", base + WHOAMI_PATH, headers=auth, step="whoami")
    except OutboundError as e:
        return fail(f"whoami at {base} failed: {e.reason}")
    who = json_object(whoami)
    if whoami.code != 200 or not isinstance(who.get("user_id"), str):
        return fail(f"the homeserver does not accept --access-token: whoami answers {status_text(whoami)}")
    user_id = who["user_id"]
    device_id = who.get("device_id") if isinstance(who.get("device_id"), str) else "RTCAUTHDOCTOR"

    openid_url = f"{base}/_matrix/client/v3/user/{quote(user_id, safe='')}/openid/request_token"
    try:
        answer = await ctx.fetch(
            b"POST", openid_url, headers={**auth, "Content-Type": "application/json"}, body=b"{}", step="openid"
        )
    except OutboundError as e:
        return fail(f"requesting an OpenID token failed: {e.reason}")
    openid = json_object(answer)
    if answer.code != 200 or not isinstance(openid.get("access_token"), str):
        return fail(f"the homeserver gives no OpenID token: {status_text(answer)}")
    server_name = openid.get("matrix_server_name")

    room_id = f"!rtcauth-doctor:{ctx.server}"
    request = {
        "room_id": room_id,
        "slot_id": PROBE_SLOT_ID,
        "openid_token": {
            "access_token": openid["access_token"],
            "token_type": openid.get("token_type", "Bearer"),
            "matrix_server_name": server_name,
            "expires_in": openid.get("expires_in", 3600),
        },
        "member": {"id": PROBE_MEMBER_ID, "claimed_user_id": user_id, "claimed_device_id": device_id},
    }
    try:
        token_answer = await ctx.fetch(
            b"POST",
            service + "/get_token",
            headers={"Content-Type": "application/json", "Origin": DOCTOR_ORIGIN},
            body=json.dumps(request).encode("utf-8"),
            step="get_token",
        )
    except OutboundError as e:
        return fail(f"POST {service}/get_token failed: {e.reason}")
    if token_answer.code != 200:
        return fail(*_get_token_failure(token_answer, server_name))
    body = json_object(token_answer)
    jwt_text, sfu_url = body.get("jwt"), body.get("url")
    if not isinstance(jwt_text, str) or not isinstance(sfu_url, str):
        return fail(f"{service}/get_token answered 200 without a string jwt and url")

    expected_identity = naming.identity(user_id, device_id, PROBE_MEMBER_ID)
    expected_room = naming.room_alias(room_id, PROBE_SLOT_ID)
    problems = _jwt_problems(ctx, jwt_text, expected_identity, expected_room)
    if problems:
        return Flow(
            [Result("token-flow", title, Status.FAIL, f"the service's JWT for {user_id} is wrong: {problems[0]}", problems[1:])],
            sfu_url=sfu_url,
        )
    return Flow(
        [
            Result(
                "token-flow",
                title,
                Status.PASS,
                f"{user_id} got a LiveKit JWT from {service}/get_token; its claims match "
                "MSC4195 (identity, room alias, join/publish/subscribe grants)",
            )
        ],
        sfu_url=sfu_url,
    )

def _get_token_failure(response: HTTPResponse, server_name) -> tuple[str, list[str]]:
    text = status_text(response)
    if response.code == 401:
        return (
            f"the service refused the OpenID token ({text}): it could not verify it with "
            f"{server_name} over federation",
            ["See the Federation line: the service must reach the homeserver's "
             "openid/userinfo endpoint and trust its certificate (RTCAUTH_CA_FILE for a private CA)."],
        )
    if response.code == 500 and "create room" in text.lower():
        return (
            f"the service cannot create the room on the SFU ({text})",
            ["Check the service's LIVEKIT_URL and key/secret (run doctor with --config ENVFILE)."],
        )
    return (f"POST /get_token answers {text}", [])


def _jwt_problems(ctx: Context, token: str, identity: str, room: str) -> list[str]:
    parts = token.split(".")
    if len(parts) != 3:
        return ["it is not a JWT"]
    try:
        header, claims = _b64url_json(parts[0]), _b64url_json(parts[1])
    except (ValueError, UnicodeDecodeError):
        return ["its header or payload is not base64url JSON"]
    if not isinstance(header, dict) or not isinstance(claims, dict):
        return ["its header or payload is not a JSON object"]
    problems = []
    if header.get("alg") != "HS256":
        problems.append(f"alg is {header.get('alg')!r}, not HS256")
    if claims.get("sub") != identity:
        problems.append(f"sub is {claims.get('sub')!r}, expected the MSC4195 identity {identity}")
    video = claims.get("video") if isinstance(claims.get("video"), dict) else {}
    if video.get("room") != room:
        problems.append(f"video.room is {video.get('room')!r}, expected the room alias {room}")
    for grant in ("roomJoin", "canSubscribe"):
        if video.get(grant) is not True:
            problems.append(f"video.{grant} is not true")
    if video.get("canPublish") is not True:
        # Since v0.7 only users of full-access homeservers may publish (upstream #222).
        problems.append(
            "video.canPublish is not true: the service does not count this homeserver as full "
            "access (LIVEKIT_FULL_ACCESS_HOMESERVERS), so its users could only listen"
        )
    now = ctx.clock.seconds()
    exp, nbf = claims.get("exp"), claims.get("nbf")
    if not isinstance(exp, (int, float)) or exp <= now:
        problems.append(f"exp {exp!r} is not in the future (check the service host's clock)")
    if isinstance(nbf, (int, float)) and nbf > now + JWT_LEEWAY:
        problems.append(f"nbf {nbf!r} is in the future (check the service host's clock)")
    config = ctx.options.config
    if config is not None:
        signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
        expected = hmac.new(config.api_secret.encode("utf-8"), signing_input, hashlib.sha256).digest()
        try:
            signature = base64.urlsafe_b64decode(parts[2] + "=" * (-len(parts[2]) % 4))
        except ValueError:
            signature = b""
        if not hmac.compare_digest(expected, signature):
            problems.append("its signature does not verify with the configured LIVEKIT_SECRET")
        if claims.get("iss") != config.api_key:
            problems.append(f"iss is {claims.get('iss')!r}, not the configured key {config.api_key!r}")
    return problems


async def check_token_flow(ctx: Context) -> list[Result]:
    """With ``--access-token``: the whole flow, and the SFU URL clients are handed."""
    if not ctx.options.access_token:
        return [Result("token-flow", "Token flow", Status.SKIP, "needs --access-token")]
    flow = await ctx.finding(run_token_flow)
    results = list(flow.results)
    config = ctx.options.config
    if flow.sfu_url and (config is None or config.livekit_url != flow.sfu_url):
        results.append(await check_sfu_url(ctx, flow.sfu_url, "SFU URL", "the URL the service hands to clients"))
    return results


async def check_sfu_url(ctx: Context, url: str, title: str, what: str) -> Result:
    """The SFU's WebSocket URL as clients get it: wss://, public, reachable."""
    try:
        parsed = parse_url(url)
    except ValueError:
        return Result("sfu-url", title, Status.FAIL, f"{what}, {url!r}, is not a URL")
    if parsed.scheme not in ("ws", "wss", "http", "https"):
        return Result("sfu-url", title, Status.FAIL, f"{what}, {url}, is not a ws(s):// URL")
    http_url = ("https" if parsed.scheme in ("wss", "https") else "http") + url[len(parsed.scheme):]
    fix = ["LIVEKIT_URL is handed to clients verbatim: it must be the SFU's public wss:// URL."]
    try:
        await ctx.fetch(b"GET", http_url, step="GET")
    except OutboundError as e:
        return Result("sfu-url", title, Status.FAIL, f"{url} ({what}) is unreachable: {e.reason}", fix=fix)
    if parsed.scheme in ("ws", "http"):
        return Result("sfu-url", title, Status.WARN, f"{url} ({what}) is not TLS: browsers on https pages refuse ws:// (mixed content)", fix=fix)
    if _is_internal_host(parsed.host):
        return Result("sfu-url", title, Status.WARN, f"{url} ({what}) names an internal host: clients elsewhere cannot reach it", fix=fix)
    return Result("sfu-url", title, Status.PASS, f"{url} ({what}) is reachable")


# -- delayed-event rate limits --------------------------------------------------------------------


def _retry_after_ms(response: HTTPResponse) -> Optional[int]:
    value = json_object(response).get("retry_after_ms")
    if isinstance(value, int) and value > 0:
        return value
    header = response.header("Retry-After")
    if header and header.strip().isdigit():
        return int(header.strip()) * 1000
    return None


async def check_delayed_event_limits(ctx: Context) -> list[Result]:
    """Would the homeserver throttle the service's (unauthenticated, one-IP) restarts?"""
    from rtcauthd.matrix.csapi import delayed_event_url

    title = "Delayed events"
    if not ctx.options.access_token:
        return [Result("delayed-events", title, Status.SKIP, "rate-limit probe needs --access-token")]
    info = await ctx.finding(find_well_known)
    if info.base_url is None:
        return [Result("delayed-events", title, Status.SKIP, "no homeserver base URL (see Client discovery)")]
    url = delayed_event_url(info.base_url, PROBE_DELAY_ID, "restart")
    accepted = 0
    for _ in range(RATE_PROBE_REQUESTS):
        try:
            response = await ctx.fetch(
                b"POST", url, headers={"Content-Type": "application/json"}, body=b"{}", step="restart"
            )
        except OutboundError as e:
            return [Result("delayed-events", title, Status.FAIL, f"the delayed-event API at {info.base_url} is unreachable: {e.reason}")]
        code = errcode_of(response)
        if response.code == 429:
            return [_throttled(accepted, _retry_after_ms(response))]
        if accepted == 0 and response.code in (401, 403):
            return [
                Result(
                    "delayed-events",
                    title,
                    Status.WARN,
                    f"the homeserver requires a token to manage delayed events ({status_text(response)}); "
                    "the service calls without one, so delegated leave will fail",
                )
            ]
        if accepted == 0 and response.code in (400, 404, 405) and code == "M_UNRECOGNIZED":
            return [
                Result(
                    "delayed-events",
                    title,
                    Status.WARN,
                    "the homeserver has no MSC4140 delayed-event management endpoint: the "
                    "service cannot keep or send delayed leave events",
                    fix=["Synapse: set max_event_delay_duration: 24h in homeserver.yaml."],
                )
            ]
        accepted += 1
    return [
        Result(
            "delayed-events",
            title,
            Status.PASS,
            f"no throttling in a burst of {RATE_PROBE_REQUESTS} unauthenticated delayed-event restarts",
        )
    ]


def _throttled(accepted: int, retry_after_ms: Optional[int]) -> Result:
    if retry_after_ms:
        rate = 1000.0 / retry_after_ms
        capacity = max(int(rate * RESTART_INTERVAL_SECONDS), 1)
        detail = (
            f"retry after {retry_after_ms} ms, about {rate:.2g} request(s)/s per IP: the service "
            f"restarts each participant's delayed leave every ~{RESTART_INTERVAL_SECONDS} s from one "
            f"address, so about {capacity} participants at once are enough to be throttled"
        )
    else:
        detail = "the service restarts every participant's delayed leave from one IP address"
    return Result(
        "delayed-events",
        "Delayed events",
        Status.WARN,
        f"the homeserver throttled unauthenticated delayed-event restarts after {accepted} "
        "requests in a burst: a busy service would be throttled",
        [detail],
        [
            "Exempt the service by raising the per-IP limit in Synapse's homeserver.yaml (it "
            "calls without a token, so per-user overrides do not apply):",
            "  rc_delayed_event_mgmt:\n    per_second: 100\n    burst_count: 1000",
        ],
    )
