"""Client discovery and the RTC focus: the first links of the chain a client follows.

A client reads ``https://<server>/.well-known/matrix/client`` (and, newer ones, the
homeserver's MSC4143 ``rtc/transports``) to find the homeserver and the authorization
service. The findings here (:func:`find_well_known`, :func:`find_transports`,
:func:`find_focus`) are shared through the context with the later checks.
"""

from __future__ import annotations

from typing import Optional

import attr

from rtcauthd.doctor.answers import DOCTOR_ORIGIN, errcode_of, json_of, status_text
from rtcauthd.doctor.context import Context
from rtcauthd.doctor.net import parse_url
from rtcauthd.doctor.report import Result, Status
from rtcauthd.outbound.client import HTTPResponse, OutboundError
from rtcauthd.outbound.errors import FailureKind

CLIENT_WELL_KNOWN_PATH = "/.well-known/matrix/client"
TRANSPORTS_PATH = "/_matrix/client/unstable/org.matrix.msc4143/rtc/transports"
FOCI_KEY = "org.matrix.msc4143.rtc_foci"


@attr.s(auto_attribs=True)
class ClientWellKnown:
    """What ``https://<server>/.well-known/matrix/client`` gave (or why it gave nothing)."""

    url: str
    final_url: Optional[str] = None
    response: Optional[HTTPResponse] = None
    document: Optional[dict] = None
    base_url: Optional[str] = None
    redirects: list = attr.Factory(list)
    problems: list = attr.Factory(list)  # (message, fix paragraphs)
    fatal: bool = False  # no usable document at all
    unreachable: bool = False  # no HTTP answer at all
    cors: Optional[str] = None
    elsewhere: Optional[str] = None  # a well-known found on matrix.<server> instead


@attr.s(auto_attribs=True)
class Transports:
    """The homeserver's MSC4143 ``rtc/transports`` endpoint: ``state`` and entries."""

    state: str  # "ok", "needs-token", "absent", "error", "unknown"
    entries: list = attr.Factory(list)
    detail: str = ""
    document: Optional[dict] = None  # the 200 answer as sent (``{}`` means none configured)
    credential: Optional[str] = None  # whose token read it: "--access-token" or "the service's as_token"


@attr.s(auto_attribs=True)
class Focus:
    """The advertised authorization service: the rtc-focus lines and a usable base URL."""

    results: list
    url: Optional[str] = None


async def find_well_known(ctx: Context) -> ClientWellKnown:
    """The client well-known of the server name, judged as a browser would read it."""
    url = ctx.https_url(ctx.host, CLIENT_WELL_KNOWN_PATH)
    info = ClientWellKnown(url=url)
    headers = {"Accept": "application/json", "Origin": DOCTOR_ORIGIN}
    try:
        response, info.final_url, info.redirects = await ctx.fetch_following(url, headers)
    except OutboundError as e:
        info.fatal = info.unreachable = True
        info.problems.append((f"cannot fetch {url}: {e.reason}", ()))
        if e.kind is not FailureKind.TIMEOUT:  # a hung host: do not wait twice
            await _look_elsewhere(ctx, info, headers)
        return info
    info.response = response
    info.cors = response.header("Access-Control-Allow-Origin")
    if response.code != 200:
        info.fatal = True
        if response.code == 404:
            message = f"{url} answers 404: the bare server name serves no client well-known"
        else:
            message = f"{url} answers {status_text(response)}"
        info.problems.append((message, ()))
        await _look_elsewhere(ctx, info, headers)
        return info
    try:
        document = json_of(response)
    except ValueError as e:
        document = None
        info.problems.append((f"{url} is not valid JSON ({e})", ()))
    if document is not None and not isinstance(document, dict):
        info.problems.append((f"{url} is JSON but not an object", ()))
        document = None
    if document is None:
        info.fatal = True
        return info
    info.document = document
    homeserver = document.get("m.homeserver")
    base_url = homeserver.get("base_url") if isinstance(homeserver, dict) else None
    if not isinstance(base_url, str) or not base_url:
        info.problems.append(
            (
                f"{url} has no m.homeserver.base_url",
                (f'Add "m.homeserver": {{"base_url": "https://matrix.{ctx.host}"}} '
                 "(the public URL of your homeserver's client API).",),
            )
        )
    else:
        try:
            scheme = parse_url(base_url).scheme
        except ValueError:
            scheme = ""
        if scheme == "https":
            info.base_url = base_url.rstrip("/")
        elif scheme == "http":
            info.base_url = base_url.rstrip("/")
            info.problems.append(
                (
                    f"m.homeserver.base_url is {base_url}: browsers on https pages refuse "
                    "plain http (mixed content)",
                    ("Serve the client API over https and write its https:// URL.",),
                )
            )
        else:
            info.problems.append((f"m.homeserver.base_url {base_url!r} is not an https:// URL", ()))
    if info.cors is None:
        info.problems.append(
            (
                f"{url} has no Access-Control-Allow-Origin header: browsers (Element Web, "
                "Element Call) cannot read it",
                ("Send it with the header Access-Control-Allow-Origin: * (nginx: add_header "
                 "Access-Control-Allow-Origin * always;).",),
            )
        )
    elif info.cors.strip() not in ("*", DOCTOR_ORIGIN):
        info.problems.append(
            (
                f"{url} allows only the origin {info.cors.strip()!r}: other web clients "
                "cannot read it",
                ("Send Access-Control-Allow-Origin: * instead.",),
            )
        )
    return info

