"""The token and delegation procedures (docs/authorization.md#token-procedure P1–P8, docs/endpoints.md#legacy-token-endpoint, docs/authorization.md#delegation-procedure G1–G7).

Kept apart from HTTP so that the order of steps — validate, verify OpenID, check the
claimed user, decide access, sign, resolve the client-server API *before* touching the SFU,
create the room, register the job — reads top to bottom in one place.
"""

from __future__ import annotations

from typing import Optional, Protocol

import attr
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from rtcauthd import errors
from rtcauthd.config import Config
from rtcauthd.errors import MatrixError
from rtcauthd.inbound.models import LegacyTokenRequest, OpenIDToken, TokenRequest
from rtcauthd.leave.record import NS_PER_MS, JobParams
from rtcauthd.livekit import naming
from rtcauthd.logging import LogSummary
from rtcauthd.livekit.tokens import TokenMinter
from rtcauthd.outbound.errors import OutboundError
from rtcauthd.metrics import Metrics, reason_label

log = Logger()


class UserInfoVerifier(Protocol):
    def userinfo(self, server_name: str, access_token: str):  # -> Deferred[str]
        ...


class RoomCreator(Protocol):
    def create_room(self, room: str):  # -> Deferred[None]
        ...


class LeaveJobSink(Protocol):
    """Where the token endpoints hand a delegated leave (the leave package implements it)."""

    def resolve_cs_api(self, server_name: str):  # -> Deferred[str]; fails when unresolvable
        ...

    def add_job(self, job: JobParams):  # -> Deferred[None]; raises MatrixError (503/400)
        ...


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Grant:
    """The answer to a token request."""

    url: str
    jwt: str = attr.ib(repr=False)


