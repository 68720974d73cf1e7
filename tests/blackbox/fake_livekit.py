"""A LiveKit RoomService fake speaking Twirp with protobuf bodies only (docs/livekit.md#roomservice).

Like upstream's fake SFU it refuses anything it cannot decode as protobuf (JSON Twirp gets
400), so the daemon's wire format is really exercised.  Bodies are decoded with the
generated classes of ``livekit-protocol`` (a test-only dependency), independently of how
rtcauthd encodes them.  Methods: CreateRoom; GetParticipant, which answers
HTTP 404 ``{"code":"not_found","msg":"participant not found"}`` (as upstream's fake SFU)
until the test says the participant is present (docs/livekit.md#getparticipant);
RemoveParticipant, which takes a present participant out (else the same not_found); and
DeleteRoom, which takes everybody in the room out (docs/membership.md#removal).
"""

from __future__ import annotations

import json
from typing import Callable, Optional

import attr
from google.protobuf.message import DecodeError
from livekit.protocol.models import ParticipantInfo, Room
from livekit.protocol.room import CreateRoomRequest, DeleteRoomRequest, RoomParticipantIdentity
from twisted.logger import Logger
from twisted.web import resource, server

from tests.blackbox.harness import FakeServer, host_for_url

log = Logger()

TWIRP_PREFIX = "/twirp/livekit.RoomService/"
PROTOBUF = "application/protobuf"


@attr.s(auto_attribs=True, frozen=True)
class TwirpCall:
    """Any request the fake received, decodable or not."""

    method: str
    path: str
    content_type: Optional[str]
    authorization: Optional[str]
    body: bytes
    peer_host: str
    headers: dict

    @property
    def bearer(self) -> Optional[str]:
        if self.authorization and self.authorization.startswith("Bearer "):
            return self.authorization[len("Bearer "):]
        return None


@attr.s(auto_attribs=True, frozen=True)
class CreateRoomCall:
    """A decoded CreateRoom request."""

    name: str
    empty_timeout: int
    departure_timeout: int
    max_participants: int
    call: TwirpCall

    @property
    def bearer(self) -> Optional[str]:
        return self.call.bearer


@attr.s(auto_attribs=True, frozen=True)
class GetParticipantCall:
    """A decoded GetParticipant request and what the fake answered."""

    room: str
    identity: str
    present: bool
    at: float
    call: TwirpCall

    @property
    def bearer(self) -> Optional[str]:
        return self.call.bearer


@attr.s(auto_attribs=True, frozen=True)
class RemovalCall:
    """A decoded RemoveParticipant (``identity`` set) or DeleteRoom (``identity`` None) request."""

    method: str
    room: str
    identity: Optional[str]
    found: bool
    at: float
    call: TwirpCall

    @property
    def bearer(self) -> Optional[str]:
        return self.call.bearer


def twirp_error(status: int, code: str, msg: str) -> tuple[int, bytes, str]:
    return status, json.dumps({"code": code, "msg": msg}, separators=(",", ":")).encode("utf-8"), "application/json"


class _Root(resource.Resource):
    isLeaf = True

    def __init__(self, fake: "FakeLiveKit") -> None:
        super().__init__()
        self._fake = fake

    def render(self, request):
        status, body, content_type = self._fake._handle(request)
        request.setResponseCode(status)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return body


