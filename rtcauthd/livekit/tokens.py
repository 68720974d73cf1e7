"""LiveKit access tokens: participant tokens and RoomService admin tokens (docs/authorization.md#livekit-tokens).

PyJWT signs; the claims are serialised first, in LiveKit's field order with Go's
escaping, so that the token bytes are fixed and a worked example pins them. Time comes
only from the injected clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime

from rtcauthd.gojson import go_json_dumps
from rtcauthd.livekit.jws import ALGORITHM, JWS, secret_bytes

__all__ = ["TokenMinter", "PARTICIPANT_TTL", "ADMIN_TTL"]

PARTICIPANT_TTL = 3600  # upstream sets one hour on join tokens
ADMIN_TTL = 6 * 3600  # the LiveKit SDK's default validity, used for RoomService calls

class TokenMinter:
    """Mints HS256 LiveKit JWTs with upstream's exact claims, grants and lifetimes."""

    def __init__(
        self, *, api_key: str, api_secret: str, clock: IReactorTime, participant_ttl: int = PARTICIPANT_TTL
    ) -> None:
        if not api_key or not api_secret:
            # Upstream fails to sign with an empty key or secret; refuse early instead.
            raise ValueError("LiveKit API key and secret must both be non-empty")
        self._api_key = api_key
        self._secret = secret_bytes(api_secret)
        self._clock = clock
        self._participant_ttl = participant_ttl

    @property
    def api_key(self) -> str:
        return self._api_key

    def now(self) -> int:
        """Whole seconds since the epoch, as Go's ``time.Now().Unix()``."""
        return int(self._clock.seconds())

    def participant_token(
        self,
        identity: str,
        room: str,
        *,
        can_publish: bool = True,
        can_update_own_metadata: bool = False,
    ) -> str:
        """The join token returned to clients as ``jwt`` (docs/authorization.md#participant-token), valid for an hour
        (upstream's lifetime) unless ``RTCAUTH_TOKEN_TTL_SECONDS`` says otherwise.

        Every grant is written, false ones included: LiveKit reads a missing
        ``canPublish`` as true, so a subscribe-only token must say false.
        """
        now = self.now()
        claims: dict[str, Any] = {"iss": self._api_key}
        if identity:  # Go's omitempty
            claims["sub"] = identity
        claims["exp"] = now + self._participant_ttl
        claims["nbf"] = now
        claims["iat"] = now
        if identity:
            claims["identity"] = identity
        # LiveKit's VideoGrant field order
        video: dict[str, Any] = {"roomCreate": False, "roomJoin": True}
        if room:
            video["room"] = room
        video["canPublish"] = bool(can_publish)
        video["canSubscribe"] = True
        video["canPublishData"] = True  # as v0.7: data messages stay allowed without media
        video["canUpdateOwnMetadata"] = bool(can_update_own_metadata)
        video["hidden"] = False
        claims["video"] = video
        return self._sign(claims)

    def create_room_token(self) -> str:
        """Bearer token for ``RoomService/CreateRoom`` (``roomCreate`` grant, docs/livekit.md#admin-tokens)."""
        return self._admin({"roomCreate": True})

    def room_admin_token(self, room: str) -> str:
        """Bearer token for per-room RoomService calls such as ``GetParticipant`` (docs/livekit.md#admin-tokens)."""
        video: dict[str, Any] = {"roomAdmin": True}
        if room:
            video["room"] = room
        return self._admin(video)

    def _admin(self, video: dict[str, Any]) -> str:
        now = self.now()
        return self._sign(
            {"iss": self._api_key, "exp": now + ADMIN_TTL, "nbf": now, "iat": now, "video": video}
        )

    def _sign(self, claims: dict[str, Any]) -> str:
        # PyJWS writes {"alg":"HS256","typ":"JWT"}, the header golang-jwt writes.
        return JWS.encode(go_json_dumps(claims).encode("utf-8"), self._secret, algorithm=ALGORITHM)