class Authorizer:
    """Verifies OpenID tokens and hands out LiveKit tokens, per lk-jwt-service's rules."""

    def __init__(
        self,
        *,
        config: Config,
        federation: UserInfoVerifier,
        tokens: TokenMinter,
        rooms: RoomCreator,
        clock: IReactorTime,
        leave_jobs: Optional[LeaveJobSink] = None,
        metrics: Optional[Metrics] = None,
    ) -> None:
        self._clock = clock
        self._metrics = metrics if metrics is not None else Metrics()
        self._config = config
        self._federation = federation
        self._tokens = tokens
        self._rooms = rooms
        self._leave_jobs = leave_jobs
        # Under a flood, one line per kind of failure every few seconds (counts stay in metrics).
        self._failure_log = LogSummary(clock)

    async def _verify(self, openid: OpenIDToken, endpoint: str) -> str:
        """P1: the user ID the homeserver vouches for, or 401 (cause logged, not answered)."""
        server_name = openid.matrix_server_name
        started = self._clock.seconds()
        lookup = self._metrics.homeserver_lookup_seconds
        try:
            user_id = await self._federation.userinfo(server_name, openid.access_token)
        except MatrixError as e:  # the outbound budget is full: answered as it says (503)
            lookup.labels(result="refused").observe(self._clock.seconds() - started)
            log.info("{endpoint}: not verifying against {server_name} now: {error}",
                     endpoint=endpoint, server_name=server_name, error=e.message)
            raise
        except Exception as e:  # every failure is the same 401 to the client
            step = getattr(e, "step", type(e).__name__)
            detail = getattr(e, "detail", str(e))
            lookup.labels(result="error").observe(self._clock.seconds() - started)
            self._metrics.openid_failures.labels(reason=reason_label(step)).inc()
            left_out = self._failure_log.allow((endpoint, reason_label(step)))
            if left_out is not None:
                log.warn(
                    "{endpoint}: OpenID verification against {server_name} failed at {step}: {detail}{more}",
                    endpoint=endpoint,
                    server_name=server_name,
                    step=step,
                    detail=detail,
                    more=f" ({left_out} more such failures not logged)" if left_out else "",
                )
            raise errors.unauthorized() from None
        lookup.labels(result="ok").observe(self._clock.seconds() - started)
        return user_id

    async def _verify_member(self, request: TokenRequest, endpoint: str) -> str:
        """P1 + P2: the verified user must be exactly the member's claimed user."""
        user_id = await self._verify(request.openid_token, endpoint)
        if request.member.claimed_user_id != user_id:
            log.warn(
                "{endpoint}: claimed_user_id {claimed} does not match verified {user_id}",
                endpoint=endpoint,
                claimed=request.member.claimed_user_id,
                user_id=user_id,
            )
            raise errors.unauthorized()
        return user_id

    async def get_token(self, request: TokenRequest) -> Grant:
        """POST /get_token: V1–V4 then P1–P8."""
        request.validate_for_token()
        user_id = await self._verify_member(request, "/get_token")
        identity = naming.identity(user_id, request.member.claimed_device_id, request.member.id)
        room = naming.room_alias(request.room_id, request.slot_id)
        return await self._grant(request, user_id, identity, room, "/get_token")

    async def sfu_get(self, request: LegacyTokenRequest) -> Grant:
        """POST /sfu/get: L1–L3 then P1, P3–P8 (no claimed user, unhashed identity)."""
        request.validate()
        user_id = await self._verify(request.openid_token, "/sfu/get")
        identity = naming.legacy_identity(user_id, request.device_id)
        room = naming.legacy_room_alias(request.room)
        return await self._grant(request, user_id, identity, room, "/sfu/get")

    async def delegate_delayed_leave(self, request: TokenRequest) -> None:
        """POST /delegate_delayed_leave: D1–D4 then G1–G7."""
        request.validate_for_delegation()
        server_name = request.openid_token.matrix_server_name
        user_id = await self._verify_member(request, "/delegate_delayed_leave")
        if not self._config.is_full_access(server_name):
            raise MatrixError(403, errors.M_FORBIDDEN, errors.E_DELEG)
        identity = naming.identity(user_id, request.member.claimed_device_id, request.member.id)
        room = naming.room_alias(request.room_id, request.slot_id)
        await self._resolve_cs_api(server_name)
        await self._add_job(request, server_name, room, identity)
        log.info(
            "Delegated delayed leave for {user_id} in LiveKit room {room}", user_id=user_id, room=room
        )

    async def _grant(self, request, user_id: str, identity: str, room: str, endpoint: str) -> Grant:
        server_name = request.openid_token.matrix_server_name
        full_access = self._config.is_full_access(server_name)
        delegate = request.wants_delegation
        if delegate and not full_access:  # P3
            raise errors.bad_json(errors.E_DELEG)
        try:  # P4; only this deployment's own users may publish media (docs/authorization.md#access-rules)
            jwt = self._tokens.participant_token(
                identity,
                room,
                can_publish=full_access,
                can_update_own_metadata=self._config.can_update_own_metadata,
            )
        except Exception:
            log.failure("{endpoint}: signing the LiveKit token failed", endpoint=endpoint)
            raise MatrixError(500, errors.M_UNKNOWN, errors.E_INTERNAL) from None
        if full_access and delegate:  # P5, before the SFU is touched
            await self._resolve_cs_api(server_name)
        if full_access:  # P6
            try:
                await self._rooms.create_room(room)
            except Exception as e:  # any CreateRoom failure is E-CREATE (docs/authorization.md#token-procedure P6)
                log.error(
                    "{endpoint}: CreateRoom for {room} failed: {error}",
                    endpoint=endpoint,
                    room=room,
                    error=str(e) if isinstance(e, OutboundError) else f"{type(e).__name__}: {e}",
                )
                raise MatrixError(500, errors.M_UNKNOWN, errors.E_CREATE) from None
        if full_access and delegate:  # P7
            await self._add_job(request, server_name, room, identity)
        self._metrics.tokens_issued.labels(
            endpoint=endpoint, access="full" if full_access else "restricted"
        ).inc()
        log.info(
            "{endpoint}: issued token for {user_id} ({access}) in LiveKit room {room}",
            endpoint=endpoint,
            user_id=user_id,
            access="full access" if full_access else "restricted",
            room=room,
        )
        return Grant(url=self._config.livekit_url, jwt=jwt)

    async def _resolve_cs_api(self, server_name: str) -> str:
        if self._leave_jobs is None:
            log.error("Delegated leave requested but no delegation service is configured")
            raise errors.bad_json(errors.E_CSAPI)
        try:
            return await self._leave_jobs.resolve_cs_api(server_name)
        except MatrixError:
            raise
        except Exception as e:
            log.warn(
                "Cannot resolve the client-server API of {server_name}: {error}",
                server_name=server_name,
                error=str(e),
            )
            raise errors.bad_json(errors.E_CSAPI) from None

    async def _add_job(self, request, server_name: str, room: str, identity: str) -> None:
        assert self._leave_jobs is not None  # _resolve_cs_api ran first
        await self._leave_jobs.add_job(
            JobParams(
                delay_id=request.delay_id,
                delay_timeout_ns=request.delay_timeout * NS_PER_MS,
                server_name=server_name,
                room=room,
                identity=identity,
            )
        )
