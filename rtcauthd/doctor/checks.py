"""The checks of ``rtcauth doctor``: one function per link of the MatrixRTC call set-up chain.

Each check is an ``async`` function ``check_x(ctx) -> list[Result]`` that never raises for
a problem it diagnoses: a problem becomes a ✗ or ! line naming what is wrong and what to
change. Checks run concurrently; what several of them need (the zone apex's addresses,
the client well-known, the advertised service URL, the token flow) is computed once in
:class:`rtcauthd.doctor.context.Context` and shared. Every network operation is bounded
by ``--timeout``.

The six misconfigurations of the post-mortem behind this command each have a dedicated
diagnosis: no authorization service advertised; ``wss://`` instead of ``https://`` in the
well-known; no ``.well-known`` on the bare server name; a DNS wildcard not covering the
apex; an unreachable published IPv6 address; a homeserver without MSC4140.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import ipaddress
import json
from typing import Any, Optional
from urllib.parse import quote, urlencode

import attr
from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from rtcauthd.doctor.context import (
    DOCTOR_ORIGIN,
    ClientWellKnown,
    Context,
    Flow,
    Focus,
    Transports,
    errcode_of,
    gather,
    hostport,
    json_of,
    listing,
    status_text,
    transport_fix,
)
from rtcauthd.doctor.net import HTTPS_PORT, ProbeError, explain, parse_url, simplify
from rtcauthd.doctor.report import Result, Status
from rtcauthd.outbound.client import HTTPResponse, OutboundError

log = Logger()

WILDCARD_PROBE_LABEL = "rtcauth-doctor-wildcard-probe"
FOCI_KEY = "org.matrix.msc4143.rtc_foci"
VERSIONS_PATH = "/_matrix/client/versions"
WHOAMI_PATH = "/_matrix/client/v3/account/whoami"
USERINFO_PATH = "/_matrix/federation/v1/openid/userinfo"
MSC4140_FEATURE = "org.matrix.msc4140"
#: A token no homeserver has issued: userinfo must refuse it (401), proving the route works.
PROBE_OPENID_TOKEN = "rtcauth-doctor-probe"
PROBE_SLOT_ID = "m.call#ROOM"
PROBE_MEMBER_ID = "rtcauth-doctor"
PROBE_DELAY_ID = "rtcauth-doctor-probe"
PROBE_LIVEKIT_ROOM = "rtcauth-doctor-probe"
#: Unauthenticated delayed-event restarts sent to look for a tight rate limit.
RATE_PROBE_REQUESTS = 10
#: Element Call schedules its leave 10 s ahead; the service restarts it at 80 %.
RESTART_INTERVAL_SECONDS = 8
CERT_WARN_DAYS = 14
#: Allowed clock difference when judging nbf/exp of the service's JWT.
JWT_LEEWAY = 60


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


# ---------------------------------------------------------------------------------------------
# 1. DNS


async def check_dns(ctx: Context) -> list[Result]:
    """The zone apex has A and/or AAAA records; a wildcard below it does not count."""
    title = "DNS"
    if ctx.server.is_ip:
        return [Result("dns", title, Status.SKIP, f"{ctx.host} is an IP address: nothing to look up")]
    v4, v6 = await ctx.apex.get()
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
        v4, v6 = await ctx.apex.get()
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


# ---------------------------------------------------------------------------------------------
# 2. Client discovery


async def check_client_discovery(ctx: Context) -> list[Result]:
    """``/.well-known/matrix/client`` on the bare server name: JSON, base_url, CORS."""
    title = "Client discovery"
    info = await ctx.well_known.get()
    details = [f"redirected to {r}" for r in info.redirects]
    if not info.problems:
        return [
            Result(
                "well-known",
                title,
                Status.PASS,
                f"{info.url}: m.homeserver {info.base_url}, Access-Control-Allow-Origin: {info.cors}",
                details,
            )
        ]
    (message, fix), rest = info.problems[0], info.problems[1:]
    details += [m for m, _f in rest]
    fixes = list(fix) + [f for _m, fs in rest for f in fs]
    if info.unreachable and not info.elsewhere:
        fixes.append(
            "Clients must be able to fetch this URL: see the DNS, Reachability and TLS lines."
        )
    elif info.fatal:
        if info.elsewhere:
            message += f"; {info.elsewhere} has one, but clients only look on the server name"
        fixes.append(
            f"Serve the client well-known at https://{ctx.host}/.well-known/matrix/client itself "
            "(not only on a matrix subdomain), as JSON with Access-Control-Allow-Origin: *, e.g. "
            f"nginx in the server block of {ctx.host}:"
        )
        fixes.append(
            "  location = /.well-known/matrix/client {\n"
            "      default_type application/json;\n"
            "      add_header Access-Control-Allow-Origin * always;\n"
            "      return 200 '{\"m.homeserver\":\n"
            f"                   {{\"base_url\": \"https://matrix.{ctx.host}\"}}}}';\n"
            "  }"
        )
    return [Result("well-known", title, Status.FAIL, message, details, fixes)]


# ---------------------------------------------------------------------------------------------
# 3. RTC transport (the authorization service)


def _livekit_entries(value) -> tuple[list, bool]:
    """(livekit entries, whether the first entry is one) of a foci/transports list."""
    if not isinstance(value, list):
        return [], False
    entries = [e for e in value if isinstance(e, dict) and e.get("type") == "livekit"]
    return entries, bool(value) and isinstance(value[0], dict) and value[0].get("type") == "livekit"


async def find_focus(ctx: Context) -> Focus:
    """Which authorization service clients are told about, and whether its URL is usable."""
    title = "RTC focus"
    info = await ctx.well_known.get()
    transports = await ctx.transports.get()
    sources: list[tuple[str, list, bool]] = []
    if info.document is not None and FOCI_KEY in info.document:
        entries, first = _livekit_entries(info.document.get(FOCI_KEY))
        sources.append((".well-known", entries, first))
    if transports.state == "ok":
        entries, first = _livekit_entries(transports.entries)
        sources.append(("rtc/transports", entries, first))
    advertised = [(name, entry) for name, entries, _first in sources for entry in entries]
    if not advertised:
        return Focus(results=[_no_focus(ctx, info, transports)])

    source, entry = advertised[0]
    url = entry.get("livekit_service_url")
    details = []
    others = {e.get("livekit_service_url") for _n, e in advertised[1:]} - {url}
    if others:
        details.append("also advertised: " + ", ".join(sorted(str(o) for o in others)))
    if any(not first for name, entries, first in sources if entries):
        details.append("the first entry is not of type livekit; Element Call uses the first entry")
    where = "the well-known" if source == ".well-known" else "the homeserver's rtc/transports"
    if not isinstance(url, str) or not url:
        return Focus(
            results=[Result("rtc-focus", title, Status.FAIL, f"the livekit entry in {where} has no livekit_service_url", details)]
        )
    try:
        parsed = parse_url(url)
    except ValueError:
        parsed = None
    if parsed is not None and parsed.scheme in ("ws", "wss"):
        return Focus(results=[await _websocket_focus(ctx, url, where, details)])
    if parsed is None or parsed.scheme not in ("https", "http"):
        return Focus(
            results=[
                Result("rtc-focus", title, Status.FAIL, f"livekit_service_url {url!r} is not an https:// URL", details,
                       [f"Write the https:// URL where rtcauthd (or lk-jwt-service) is served, e.g. "
                        f"https://matrix-rtc.{ctx.host}/livekit/jwt."])
            ]
        )
    if parsed.scheme == "http":
        return Focus(
            results=[
                Result(
                    "rtc-focus",
                    title,
                    Status.FAIL,
                    f"livekit_service_url {url} is plain http: browsers on https pages refuse it (mixed content)",
                    details,
                    ["Serve the service through your TLS reverse proxy and write its https:// URL."],
                )
            ],
            url=url,
        )
    if url.endswith("/"):
        return Focus(
            results=[
                Result(
                    "rtc-focus",
                    title,
                    Status.WARN,
                    f"livekit_service_url {url} ends with '/': clients request {url}/get_token (a '//' path)",
                    details,
                    [f"Write it without the trailing slash: {url.rstrip('/')}"],
                )
            ],
            url=url,
        )
    return Focus(
        results=[Result("rtc-focus", title, Status.PASS, f"livekit_service_url {url} (from {where})", details)],
        url=url,
    )


def _no_focus(ctx: Context, info: ClientWellKnown, transports: Transports) -> Result:
    title = "RTC focus"
    if info.document is None and transports.state in ("unknown", "error"):
        return Result("rtc-focus", title, Status.SKIP, "no client well-known to read (see Client discovery)")
    snippet_fix = (
        f'  "{FOCI_KEY}": [{{\n'
        '      "type": "livekit",\n'
        '      "livekit_service_url":\n'
        f'          "https://matrix-rtc.{ctx.host}/livekit/jwt"\n'
        "  }]"
    )
    if transports.state == "needs-token":
        return Result(
            "rtc-focus",
            title,
            Status.WARN,
            f"{info.url} has no {FOCI_KEY}, and the homeserver's MSC4143 rtc/transports "
            "endpoint can only be read with a token",
            fix=["Run doctor again with --access-token to check the service it advertises, and "
                 "add the focus to the well-known for clients that still read it:", snippet_fix],
        )
    where = f"{info.url} has no {FOCI_KEY} entry of type livekit" if info.document is not None else (
        "there is no client well-known")
    hs = {
        "absent": "the homeserver has no MSC4143 rtc/transports endpoint",
        "ok": "the homeserver's rtc/transports lists no livekit transport",
    }.get(transports.state, f"the homeserver's rtc/transports could not be read ({transports.detail})")
    return Result(
        "rtc-focus",
        title,
        Status.FAIL,
        f"no MatrixRTC authorization service is advertised: {where}, and {hs}; clients find no "
        "focus (MISSING_MATRIX_RTC_FOCUS)",
        fix=[
            f"Run rtcauthd (or lk-jwt-service) behind your reverse proxy and advertise it in "
            f"https://{ctx.host}/.well-known/matrix/client:",
            snippet_fix,
            "Synapse can advertise it too: experimental_features: msc4143_enabled: true and "
            "matrix_rtc: transports: in homeserver.yaml.",
        ],
    )


async def _websocket_focus(ctx: Context, url: str, where: str, details: list) -> Result:
    """The classic mistake: the SFU's wss:// URL where the service's https:// URL belongs."""
    rest = url.split("://", 1)[1]
    candidate = "https://" + rest.rstrip("/")
    fix = [
        f"Clients POST to {url}/get_token, which a WebSocket URL cannot answer. Write the "
        "https:// URL where rtcauthd (or lk-jwt-service) is served, e.g. "
        f'"livekit_service_url": "https://matrix-rtc.{ctx.host}/livekit/jwt". The SFU\'s '
        "wss:// URL belongs in the service's LIVEKIT_URL; clients get it from the service."
    ]
    try:
        response = await ctx.fetch(b"GET", candidate + "/healthz", step="GET")
    except OutboundError:
        response = None
    if response is not None and response.code == 200:
        fix = [f'Write "livekit_service_url": "{candidate}" — it answers /healthz like the service '
               f"does. Clients POST to {url}/get_token, which a WebSocket URL cannot answer."]
    return Result(
        "rtc-focus",
        "RTC focus",
        Status.FAIL,
        f"livekit_service_url in {where} is {url}, a WebSocket (wss://) URL: it must be the "
        "https:// URL of the authorization service",
        details,
        fix,
    )


