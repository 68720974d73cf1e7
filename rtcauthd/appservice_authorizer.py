"""The application-service procedures (docs/appservice.md#procedures): C-S and S-S token, C-S delegation.

Kept apart from HTTP, as :mod:`rtcauthd.authorizer` is for the legacy routes, so the order
of checks — URL, user ID shape, client-server API, membership, then sign and create the
room or relay — reads top to bottom. The caller is already authenticated by the
homeserver (hs_token and identity header, checked by :mod:`rtcauthd.inbound.appservice`).
Every collaborator is injected; the composition root wires the real ones.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from rtcauthd import errors
from rtcauthd.authorizer import LeaveJobSink, RoomCreator
from rtcauthd.errors import MatrixError
from rtcauthd.inbound.appservice_models import ClientDelegationRequest, ClientTokenRequest, ServerTokenRequest
from rtcauthd.leave.record import NS_PER_MS
from rtcauthd.livekit import naming
from rtcauthd.matrix.appservice import FedProxyAnswer
from rtcauthd.metrics import Metrics
from rtcauthd.outbound.errors import OutboundError

log = Logger()

#: The S-S path a C-S request for another server is relayed to (docs/appservice.md#relaying).
SS_GET_TOKEN_PATH = "/_matrix/federation/unstable/io.element.msc4195/rtc/livekit/get_token"


class Homeserver(Protocol):
    """What :class:`rtcauthd.matrix.appservice.HomeserverAppservice` offers."""

    async def is_joined(self, base_url: str, room_id: str, *, mxid=None, server_name=None) -> bool: ...

    async def fed_proxy(self, base_url: str, destination: str, path: str, body) -> FedProxyAnswer: ...


class ParticipantRegistry(Protocol):
    """Membership enforcement (docs/membership.md#tracking): told of every token minted here."""

    def register(self, *, matrix_room_id: str, matrix_user_id: str, livekit_room: str, livekit_identity: str) -> None: ...


class ParticipantTokens(Protocol):
    def participant_token(
        self, identity: str, room: str, *, can_publish: bool = True, can_update_own_metadata: bool = False
    ) -> str: ...


def mxid_server_name(mxid: str) -> Optional[str]:
    """The server part of a well-formed ``@local:server`` (split at the first ``:``), else None."""
    if not mxid.startswith("@"):
        return None
    localpart, colon, server = mxid[1:].partition(":")
    if not colon or not localpart or not server:
        return None
    return server


def _default_identity(user_id: str, member_id: str) -> str:
    return naming.appservice_identity(user_id, member_id)


def _default_delay_unknown() -> tuple:
    """The look-up's "no such delayed event" failure, where the delay client defines one."""
    from rtcauthd.matrix import csapi

    unknown = getattr(csapi, "DelayedEventUnknown", None)
    return (unknown,) if unknown is not None else ()


def _default_job(**fields: Any):
    from rtcauthd.leave.record import JobParams

    return JobParams(**fields)


class AppserviceAuthorizer:
    """Answers the AS routes for the homeserver ``server_name`` and the SFU ``livekit_url``.

    ``resolve_cs_api(server_name)`` gives the homeserver's client-server API base URL;
    ``lookup_delay(server_name, user_id, delay_id, room_id=...)`` the delay in ms of the
    user's pending delayed event in that room (fails with OutboundError; one of
    ``delay_unknown``, a 404 or a delay ≤ 0 means "unknown"); ``identity(user_id,
    member_id)`` the AS-route identity; ``new_job(**fields)`` a JobParams with ``owner_user_id``.
    """

    def __init__(
        self,
        *,
        server_name: str,
        livekit_url: str,
        can_update_own_metadata: bool,
        homeserver: Homeserver,
        resolve_cs_api: Callable[[str], "Deferred[str]"],
        tokens: ParticipantTokens,
        rooms: RoomCreator,
        leave_jobs: LeaveJobSink,
        lookup_delay: Callable[..., "Deferred[int]"],
        delay_unknown: Optional[tuple] = None,
        identity: Callable[[str, str], str] = _default_identity,
        new_job: Callable[..., Any] = _default_job,
        metrics: Optional[Metrics] = None,
        participants: Optional[ParticipantRegistry] = None,
    ) -> None:
        self._server_name = server_name
        self._livekit_url = livekit_url
        self._can_update_own_metadata = can_update_own_metadata
        self._homeserver = homeserver
        self._resolve_cs_api = resolve_cs_api
        self._tokens = tokens
        self._rooms = rooms
        self._leave_jobs = leave_jobs
        self._lookup_delay = lookup_delay
        self._delay_unknown = delay_unknown if delay_unknown is not None else _default_delay_unknown()
        self._identity = identity
        self._new_job = new_job
        self._metrics = metrics if metrics is not None else Metrics()
        self._participants = participants

    # -- C-S get_token ---------------------------------------------------------------

    async def client_token(self, request: ClientTokenRequest, mxid: str) -> str:
        """C2–C9: a local token after the membership check, or the remote server's, relayed."""
        local = request.server_name in ("", self._server_name)
        if local and request.url != self._livekit_url:
            raise MatrixError(400, errors.M_INVALID_PARAM, errors.E7_URL)
        if mxid_server_name(mxid) is None:
            raise MatrixError(400, errors.M_INVALID_PARAM, errors.E7_BAD_MXID)
        base_url = await self._cs_api()
        if not await self._joined(base_url, request.room_id, mxid=mxid):
            raise MatrixError(403, errors.M_FORBIDDEN, errors.E7_NOT_MEMBER)
        if local:
            return await self._mint(request, mxid, can_publish=True, endpoint="C-S get_token")
        if not await self._joined(base_url, request.room_id, server_name=request.server_name):
            raise MatrixError(403, errors.M_FORBIDDEN, errors.E7_TARGET_NJ)
        return await self._relay(base_url, request, mxid)

    async def _relay(self, base_url: str, request: ClientTokenRequest, mxid: str) -> str:
        """C8: the remote's ``{jwt}``, or one of three generic errors (its text is never relayed)."""
        destination = request.server_name
        try:
            answer = await self._homeserver.fed_proxy(base_url, destination, SS_GET_TOKEN_PATH, request.relayed(mxid))
        except Exception as e:
            log.warn(
                "C-S get_token: relaying to {destination} failed: {error}", destination=destination, error=_text(e)
            )
            raise MatrixError(502, errors.M_UNKNOWN, errors.E7_REMOTE_OTHER) from None
        content = answer.content if isinstance(answer.content, dict) else {}
        if 200 <= answer.status < 300:
            jwt = content.get("jwt")
            if isinstance(jwt, str) and jwt:
                log.info(
                    "C-S get_token: relayed a token from {destination} for {user_id}",
                    destination=destination,
                    user_id=mxid,
                )
                return jwt
            log.warn("C-S get_token: {destination} answered {status} without a jwt", destination=destination, status=answer.status)
            raise MatrixError(502, errors.M_UNKNOWN, errors.E7_REMOTE_OTHER)
        errcode = content.get("errcode")
        log.info(
            "C-S get_token: {destination} refused {user_id}: {status} {errcode}",
            destination=destination,
            user_id=mxid,
            status=answer.status,
            errcode=errcode if isinstance(errcode, str) else "-",
        )
        if answer.status == 403 and errcode == errors.M_FORBIDDEN:
            raise MatrixError(403, errors.M_FORBIDDEN, errors.E7_REMOTE_403)
        if answer.status == 400 and errcode == errors.M_INVALID_PARAM:
            raise MatrixError(400, errors.M_INVALID_PARAM, errors.E7_REMOTE_400)
        raise MatrixError(502, errors.M_UNKNOWN, errors.E7_REMOTE_OTHER)

    # -- S-S get_token ---------------------------------------------------------------

    async def server_token(self, request: ServerTokenRequest, origin: str) -> str:
        """S2–S9: the origin's user must be joined, and so must this server; subscribe-only."""
        user_server = mxid_server_name(request.user_id)
        if user_server is None:
            raise MatrixError(400, errors.M_INVALID_PARAM, errors.E7_BAD_MXID)
        if user_server != origin:
            log.warn(
                "S-S get_token: {origin} asked for {user_id}, who is not its user",
                origin=origin,
                user_id=request.user_id,
            )
            raise MatrixError(403, errors.M_FORBIDDEN, errors.E7_FOREIGN_USER)
        base_url = await self._cs_api()
        if not await self._joined(base_url, request.room_id, server_name=self._server_name):
            raise MatrixError(403, errors.M_FORBIDDEN, errors.E7_SELF_NJ)
        if not await self._joined(base_url, request.room_id, mxid=request.user_id):
            raise MatrixError(403, errors.M_FORBIDDEN, errors.E7_NOT_MEMBER)
        if request.url != self._livekit_url:
            raise MatrixError(400, errors.M_INVALID_PARAM, errors.E7_URL)
        return await self._mint(request, request.user_id, can_publish=False, endpoint="S-S get_token")

    # -- C-S delegate_delayed_leave --------------------------------------------------

    async def delegate(self, request: ClientDelegationRequest, mxid: str) -> None:
        """D2–D6: the job acts as ``mxid`` and keeps the delay the homeserver knows."""
        if request.url != self._livekit_url:
            raise MatrixError(400, errors.M_INVALID_PARAM, errors.E7_URL)
        identity = self._identity(mxid, request.member_id)
        room = naming.room_alias(request.room_id, request.slot_id)
        await self._cs_api()
        delay_ms = await self._delay(mxid, request.delay_id, request.room_id)
        await self._leave_jobs.add_job(
            self._new_job(
                delay_id=request.delay_id,
                delay_timeout_ns=delay_ms * NS_PER_MS,
                server_name=self._server_name,
                room=room,
                identity=identity,
                owner_user_id=mxid,
            )
        )
        log.info("C-S delegated delayed leave for {user_id} in LiveKit room {room}", user_id=mxid, room=room)

    async def _delay(self, mxid: str, delay_id: str, room_id: str) -> int:
        try:
            delay_ms = await self._lookup_delay(self._server_name, mxid, delay_id, room_id=room_id)
        except OutboundError as e:
            if isinstance(e, self._delay_unknown) or e.status == 404:
                raise MatrixError(400, errors.M_INVALID_PARAM, errors.E7_DELAY_UNKNOWN) from None
            log.warn("C-S delegation: delay look-up for {user_id} failed: {error}", user_id=mxid, error=str(e))
            raise MatrixError(503, errors.M_UNKNOWN, errors.E7_DELAY_LOOKUP) from None
        except MatrixError:
            raise
        except Exception as e:
            log.warn("C-S delegation: delay look-up for {user_id} failed: {error}", user_id=mxid, error=_text(e))
            raise MatrixError(503, errors.M_UNKNOWN, errors.E7_DELAY_LOOKUP) from None
        if type(delay_ms) is not int or delay_ms <= 0:
            raise MatrixError(400, errors.M_INVALID_PARAM, errors.E7_DELAY_UNKNOWN)
        return delay_ms

    # -- shared steps ----------------------------------------------------------------

    async def _cs_api(self) -> str:
        """C4/S4/D3: our homeserver's client-server API (never the caller's server)."""
        try:
            return await self._resolve_cs_api(self._server_name)
        except Exception as e:
            log.warn(
                "Cannot resolve the client-server API of {server_name}: {error}",
                server_name=self._server_name,
                error=_text(e),
            )
            raise errors.bad_json(errors.E_CSAPI) from None

    async def _joined(self, base_url: str, room_id: str, **subject: str) -> bool:
        try:
            return await self._homeserver.is_joined(base_url, room_id, **subject)
        except Exception as e:
            log.warn(
                "is_joined for {subject} in {room_id} failed: {error}",
                subject=next(iter(subject.values())),
                room_id=room_id,
                error=_text(e),
            )
            raise MatrixError(502, errors.M_UNKNOWN, errors.E7_MEMBERSHIP) from None

    async def _mint(self, request, user_id: str, *, can_publish: bool, endpoint: str) -> str:
        """C6/S8: sign, then create the LiveKit room (no token without the room)."""
        room = naming.room_alias(request.room_id, request.slot_id)
        try:
            identity = self._identity(user_id, request.member_id)
            jwt = self._tokens.participant_token(
                identity,
                room,
                can_publish=can_publish,
                can_update_own_metadata=self._can_update_own_metadata,
            )
        except Exception:
            log.failure("{endpoint}: signing the LiveKit token failed", endpoint=endpoint)
            raise MatrixError(500, errors.M_UNKNOWN, errors.E_INTERNAL) from None
        try:
            await self._rooms.create_room(room)
        except Exception as e:
            log.error("{endpoint}: CreateRoom for {room} failed: {error}", endpoint=endpoint, room=room, error=_text(e))
            raise MatrixError(500, errors.M_UNKNOWN, errors.E_CREATE) from None
        self._metrics.tokens_issued.labels(
            endpoint=endpoint, access="full" if can_publish else "restricted"
        ).inc()
        if self._participants is not None:
            self._participants.register(
                matrix_room_id=request.room_id, matrix_user_id=user_id, livekit_room=room, livekit_identity=identity
            )
        log.info(
            "{endpoint}: issued token for {user_id} in LiveKit room {room}",
            endpoint=endpoint,
            user_id=user_id,
            room=room,
        )
        return jwt


def _text(error: BaseException) -> str:
    return str(error) if isinstance(error, OutboundError) else f"{type(error).__name__}: {error}"
