"""Federation: can the service reach the homeserver's OpenID userinfo, as it must?

The service verifies each user's OpenID token over federation (well-known, SRV, 8448),
so the doctor resolves the server name the same way, with the daemon's own resolver
and agent, and asks userinfo about a made-up token.
"""

from __future__ import annotations

from urllib.parse import urlencode

from rtcauthd.doctor.answers import errcode_of, listing, status_text, transport_fix
from rtcauthd.doctor.context import Context
from rtcauthd.doctor.report import Result, Status
from rtcauthd.matrix.federation import USERINFO_PATH
from rtcauthd.matrix.federation_agent import hostport
from rtcauthd.outbound.client import OutboundError
from rtcauthd.tls import is_ip_literal

#: A token no homeserver has issued: userinfo must refuse it (401), proving the route works.
PROBE_OPENID_TOKEN = "rtcauth-doctor-probe"


def _describe_route(ctx: Context, resolution) -> str:
    targets = ", ".join(hostport(h, p) for h, p in resolution.targets)
    if resolution.host_header != ctx.server.original:
        where = "" if targets == resolution.host_header else f", at {targets}"
        return f"{resolution.host_header} (delegated by .well-known/matrix/server){where}"
    return targets


async def check_federation(ctx: Context) -> list[Result]:
    """OpenID userinfo reachable through server-name resolution (how the service verifies users)."""
    title = "Federation"
    fix = (
        "rtcauthd verifies each user's OpenID token at "
        "/_matrix/federation/v1/openid/userinfo of the homeserver, found like federation "
        "does (.well-known/matrix/server, SRV, port 8448). Make it reachable from the "
        "service's host: Synapse needs a listener with the federation (or openid) resource."
    )
    try:
        resolution = await ctx.net.resolver.resolve(ctx.server.original)
    except OutboundError as e:
        return [Result("federation", title, Status.FAIL, f"cannot resolve {ctx.server} for federation: {e.reason}", fix=[fix])]
    route = _describe_route(ctx, resolution)
    query = urlencode({"access_token": PROBE_OPENID_TOKEN})
    url = f"matrix-federation://{ctx.server.original}{USERINFO_PATH}?{query}"
    try:
        response = await ctx.net.federation.request(b"GET", url, step="userinfo")
    except OutboundError as e:
        return [
            Result(
                "federation",
                title,
                Status.FAIL,
                f"OpenID userinfo unreachable via {route}: {e.reason}",
                fix=transport_fix(e, [fix]),
            )
        ]
    details = await _private_address_warning(ctx, resolution)
    status = Status.WARN if details else Status.PASS
    code = errcode_of(response)
    if response.code == 401 and code in ("M_UNKNOWN_TOKEN", "M_UNAUTHORIZED", "M_MISSING_TOKEN"):
        return [
            Result(
                "federation",
                title,
                status,
                f"OpenID userinfo reachable via {route}; a made-up token gets 401 {code}, as it should",
                details,
            )
        ]
    if response.code == 404:
        return [
            Result(
                "federation",
                title,
                Status.FAIL,
                f"{route} answers 404 for OpenID userinfo: that listener does not serve it",
                details,
                ["Synapse: add the openid (or federation) resource to the listener this route reaches."],
            )
        ]
    return [
        Result(
            "federation",
            title,
            Status.FAIL,
            f"OpenID userinfo via {route} answers {status_text(response)} for a made-up token (expected 401)",
            details,
        )
    ]


async def _private_address_warning(ctx: Context, resolution) -> list[str]:
    """With the service's config: will its SSRF filter refuse this homeserver's addresses?"""
    config = ctx.options.config
    if config is None or config.is_named_full_access(ctx.server.original):
        return []
    from rtcauthd.matrix.ipfilter import DEFAULT_BLOCKLIST, IPRangeFilter

    ip_filter = IPRangeFilter(
        blocklist=config.ip_blocklist if config.ip_blocklist is not None else DEFAULT_BLOCKLIST,
        allowlist=config.ip_allowlist,
    )
    addresses: list[str] = []
    for host, _port in resolution.targets:
        if is_ip_literal(host):
            addresses.append(host)
        else:
            v4, v6 = await ctx.net.dns.addresses(host)
            addresses += list(v4.addresses + v6.addresses)
    blocked = [a for a in addresses if ip_filter.check(a) is not None]
    if not blocked:
        return []
    return [
        f"the service refuses to connect to {listing(blocked)} (private addresses) unless "
        f"{ctx.server} is listed in LIVEKIT_FULL_ACCESS_HOMESERVERS or the address in "
        "RTCAUTH_FEDERATION_IP_RANGE_ALLOWLIST"
    ]