async def check_rtc_focus(ctx: Context) -> list[Result]:
    """An ``org.matrix.msc4143.rtc_foci`` livekit entry with an https:// service URL."""
    focus = await ctx.focus.get()
    return focus.results


def _cors_problems(response: HTTPResponse, *, preflight: bool) -> list[str]:
    problems = []
    origin = response.header("Access-Control-Allow-Origin")
    if origin is None:
        problems.append("no Access-Control-Allow-Origin")
    elif origin.strip() not in ("*", DOCTOR_ORIGIN):
        problems.append(f"Access-Control-Allow-Origin is {origin.strip()!r}, not *")
    if preflight:
        methods = [m.strip().upper() for m in (response.header("Access-Control-Allow-Methods") or "").split(",")]
        if "POST" not in methods and "*" not in methods:
            problems.append("Access-Control-Allow-Methods lacks POST")
        allowed = [h.strip().lower() for h in (response.header("Access-Control-Allow-Headers") or "").split(",")]
        if "content-type" not in allowed and "*" not in allowed:
            problems.append("Access-Control-Allow-Headers lacks Content-Type")
    return problems


async def check_service(ctx: Context) -> list[Result]:
    """The advertised service answers ``/healthz``, ``/get_token`` and CORS preflights."""
    title, cors_title = "Auth service", "Service CORS"
    focus = await ctx.focus.get()
    base = focus.url
    if base is None:
        return [Result("service", title, Status.SKIP, "no https:// service URL to check (see RTC focus)")]
    try:
        health = await ctx.fetch(b"GET", base + "/healthz", step="GET")
    except OutboundError as e:
        reason = explain(Failure(e))
        return [
            Result(
                "service",
                title,
                Status.FAIL,
                f"{base} is unreachable: {reason}",
                fix=transport_fix(
                    reason,
                    [f"Start rtcauthd (or lk-jwt-service) and make {base}/ reach it through the "
                     f"reverse proxy: clients call {base}/get_token and {base}/sfu/get."],
                ),
            ),
            Result("service-cors", cors_title, Status.SKIP, "the service is unreachable"),
        ]
    results = [_health_result(base, health)]
    if health.code != 200:
        results.append(Result("service-cors", cors_title, Status.SKIP, "the service does not answer /healthz"))
        return results

    cors_headers = {
        "Origin": DOCTOR_ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }

    async def attempt(method: bytes, path: str, headers: dict, body=None):
        try:
            return await ctx.fetch(method, base + path, headers=headers, body=body, step=method.decode())
        except OutboundError as e:
            return e

    post, *preflights = await gather(
        [
            attempt(b"POST", "/get_token", {"Content-Type": "application/json", "Origin": DOCTOR_ORIGIN}, b"{}"),
            attempt(b"OPTIONS", "/get_token", cors_headers),
            attempt(b"OPTIONS", "/sfu/get", cors_headers),
        ]
    )
    if isinstance(post, OutboundError):
        results[0] = Result("service", title, Status.FAIL, f"POST {base}/get_token failed: {explain(Failure(post))}")
    elif post.code == 404:
        results[0] = Result(
            "service",
            title,
            Status.FAIL,
            f"{base}/healthz works but POST {base}/get_token answers 404",
            fix=["Upgrade the service: Matrix 2.0 clients need /get_token (lk-jwt-service 0.3 or "
                 "later, or rtcauthd), and check the reverse proxy routes every path under the prefix."],
        )
    elif errcode_of(post) is None:
        results[0] = Result(
            "service",
            title,
            Status.FAIL,
            f"POST {base}/get_token answers {status_text(post)}, not a Matrix error: this is not "
            "an authorization service",
        )

    problems = []
    for path, answer in zip(("/get_token", "/sfu/get"), preflights):
        if isinstance(answer, OutboundError):
            problems.append(f"OPTIONS {path}: {explain(Failure(answer))}")
        elif not 200 <= answer.code < 300:
            problems.append(f"OPTIONS {path} answers HTTP {answer.code}")
        else:
            problems += [f"OPTIONS {path}: {p}" for p in _cors_problems(answer, preflight=True)]
    if not isinstance(post, OutboundError):
        problems += [f"POST /get_token: {p}" for p in _cors_problems(post, preflight=False)]
    if problems:
        results.append(
            Result(
                "service-cors",
                cors_title,
                Status.FAIL,
                f"browsers cannot call {base}: " + problems[0],
                problems[1:],
                ["The reverse proxy must pass OPTIONS requests to the service (which answers "
                 "them) and keep its Access-Control-* headers."],
            )
        )
    else:
        results.append(
            Result(
                "service-cors",
                cors_title,
                Status.PASS,
                "preflights for /get_token and /sfu/get allow POST with Content-Type from any origin",
            )
        )
    return results


