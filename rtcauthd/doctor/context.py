"""Shared state of one ``rtcauth doctor`` run: options, network, and findings computed once.

Several checks need the same intermediate facts (the zone apex's addresses, the client
well-known, the homeserver's MSC4143 transports, the advertised service, the token flow).
Each is an ``async`` function of the context, defined beside the check it belongs to;
:meth:`Context.finding` computes it on first use and hands it to every check that asks
(:class:`Shared`), so a finding is fetched once however many checks depend on it, and
the runner can cancel all of them at the report's deadline. The context knows no check.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional, TypeVar

import attr
from twisted.internet.defer import Deferred, FirstError, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from rtcauthd.doctor.net import HTTPS_PORT
from rtcauthd.matrix.servername import ServerName
from rtcauthd.outbound.client import HTTPResponse, redirect_target
from rtcauthd.outbound.errors import FailureKind, OutboundError

T = TypeVar("T")

MAX_REDIRECTS = 5


@attr.s(frozen=True, auto_attribs=True)
class DoctorOptions:
    """What the operator asked for (command-line options, already validated)."""

    server_name: str
    https_port: int = HTTPS_PORT
    timeout: float = 5.0
    access_token: Optional[str] = attr.ib(default=None, repr=False)
    config: Any = attr.ib(default=None, repr=False)  # rtcauthd.config.Config
    config_error: Optional[str] = None
    config_source: Optional[str] = None


class Shared:
    """Computes a value once (on first use) and hands it to every caller."""

    def __init__(self, make: Callable[[], Awaitable[Any]]) -> None:
        self._make = make
        self._running: Optional[Deferred] = None
        self._done = False
        self._result: Any = None
        self._waiters: list[Deferred] = []

    def get(self) -> Deferred:
        if self._done:
            if isinstance(self._result, Failure):
                return _failed(self._result)
            return succeed(self._result)
        waiter: Deferred = Deferred()
        self._waiters.append(waiter)
        if self._running is None:
            self._running = Deferred.fromCoroutine(self._make())
            self._running.addBoth(self._finish)
        return waiter

    def _finish(self, result: Any) -> None:
        self._done = True
        self._result = result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if waiter.called:
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        return None

    def cancel(self) -> None:
        if self._running is not None and not self._done:
            self._running.cancel()


async def gather(coroutines) -> list:
    """Run coroutines concurrently; their results in order, or the first exception itself."""
    deferreds = [Deferred.fromCoroutine(c) for c in coroutines]
    try:
        return await gatherResults(deferreds, consumeErrors=True)
    except FirstError as e:
        e.subFailure.raiseException()


def _failed(failure: Failure) -> Deferred:
    d: Deferred = Deferred()
    d.errback(failure)
    return d


class Context:
    """The run's options, network and the shared intermediate findings."""

    def __init__(self, *, clock: IReactorTime, options: DoctorOptions, server: ServerName, net) -> None:
        self.clock = clock
        self.options = options
        self.server = server
        self.net = net
        self._findings: dict[Callable, Shared] = {}
        #: Set when the report's deadline has passed (late errors are not crashes).
        self.expired = False

    def finding(self, find: "Callable[[Context], Awaitable[T]]") -> "Deferred[T]":
        """``find(self)``, computed on first use and shared with every later caller."""
        shared = self._findings.get(find)
        if shared is None:
            shared = self._findings[find] = Shared(lambda: find(self))
        return shared.get()

    def cancel(self) -> None:
        for shared in list(self._findings.values()):
            shared.cancel()

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def https_port(self) -> int:
        return self.options.https_port

    def https_url(self, host: str, path: str) -> str:
        bracketed = f"[{host}]" if ":" in host else host
        return f"https://{bracketed}{path}"

    async def fetch(
        self,
        method: bytes,
        url: str,
        *,
        headers: Optional[dict] = None,
        body: Optional[bytes] = None,
        step: str = "request",
    ) -> HTTPResponse:
        """One bounded request through the port-mapped client (OutboundError on failure)."""
        return await self.net.http.request(method, url, headers=headers, body=body, step=step)

    async def fetch_following(self, url: str, headers: dict) -> tuple[HTTPResponse, str, list]:
        """GET with redirects followed (as browsers and upstream's client do)."""
        redirects: list[str] = []
        for _ in range(MAX_REDIRECTS + 1):
            response = await self.fetch(b"GET", url, headers=headers, step="GET")
            target = redirect_target(url, response.code, response.header("Location") or None)
            if target is None:
                return response, url, redirects
            url = target
            redirects.append(url)
        raise OutboundError(FailureKind.REDIRECT, "redirect", f"more than {MAX_REDIRECTS} redirects")
