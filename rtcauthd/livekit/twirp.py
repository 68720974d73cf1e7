"""LiveKit RoomService client over protobuf Twirp (docs/livekit.md#roomservice).

Speaks exactly what upstream's generated Go client sends (protobuf bodies, Twirp v8
headers, a fresh admin JWT per call, no redirects) so that any SFU or test fake that
works with lk-jwt-service works with rtcauthd. Error answers are classified the way the
Go Twirp client does, because "participant absent" must only be concluded from a real
``not_found`` Twirp error, never from a bare 404 of some proxy in between.

Bodies are LiveKit's generated protobuf classes. One measured difference from Go: Python's
protobuf (upb and pure Python alike) accepts a 10-byte varint whose last byte is above 1,
which Go refuses as an overflow; such an answer reads as well-formed here.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from google.protobuf.message import DecodeError
from livekit.protocol import models as lk_models, room as lk_room
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from rtcauthd.gojson import JSONObject, decode_first_value, scrub_surrogates
from rtcauthd.outbound.client import HTTPClient, HTTPResponse
from rtcauthd.outbound.errors import FailureKind, OutboundError
from rtcauthd.livekit.presence import Presence
from rtcauthd.livekit.tokens import TokenMinter
from rtcauthd.metrics import Metrics

__all__ = [
    "Presence",
    "twirp_failure",
    "RoomServiceClient",
    "twirp_url",
    "EMPTY_TIMEOUT",
    "DEPARTURE_TIMEOUT",
]

log = Logger()

TWIRP_VERSION = "v8.1.3"
CONTENT_TYPE = "application/protobuf"
SERVICE_PATH = "/twirp/livekit.RoomService/"

EMPTY_TIMEOUT = 300  # seconds an empty new room is kept (upstream constant)
DEPARTURE_TIMEOUT = 20  # seconds a room is kept after the last participant left

SNIPPET_CHARS = 200

VALID_TWIRP_CODES = frozenset(
    {
        "canceled",
        "unknown",
        "invalid_argument",
        "malformed",
        "deadline_exceeded",
        "not_found",
        "bad_route",
        "already_exists",
        "permission_denied",
        "unauthenticated",
        "resource_exhausted",
        "failed_precondition",
        "aborted",
        "out_of_range",
        "unimplemented",
        "internal",
        "unavailable",
        "dataloss",
    }
)


def twirp_failure(
    kind: FailureKind, method: str, status: int, code: str, snippet: str, detail: str = ""
) -> OutboundError:
    """A RoomService answer we cannot use, as the one outbound failure type.

    ``step`` is the method, ``code`` the Twirp code (from the error body, or synthesised
    from the status as the Go client does), ``snippet`` at most 200 characters of the body.
    """
    text = f"HTTP {status}, twirp code {code}"
    if detail:
        text += f" ({detail})"
    return OutboundError(kind, method, f"{text}, body: {snippet!r}", status=status, code=code, snippet=snippet)


def twirp_url(livekit_url: str, method: str) -> str:
    """Map ``LIVEKIT_URL`` to a RoomService method URL the way upstream does (docs/livekit.md#twirp-url).

    A leading ``ws`` becomes ``http`` (so ``wss`` becomes ``https``); the service path is
    then appended literally, without slash normalisation.
    """
    base = "http" + livekit_url[2:] if livekit_url.startswith("ws") else livekit_url
    return base + SERVICE_PATH + method


# Text is scrubbed first: protobuf refuses lone surrogates, which become U+FFFD everywhere.


def create_room_request(room: str) -> bytes:
    """``livekit.CreateRoomRequest`` with upstream's parameters (docs/livekit.md#createroom)."""
    return lk_room.CreateRoomRequest(
        name=scrub_surrogates(room),
        empty_timeout=EMPTY_TIMEOUT,
        departure_timeout=DEPARTURE_TIMEOUT,
    ).SerializeToString()


def delete_room_request(room: str) -> bytes:
    """``livekit.DeleteRoomRequest`` (docs/livekit.md#roomservice)."""
    return lk_room.DeleteRoomRequest(room=scrub_surrogates(room)).SerializeToString()


def participant_identity_request(room: str, identity: str) -> bytes:
    """``livekit.RoomParticipantIdentity`` (docs/livekit.md#getparticipant); proto3 leaves empty strings out."""
    return lk_room.RoomParticipantIdentity(
        room=scrub_surrogates(room), identity=scrub_surrogates(identity)
    ).SerializeToString()


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def body_snippet(body: bytes) -> str:
    """At most 200 characters of an answer body, control characters made visible."""
    text = body.decode("utf-8", "replace")
    text = _CONTROL.sub(lambda m: "\\x%02x" % ord(m.group()), text)
    return text[:SNIPPET_CHARS]


def parse_twirp_error(body: bytes) -> Optional[tuple[str, str]]:
    """``(code, msg)`` if ``body`` is a Twirp error object as Go's client accepts it.

    Mirrors the Go client's strict decode: the first JSON value must be an object whose
    members are only ``code``, ``msg``, ``meta`` (matched case-insensitively, each
    occurrence type-checked, later ones win, ``null`` leaves a member unchanged), typed
    string / string / map of strings, with a non-empty ``code``. Bytes after the value
    are ignored. Returns None otherwise; whether ``code`` is a valid Twirp code is the
    caller's business. By hand: no Python Twirp library decodes errors by the Go rules.
    """
    try:
        value = decode_first_value(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, JSONObject):
        return None
    code = msg = ""
    for key, member in value:
        folded = key.lower()
        if folded not in ("code", "msg", "meta"):
            return None
        if member is None:
            continue
        if folded == "meta":
            if not isinstance(member, JSONObject):
                return None
            if not all(v is None or isinstance(v, str) for _k, v in member):
                return None
        elif not isinstance(member, str):
            return None
        elif folded == "code":
            code = member
        else:
            msg = member
    if not code:
        return None
    return code, msg


def code_from_status(status: int) -> str:
    """The Twirp code the Go client synthesises for a non-Twirp error answer (its table)."""
    if 300 <= status < 400:
        return "internal"
    return {
        400: "internal",
        401: "unauthenticated",
        403: "permission_denied",
        404: "bad_route",
        429: "resource_exhausted",
        502: "unavailable",
        503: "unavailable",
        504: "unavailable",
    }.get(status, "unknown")


def error_from_response(method: str, response: HTTPResponse) -> OutboundError:
    """Classify a non-200 answer exactly like the Go Twirp client (docs/livekit.md#getparticipant)."""
    status = response.code
    snippet = body_snippet(response.body)
    if 300 <= status < 400:
        # Redirects are never followed; the Go client reports them as internal errors.
        location = response.header("Location") or ""
        return twirp_failure(FailureKind.REDIRECT, method, status, "internal", snippet, f"redirect to {location!r}")
    parsed = parse_twirp_error(response.body)
    if parsed is None:
        return twirp_failure(FailureKind.HTTP_STATUS, method, status, code_from_status(status), snippet, "not a Twirp error")
    code, msg = parsed
    if code not in VALID_TWIRP_CODES:
        return twirp_failure(FailureKind.HTTP_STATUS, method, status, "internal", snippet, f"invalid twirp code {code!r}")
    return twirp_failure(FailureKind.HTTP_STATUS, method, status, code, snippet, msg)


class RoomServiceClient:
    """CreateRoom, GetParticipant, RemoveParticipant and DeleteRoom against the SFU named by ``LIVEKIT_URL``."""

    def __init__(
        self,
        *,
        livekit_url: str,
        http: HTTPClient,
        tokens: TokenMinter,
        timeout: float = 10.0,
        metrics: Optional[Metrics] = None,
    ) -> None:
        self._metrics = metrics if metrics is not None else Metrics()
        self._livekit_url = livekit_url
        self._http = http
        self._tokens = tokens
        self._timeout = timeout

    def url_for(self, method: str) -> str:
        return twirp_url(self._livekit_url, method)

    def _call(self, method: str, body: bytes, token: str) -> "Deferred[HTTPResponse]":
        """POST one protobuf Twirp request; a transport failure keeps its kind, under ``method``."""
        headers = {
            "Content-Type": CONTENT_TYPE,
            "Accept": CONTENT_TYPE,
            "Twirp-Version": TWIRP_VERSION,
            "Authorization": "Bearer " + token,
        }
        d = self._http.request(
            b"POST",
            self.url_for(method),
            headers=headers,
            body=body,
            timeout=self._timeout,
            step=f"RoomService.{method}",
        )

        def transport_failed(failure: Failure) -> Failure:
            failure.trap(OutboundError)
            error = failure.value
            raise OutboundError(error.kind, method, str(error), reason=error.reason) from None

        return d.addErrback(transport_failed)

    def create_room(self, room: str) -> "Deferred[None]":
        """Create (or reuse) ``room`` with upstream's timeouts; fails with OutboundError."""
        started = self._tokens.now()
        d = self._call("CreateRoom", create_room_request(room), self._tokens.create_room_token())

        calls = self._metrics.twirp_calls

        def got(response: HTTPResponse) -> None:
            if response.code != 200:
                raise error_from_response("CreateRoom", response)
            try:
                created = lk_models.Room.FromString(response.body).creation_time
            except DecodeError as e:
                raise twirp_failure(
                    FailureKind.BAD_BODY, "CreateRoom", 200, "internal", body_snippet(response.body),
                    f"undecodable Room: {e}",
                ) from None
            # LiveKit's clock may lag ours by a little; a second of slack is enough to
            # tell a fresh room from one created by an earlier call.
            log.debug(
                "LiveKit room {room} {outcome} (creation_time {created})",
                room=room,
                outcome="created" if created >= started - 1 else "reused",
                created=created,
            )
            calls.labels(method="CreateRoom", outcome="ok").inc()

        def failed(failure: Failure) -> Failure:
            calls.labels(method="CreateRoom", outcome="error").inc()
            return failure

        return d.addCallback(got).addErrback(failed)

    def get_participant(self, room: str, identity: str) -> "Deferred[Presence]":
        """Whether ``identity`` is in ``room`` on the SFU; never fails (docs/livekit.md#getparticipant, docs/delegated-leave.md#participant-lookup)."""
        d = self._call(
            "GetParticipant",
            participant_identity_request(room, identity),
            self._tokens.room_admin_token(room),
        )

        def got(response: HTTPResponse) -> Presence:
            if response.code == 200:
                try:
                    # Content is ignored, but like upstream an unparsable answer is an error.
                    lk_models.ParticipantInfo.FromString(response.body)
                except DecodeError as e:
                    log.warn(
                        "GetParticipant for {identity} in {room}: undecodable 200 body: {error}",
                        identity=identity,
                        room=room,
                        error=str(e),
                    )
                    return Presence.UNKNOWN
                return Presence.PRESENT
            error = error_from_response("GetParticipant", response)
            if error.code == "not_found":
                return Presence.ABSENT
            return unknown(error)

        def failed(failure: Failure) -> Presence:
            failure.trap(OutboundError)
            return unknown(failure.value)

        def unknown(error: OutboundError) -> Presence:
            log.warn(
                "GetParticipant for {identity} in {room} failed: {error}",
                identity=identity,
                room=room,
                error=str(error),
            )
            return Presence.UNKNOWN

        def count(presence: Presence) -> Presence:
            self._metrics.twirp_calls.labels(method="GetParticipant", outcome=presence.value).inc()
            return presence

        return d.addCallbacks(got, failed).addCallback(count)

    def remove_participant(self, room: str, identity: str) -> "Deferred[bool]":
        """Take ``identity`` out of ``room`` (docs/membership.md#removal): True when removed,
        False when the SFU says it is not there (``not_found``); else fails with OutboundError."""
        d = self._call(
            "RemoveParticipant",
            participant_identity_request(room, identity),
            self._tokens.room_admin_token(room),
        )
        return d.addCallback(self._done_or_not_found, "RemoveParticipant")

    def delete_room(self, room: str) -> "Deferred[bool]":
        """Close ``room`` for everybody in it: True when deleted, False when it did not exist."""
        d = self._call("DeleteRoom", delete_room_request(room), self._tokens.create_room_token())
        return d.addCallback(self._done_or_not_found, "DeleteRoom")

    def _done_or_not_found(self, response: HTTPResponse, method: str) -> bool:
        # The answer messages are empty; only the status and a Twirp error code matter.
        if response.code == 200:
            self._metrics.twirp_calls.labels(method=method, outcome="ok").inc()
            return True
        error = error_from_response(method, response)
        if error.code == "not_found":
            self._metrics.twirp_calls.labels(method=method, outcome="absent").inc()
            return False
        self._metrics.twirp_calls.labels(method=method, outcome="error").inc()
        raise error
