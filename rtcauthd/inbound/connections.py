"""Inbound connections stay bounded: slow clients are dropped, and past a cap new ones get
a quick answer instead of a descriptor each for as long as they like.

Twisted's own idle timeout is reset by every byte, so a client trickling its headers at
one byte a second is never dropped; :class:`DeadlineChannel` gives each request an
absolute deadline from its first byte to its last. Over ``max_connections``,
:class:`OverflowProtocol` reads only the request line: ``/healthz`` is still answered
(200, as the route would), everything else gets ``503`` with ``Retry-After``, and the
connection is closed at once — a monitor keeps working while the service is full.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.http import HTTPChannel

log = Logger()

#: How long an over-capacity connection may take to send its request line.
OVERFLOW_DEADLINE = 2.0
#: Bytes of request line read from an over-capacity connection before giving up.
OVERFLOW_LINE_LIMIT = 2048

_HEALTHY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_FULL_BODY = b'{"errcode":"M_UNKNOWN","error":"Too many connections"}'
_FULL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Access-Control-Allow-Origin: *\r\n"
    b"Retry-After: 1\r\n"
    b"Content-Length: " + str(len(_FULL_BODY)).encode("ascii") + b"\r\n"
    b"Connection: close\r\n\r\n" + _FULL_BODY
)


class DeadlineChannel(HTTPChannel):
    """An HTTPChannel whose every request must arrive whole within ``factory.request_timeout``.

    The clock starts at the connection (for the first request) or at the first byte of the
    next one, and stops once the request is fully read; the handler's own time is not
    counted. The site (``factory``) counts open connections for the cap.
    """

    _deadline = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.connection_opened()
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        if self._deadline is None:
            self._arm()
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._disarm()
        super().allContentReceived()

    def connectionLost(self, reason) -> None:
        self._disarm()
        self.factory.connection_closed()
        super().connectionLost(reason)

    def _arm(self) -> None:
        timeout = self.factory.request_timeout
        if timeout and self.transport is not None:
            self._deadline = self.callLater(timeout, self._too_slow)

    def _disarm(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _too_slow(self) -> None:
        self._deadline = None
        peer = self.transport.getPeer()
        log.info(
            "Dropped {client}: no complete request within {timeout:g} s",
            client=getattr(peer, "host", None) or str(peer),
            timeout=self.factory.request_timeout,
        )
        self.factory.dropped("slow")
        self.transport.abortConnection()


class OverflowProtocol(Protocol):
    """What a connection over the cap talks to (see the module docstring)."""

    def __init__(self, factory) -> None:
        self._factory = factory
        self._buffer = b""
        self._timer = None
        self._done = False

    def connectionMade(self) -> None:
        self._factory.dropped("over_capacity")
        self._timer = self._factory.reactor.callLater(OVERFLOW_DEADLINE, self._give_up)

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        self._buffer += data
        line, found, _ = self._buffer.partition(b"\n")
        if not found and len(self._buffer) < OVERFLOW_LINE_LIMIT:
            return
        parts = line.split()
        healthz = len(parts) >= 2 and parts[0] in (b"GET", b"HEAD") and parts[1] == b"/healthz"
        self._finish(_HEALTHY if healthz else _FULL)

    def connectionLost(self, reason) -> None:
        self._stop_timer()

    def _finish(self, answer: Optional[bytes]) -> None:
        self._done = True
        self._stop_timer()
        if answer is not None:
            self.transport.write(answer)
            self.transport.loseConnection()
        else:
            self.transport.abortConnection()

    def _give_up(self) -> None:
        self._timer = None
        self._finish(None)

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
