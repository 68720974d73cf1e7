"""Process lifecycle: restore state, then listen, then tell systemd; on stop, drain and persist.

Order matters to operators and to upstream's black-box suite: the first 200 from /healthz
means "ready", so job recovery finishes *before* the listeners open (docs/endpoints.md#health-endpoint).
A listener that cannot open is fatal (exit status 1), as upstream's is.
"""

from __future__ import annotations

import os
import socket
from typing import Awaitable, Callable, Optional, Sequence

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure

from rtcauthd.twisted_private import forget_exit_signal

log = Logger()

DRAIN_SECONDS = 8.0  # systemd's default stop timeout is 90 s; upstream's suite wants < 10 s
_DUAL_STACK_SUFFIX = ":interface=\\:\\:"
#: Listen backlog for TCP endpoints that name none (the kernel caps it at net.core.somaxconn).
#: Twisted's default of 50 drops SYNs under a burst, and a dropped SYN costs the client a
#: 1 s (then 3 s, 7 s, ...) retransmission, /healthz probes included (docs/endpoints.md#connection-limits).
LISTEN_BACKLOG = 4096


def sd_notify(message: str, environ=os.environ) -> bool:
    """Send one sd_notify datagram if systemd asked for it (Type=notify); never raises."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(message.encode("utf-8"))
        return True
    except OSError as e:
        log.warn("sd_notify({message}) failed: {error}", message=message.split("\n")[0], error=e)
        return False


def ipv4_fallback(description: str) -> Optional[str]:
    """``tcp6:PORT:interface=\\:\\:`` → ``tcp:PORT:interface=0.0.0.0`` for IPv4-only hosts."""
    if description.startswith("tcp6:") and description.endswith(_DUAL_STACK_SUFFIX):
        port = description[len("tcp6:") : -len(_DUAL_STACK_SUFFIX)]
        if port.isdigit():
            return f"tcp:{port}:interface=0.0.0.0"
    return None


def with_backlog(description: str, backlog: int = LISTEN_BACKLOG) -> str:
    """``tcp:``/``tcp6:`` endpoint strings get ``backlog=`` unless they set one."""
    kind = description.split(":", 1)[0]
    if kind not in ("tcp", "tcp6") or "backlog=" in description:
        return description
    return f"{description}:backlog={backlog}"


class RtcAuthService(MultiService):
    """The daemon: child services plus listeners opened only after ``before_listen``."""

    def __init__(
        self,
        *,
        reactor,
        endpoints: Sequence[str],
        site,
        extra_listeners: Sequence[tuple[str, object]] = (),
        before_listen: Callable[[], Awaitable[None]] = None,
        after_stop: Callable[[], Awaitable[None]] = None,
        exit_process: Callable[[int], None] = os._exit,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._endpoints = list(endpoints)
        self._site = site
        self._extra_listeners = list(extra_listeners)
        self._before_listen = before_listen
        self._after_stop = after_stop
        self._exit_process = exit_process
        self.ports: list = []
        self._stopping = False
        self._ready_result = None  # ports list, or the Failure that stopped the start
        self._ready_waiters: list[Deferred] = []

    def when_ready(self) -> Deferred:
        """Fires with the listening ports once serving, or fails with why it could not start."""
        d: Deferred = Deferred()
        if self._ready_result is None:
            self._ready_waiters.append(d)
        elif isinstance(self._ready_result, Failure):
            d.errback(self._ready_result)
        else:
            d.callback(self._ready_result)
        return d

    def _set_ready(self, result) -> None:
        self._ready_result = result
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def startService(self) -> None:
        super().startService()
        # twistd re-raises SIGTERM after a clean shutdown (exit status 143); a stop that
        # drained and persisted everything is a success, so report 0 as upstream does.
        self._reactor.addSystemEventTrigger("after", "shutdown", forget_exit_signal, self._reactor)
        ensureDeferred(self._start()).addErrback(self._fatal)

    async def _start(self) -> None:
        if self._before_listen is not None:
            await self._before_listen()
        if self._stopping:  # stopped while restoring: never open the listeners
            return
        listeners = [(d, self._site) for d in self._endpoints] + self._extra_listeners
        for description, factory in listeners:
            port = await self._listen(description, factory)
            if self._stopping:  # stop arrived while this listener was opening
                await maybeDeferred(port.stopListening)
                return
            self.ports.append(port)
        for port in self.ports:
            log.info("Listening on {address}", address=_describe_port(port))
        sd_notify("READY=1\nSTATUS=serving")
        self._set_ready(list(self.ports))

    async def _listen(self, description: str, factory):
        try:
            return await serverFromString(self._reactor, with_backlog(description)).listen(factory)
        except CannotListenError as e:
            fallback = ipv4_fallback(description)
            if fallback is None or not _is_address_family_error(e):
                raise
            log.warn(
                "IPv6 is not available here ({error}); listening on IPv4 only ({fallback})",
                error=e.socketError,
                fallback=fallback,
            )
            return await serverFromString(self._reactor, with_backlog(fallback)).listen(factory)

    def _fatal(self, failure) -> None:
        log.critical(
            "rtcauthd cannot start: {error}", error=failure.getErrorMessage()
        )
        self._set_ready(failure)
        self._reactor.addSystemEventTrigger("after", "shutdown", self._exit_process, 1)
        if self._reactor.running:
            self._reactor.stop()
        else:
            self._reactor.callWhenRunning(self._reactor.stop)

    def stopService(self) -> Deferred:
        self._stopping = True
        sd_notify("STOPPING=1")
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        ports, self.ports = self.ports, []
        await DeferredList([port.stopListening() or succeed(None) for port in ports])
        await self._drain()
        await super().stopService()
        if self._after_stop is not None:
            await self._after_stop()
        log.info("rtcauthd stopped")

    async def _drain(self) -> None:
        """Let in-flight requests finish, bounded by DRAIN_SECONDS (the site says when)."""
        when_idle = getattr(self._site, "when_idle", None)
        if when_idle is not None:
            idle = when_idle()
            idle.addTimeout(DRAIN_SECONDS, self._reactor, onTimeoutCancel=lambda result, timeout: None)
            await idle
        left = getattr(self._site, "in_flight", 0)
        if left:
            log.warn("Stopping with {count} request(s) still in flight", count=left)


def _is_address_family_error(error: CannotListenError) -> bool:
    import errno

    code = getattr(error.socketError, "errno", None)
    return code in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)


def _describe_port(port) -> str:
    try:
        address = port.getHost()
    except Exception:
        return repr(port)
    host = getattr(address, "host", None)
    if host is None:
        return getattr(address, "name", repr(address))
    if ":" in host:
        return f"[{host}]:{address.port}"
    return f"{host}:{address.port}"
