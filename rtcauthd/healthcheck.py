"""``rtcauth healthcheck [URL]``: GET ``<URL>/healthz``; exit 0 on 200, otherwise 1.

A probe for Docker ``HEALTHCHECK``, systemd and monitoring, so it is built on the standard
library's ``http.client`` (no Twisted, no reactor) and starts in milliseconds. On failure it
prints one line on stderr saying why; on success it prints nothing.

Without a URL it works out where the daemon listens from the same settings the daemon reads
(the environment over an optional ``--config`` env file): ``RTCAUTH_LISTEN`` if set, else
``LIVEKIT_JWT_BIND`` / ``LIVEKIT_JWT_PORT`` (default ``:8080``). A wildcard bind is probed on
loopback. This fixes lk-jwt-service's probe, which builds ``http://localhost::8080/healthz``
from the default bind (element-hq/lk-jwt-service#210, docs/endpoints.md#health-endpoint).

The whole probe is bounded by ``--timeout`` (default 3 s, as upstream's Docker HEALTHCHECK):
the request runs in a daemon thread that the caller stops waiting for at the deadline, so a
peer that accepts and then trickles bytes cannot stretch it.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import http.client
import os
import socket
import ssl
import sys
import threading
import time
from typing import IO, Callable, Iterable, Mapping, Optional, Sequence
from urllib.parse import urlsplit

HELP = "probe rtcauthd's /healthz: exit 0 if it answers 200, else 1 with the reason on stderr"
DEFAULT_TIMEOUT = 3.0
HEALTHZ = "/healthz"
USER_AGENT = "rtcauth-healthcheck"
_PREFIX = "rtcauth healthcheck"

#: Loopback addresses to probe for a listener bound to a wildcard address. ``::`` is a
#: dual-stack socket on Linux (IPv4 clients arrive as ::ffff:127.0.0.1), and the daemon falls
#: back from ``::`` to ``0.0.0.0`` on hosts without IPv6, so both families are candidates.
_V4_LOOPBACK = "127.0.0.1"
_V6_LOOPBACK = "::1"

from rtcauthd.cli import positive_seconds


class HealthcheckError(Exception):
    """The probe cannot even be attempted (bad URL or settings); ``str()`` is the reason."""


@dataclasses.dataclass(frozen=True)
class Target:
    """One place to send ``GET <path>``: a TCP host (IPv6 without brackets) or a unix socket."""

    host: str  # IP address or host name; for scheme "unix", the socket's path
    port: int = 0
    path: str = HEALTHZ
    scheme: str = "http"  # "http", "https" or "unix"

    @property
    def url(self) -> str:
        if self.scheme == "unix":
            return f"unix:{self.host} GET {self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


# --- where to probe ----------------------------------------------------------------------


def targets_from_url(url: str) -> list[Target]:
    """``http(s)://host[:port][/prefix]`` → ``/prefix/healthz``; ``unix:/path`` for a socket.

    A URL that already ends in ``/healthz`` is used as it is.
    """
    if url.startswith("unix:"):
        path = url[len("unix:") :]
        if not path.startswith("/"):
            raise HealthcheckError(f"{url!r}: a unix socket needs an absolute path (unix:/run/…)")
        return [Target(host=path, scheme="unix")]
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HealthcheckError(f"{url!r} is not an http:// or https:// URL (e.g. http://127.0.0.1:8080)")
    if parts.username is not None or parts.query or parts.fragment:
        raise HealthcheckError(f"{url!r}: user info, query and fragment are not supported")
    try:
        port = parts.port
    except ValueError:
        raise HealthcheckError(f"{url!r} has an invalid port") from None
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    base = parts.path.rstrip("/")
    path = base if base.endswith(HEALTHZ) else base + HEALTHZ
    return [Target(host=parts.hostname, port=port, path=path, scheme=parts.scheme)]


def _loopback_for(interface: str) -> list[str]:
    """The addresses a local client reaches a listener on ``interface`` by, best first."""
    if interface in ("", "0.0.0.0"):
        return [_V4_LOOPBACK]
    if interface == "::":
        return [_V6_LOOPBACK, _V4_LOOPBACK]
    return [interface]


def _split_endpoint(description: str) -> tuple[str, list[str], dict[str, str]]:
    """Twisted endpoint-string syntax: ``:``-separated, ``\\`` escapes, ``key=value`` options."""
    fields: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in description:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(ch)
    fields.append("".join(current))
    positional: list[str] = []
    options: dict[str, str] = {}
    for field in fields[1:]:
        name, sep, value = field.partition("=")
        if sep:
            options[name] = value
        else:
            positional.append(field)
    return fields[0], positional, options


def _port_number(text: str, where: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise HealthcheckError(f"{where}: port {text!r} cannot be probed; pass the URL instead")
    return int(text)


def targets_from_endpoints(descriptions: Iterable[str]) -> list[Target]:
    """Probe targets for the ``tcp:``, ``tcp6:`` and ``unix:`` listeners among ``descriptions``.

    Others (``ssl:``, ``systemd:``, …) say nothing usable about a local address; if nothing
    usable is left, the caller must pass a URL.
    """
    targets: list[Target] = []
    unusable: list[str] = []
    for description in descriptions:
        kind, positional, options = _split_endpoint(description)
        kind = kind.lower()
        if kind in ("tcp", "tcp6"):
            port = positional[0] if positional else options.get("port", "")
            default_interface = "::" if kind == "tcp6" else ""
            interface = positional[1] if len(positional) > 1 else options.get("interface", default_interface)
            number = _port_number(port, f"RTCAUTH_LISTEN {description!r}")
            targets.extend(Target(host=host, port=number) for host in _loopback_for(interface.strip("[]")))
        elif kind == "unix":
            path = positional[0] if positional else options.get("address", "")
            if path:
                targets.append(Target(host=path, scheme="unix"))
            else:
                unusable.append(description)
        else:
            unusable.append(description)
    if not targets:
        raise HealthcheckError(
            f"cannot tell where to probe from RTCAUTH_LISTEN ({' '.join(unusable)}); pass the URL"
        )
    return _unique(targets)


def _unique(targets: Iterable[Target]) -> list[Target]:
    seen: list[Target] = []
    for target in targets:
        if target not in seen:
            seen.append(target)
    return seen


def targets_from_environment(
    environ: Mapping[str, str],
    *,
    config_file: Optional[str] = None,
    read_file: Optional[Callable[[str], str]] = None,
) -> list[Target]:
    """Where the daemon started with these settings listens, as loopback probe targets.

    Same sources and precedence as the daemon (``--config`` file < environment;
    ``RTCAUTH_LISTEN`` over ``LIVEKIT_JWT_BIND`` over ``LIVEKIT_JWT_PORT``), and the daemon's
    own validation of the bind address, so the probe rejects what the daemon rejects with
    the same words. The daemon's ``--listen`` options are not visible here: pass the URL.
    """
    # Imported here: plain `rtcauth healthcheck URL` needs none of the daemon's modules.
    from rtcauthd.config import DEFAULT_BIND
    from rtcauthd.config_sources import ConfigError, parse_env_file, read_text_file
    from rtcauthd.config_values import bind_to_endpoints

    env: dict[str, str] = {}
    if config_file:
        try:
            text = (read_file or read_text_file)(config_file)
        except OSError as e:
            raise HealthcheckError(f"--config: cannot read {config_file}: {e.strerror or e}") from None
        try:
            env.update(parse_env_file(text))
        except ConfigError as e:
            raise HealthcheckError(str(e)) from None
    env.update(environ)

    listen = env.get("RTCAUTH_LISTEN", "").split()
    if listen:
        return targets_from_endpoints(listen)

    bind, port = env.get("LIVEKIT_JWT_BIND", ""), env.get("LIVEKIT_JWT_PORT", "")
    if bind and port:
        raise HealthcheckError("LIVEKIT_JWT_BIND and LIVEKIT_JWT_PORT must not be set together")
    bind = bind or (":" + port if port else DEFAULT_BIND)
    try:
        bind_to_endpoints(bind)
    except ConfigError as e:
        raise HealthcheckError(str(e)) from None
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    number = _port_number(port, f"LIVEKIT_JWT_BIND {bind!r}")
    if host in ("", "localhost"):
        # ":P" is dual-stack "::" (or 0.0.0.0 on an IPv4-only host); localhost binds both.
        # IPv4 first (it reaches both), then ::1 for a host with net.ipv6.bindv6only=1.
        hosts = [_V4_LOOPBACK, _V6_LOOPBACK]
    else:
        hosts = _loopback_for(host)
    return [Target(host=h, port=number) for h in hosts]


# --- probing -----------------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix stream socket (``Host: localhost``)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _connection(target: Target, timeout: float) -> http.client.HTTPConnection:
    if target.scheme == "unix":
        return _UnixHTTPConnection(target.host, timeout)
    if target.scheme == "https":
        return http.client.HTTPSConnection(
            target.host, target.port, timeout=timeout, context=ssl.create_default_context()
        )
    return http.client.HTTPConnection(target.host, target.port, timeout=timeout)


class NothingListening(Exception):
    """Nothing answered at this address (``str()`` says how): the next candidate may."""


class ProbeTimedOut(Exception):
    """The time given to the probe ran out."""


#: connect() failures that mean "not listening here", as opposed to a broken daemon.
_NOT_LISTENING_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT}
)


def _probe_failure_text(error: BaseException, target: Target) -> str:
    """Why a stdlib socket probe failed, in words an operator reads in a systemd status line."""
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (nothing listens there)"
    if isinstance(error, FileNotFoundError) and target.scheme == "unix":
        return "no such socket (nothing listens there)"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve {target.host}: {error.strerror}"
    if isinstance(error, ssl.SSLError):
        return f"TLS failed: {error.reason or error}"
    if isinstance(error, http.client.RemoteDisconnected):
        return "connection closed without an answer"
    if isinstance(error, http.client.HTTPException):
        return f"not an HTTP answer ({type(error).__name__})"
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return f"{type(error).__name__}: {error}"


def _nothing_listening(error: BaseException) -> bool:
    if isinstance(error, (socket.timeout, TimeoutError, ssl.SSLError)):
        return False
    if isinstance(error, (FileNotFoundError, socket.gaierror)):
        return True
    return isinstance(error, OSError) and error.errno in _NOT_LISTENING_ERRNOS


def probe(target: Target, *, timeout: float) -> Optional[str]:
    """GET the target within ``timeout`` seconds: ``None`` if it answered 200, else the reason.

    Raises :class:`NothingListening` when nothing listens at the address, so that the caller
    can try the next candidate, and :class:`ProbeTimedOut` when the time is up.
    """
    connection = _connection(target, timeout)
    outcome: dict = {}

    def request() -> None:
        try:
            connection.request(
                "GET", target.path, headers={"User-Agent": USER_AGENT, "Connection": "close"}
            )
            response = connection.getresponse()
            outcome["status"] = (response.status, response.reason)
        except BaseException as e:  # reported by the caller's thread
            outcome["error"] = e
        finally:
            connection.close()

    worker = threading.Thread(target=request, name="rtcauth-healthcheck", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        _abort(connection)  # the daemon thread then returns at once; nobody waits for it
        raise ProbeTimedOut()
    if "error" in outcome:
        error = outcome["error"]
        if isinstance(error, (socket.timeout, TimeoutError)):
            raise ProbeTimedOut()
        reason = _probe_failure_text(error, target)
        if _nothing_listening(error):
            raise NothingListening(reason)
        return reason
    status, phrase = outcome["status"]
    if status == 200:
        return None
    return f"HTTP {status} {phrase}".rstrip() + " (want 200)"


def _abort(connection: http.client.HTTPConnection) -> None:
    sock = connection.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def check(
    targets: Sequence[Target],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    clock: Callable[[], float] = time.monotonic,
    probe: Callable[..., Optional[str]] = probe,
) -> Optional[str]:
    """Probe the candidates in order within one overall ``timeout``.

    ``None`` if one answered 200. The next candidate is tried only when nothing listened at
    the previous one: a daemon that answers 500 is unhealthy, whichever address it is on.
    """
    deadline = clock() + timeout
    failures: list[str] = []
    for target in targets:
        remaining = deadline - clock()
        if remaining <= 0:
            failures.append(f"{target.url}: not tried, {timeout:g} s used up")
            break
        try:
            reason = probe(target, timeout=remaining)
        except NothingListening as e:
            failures.append(f"{target.url}: {e}")
            continue
        except ProbeTimedOut:
            failures.append(f"{target.url}: no answer within {timeout:g} s")
            break
        if reason is None:
            return None
        failures.append(f"{target.url}: {reason}")
        break
    return "; ".join(failures)


# --- command line ------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "url",
        nargs="?",
        metavar="URL",
        help="rtcauthd's base URL, e.g. http://[::1]:8080 or unix:/run/rtcauthd/rtcauthd.sock "
        "(default: derived from RTCAUTH_LISTEN or LIVEKIT_JWT_BIND, as the daemon reads them)",
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="ENVFILE",
        help="read KEY=value settings from this env file first (the environment wins), "
        "like `twistd rtcauth --config`",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up after this long in total (default {DEFAULT_TIMEOUT:g})",
    )


def run(
    args: argparse.Namespace,
    *,
    environ: Optional[Mapping[str, str]] = None,
    stderr: Optional[IO[str]] = None,
) -> int:
    """Probe and report: 0 healthy, 1 otherwise (one line on stderr)."""
    environ = environ if environ is not None else os.environ
    stderr = stderr if stderr is not None else sys.stderr
    try:
        if args.url:
            targets = targets_from_url(args.url)
        else:
            targets = targets_from_environment(environ, config_file=args.config)
    except HealthcheckError as e:
        stderr.write(f"{_PREFIX}: {e}\n")
        return 1
    problem = check(targets, timeout=args.timeout)
    if problem is None:
        return 0
    stderr.write(f"{_PREFIX}: unhealthy: {problem}\n")
    return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m rtcauthd.healthcheck [URL]``: the same probe without the dispatcher."""
    from rtcauthd.cli import run_command_module

    return run_command_module(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
