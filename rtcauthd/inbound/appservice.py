"""The application-service HTTP surface (docs/appservice.md#routes), mounted only in AS mode.

Synapse proxies the MSC4195 C-S and S-S endpoints here with ``Authorization: Bearer
<hs_token>`` and the caller in ``X-Matrix-User-Identifier`` / ``X-Matrix-Origin``. Every
route runs the same gates in upstream's order (docs/appservice.md#gate-order): method,
hs_token, body, fields, identity header; the first failure answers. The hs_token is the
only thing that makes the identity headers trustworthy, so it is compared in constant time
and checked before anything else is read.
"""

from __future__ import annotations

import functools
import hmac
from typing import Callable, Optional

from klein import Klein
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from werkzeug.exceptions import NotFound

from rtcauthd.inbound.ratelimit import TokenBuckets, limit_exceeded
from rtcauthd import errors
from rtcauthd.appservice_authorizer import AppserviceAuthorizer
from rtcauthd.errors import MatrixError
from rtcauthd.inbound.app import CORS_HEADERS, _is_canonical, _not_found, json_body, send_error
from rtcauthd.inbound.appservice_models import ClientDelegationRequest, ClientTokenRequest, ServerTokenRequest
from rtcauthd.matrix.appservice import HomeserverAppservice

log = Logger()

#: Both the unstable MSC4195 prefix and the stable ``v1`` form are served (docs/appservice.md#path-forms).
CS_PREFIXES = ("/_matrix/client/unstable/io.element.msc4195", "/_matrix/client/v1")
SS_PREFIXES = ("/_matrix/federation/unstable/io.element.msc4195", "/_matrix/federation/v1")
USER_HEADER = b"X-Matrix-User-Identifier"
ORIGIN_HEADER = b"X-Matrix-Origin"
BEARER = b"Bearer "


def _visible_ascii(value: bytes) -> bool:
    """What an HTTP library reads as a string header: printable ASCII (and tab)."""
    return all(32 <= b < 127 or b == 9 for b in value)


def header(request: IRequest, name: bytes) -> str:
    """The first value of ``name``; absent or not visible ASCII reads as ""."""
    values = request.requestHeaders.getRawHeaders(name)
    if not values or not _visible_ascii(values[0]):
        return ""
    return values[0].decode("ascii")


def check_hs_token(request: IRequest, hs_token: str) -> Optional[MatrixError]:
    """A2: ``Authorization: Bearer <hs_token>`` (case-sensitive prefix), compared in constant time."""
    values = request.requestHeaders.getRawHeaders(b"Authorization")
    value = values[0] if values else b""
    if not _visible_ascii(value) or not value.startswith(BEARER) or len(value) == len(BEARER):
        return MatrixError(401, errors.M_MISSING_TOKEN, errors.E7_HS_MISSING)
    if not hmac.compare_digest(value[len(BEARER):], hs_token.encode("utf-8")):
        return MatrixError(401, errors.M_UNKNOWN_TOKEN, errors.E7_HS_WRONG)
    return None


def _empty(request: IRequest, status: int) -> bytes:
    request.setResponseCode(status)
    request.defaultContentType = None
    return b""


def _error(request: IRequest, error: MatrixError) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    return send_error(request, error)


def _ok(request: IRequest, obj: dict) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    return json_body(obj)


def _gated(*, cors: bool, identity_header: bytes, missing_identity: str, decode: Callable[[bytes], object]):
    """A1–A5 for a POST route, then ``func(self, request, parsed_body, identity)``."""

    def decorate(func):
        @functools.wraps(func)
        def wrapper(self: "AppserviceApp", request: IRequest):
            if not _is_canonical(request):
                return _not_found(request)
            if cors:
                for name, value in CORS_HEADERS.items():
                    request.setHeader(name, value)
            if request.method == b"OPTIONS":  # A1
                return _empty(request, 200)
            if request.method != b"POST":
                return _empty(request, 405)
            refused = check_hs_token(request, self._hs_token)  # A2
            if refused is not None:
                return _error(request, refused)
            try:
                if getattr(request, "body_too_large", False):  # A3: a body we did not read is unreadable
                    raise errors.not_json()
                body = request.content.read() if request.content is not None else b""
                parsed = decode(body)
                parsed.validate()  # A4
            except MatrixError as e:
                return _error(request, e)
            identity = header(request, identity_header)  # A5
            if not identity:
                return _error(request, MatrixError(401, errors.M_UNAUTHORIZED, missing_identity))
            # rtcauthd only: per Matrix user (S-S: the relayed user), as on the legacy routes per client
            user = getattr(parsed, "user_id", None) or identity
            if self._limits is not None:
                wait = self._limits.take(user)
                if wait > 0:
                    return _error(request, limit_exceeded(wait))

            async def run() -> bytes:
                try:
                    return await func(self, request, parsed, identity)
                except MatrixError as e:
                    return _error(request, e)
                except Exception:
                    log.failure("Unhandled error in {path}", path=request.path.decode("latin-1"))
                    return _error(request, MatrixError(500, errors.M_UNKNOWN, errors.E_INTERNAL))

            # Shielded from Klein's cancellation when the homeserver hangs up: a job
            # registration half done must still finish.
            shield: Deferred = Deferred()
            ensureDeferred(run()).chainDeferred(shield)
            return shield

        return wrapper

    return decorate


def _routes(prefixes, suffix: str, name: str):
    """Register the decorated view under every ``prefix + suffix``."""

    def decorate(func):
        for i, prefix in enumerate(prefixes):
            func = AppserviceApp.app.route(prefix + suffix, branch=False, endpoint=f"{name}_{i}")(func)
        return func

    return decorate


