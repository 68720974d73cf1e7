"""The authorization service the focus names: ``/healthz``, ``/get_token`` and CORS."""

from __future__ import annotations

import ipaddress

from rtcauthd.doctor.answers import DOCTOR_ORIGIN, errcode_of, status_text, transport_fix
from rtcauthd.doctor.check_discovery import find_focus
from rtcauthd.doctor.context import Context, gather
from rtcauthd.doctor.net import parse_url
from rtcauthd.doctor.report import Result, Status
from rtcauthd.outbound.client import HTTPResponse, OutboundError
from rtcauthd.tls import is_ip_literal


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
    focus = await ctx.finding(find_focus)
    base = focus.url
    if base is None:
        return [Result("service", title, Status.SKIP, "no https:// service URL to check (see RTC focus)")]
    try:
        health = await ctx.fetch(b"GET", base + "/healthz", step="GET")
    except OutboundError as e:
        return [
            Result(
                "service",
                title,
                Status.FAIL,
                f"{base} is unreachable: {e.reason}",
                fix=transport_fix(
                    e,
                    [f"Start rtcauthd (or lk-jwt-service) and make {base}/ reach it through the "
                     f"reverse proxy: clients call {base}/get_token and {base}/sfu/get."],
                ),
            ),
            Result("service-cors", cors_title, Status.SKIP, "the service is unreachable"),
        ]
    results = [_health_result(base, health)]
    proxy_warning = _shared_bucket_warning(base, health)
    if proxy_warning is not None:
        results.append(proxy_warning)
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
        results[0] = Result("service", title, Status.FAIL, f"POST {base}/get_token failed: {post.reason}")
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
            problems.append(f"OPTIONS {path}: {answer.reason}")
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


def _shared_bucket_warning(base: str, response: HTTPResponse):
    """A public URL whose callers all look like one local address: the reverse proxy does not
    pass the client address on, so every client shares one rate-limit bucket."""
    seen = response.header("X-Rtcauth-Client-Address")
    host = parse_url(base).host
    if seen is None or host is None or is_ip_literal(host) or host == "localhost":
        return None
    try:
        address = ipaddress.ip_address(seen)
    except ValueError:
        return None
    if not address.is_loopback:
        return None
    return Result(
        "service-client-address",
        "Client address",
        Status.WARN,
        f"{base} sees this doctor as {seen}: the reverse proxy does not pass the client address on, "
        "so all clients share one rate-limit bucket",
        fix=["nginx: proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; (Caddy sends it by "
             "default). The proxy's address must be in RTCAUTH_TRUSTED_PROXIES (default: this host)."],
    )


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