class FakeLiveKit(FakeServer):
    """Plain-HTTP Twirp RoomService on loopback; ``url`` is the ``ws://`` LIVEKIT_URL."""

    def __init__(self, *, reactor=None) -> None:
        super().__init__(_Root(self), reactor=reactor)
        self.calls: list[TwirpCall] = []
        self.create_room_requests: list[CreateRoomCall] = []
        self.get_participant_requests: list[GetParticipantCall] = []
        self.removal_requests: list[RemovalCall] = []
        #: (room, identity) pairs GetParticipant reports as present.
        self.present: set[tuple[str, str]] = set()
        self._failure: Optional[tuple[int, bytes, str]] = None
        #: Twirp method name → handler(call) returning (status, body, content type).
        self.methods: dict[str, Callable[[TwirpCall], tuple[int, bytes, str]]] = {
            "CreateRoom": self._create_room,
            "GetParticipant": self._get_participant,
            "RemoveParticipant": self._remove_participant,
            "DeleteRoom": self._delete_room,
        }

    def listen(self, *, host: str = "127.0.0.1", port: int = 0) -> str:
        self.listen_tcp(host, port)
        return self.url

    @property
    def url(self) -> str:
        return f"ws://{host_for_url(self.host)}:{self.port}"

    def fail_with(self, status: int, body: bytes = b'{"code":"internal","msg":"fake SFU failure"}',
                  content_type: str = "application/json") -> None:
        """Answer every decodable request with this (the request is still recorded)."""
        self._failure = (status, body, content_type)

    def succeed(self) -> None:
        self._failure = None

    def set_present(self, room: str, identity: str, present: bool = True) -> None:
        """Whether GetParticipant(room, identity) finds the participant from now on."""
        if present:
            self.present.add((room, identity))
        else:
            self.present.discard((room, identity))

    def lookups(self, room: str, identity: str) -> list[GetParticipantCall]:
        return [c for c in self.get_participant_requests if (c.room, c.identity) == (room, identity)]

    def removals(self, room: Optional[str] = None, identity: Optional[str] = None) -> list[RemovalCall]:
        """RemoveParticipant requests (for ``room`` / ``identity`` when given)."""
        return [
            c for c in self.removal_requests
            if c.method == "RemoveParticipant" and room in (None, c.room) and identity in (None, c.identity)
        ]

    @property
    def deleted_rooms(self) -> list[str]:
        return [c.room for c in self.removal_requests if c.method == "DeleteRoom"]

    @property
    def rejected(self) -> list[TwirpCall]:
        """Calls that were not decoded as a known method (wrong path/format)."""
        decoded = {id(c.call) for c in self.create_room_requests}
        decoded.update(id(c.call) for c in self.get_participant_requests)
        decoded.update(id(c.call) for c in self.removal_requests)
        return [c for c in self.calls if id(c) not in decoded]

    def _handle(self, request: server.Request) -> tuple[int, bytes, str]:
        headers = {
            name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        ct = request.getHeader(b"content-type")
        auth = request.getHeader(b"authorization")
        call = TwirpCall(
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("utf-8", "replace"),
            content_type=ct.decode("latin-1") if ct is not None else None,
            authorization=auth.decode("latin-1") if auth is not None else None,
            body=request.content.read() if request.content is not None else b"",
            peer_host=request.getClientAddress().host,
            headers=headers,
        )
        self.calls.append(call)
        if call.method != "POST":
            return twirp_error(405, "bad_route", f"unsupported method {call.method}")
        if not call.path.startswith(TWIRP_PREFIX):
            return twirp_error(404, "bad_route", f"no handler for path {call.path}")
        handler = self.methods.get(call.path[len(TWIRP_PREFIX):])
        if handler is None:
            return twirp_error(404, "bad_route", f"no handler for path {call.path}")
        media_type = (call.content_type or "").split(";")[0].strip().lower()
        if media_type != PROTOBUF:
            return twirp_error(400, "malformed", f"this fake speaks protobuf only, got {call.content_type!r}")
        return handler(call)

    def _create_room(self, call: TwirpCall) -> tuple[int, bytes, str]:
        try:
            req = CreateRoomRequest.FromString(call.body)
        except DecodeError as e:
            return twirp_error(400, "malformed", f"cannot decode CreateRoomRequest: {e}")
        self.create_room_requests.append(
            CreateRoomCall(
                name=req.name,
                empty_timeout=req.empty_timeout,
                departure_timeout=req.departure_timeout,
                max_participants=req.max_participants,
                call=call,
            )
        )
        if self._failure is not None:
            return self._failure
        room = Room(
            sid="RM_fake" + str(len(self.create_room_requests)),
            name=req.name,
            empty_timeout=req.empty_timeout,
            departure_timeout=req.departure_timeout,
            max_participants=req.max_participants,
            creation_time=int(self.reactor.seconds()),
        )
        return 200, room.SerializeToString(), PROTOBUF

    def _get_participant(self, call: TwirpCall) -> tuple[int, bytes, str]:
        try:
            req = RoomParticipantIdentity.FromString(call.body)
        except DecodeError as e:
            return twirp_error(400, "malformed", f"cannot decode RoomParticipantIdentity: {e}")
        present = (req.room, req.identity) in self.present
        self.get_participant_requests.append(
            GetParticipantCall(room=req.room, identity=req.identity, present=present,
                               at=self.reactor.seconds(), call=call)
        )
        if self._failure is not None:
            return self._failure
        if not present:
            return twirp_error(404, "not_found", "participant not found")
        info = ParticipantInfo(
            sid="PA_fake" + str(len(self.get_participant_requests)),
            identity=req.identity,
            state=ParticipantInfo.State.ACTIVE,
            joined_at=int(self.reactor.seconds()),
        )
        return 200, info.SerializeToString(), PROTOBUF

    def _remove_participant(self, call: TwirpCall) -> tuple[int, bytes, str]:
        try:
            req = RoomParticipantIdentity.FromString(call.body)
        except DecodeError as e:
            return twirp_error(400, "malformed", f"cannot decode RoomParticipantIdentity: {e}")
        found = (req.room, req.identity) in self.present
        self.removal_requests.append(
            RemovalCall("RemoveParticipant", req.room, req.identity, found, self.reactor.seconds(), call)
        )
        if self._failure is not None:
            return self._failure
        if not found:
            return twirp_error(404, "not_found", "participant not found")
        self.present.discard((req.room, req.identity))
        return 200, b"", PROTOBUF

    def _delete_room(self, call: TwirpCall) -> tuple[int, bytes, str]:
        try:
            req = DeleteRoomRequest.FromString(call.body)
        except DecodeError as e:
            return twirp_error(400, "malformed", f"cannot decode DeleteRoomRequest: {e}")
        self.removal_requests.append(RemovalCall("DeleteRoom", req.room, None, True, self.reactor.seconds(), call))
        if self._failure is not None:
            return self._failure
        for member in [m for m in self.present if m[0] == req.room]:
            self.present.discard(member)
        return 200, b"", PROTOBUF