def _health_result(base: str, response: HTTPResponse) -> Result:
    title = "Auth service"
    if response.code == 200:
        return Result("service", title, Status.PASS, f"{base} answers /healthz and /get_token")
    if response.code == 404:
        prefix = parse_url(base).path.rstrip("/")
        if prefix:
            return Result(
                "service",
                title,
                Status.FAIL,
                f"{base}/healthz answers 404: the reverse proxy probably passes the path prefix "
                f"{prefix} on to the service, which serves /healthz, /get_token and /sfu/get at its root",
                fix=[f"Strip the prefix. Caddy: handle_path {prefix}/* {{ reverse_proxy "
                     f"localhost:8080 }}; nginx: location {prefix}/ {{ proxy_pass "
                     "http://localhost:8080/; } (the trailing / strips it)."],
            )
        return Result("service", title, Status.FAIL, f"{base}/healthz answers 404: no rtcauthd/lk-jwt-service here")
    if response.code in (502, 503, 504):
        return Result(
            "service",
            title,
            Status.FAIL,
            f"{base}/healthz answers HTTP {response.code}: the reverse proxy cannot reach the service behind it",
            fix=["Check that the service runs and that the proxy's upstream matches its listen "
                 "address (LIVEKIT_JWT_BIND or RTCAUTH_LISTEN)."],
        )
    return Result("service", title, Status.FAIL, f"{base}/healthz answers {status_text(response)} (expected 200)")


