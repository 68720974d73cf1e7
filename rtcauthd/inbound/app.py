"""The inbound HTTP surface (docs/endpoints.md): routes, CORS, methods, bodies, errors.

Every observable detail — which methods get 405 with an empty body, which paths carry the
CORS headers, the exact 404 text, ``{"errcode","error"}`` + LF bodies — follows upstream,
because clients and reverse-proxy setups were written against it. The Site (size limit,
access log, in-flight count) is in :mod:`rtcauthd.inbound.site`.
"""

from __future__ import annotations

import functools
import math
from typing import Awaitable, Callable, Optional

from klein import Klein
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from werkzeug.exceptions import NotFound

from rtcauthd import errors
from rtcauthd.authorizer import Authorizer
from rtcauthd.errors import MatrixError
from rtcauthd.gojson import go_json_dumps
from rtcauthd.inbound.models import LegacyTokenRequest, TokenRequest
from rtcauthd.inbound.client_address import ATTRIBUTE as CLIENT_ATTRIBUTE, CLIENT_ADDRESS_HEADER
from rtcauthd.inbound.policy import AllowAll, IRequestPolicy, Verdict

log = Logger()

CORS_HEADERS = {
    b"Content-Type": b"application/json",
    b"Access-Control-Allow-Origin": b"*",
    b"Access-Control-Allow-Methods": b"POST",
    b"Access-Control-Allow-Headers": b"Accept, Content-Type, Content-Length, Accept-Encoding, X-CSRF-Token",
}
NOT_FOUND_BODY = b"404 page not found\n"


def json_body(obj: dict) -> bytes:
    """Go's encoder output: compact, HTML-escaped, newline-terminated."""
    return go_json_dumps(obj).encode("utf-8") + b"\n"


def error_body(error: MatrixError) -> bytes:
    document = {"errcode": error.errcode, "error": error.message}
    if error.retry_after_ms is not None:
        document["retry_after_ms"] = error.retry_after_ms
    return json_body(document)


def send_error(request: IRequest, error: MatrixError) -> bytes:
    """Status, ``Retry-After`` when the error carries a wait, and the JSON error body."""
    request.setResponseCode(error.status)
    if error.retry_after_ms is not None:
        request.setHeader(b"Retry-After", str(max(1, math.ceil(error.retry_after_ms / 1000))).encode("ascii"))
    return error_body(error)


class WebhookSink:
    """Receives each raw LiveKit webhook (Authorization header and body, NOT yet verified).

    The sink verifies the signature itself (:class:`rtcauthd.leave.delegation.DelegatedLeave`
    does); this default one, used when delegated leave is off, ignores everything.
    """

    def handle(self, authorization: Optional[str], body: bytes) -> None:
        log.debug("Webhook received but delegated leave is not enabled; ignored")


def _exact_path(func):
    """Klein folds ``//get_token`` onto ``/get_token``; Go would not serve it, so neither do we."""

    @functools.wraps(func)
    def wrapper(self, request: IRequest, *args):
        if not _is_canonical(request):
            return _not_found(request)
        return func(self, request, *args)

    return wrapper


def _cors_json_endpoint(func: Callable[..., Awaitable[bytes]]):
    """Wrap a POST endpoint: CORS on every answer, OPTIONS 200, other methods 405, errors as JSON."""

    @functools.wraps(func)
    @_exact_path
    def wrapper(self: "RtcAuthApp", request: IRequest):
        for name, value in CORS_HEADERS.items():
            request.setHeader(name, value)
        if request.method == b"OPTIONS":
            return b""
        if request.method != b"POST":
            request.setResponseCode(405)
            return b""
        too_large = getattr(request, "body_too_large", False)
        if too_large:
            return self._error(
                request,
                MatrixError(413, errors.M_TOO_LARGE, errors.E_TOO_LARGE),
            )
        body = request.content.read() if request.content is not None else b""

        async def run() -> bytes:
            try:
                verdict = await maybeDeferred(self._policy.check, request, func.__name__)
                if verdict is not None:
                    return self._answer(request, verdict)
                return await func(self, request, body)
            except MatrixError as e:
                return self._error(request, e)
            except Exception:
                log.failure("Unhandled error in {path}", path=request.path.decode("latin-1"))
                return self._error(request, MatrixError(500, errors.M_UNKNOWN, errors.E_INTERNAL))

        # Shielded: Klein cancels the handler when the client goes away, but a verification
        # or a job registration half done must finish (and not be logged as a failure).
        shield: Deferred = Deferred()
        ensureDeferred(run()).chainDeferred(shield)
        return shield

    return wrapper


