"""``rtcauth doctor SERVER_NAME``: diagnose a MatrixRTC deployment end to end.

Checks every link of the call set-up chain (DNS, client discovery, the advertised
authorization service, TLS, the homeserver's federation and client APIs, and with the
service's configuration its LiveKit settings and, in application-service mode, what
Synapse does with its registration) and prints one line per check: ✓ pass,
! warning, ✗ fail with the concrete fix. Exit status 0 when nothing failed, 1 otherwise
(also for usage errors). ``--json`` prints the same findings for machines.

This module is the command-line glue (``rtcauthd.cli`` lists it); the checks live in
:mod:`rtcauthd.doctor.check_*` modules, one per link of the chain (sharing findings
through :mod:`rtcauthd.doctor.context`), the orchestration in :mod:`rtcauthd.doctor.runner`.
Heavy imports happen inside :func:`run`, so that ``rtcauth --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import IO, Mapping, Optional, Sequence

HELP = "diagnose a MatrixRTC deployment (DNS, well-known, transports, service, TLS, homeserver, application service, LiveKit)"
DEFAULT_TIMEOUT = 5.0
USER_AGENT = "rtcauth-doctor"
_PREFIX = "rtcauth doctor"

#: Any of these in the environment means "this is the service's environment": check LiveKit.
_SERVICE_VARIABLES = ("LIVEKIT_URL", "LIVEKIT_KEY", "LIVEKIT_KEY_FILE", "LIVEKIT_FULL_ACCESS_HOMESERVERS")

from rtcauthd.cli import positive_seconds


class DoctorUsageError(Exception):
    """Options that cannot be used; ``str()`` is the one line to print."""


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 1-65535, got {text!r}")
    return int(text)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("server_name", metavar="SERVER_NAME", help="the Matrix server name (the part after ':' in user IDs)")
    parser.add_argument(
        "--dns-server",
        metavar="HOST:PORT",
        help="resolve every name through this DNS server instead of the system's",
    )
    parser.add_argument(
        "--https-port",
        type=_port,
        default=443,
        metavar="N",
        help="port for every HTTPS URL doctor derives without an explicit port (default 443)",
    )
    parser.add_argument("--ca-file", metavar="PATH", help="also trust the CA certificates in this PEM file")
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"bound for each network operation (default {DEFAULT_TIMEOUT:g}); the whole report "
        "is cut off after 2.4 times this",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--access-token",
        metavar="TOKEN",
        help="a Matrix access token of a user of SERVER_NAME: runs the whole token flow, reads the "
        "homeserver's rtc/transports, probes the proxied get_token and the delayed-event rate "
        "limit (@PATH reads it from a file, keeping it out of ps)",
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="ENVFILE",
        help="the service's env file (KEY=value, as twistd rtcauth --config): checks its "
        "LiveKit settings and, in application-service mode, its registration against Synapse "
        "(as_token, AS ping, proxy, is_joined, transport url); the service's environment is "
        "used when LIVEKIT_URL is set",
    )


def _access_token(value: Optional[str]) -> Optional[str]:
    if value is None or not value.startswith("@"):
        return value
    path = value[1:]
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise DoctorUsageError(f"--access-token: cannot read {path}: {e.strerror or e}") from None
    if not token:
        raise DoctorUsageError(f"--access-token: {path} is empty")
    return token


def options_from_args(args: argparse.Namespace, environ: Mapping[str, str]):
    """DoctorOptions and the DNS servers for the parsed command line (no network)."""
    from rtcauthd.config import ConfigError, load_config
    from rtcauthd.doctor.context import DoctorOptions
    from rtcauthd.doctor.dns import DNSServerSyntaxError, parse_dns_server, system_dns_servers

    if args.dns_server:
        try:
            dns_servers, custom = [parse_dns_server(args.dns_server)], True
        except DNSServerSyntaxError as e:
            raise DoctorUsageError(f"--dns-server: {e}") from None
    else:
        dns_servers, custom = system_dns_servers(), False
    config = config_error = source = None
    if args.config or any(environ.get(name) for name in _SERVICE_VARIABLES):
        source = f"--config {args.config}" if args.config else "the environment"
        try:
            config = load_config(environ, config_file=args.config)
        except ConfigError as e:
            config_error = str(e)
    options = DoctorOptions(
        server_name=args.server_name,
        https_port=args.https_port,
        timeout=args.timeout,
        access_token=_access_token(args.access_token),
        config=config,
        config_error=config_error,
        config_source=source,
    )
    ca_file = args.ca_file or (config.ca_file if config is not None else None)
    return options, dns_servers, custom, ca_file


def _can_print_marks(stream: IO[str]) -> bool:
    try:
        "✓✗".encode(getattr(stream, "encoding", None) or "ascii")
    except (LookupError, UnicodeEncodeError):
        return False
    return True


def run(
    args: argparse.Namespace,
    *,
    environ: Optional[Mapping[str, str]] = None,
    stdout: Optional[IO[str]] = None,
    stderr: Optional[IO[str]] = None,
) -> int:
    """Diagnose and print the report; 0 if no check failed, else 1."""
    environ = os.environ if environ is None else environ
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    try:
        options, dns_servers, custom_dns, ca_file = options_from_args(args, environ)
    except DoctorUsageError as e:
        stderr.write(f"{_PREFIX}: {e}\n")
        return 1

    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    from rtcauthd.doctor.net import build_network
    from rtcauthd.doctor.report import render_json, render_text
    from rtcauthd.doctor.runner import diagnose
    from rtcauthd.tls import TLSConfigError

    outcome: dict = {}

    def main(reactor) -> Deferred:
        try:
            network = build_network(
                reactor,
                timeout=options.timeout,
                https_port=options.https_port,
                dns_servers=dns_servers,
                custom_dns=custom_dns,
                ca_file=ca_file,
                user_agent=USER_AGENT,
            )
        except TLSConfigError as e:
            outcome["error"] = f"--ca-file: {e}"
            return Deferred.fromCoroutine(_nothing())
        d = Deferred.fromCoroutine(diagnose(options, reactor=reactor, network=network))
        return d.addCallback(lambda report: outcome.update(report=report))

    try:
        react(main)
    except SystemExit:
        pass
    if "error" in outcome:
        stderr.write(f"{_PREFIX}: {outcome['error']}\n")
        return 1
    report = outcome.get("report")
    if report is None:
        stderr.write(f"{_PREFIX}: internal error, no report\n")
        return 1
    if args.json:
        stdout.write(render_json(report))
    else:
        stdout.write(render_text(report, unicode=_can_print_marks(stdout)))
    stdout.flush()
    return report.exit_status


async def _nothing() -> None:
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m rtcauthd.doctor SERVER_NAME``: the same without the dispatcher."""
    from rtcauthd.cli import run_command_module

    return run_command_module(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
