"""Outbound HTTP: one bounded-time, bounded-size request helper over an injected IAgent.

Why not ``treq.request``: treq parses URLs with hyperlink, which IDNA-encodes IPv6
literals and raises before connecting (docs/federation.md#tls). ``Agent.request`` takes the URL
as bytes and handles ``[::1]`` correctly, so every outbound call (federation, LiveKit
Twirp, client-server API) goes through :class:`HTTPClient`, which talks to the agent
directly and reads the body itself so that it can enforce a size cap and abort the
connection on timeout. Tests inject ``treq.testing.RequestTraversalAgent`` or a
memory-reactor agent; production injects a pooled, keep-alive ``Agent``.
"""

from __future__ import annotations

from typing import Mapping, Optional

import attr
from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferTimeout, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer
from urllib.parse import urljoin, urlsplit

from rtcauthd.outbound.errors import FailureKind, OutboundError, describe, kind_of, reason
from rtcauthd.twisted_private import make_pool_quiet

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_BODY = 64 * 1024


def connection_pool(reactor, *, persistent: bool = True, per_host: int = 8, idle_seconds: float = 120) -> HTTPConnectionPool:
    """A keep-alive pool that does not log every connection it opens."""
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    make_pool_quiet(pool)
    pool.maxPersistentPerHost = per_host
    pool.cachedConnectionTimeout = idle_seconds
    return pool