async def _look_elsewhere(ctx: Context, info: ClientWellKnown, headers: dict) -> None:
    """Where people often put the well-known by mistake: the homeserver's own host."""
    if ctx.server.is_ip or ctx.host.startswith("matrix."):
        return
    url = ctx.https_url("matrix." + ctx.host, CLIENT_WELL_KNOWN_PATH)
    try:
        response, _final, _redirects = await ctx.fetch_following(url, headers)
        document = json_of(response) if response.code == 200 else None
    except (OutboundError, ValueError):
        return
    if isinstance(document, dict):
        info.elsewhere = url

async def find_transports(ctx: Context) -> Transports:
    """The homeserver's MSC4143 ``rtc/transports`` answer.

    Read as clients read it: with ``--access-token`` at the well-known's base URL; else, in
    application-service mode, with the service's as_token where the service sends it.
    """
    from rtcauthd.doctor.as_config import service_homeserver_url

    info = await ctx.finding(find_well_known)
    base, credential, token = info.base_url, None, ctx.options.access_token
    if token:
        credential = "--access-token"
    else:
        as_base = service_homeserver_url(ctx, info.base_url)
        if as_base is not None:
            base, credential, token = as_base, "the service's as_token", ctx.options.config.as_token
    if base is None:
        return Transports("unknown", detail="no homeserver base URL")
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    try:
        response = await ctx.fetch(b"GET", base + TRANSPORTS_PATH, headers=headers, step="GET")
    except OutboundError as e:
        return Transports("error", detail=e.reason, credential=credential)
    if response.code == 200:
        try:
            document = json_of(response)
        except ValueError:
            return Transports("error", detail="answer is not JSON", credential=credential)
        entries = document.get("rtc_transports") if isinstance(document, dict) else None
        return Transports("ok", entries=entries if isinstance(entries, list) else [],
                          document=document if isinstance(document, dict) else None, credential=credential)
    if response.code in (401, 403) and errcode_of(response) in ("M_MISSING_TOKEN", "M_UNKNOWN_TOKEN", "M_FORBIDDEN"):
        return Transports("needs-token", detail=status_text(response), credential=credential)
    if response.code in (400, 404, 405):
        return Transports("absent", detail=status_text(response), credential=credential)
    return Transports("error", detail=status_text(response), credential=credential)


async def check_client_discovery(ctx: Context) -> list[Result]:
    """``/.well-known/matrix/client`` on the bare server name: JSON, base_url, CORS."""
    title = "Client discovery"
    info = await ctx.finding(find_well_known)
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


def _livekit_entries(value) -> tuple[list, bool]:
    """(livekit entries, whether the first entry is one) of a foci/transports list."""
    if not isinstance(value, list):
        return [], False
    entries = [e for e in value if isinstance(e, dict) and e.get("type") == "livekit"]
    return entries, bool(value) and isinstance(value[0], dict) and value[0].get("type") == "livekit"


async def find_focus(ctx: Context) -> Focus:
    """Which authorization service clients are told about, and whether its URL is usable."""
    title = "RTC focus"
    info = await ctx.finding(find_well_known)
    transports = await ctx.finding(find_transports)
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
    focus = await ctx.finding(find_focus)
    return focus.results
