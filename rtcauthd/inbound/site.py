"""The twisted.web side of the inbound surface: request-size limit, access log, drain signal.

Kept apart from the routes so the routes stay a plain Klein object and the Site is the
one place that knows about connections, in-flight requests and their timing.
"""

from __future__ import annotations

import inspect
from typing import Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import INonQueuedRequestFactory
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from rtcauthd.inbound.admission import AdmissionQueue, healthz_now
from rtcauthd.inbound.client_address import ATTRIBUTE as CLIENT_ATTRIBUTE
from rtcauthd.inbound.connections import DeadlineChannel, OverflowProtocol
from rtcauthd.metrics import Metrics

log = Logger()

#: Our routes take JSON; Twisted's HTML-form parsing of every POST body (through the
#: ``email`` package) was a third of the cost of reading a request. The switch is public
#: from Twisted 24 on; older releases always parse, which is only slower.
_SITE_OPTIONS = (
    {"parsePOSTFormSubmission": False} if "parsePOSTFormSubmission" in inspect.signature(Site.__init__).parameters else {}
)


class UTF8URLsOnly(Resource):
    """Answers a URL that is not UTF-8 (``GET /%ff``) with Klein's 400, without its traceback.

    Klein logs such a client mistake as a critical failure with a traceback; under a
    flood that is a log line per request. Here it is one debug line.
    """

    isLeaf = True

    def __init__(self, inner) -> None:
        super().__init__()
        self._inner = inner

    def render(self, request):
        try:
            b"/".join(request.postpath).decode("utf-8")
            request.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            log.debug("Non-UTF-8 URL from {client} answered 400", client=_client_address(request))
            request.setResponseCode(400)
            return b"Non-UTF-8 encoding in URL."
        return self._inner.render(request)


class SizeLimitingRequest(Request):
    """Stops buffering a request body past ``max_body`` bytes; the route answers 413."""

    max_body = 64 * 1024

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.body_too_large = False
        self._body_size = 0
        self.started: Optional[float] = None  # clock seconds; set by the site

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > self.max_body:
            self.body_too_large = True
            length = 0  # keep Twisted from preparing a large buffer
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._body_size += len(data)
        if self._body_size > self.max_body:
            self.body_too_large = True
            self.content.seek(0)
            self.content.truncate()
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        """Hands the parsed request to the site's admission queue, if it has one."""
        admission = getattr(self.channel.site, "admission", None)
        if admission is None:
            super().process()
        else:
            admission.admit(self)

    def handle_now(self) -> None:
        """Routes and renders the request (Twisted's own ``process``)."""
        super().process()


class RtcAuthSite(Site):
    """A Site whose access log is a structured event (healthz only at debug).

    It counts requests in flight so that a stopping service can wait for the last one
    (:meth:`when_idle`) instead of polling. With ``admission_batch``, requests are handled
    through an :class:`AdmissionQueue` (``/healthz`` first); without, as soon as read.
    """

    protocol = DeadlineChannel

    def __init__(
        self,
        resource,
        *,
        max_body: int,
        reactor=None,
        clock: Optional[IReactorTime] = None,
        request_timeout: float = 0.0,
        max_connections: Optional[int] = None,
        metrics: Optional[Metrics] = None,
        admission_batch: Optional[int] = None,
        admission_classify=None,
    ) -> None:
        super().__init__(resource, reactor=reactor, **_SITE_OPTIONS)
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.connections = 0
        self._metrics = metrics if metrics is not None else Metrics()
        self.in_flight = 0
        self._clock = clock if clock is not None else self.reactor
        self._idle_waiters: list[Deferred] = []
        self.admission: Optional[AdmissionQueue] = None
        if admission_batch is not None:
            self.admission = AdmissionQueue(
                self._clock,
                SizeLimitingRequest.handle_now,
                batch=admission_batch,
                classify=admission_classify or healthz_now,
            )
            self._metrics.inbound_queued.set_function(self.admission.__len__)
        self.requestFactory = _RequestFactory(self)
        self.displayTracebacks = False
        self.noisy = False

    def buildProtocol(self, addr):
        if self.max_connections is not None and self.connections >= self.max_connections:
            return OverflowProtocol(self)
        return super().buildProtocol(addr)

    def connection_opened(self) -> None:
        self.connections += 1

    def connection_closed(self) -> None:
        self.connections -= 1

    def dropped(self, reason: str) -> None:
        self._metrics.inbound_dropped.labels(reason=reason).inc()

    def make_request(self, channel) -> SizeLimitingRequest:
        request = SizeLimitingRequest(channel)
        request.max_body = self.max_body
        request.started = self._clock.seconds()
        self.in_flight += 1
        request.notifyFinish().addBoth(self._finished)
        return request

    def when_idle(self) -> Deferred:
        """Fires once no request is in flight: now if none is, else when the last one ends.

        Cancelling the Deferred (e.g. a drain timeout) only forgets this waiter.
        """
        if self.in_flight == 0:
            d: Deferred = Deferred()
            d.callback(None)
            return d
        d = Deferred(lambda cancelled: self._idle_waiters.remove(cancelled))
        self._idle_waiters.append(d)
        return d

    def _finished(self, _result) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def log(self, request: Request) -> None:
        path = request.path.decode("latin-1", errors="replace")
        started = getattr(request, "started", None)
        duration_ms = (self._clock.seconds() - started) * 1000 if started is not None else 0.0
        origin = request.getHeader(b"Origin")
        event = dict(
            method=request.method.decode("latin-1", errors="replace"),
            path=path,
            status=request.code,
            duration_ms=round(duration_ms, 1),
            origin=origin.decode("latin-1", errors="replace") if origin else "-",
            client=_client_address(request),
        )
        fmt = "{client} {method} {path} -> {status} in {duration_ms} ms (origin {origin})"
        if path == "/healthz":
            log.debug(fmt, **event)
        else:
            log.info(fmt, **event)


@implementer(INonQueuedRequestFactory)
class _RequestFactory:
    """Builds our requests; declaring the interface keeps Twisted from passing ``queued``."""

    def __init__(self, site: RtcAuthSite) -> None:
        self._site = site

    def __call__(self, channel) -> SizeLimitingRequest:
        return self._site.make_request(channel)


def _client_address(request: Request) -> str:
    """The address the rate limit used (behind a trusted proxy: the client), else the peer."""
    resolved = getattr(request, CLIENT_ATTRIBUTE, None)
    if resolved is not None:
        return resolved
    peer = request.getClientAddress()
    host = getattr(peer, "host", None)
    return host if host else str(peer)
