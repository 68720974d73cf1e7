"""DNS and reachability: does the server name have addresses, and do they answer?

Two misconfigurations get their own diagnosis here: a DNS wildcard that does not cover
the zone apex, and a published (often IPv6) address that does not accept connections.
"""

from __future__ import annotations

from typing import Optional

from rtcauthd.doctor.answers import listing
from rtcauthd.doctor.context import Context, gather
from rtcauthd.doctor.probes import ProbeError
from rtcauthd.doctor.report import Result, Status
from rtcauthd.matrix.federation_agent import hostport

WILDCARD_PROBE_LABEL = "rtcauth-doctor-wildcard-probe"


async def find_apex(ctx: Context):
    """The (A, AAAA) answers for the server name itself."""
    return await ctx.net.dns.addresses(ctx.host)


async def check_dns(ctx: Context) -> list[Result]:
    """The zone apex has A and/or AAAA records; a wildcard below it does not count."""
    title = "DNS"
    if ctx.server.is_ip:
        return [Result("dns", title, Status.SKIP, f"{ctx.host} is an IP address: nothing to look up")]
    v4, v6 = await ctx.finding(find_apex)
    host = ctx.host
    if v4.addresses or v6.addresses:
        found = []
        if v4.addresses:
            found.append("A " + listing(v4.addresses))
        if v6.addresses:
            found.append("AAAA " + listing(v6.addresses))
        details = [f"{a.kind} lookup failed: {a.error}" for a in (v4, v6) if a.error]
        return [Result("dns", title, Status.PASS, f"{host} has " + " and ".join(found), details)]
    if v4.error and v6.error:
        return [
            Result(
                "dns",
                title,
                Status.FAIL,
                f"cannot look up {host}: {v4.error}",
                fix=[f"Check that the name servers of {host}'s zone answer (dig A {host}; "
                     f"dig AAAA {host}); doctor asked "
                     + ", ".join(hostport(h, p) for h, p in getattr(ctx.net.dns, "servers", ()))
                     + "."],
            )
        ]
    probe = f"{WILDCARD_PROBE_LABEL}.{host}"
    p4, p6 = await ctx.net.dns.addresses(probe)
    below = p4.addresses + p6.addresses
    if below:
        return [
            Result(
                "dns",
                title,
                Status.FAIL,
                f"{host} has no A or AAAA record, but names under it resolve ({probe} → "
                f"{below[0]}): a DNS wildcard *.{host} does not cover the zone apex {host} itself",
                fix=[
                    f"Add address records for {host} itself, pointing at the web server that "
                    f"serves https://{host}/.well-known/matrix/client, e.g. in the zone file:",
                    f"  {host}.  IN  A     <IPv4 address>\n  {host}.  IN  AAAA  <IPv6 address>",
                ],
            )
        ]
    nxdomain = v4.nxdomain and v6.nxdomain
    message = f"{host} does not exist in DNS (NXDOMAIN)" if nxdomain else f"{host} has no A or AAAA record"
    return [
        Result(
            "dns",
            title,
            Status.FAIL,
            message,
            fix=[f"Publish an A and/or AAAA record for {host}: clients fetch "
                 f"https://{host}/.well-known/matrix/client and users' IDs end in :{host}."],
        )
    ]


async def check_reachability(ctx: Context) -> list[Result]:
    """Every published address family is reachable on the HTTPS port, separately."""
    port = ctx.https_port
    if ctx.server.is_ip:
        families = [("IPv6" if ctx.server.is_ipv6 else "IPv4", (ctx.host,))]
    else:
        v4, v6 = await ctx.finding(find_apex)
        families = [("IPv4", v4.addresses), ("IPv6", v6.addresses)]
    families = [(family, addresses) for family, addresses in families if addresses]
    if not families:
        return [Result("reach", "Reachability", Status.SKIP, f"{ctx.host} has no address to connect to (see DNS)")]

    async def attempt(address: str) -> Optional[str]:
        try:
            await ctx.net.probes.tcp_connect(address, port)
        except ProbeError as e:
            return e.detail
        return None

    results = []
    for family, addresses in families:
        outcomes = await gather([attempt(a) for a in addresses])
        broken = [(a, why) for a, why in zip(addresses, outcomes) if why is not None]
        if not broken:
            verb = "accepts" if len(addresses) == 1 else "accept"
            results.append(
                Result(
                    "reach-" + family.lower(),
                    "Reachability",
                    Status.PASS,
                    f"{family} {listing(addresses)} {verb} connections on port {port}",
                )
            )
            continue
        where = "; ".join(f"{hostport(a, port)}: {why}" for a, why in broken)
        if family == "IPv6":
            who, record, wildcard = "Clients that try IPv6 first (most phones and dual-stack networks) fail or stall", "AAAA", "[::]"
        else:
            who, record, wildcard = "IPv4-only clients cannot connect", "A", "0.0.0.0"
        if ctx.server.is_ip:  # an IP-literal server name: there is no DNS record to delete
            message = f"{family} address {ctx.host} is unreachable: {where}"
            fix = (
                f"Make {ctx.host} answer HTTPS on port {port} (listen on it and allow it in the "
                "firewall)."
            )
        else:
            message = f"{family} address published but unreachable: {where}"
            fix = (
                f"{who}. Make {ctx.host} answer HTTPS on this address (listen on {wildcard}:{port} and "
                f"allow it in the firewall), or delete the {record} record."
            )
        results.append(
            Result("reach-" + family.lower(), "Reachability", Status.FAIL, message, fix=[fix])
        )
    return results