# ---------------------------------------------------------------------------------------------
# 4. TLS


def _not_after(certificate) -> datetime.datetime:
    value = getattr(certificate, "not_valid_after_utc", None)
    if value is None:
        value = certificate.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    return value


def _certificate_names(certificate) -> list[str]:
    from cryptography import x509

    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.get_values_for_type(x509.DNSName)] + [
        str(n) for n in san.get_values_for_type(x509.IPAddress)
    ]


def _covers(certificate, host: str) -> bool:
    from service_identity import CertificateError, VerificationError
    from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address

    try:
        if ":" in host or host.replace(".", "").isdigit():
            verify_certificate_ip_address(certificate, host)
        else:
            verify_certificate_hostname(certificate, host)
    except (CertificateError, VerificationError):
        return False
    return True


def _issuer(certificate) -> str:
    from cryptography.x509.oid import NameOID

    names = certificate.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else certificate.issuer.rfc4514_string()


_TLS_ROLE_ORDER = ("server name", "homeserver", "auth service", "SFU")


async def check_tls(ctx: Context) -> list[Result]:
    """Each host's certificate covers its name, chains to a trusted root, lasts > 14 days.

    Hosts are checked as soon as they are known (the server name at once; the homeserver,
    service and SFU hosts once discovery names them), so a slow discovery does not delay
    the certificate checks of hosts already known.
    """
    started: dict[tuple[str, int], tuple[Deferred, list[str]]] = {}

    def start(url_or_host: Optional[str], role: str, *, is_url: bool = True) -> None:
        if not url_or_host:
            return
        if is_url:
            try:
                parsed = parse_url(url_or_host)
            except ValueError:
                return
            if parsed.scheme not in ("https", "wss"):
                return
            key = (parsed.host, parsed.port_or(ctx.https_port))
        else:
            key = (url_or_host, ctx.https_port)
        if key in started:
            if role not in started[key][1]:
                started[key][1].append(role)
            return
        started[key] = (Deferred.fromCoroutine(_check_certificate(ctx, *key)), [role])

    start(ctx.host, "server name", is_url=False)
    config = ctx.options.config
    if config is not None:
        start(config.livekit_url, "SFU")
    try:
        info = await ctx.well_known.get()
        start(info.base_url, "homeserver")
        focus = await ctx.focus.get()
        start(focus.url, "auth service")
        if ctx.options.access_token:
            flow = await ctx.flow.get()
            start(flow.sfu_url, "SFU")
        # Report order: server name, homeserver, service, SFU (not discovery order).
        keys = sorted(started, key=lambda k: _TLS_ROLE_ORDER.index(started[k][1][0]))
        results = await gatherResults([started[k][0] for k in keys], consumeErrors=True)
    except BaseException as e:
        for d, _roles in started.values():  # cut off (deadline): stop the probes too
            d.addErrback(lambda _f: None)
            d.cancel()
        if isinstance(e, FirstError):
            e.subFailure.raiseException()
        raise
    return [
        attr.evolve(result, details=("used as " + ", ".join(started[key][1]),) + result.details)
        for key, result in zip(keys, results)
    ]