def _policed(func: Callable[["RtcAuthApp", IRequest], bytes]):
    """Ask the request policy before a plain (non-JSON) handler runs."""

    @functools.wraps(func)
    def wrapper(self: "RtcAuthApp", request: IRequest):
        def decided(verdict: Verdict):
            if verdict is not None:
                return self._answer(request, verdict)
            return func(self, request)

        def failed(failure):
            log.failure("Request policy failed for {path}", failure, path=request.path.decode("latin-1"))
            return self._error(request, MatrixError(500, errors.M_UNKNOWN, errors.E_INTERNAL))

        return maybeDeferred(self._policy.check, request, func.__name__).addCallbacks(decided, failed)

    return wrapper


class RtcAuthApp:
    """Klein routes bound to one Authorizer (no global state).

    ``policy`` is asked before every handler (see :mod:`rtcauthd.inbound.policy`).
    """

    app = Klein()

    def __init__(
        self,
        *,
        authorizer: Authorizer,
        clock: IReactorTime,
        webhooks: Optional[WebhookSink] = None,
        policy: Optional[IRequestPolicy] = None,
    ) -> None:
        self._authorizer = authorizer
        self.clock = clock  # for the policy and handlers that need time (rate limits)
        self._webhooks = webhooks or WebhookSink()
        self._policy = policy if policy is not None else AllowAll()

    def resource(self):
        return self.app.resource()

    @staticmethod
    def _error(request: IRequest, error: MatrixError) -> bytes:
        return send_error(request, error)

    @classmethod
    def _answer(cls, request: IRequest, verdict: Verdict) -> bytes:
        if isinstance(verdict, MatrixError):
            return cls._error(request, verdict)
        for name, value in verdict.headers:
            request.setHeader(name, value)
        request.setResponseCode(verdict.status)
        return verdict.body

    @app.route("/get_token", branch=False)
    @_cors_json_endpoint
    async def get_token(self, request: IRequest, body: bytes) -> bytes:
        grant = await self._authorizer.get_token(TokenRequest.decode(body))
        return json_body({"url": grant.url, "jwt": grant.jwt})

    @app.route("/sfu/get", branch=False)
    @_cors_json_endpoint
    async def sfu_get(self, request: IRequest, body: bytes) -> bytes:
        grant = await self._authorizer.sfu_get(LegacyTokenRequest.decode(body))
        return json_body({"url": grant.url, "jwt": grant.jwt})

    @app.route("/delegate_delayed_leave", branch=False)
    @_cors_json_endpoint
    async def delegate_delayed_leave(self, request: IRequest, body: bytes) -> bytes:
        await self._authorizer.delegate_delayed_leave(TokenRequest.decode(body))
        return json_body({})

    @app.route("/sfu_webhook", branch=False)
    @_exact_path
    @_policed
    def sfu_webhook(self, request: IRequest) -> bytes:
        """Always 200 with an empty body: failures are only logged (docs/endpoints.md#webhook-endpoint)."""
        if not getattr(request, "body_too_large", False):
            body = request.content.read() if request.content is not None else b""
            auth = request.getHeader(b"Authorization")
            try:
                self._webhooks.handle(auth.decode("latin-1") if auth else None, body)
            except Exception:
                log.failure("Webhook handling failed")
        else:
            log.warn("Webhook body larger than the request size limit; ignored")
        return b""

    @app.route("/healthz", branch=False)
    @_exact_path
    @_policed
    def healthz(self, request: IRequest) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
        client = getattr(request, CLIENT_ATTRIBUTE, None)
        if client is not None:
            # The address the rate limit counts this caller as: lets an operator (and the
            # doctor) see whether the reverse proxy passes the client address on.
            request.setHeader(CLIENT_ADDRESS_HEADER, client.encode("ascii", "replace"))
        return b""

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure) -> bytes:
        return _not_found(request)


def _is_canonical(request: IRequest) -> bool:
    """No empty, ``.`` or ``..`` segments: the path Go's mux would serve as it is."""
    path = request.path
    return b"//" not in path and b"/./" not in path and b"/../" not in path and not path.endswith(b"/.")


def _not_found(request: IRequest) -> bytes:
    request.setResponseCode(404)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    return NOT_FOUND_BODY


# Paths are matched exactly: no merging of "//" into "/" and no redirects (docs/endpoints.md#routes, docs/differences.md).
RtcAuthApp.app.url_map.merge_slashes = False
RtcAuthApp.app.url_map.redirect_defaults = False
