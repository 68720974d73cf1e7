"""With the service's configuration: its LiveKit key, URL and webhook wiring."""

from __future__ import annotations

from rtcauthd.outbound.errors import OutboundError
from rtcauthd.doctor.check_discovery import find_focus
from rtcauthd.doctor.check_token_flow import check_sfu_url
from rtcauthd.doctor.context import Context, gather
from rtcauthd.doctor.report import Result, Status

PROBE_LIVEKIT_ROOM = "rtcauth-doctor-probe"


async def check_livekit(ctx: Context) -> list[Result]:
    """The service's own LiveKit settings: key/secret accepted, URL reachable, webhook wiring."""
    options = ctx.options
    if options.config is None and options.config_error is None:
        return [Result("livekit", "LiveKit", Status.SKIP, "needs --config ENVFILE (or the service's environment)")]
    if options.config_error is not None:
        return [Result("config", "Service config", Status.FAIL, f"{options.config_source}: {options.config_error}")]
    config = options.config
    results = [_config_result(ctx, config)]
    api, url = await gather(
        [_livekit_api(ctx, config), check_sfu_url(ctx, config.livekit_url, "LiveKit URL", "LIVEKIT_URL")]
    )
    results += [api, url]
    focus = await ctx.finding(find_focus)
    service = focus.url or f"https://matrix-rtc.{ctx.host}/livekit/jwt"
    results.append(
        Result(
            "livekit-webhook",
            "LiveKit webhook",
            Status.INFO,
            "the SFU must send webhooks to the service, signed with LIVEKIT_KEY; in livekit.yaml:",
            [
                f"  webhook:\n    api_key: {config.api_key}\n    urls:\n      - {service}/sfu_webhook\n"
                "  room:\n    auto_create: false"
            ],
        )
    )
    return results


def _config_result(ctx: Context, config) -> Result:
    title = "Service config"
    problems: list[tuple[Status, str, list[str]]] = []
    if config.livekit_url.endswith("/"):
        problems.append(
            (Status.FAIL, f"LIVEKIT_URL {config.livekit_url} ends with '/': Twirp calls go to …//twirp/… and fail",
             ["Drop the trailing slash."])
        )
    if not config.is_full_access(ctx.server.original):
        listed = " ".join(config.full_access_homeservers) or "(empty)"
        problems.append(
            (Status.WARN,
             f"{ctx.server} is not in LIVEKIT_FULL_ACCESS_HOMESERVERS ({listed}): its users are "
             "restricted (no room creation, no delegated leave)",
             [f"List the server name exactly as it appears in user IDs: "
              f"LIVEKIT_FULL_ACCESS_HOMESERVERS={ctx.server}"])
        )
    if config.insecure_skip_verify_tls:
        problems.append(
            (Status.WARN, "LIVEKIT_INSECURE_SKIP_VERIFY_TLS switches certificate checks off",
             ["Use RTCAUTH_CA_FILE for a private CA instead."])
        )
    details = list(config.warnings)
    if not problems:
        return Result(
            "config",
            title,
            Status.WARN if details else Status.PASS,
            f"{ctx.options.config_source}: LIVEKIT_URL {config.livekit_url}, key {config.api_key} "
            f"(from {config.key_source}), full access for {ctx.server}",
            details,
        )
    worst = Status.FAIL if any(s is Status.FAIL for s, _m, _f in problems) else Status.WARN
    first = problems[0]
    return Result(
        "config",
        title,
        worst,
        first[1],
        [m for _s, m, _f in problems[1:]] + details,
        [f for _s, _m, fs in problems for f in fs],
    )


async def _livekit_api(ctx: Context, config) -> Result:
    from rtcauthd.livekit.tokens import TokenMinter
    from rtcauthd.livekit.twirp import RoomServiceClient

    title = "LiveKit API"
    client = RoomServiceClient(
        livekit_url=config.livekit_url,
        http=ctx.net.http,
        tokens=TokenMinter(api_key=config.api_key, api_secret=config.api_secret, clock=ctx.clock),
        timeout=ctx.options.timeout,
    )
    endpoint = client.url_for("CreateRoom")
    try:
        await client.create_room(PROBE_LIVEKIT_ROOM)
    except OutboundError as e:
        if e.status is None:
            return Result(
                "livekit-api",
                title,
                Status.FAIL,
                f"cannot reach LiveKit's API at {endpoint}: {e.reason}",
                fix=["LIVEKIT_URL must reach the SFU from the service's host (the service maps "
                     "wss:// to https:// for its API calls)."],
            )
        if e.code in ("unauthenticated", "permission_denied"):
            return Result(
                "livekit-api",
                title,
                Status.FAIL,
                f"LiveKit refused the API key {config.api_key!r} (HTTP {e.status}, {e.code}): the "
                "key or secret is wrong",
                fix=["LIVEKIT_KEY and LIVEKIT_SECRET must be one of the key pairs under keys: in "
                     "livekit.yaml (key: secret)."],
            )
        if e.status is not None and 300 <= e.status < 400:
            return Result(
                "livekit-api",
                title,
                Status.FAIL,
                f"{endpoint} redirects ({e.detail}): LIVEKIT_URL probably has a trailing '/' or a wrong path",
            )
        if e.code == "bad_route":
            return Result(
                "livekit-api",
                title,
                Status.FAIL,
                f"no LiveKit Twirp API at {endpoint} (HTTP {e.status})",
                fix=["LIVEKIT_URL must point at the SFU itself; a reverse proxy in front of it must "
                     "pass /twirp/ through."],
            )
        return Result("livekit-api", title, Status.FAIL, f"CreateRoom at {endpoint} failed: {e}")
    return Result(
        "livekit-api",
        title,
        Status.PASS,
        f"LiveKit accepted the key {config.api_key!r} (CreateRoom {PROBE_LIVEKIT_ROOM}, an empty "
        "room LiveKit removes after 5 minutes)",
    )