class _Discard(Protocol):
    """Takes a response body nobody will read and closes its connection at once."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass


REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})


def redirect_target(url: str, code: int, location: Optional[str]) -> Optional[str]:
    """Where an answer redirects to (``location`` resolved against ``url``), or None."""
    if code not in REDIRECT_CODES or location is None:
        return None
    return urljoin(url, location)


_CREDENTIAL_HEADERS = (b"authorization", b"cookie", b"cookie2", b"proxy-authorization", b"www-authenticate")


def _origin(url: bytes) -> tuple:
    parts = urlsplit(url.decode("latin-1"))
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


def _same_origin(a: bytes, b: bytes) -> bool:
    return _origin(a) == _origin(b)


def _without_credentials(headers: Optional[Headers]) -> Optional[Headers]:
    if headers is None:
        return None
    kept = headers.copy()
    for name in _CREDENTIAL_HEADERS:
        kept.removeHeader(name)
    return kept


@implementer(IAgent)
class GoRedirectAgent:
    """Follows redirects the way Go's ``http.Client`` does, as upstream's calls do (docs/delegated-leave.md#restart-and-send-calls).

    301/302/303 turn the request into a GET without a body (HEAD stays HEAD); 307/308
    repeat the same method and body (our bodies are in memory, so they replay). Every 3xx
    connection is closed before following: Twisted's own redirect agents leave the unread
    body's connection open forever. At most ``limit`` redirects, then an error. Credentials
    (``Authorization``, ``Cookie``) never follow a redirect to another scheme, host or port,
    as neither Go's nor upstream's Rust client lets them.
    """

    def __init__(self, agent: IAgent, *, limit: int = 10) -> None:
        self._agent = agent
        self._limit = limit

    def request(self, method, uri, headers=None, bodyProducer=None):
        return self._follow(method, uri, headers, bodyProducer, 0)

    def _follow(self, method: bytes, uri: bytes, headers, body, redirects: int) -> Deferred:
        def got(response: IResponse):
            locations = response.headers.getRawHeaders(b"location")
            location = locations[0].decode("latin-1") if locations else None
            followed = redirect_target(uri.decode("latin-1"), response.code, location)
            if followed is None:
                return response  # Go hands back a 3xx without Location as it is
            response.deliverBody(_Discard())
            if redirects >= self._limit:
                raise OutboundError(FailureKind.REDIRECT, "redirect", f"stopped after {self._limit} redirects")
            target = followed.encode("latin-1")
            hop_headers = headers if _same_origin(uri, target) else _without_credentials(headers)
            if response.code in (307, 308):
                return self._follow(method, target, hop_headers, body, redirects + 1)
            return self._follow(b"HEAD" if method == b"HEAD" else b"GET", target, hop_headers, None, redirects + 1)

        return self._agent.request(method, uri, headers, body).addCallback(got)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class HTTPResponse:
    """A fully read response."""

    code: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> Optional[str]:
        values = self.headers.getRawHeaders(name)
        if not values:
            return None
        value = values[0]
        return value.decode("latin-1") if isinstance(value, bytes) else value


class _CappedBodyReader(Protocol):
    """Collects a response body up to ``limit`` bytes, then aborts."""

    def __init__(self, finished: Deferred, limit: int) -> None:
        self._finished: Optional[Deferred] = finished
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self._finished is None:
            return
        self._size += len(data)
        if self._size > self._limit:
            finished, self._finished = self._finished, None
            self.abort()
            finished.errback(
                OutboundError(FailureKind.TOO_LARGE, "read body", f"response body exceeds {self._limit} bytes")
            )
            return
        self._chunks.append(data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure) -> None:
        if self._finished is None:
            return
        finished, self._finished = self._finished, None
        if reason.check(ResponseDone, PotentialDataLoss):
            finished.callback(b"".join(self._chunks))
        else:
            finished.errback(
                OutboundError(FailureKind.LOST, "read body", f"connection lost: {reason.getErrorMessage()}")
            )


def read_body(response: IResponse, limit: int) -> Deferred:
    """Read ``response``'s whole body, failing (kind TOO_LARGE) past ``limit`` bytes."""
    if isinstance(response.length, int) and response.length > limit:
        # Refuse up front; deliver to a reader that is already finished, then abort.
        reader = _CappedBodyReader(Deferred(), limit)
        reader._finished = None
        response.deliverBody(reader)
        reader.abort()
        return fail(
            OutboundError(FailureKind.TOO_LARGE, "read body", f"Content-Length {response.length} exceeds {limit} bytes")
        )
    reader_holder: list[_CappedBodyReader] = []

    def cancel(_d: Deferred) -> None:
        if reader_holder:
            reader_holder[0].abort()

    finished: Deferred = Deferred(cancel)
    reader = _CappedBodyReader(finished, limit)
    reader_holder.append(reader)
    response.deliverBody(reader)
    return finished


def _as_url_bytes(url: str | bytes) -> bytes:
    if isinstance(url, bytes):
        return url
    try:
        return url.encode("ascii")
    except UnicodeEncodeError:
        raise OutboundError(FailureKind.INVALID, "build URL", f"URL is not ASCII: {url!r}") from None


class HTTPClient:
    """Bounded outbound HTTP over an injected ``IAgent`` (see module docstring)."""

    def __init__(
        self,
        *,
        clock: IReactorTime,
        agent: IAgent,
        timeout: float = DEFAULT_TIMEOUT,
        max_body: int = DEFAULT_MAX_BODY,
        user_agent: str = "rtcauthd",
    ) -> None:
        self._clock = clock
        self._agent = agent
        self._timeout = timeout
        self._max_body = max_body
        self._user_agent = user_agent.encode("ascii")

    @property
    def agent(self) -> IAgent:
        return self._agent

    def request(
        self,
        method: bytes,
        url: str | bytes,
        *,
        headers: Optional[Mapping[str, str]] = None,
        body: Optional[bytes] = None,
        timeout: Optional[float] = None,
        max_body: Optional[int] = None,
        step: str = "request",
    ) -> "Deferred[HTTPResponse]":
        """Send one request; the whole exchange (connect to last body byte) is time-bounded.

        Fails with :class:`OutboundError` (kind TIMEOUT, TOO_LARGE, or what the agent
        classified; ``step`` says which call this was, for the log).
        """
        limit = self._max_body if max_body is None else max_body
        bound = self._timeout if timeout is None else timeout
        raw_headers = Headers({b"User-Agent": [self._user_agent]})
        for name, value in (headers or {}).items():
            raw_headers.setRawHeaders(name.encode("ascii"), [value.encode("latin-1")])
        try:
            url_bytes = _as_url_bytes(url)
        except OutboundError as e:
            return fail(e)
        producer = None if body is None else BytesProducer(body)

        try:
            d = self._agent.request(method, url_bytes, raw_headers, producer)
        except Exception as e:  # Agent raises, not fails, on a URL it cannot parse
            return fail(OutboundError(FailureKind.INVALID, step, f"invalid URL: {type(e).__name__}: {e}"))

        def got_response(response: IResponse) -> Deferred:
            return read_body(response, limit).addCallback(
                lambda data: HTTPResponse(code=response.code, headers=response.headers, body=data)
            )

        d.addCallback(got_response)
        # Our own timer rather than addTimeout: a cancelled agent request surfaces as
        # ResponseNeverReceived(CancelledError), which addTimeout would not recognise.
        timed_out = []

        def expire() -> None:
            timed_out.append(True)
            d.cancel()

        timer = self._clock.callLater(bound, expire)

        def stop_timer(result):
            if timer.active():
                timer.cancel()
            return result

        def translate(failure: Failure) -> Failure:
            if timed_out or failure.check(DeferTimeout):
                raise OutboundError(FailureKind.TIMEOUT, step, f"no complete answer within {bound:g} s")
            if failure.check(OutboundError):
                failure.value.step = f"{step}: {failure.value.step}"
                return failure
            raise OutboundError(kind_of(failure.value), step, describe(failure), reason=reason(failure.value))

        d.addBoth(stop_timer)
        d.addErrback(translate)
        return d


@implementer(IBodyProducer)
class BytesProducer:
    """A request body that is already in memory, written in one go (no cooperator)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer) -> Deferred:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass
