"""The homeserver's MSC4143 ``/rtc/transports``: what current clients read first.

Why a line of its own: a client that gets an answer here takes it as final — an empty
``{}`` is cached for about a day and the well-known is never consulted, so the call fails
with ``MISSING_MATRIX_RTC_TRANSPORT`` while every other link looks healthy. A transport's
``url`` is what clients send to the service's application-service endpoints, which
compare it with ``LIVEKIT_URL`` byte for byte.
"""

from __future__ import annotations

import json
from typing import Optional

from rtcauthd.doctor.as_config import flags_yaml, transports_yaml, url_difference
from rtcauthd.doctor.check_discovery import TRANSPORTS_PATH, find_focus, find_transports
from rtcauthd.doctor.context import Context
from rtcauthd.doctor.report import Result, Status

TITLE = "RTC transports"


def livekit_transport(transports) -> Optional[dict]:
    """The first transport of type livekit, if the endpoint answered with one."""
    if transports.state != "ok":
        return None
    for entry in transports.entries:
        if isinstance(entry, dict) and entry.get("type") == "livekit":
            return entry
    return None


async def expected_sfu_url(ctx: Context) -> tuple[Optional[str], str]:
    """The service's LIVEKIT_URL: from ``--config``, else as the token flow handed it out."""
    config = ctx.options.config
    if config is not None:
        return config.livekit_url, "LIVEKIT_URL"
    if ctx.options.access_token:
        from rtcauthd.doctor.check_token_flow import run_token_flow

        flow = await ctx.finding(run_token_flow)
        if flow.sfu_url:
            return flow.sfu_url, "the url the service hands out"
    return None, ""


def _result(status: Status, message: str, details=(), fix=()) -> Result:
    return Result("transports", TITLE, status, message, details, fix)


async def check_transports(ctx: Context) -> list[Result]:
    """``/rtc/transports``: not ``{}``, a livekit transport, its ``url`` equal to ``LIVEKIT_URL``."""
    transports = await ctx.finding(find_transports)
    config = ctx.options.config
    as_mode = config is not None and config.appservice
    via = f" (read with {transports.credential})" if transports.credential else ""
    if transports.state == "unknown":
        return [_result(Status.SKIP, "no homeserver base URL to ask (see Client discovery)")]
    if transports.state == "error":
        return [_result(Status.WARN, f"the homeserver's {TRANSPORTS_PATH} could not be read{via}: {transports.detail}")]
    if transports.state == "needs-token":
        if transports.credential is None:
            return [_result(
                Status.SKIP,
                "not checked: the homeserver's MSC4143 rtc/transports needs an access token",
                ["Not checked without a token: whether it lists a livekit transport, whether its "
                 "url equals the service's LIVEKIT_URL, and whether the proxied get_token reaches "
                 "the service."],
                ["Run again with --access-token @FILE (a user of this server) and, for the "
                 "application-service checks, --config ENVFILE."],
            )]
        return [_result(Status.FAIL,
                        f"the homeserver refused {transports.credential} for rtc/transports ({transports.detail})")]

    focus = await ctx.finding(find_focus)
    sfu_url, sfu_source = await expected_sfu_url(ctx)
    if transports.state == "absent":
        if not as_mode:
            return [_result(Status.PASS, "the homeserver serves no MSC4143 rtc/transports: clients use the "
                            "well-known's rtc_foci")]
        return [_result(
            Status.FAIL,
            f"the homeserver serves no rtc/transports ({transports.detail}): msc4143_enabled is off, "
            "so clients never learn the transport url and never use the service's "
            "application-service endpoints",
            fix=["In homeserver.yaml:", flags_yaml(["msc4143_enabled"]), transports_yaml(sfu_url, focus.url)],
        )]

    transport = livekit_transport(transports)
    configure = ["Configure the transport in homeserver.yaml (or switch msc4143_enabled off, so that "
                 "clients read the well-known again), then restart Synapse:", transports_yaml(sfu_url, focus.url)]
    if not transports.entries:
        answer = (json.dumps(transports.document, separators=(",", ":")) if transports.document is not None
                  else "without an object")
        return [_result(
            Status.FAIL,
            f"rtc/transports answers {answer}{via}: msc4143_enabled is on but matrix_rtc has no "
            "transports. Clients take that as final (cached for about a day, no fall-back to the "
            "well-known) and fail with MISSING_MATRIX_RTC_TRANSPORT",
            fix=configure,
        )]
    if transport is None:
        types = sorted({str(e.get("type")) for e in transports.entries if isinstance(e, dict)})
        return [_result(Status.FAIL, f"rtc/transports lists no transport of type livekit ({', '.join(types) or 'none'})",
                        fix=configure)]

    details = []
    if transports.entries[0] is not transport:
        details.append("the first transport is not of type livekit; Element Call uses the first one")
    url, service_url = transport.get("url"), transport.get("livekit_service_url")
    service_text = f", livekit_service_url {service_url}" if isinstance(service_url, str) else ""
    if not isinstance(url, str) or not url:
        if as_mode:
            return [_result(
                Status.WARN,
                "the livekit transport has no url: clients use the OpenID flow at "
                "livekit_service_url and never the service's application-service endpoints",
                details,
                ["Add the service's LIVEKIT_URL as url in homeserver.yaml:",
                 transports_yaml(config.livekit_url, service_url)],
            )]
        return [_result(Status.PASS, f"a livekit transport for the OpenID flow{service_text}{via}", details)]
    if sfu_url is not None and url != sfu_url:
        return [_result(
            Status.FAIL,
            f"the livekit transport's url {url} is not {sfu_source} {sfu_url} ({url_difference(sfu_url, url)}): "
            "every token request through the homeserver gets 400 M_INVALID_PARAM",
            details,
            ["The service compares them byte for byte. In homeserver.yaml write exactly:",
             transports_yaml(sfu_url, service_url if isinstance(service_url, str) else focus.url)],
        )]
    if sfu_url is None:
        details.append("url not compared with LIVEKIT_URL: that needs --config ENVFILE")
        return [_result(Status.PASS, f"a livekit transport with url {url}{service_text}{via}", details)]
    return [_result(Status.PASS, f"a livekit transport with url {url} (= {sfu_source}){service_text}{via}", details)]
