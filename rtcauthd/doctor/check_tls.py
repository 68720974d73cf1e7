"""TLS: every host of the chain has a certificate clients accept, for a while yet.

When verification fails, the certificate is fetched again without verification, to say
*why* it was refused (expired, another name, an unknown CA).
"""

from __future__ import annotations

import datetime
from typing import Optional

import attr
from twisted.internet.defer import Deferred, FirstError, gatherResults

from rtcauthd.doctor.answers import listing
from rtcauthd.doctor.check_discovery import find_focus, find_well_known
from rtcauthd.doctor.check_token_flow import run_token_flow
from rtcauthd.doctor.context import Context
from rtcauthd.doctor.net import HTTPS_PORT, parse_url
from rtcauthd.doctor.probes import ProbeError
from rtcauthd.doctor.report import Result, Status
from rtcauthd.matrix.federation_agent import hostport
from rtcauthd.tls import is_ip_literal

CERT_WARN_DAYS = 14


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
        if is_ip_literal(host):
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
        info = await ctx.finding(find_well_known)
        start(info.base_url, "homeserver")
        focus = await ctx.finding(find_focus)
        start(focus.url, "auth service")
        if ctx.options.access_token:
            flow = await ctx.finding(run_token_flow)
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