async def _check_certificate(ctx: Context, host: str, port: int) -> Result:
    title = "TLS " + (host if port in (HTTPS_PORT, ctx.https_port) else hostport(host, port))
    details: list[str] = []
    try:
        certificate = await ctx.net.probes.certificate(host, port, verify=True)
    except ProbeError as e:
        if e.stage == "connect":
            return Result("tls", title, Status.SKIP, f"cannot connect to {hostport(host, port)}: {e.detail}", details)
        if e.timed_out:
            return Result("tls", title, Status.FAIL, e.detail, details)
        return await _describe_bad_certificate(ctx, host, port, title, details, e.detail)
    if certificate is None:
        return Result("tls", title, Status.FAIL, "the server sent no certificate", details)
    not_after = _not_after(certificate)
    days = (not_after.timestamp() - ctx.clock.seconds()) / 86400
    when = not_after.strftime("%Y-%m-%d")
    if days < CERT_WARN_DAYS:
        return Result(
            "tls",
            title,
            Status.WARN,
            f"certificate expires in {max(days, 0):.0f} days ({when})",
            details,
            ["Renew it (e.g. certbot renew) and make sure renewal runs automatically."],
        )
    return Result(
        "tls",
        title,
        Status.PASS,
        f"certificate valid, issued by {_issuer(certificate)}, expires {when} (in {days:.0f} days)",
        details,
    )