class AppserviceApp:
    """The Klein routes of AS mode, bound to one :class:`AppserviceAuthorizer` and hs_token."""

    app = Klein()

    def __init__(self, *, authorizer: AppserviceAuthorizer, hs_token: str, limits: Optional[TokenBuckets] = None) -> None:
        self._authorizer = authorizer
        self._hs_token = hs_token
        self._limits = limits  # per-user token buckets (RTCAUTH_RATELIMIT_*), None: no limit

    def __repr__(self) -> str:
        return "AppserviceApp(hs_token=<redacted>)"

    def resource(self) -> IResource:
        return self.app.resource()

    @app.route("/_matrix/app/v1/ping", branch=False)
    def ping(self, request: IRequest) -> bytes:
        """Any method; only the hs_token is checked; the body is not read."""
        if not _is_canonical(request):
            return _not_found(request)
        refused = check_hs_token(request, self._hs_token)
        if refused is not None:
            return _error(request, refused)
        return _ok(request, {})

    @app.route("/_matrix/app/v1/transactions/<txn_id>", branch=False)
    def transactions(self, request: IRequest, txn_id: str) -> bytes:
        """Acknowledge every event transaction, so Synapse never marks the service down; events are not used."""
        if not _is_canonical(request):
            return _not_found(request)
        if request.method != b"PUT":
            return _empty(request, 405)
        refused = check_hs_token(request, self._hs_token)
        if refused is not None:
            return _error(request, refused)
        return _ok(request, {})

    @_gated(cors=True, identity_header=USER_HEADER, missing_identity=errors.E7_NO_USER, decode=ClientTokenRequest.decode)
    async def client_get_token(self, request: IRequest, body: ClientTokenRequest, mxid: str) -> bytes:
        jwt = await self._authorizer.client_token(body, mxid)
        return _ok(request, {"jwt": jwt})

    @_gated(cors=False, identity_header=ORIGIN_HEADER, missing_identity=errors.E7_NO_ORIGIN, decode=ServerTokenRequest.decode)
    async def server_get_token(self, request: IRequest, body: ServerTokenRequest, origin: str) -> bytes:
        jwt = await self._authorizer.server_token(body, origin)
        return _ok(request, {"jwt": jwt})

    @_gated(cors=True, identity_header=USER_HEADER, missing_identity=errors.E7_NO_USER, decode=ClientDelegationRequest.decode)
    async def client_delegate_delayed_leave(self, request: IRequest, body: ClientDelegationRequest, mxid: str) -> bytes:
        await self._authorizer.delegate(body, mxid)
        return _ok(request, {})

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure) -> bytes:
        return _not_found(request)


_routes(CS_PREFIXES, "/rtc/livekit/get_token", "client_get_token")(AppserviceApp.client_get_token)
_routes(SS_PREFIXES, "/rtc/livekit/get_token", "server_get_token")(AppserviceApp.server_get_token)
_routes(CS_PREFIXES, "/rtc/livekit/delegate_delayed_leave", "client_delegate_delayed_leave")(
    AppserviceApp.client_delegate_delayed_leave
)
# Exact paths, as on the legacy routes (docs/endpoints.md#routes).
AppserviceApp.app.url_map.merge_slashes = False
AppserviceApp.app.url_map.redirect_defaults = False


class AppserviceMount(Resource):
    """The root resource in AS mode: ``/_matrix/...`` to the AS routes, everything else to the legacy ones."""

    isLeaf = True

    def __init__(self, *, appservice: IResource, legacy: IResource) -> None:
        super().__init__()
        self._appservice = appservice
        self._legacy = legacy

    def render(self, request: IRequest):
        target = self._appservice if request.path.startswith(b"/_matrix/") else self._legacy
        return target.render(request)


def build_appservice_app(
    *,
    config,
    clock,
    http,
    resolve_cs_api,
    tokens,
    rooms,
    leave_jobs,
    lookup_delay,
    metrics=None,
    homeserver=None,
    participants=None,
) -> AppserviceApp:
    """The AS routes wired from the Config (``as_token``, ``hs_token``, ``hs_server_name``,
    ``livekit_url``, ``can_update_own_metadata``); the composition root calls this in AS mode.

    ``http`` carries the as_token, so it must verify TLS and not follow redirects (the
    plain client); ``lookup_delay`` is the delay client's look-up made as the user;
    ``participants`` (membership enforcement) is told of every token minted.
    """
    if homeserver is None:
        homeserver = HomeserverAppservice(clock=clock, http=http, as_token=config.as_token)
    authorizer = AppserviceAuthorizer(
        server_name=config.hs_server_name,
        livekit_url=config.livekit_url,
        can_update_own_metadata=config.can_update_own_metadata,
        homeserver=homeserver,
        resolve_cs_api=resolve_cs_api,
        tokens=tokens,
        rooms=rooms,
        leave_jobs=leave_jobs,
        lookup_delay=lookup_delay,
        metrics=metrics,
        participants=participants,
    )
    limits = None
    if config.ratelimit_per_second > 0 and config.ratelimit_burst >= 1:
        limits = TokenBuckets(clock, rate=config.ratelimit_per_second, burst=config.ratelimit_burst)
    return AppserviceApp(authorizer=authorizer, hs_token=config.hs_token, limits=limits)


def appservice_resource(legacy: IResource, app: AppserviceApp) -> IResource:
    """What the Site serves in AS mode: the legacy routes plus ``app``'s (docs/appservice.md#routes)."""
    return AppserviceMount(appservice=app.resource(), legacy=legacy)