async def _describe_bad_certificate(ctx, host, port, title, details, reason) -> Result:
    """Fetch the certificate without verification to say *why* it was refused."""
    try:
        certificate = await ctx.net.probes.certificate(host, port, verify=False)
    except ProbeError:
        certificate = None
    if certificate is None:
        return Result("tls", title, Status.FAIL, reason, details)
    if _not_after(certificate).timestamp() < ctx.clock.seconds():
        return Result(
            "tls",
            title,
            Status.FAIL,
            f"certificate expired on {_not_after(certificate):%Y-%m-%d}",
            details,
            ["Renew it (e.g. certbot renew) and make sure renewal runs automatically."],
        )
    if not _covers(certificate, host):
        names = _certificate_names(certificate)
        return Result(
            "tls",
            title,
            Status.FAIL,
            f"certificate is for {listing(names, 4) or 'no names'}, not {host}",
            details,
            [f"Get a certificate that includes {host} (e.g. certbot -d {host}), and have the "
             f"web server use it for {host}."],
        )
    return Result(
        "tls",
        title,
        Status.FAIL,
        f"certificate is not trusted: issued by {_issuer(certificate)!r}, which is not a known CA",
        details,
        ["Use a certificate from a public CA (e.g. Let's Encrypt) and serve the full chain. "
         "For a private CA, pass --ca-file to doctor; clients and the service (RTCAUTH_CA_FILE) "
         "must trust it too."],
    )


# ---------------------------------------------------------------------------------------------
# 5. Homeserver


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
        return [Result("federation", title, Status.FAIL, f"cannot resolve {ctx.server} for federation: {explain(Failure(e))}", fix=[fix])]
    route = _describe_route(ctx, resolution)
    query = urlencode({"access_token": PROBE_OPENID_TOKEN})
    url = f"matrix-federation://{ctx.server.original}{USERINFO_PATH}?{query}"
    try:
        response = await ctx.net.federation.request(b"GET", url, step="userinfo")
    except OutboundError as e:
        reason = simplify(e.detail)
        return [
            Result(
                "federation",
                title,
                Status.FAIL,
                f"OpenID userinfo unreachable via {route}: {reason}",
                fix=transport_fix(reason, [fix]),
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
        if ":" in host or host.replace(".", "").isdigit():
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


async def check_client_api(ctx: Context) -> list[Result]:
    """``/_matrix/client/versions`` at base_url, and whether it advertises MSC4140."""
    title = "Homeserver API"
    info = await ctx.well_known.get()
    base = info.base_url
    if base is None:
        return [Result("client-api", title, Status.SKIP, "no m.homeserver.base_url (see Client discovery)")]
    url = base + VERSIONS_PATH
    fix = ["m.homeserver.base_url must be the public URL of the homeserver's client API."]
    try:
        response = await ctx.fetch(b"GET", url, headers={"Accept": "application/json"}, step="GET")
    except OutboundError as e:
        reason = explain(Failure(e))
        return [Result("client-api", title, Status.FAIL, f"{url}: {reason}", fix=transport_fix(reason, fix))]
    try:
        document = json_of(response) if response.code == 200 else None
    except ValueError:
        document = None
    versions = document.get("versions") if isinstance(document, dict) else None
    if not isinstance(versions, list):
        return [Result("client-api", title, Status.FAIL, f"{url} answers {status_text(response)}, not a versions list", fix=fix)]
    latest = versions[-1] if versions else "none"
    results = [Result("client-api", title, Status.PASS, f"{base} serves the client API (latest spec version {latest})")]
    features = document.get("unstable_features")
    if isinstance(features, dict) and features.get(MSC4140_FEATURE) is True:
        results.append(Result("msc4140", "MSC4140", Status.PASS, f"the homeserver advertises {MSC4140_FEATURE} (delayed events)"))
    else:
        results.append(
            Result(
                "msc4140",
                "MSC4140",
                Status.WARN,
                f"the homeserver does not advertise {MSC4140_FEATURE} (delayed events): clients "
                "cannot schedule their leave event, so one that crashes or loses its network "
                "stays in the call as a phantom participant",
                fix=["Synapse: set max_event_delay_duration: 24h in homeserver.yaml and restart it. "
                     "Other homeservers: enable MSC4140 delayed events."],
            )
        )
    return results


# -- the --access-token flow -------------------------------------------------------------------


async def run_token_flow(ctx: Context) -> Flow:
    """Access token → whoami → OpenID token → the service's /get_token → JWT claims."""
    from rtcauthd.livekit import naming

    title = "Token flow"
    info = await ctx.well_known.get()
    focus = await ctx.focus.get()
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
        return fail(f"whoami at {base} failed: {explain(Failure(e))}")
    who = _json_object(whoami)
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
        return fail(f"requesting an OpenID token failed: {explain(Failure(e))}")
    openid = _json_object(answer)
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
        return fail(f"POST {service}/get_token failed: {explain(Failure(e))}")
    if token_answer.code != 200:
        return fail(*_get_token_failure(token_answer, server_name))
    body = _json_object(token_answer)
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


def _json_object(response: HTTPResponse) -> dict:
    try:
        document = json_of(response)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


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
    for grant in ("roomJoin", "canPublish", "canSubscribe"):
        if video.get(grant) is not True:
            problems.append(f"video.{grant} is not true")
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
    flow = await ctx.flow.get()
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
        return Result("sfu-url", title, Status.FAIL, f"{url} ({what}) is unreachable: {explain(Failure(e))}", fix=fix)
    if parsed.scheme in ("ws", "http"):
        return Result("sfu-url", title, Status.WARN, f"{url} ({what}) is not TLS: browsers on https pages refuse ws:// (mixed content)", fix=fix)
    if _is_internal_host(parsed.host):
        return Result("sfu-url", title, Status.WARN, f"{url} ({what}) names an internal host: clients elsewhere cannot reach it", fix=fix)
    return Result("sfu-url", title, Status.PASS, f"{url} ({what}) is reachable")


# -- delayed-event rate limits --------------------------------------------------------------------


def _retry_after_ms(response: HTTPResponse) -> Optional[int]:
    value = _json_object(response).get("retry_after_ms")
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
    info = await ctx.well_known.get()
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
            return [Result("delayed-events", title, Status.FAIL, f"the delayed-event API at {info.base_url} is unreachable: {explain(Failure(e))}")]
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


# ---------------------------------------------------------------------------------------------
# 6. LiveKit (with the service's configuration)


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
    focus = await ctx.focus.get()
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
    from rtcauthd.livekit.twirp import RoomServiceClient, TwirpError

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
    except TwirpError as e:
        if e.status is None:
            return Result(
                "livekit-api",
                title,
                Status.FAIL,
                f"cannot reach LiveKit's API at {endpoint}: {simplify(e.detail)}",
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
