"""One tracked participant and its Redis record (docs/membership.md#redis-record).

The record is the one upstream's membership branch writes, so either service can pick up
the other's tracked set: hash ``lk-jwt:participants``, field ``[LiveKitRoom,
LiveKitIdentity]`` (the job field's escaping), value a JSON object with the Matrix room
and user, the LiveKit room and identity and ``registered_at`` in RFC 3339. Whether the
participant is connected is not stored: a recovered entry is checked on the SFU first.
"""

from __future__ import annotations

import json
from typing import Any, Tuple

import attr

from rtcauthd.gojson import reject_constant, scrub_surrogates
from rtcauthd.store.model import encode_field, format_rfc3339, parse_rfc3339

__all__ = ["PARTICIPANTS_KEY", "Participant", "ParticipantRecordError", "decode_record", "encode_field", "encode_record"]

PARTICIPANTS_KEY = b"lk-jwt:participants"

_MEMBERS = ("matrix_room_id", "matrix_user_id", "livekit_room", "livekit_identity")


class ParticipantRecordError(ValueError):
    """A stored value that is not a participant record (skipped, left in place)."""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Participant:
    """Who got a token for which LiveKit room, and when (unix seconds)."""

    matrix_room_id: str
    matrix_user_id: str
    livekit_room: str
    livekit_identity: str
    registered_at: float

    @property
    def key(self) -> Tuple[str, str]:
        return (self.livekit_room, self.livekit_identity)


def encode_record(participant: Participant) -> str:
    """The hash value: members in upstream's order, no HTML escaping (serde's style)."""
    return json.dumps(
        {
            "matrix_room_id": scrub_surrogates(participant.matrix_room_id),
            "matrix_user_id": scrub_surrogates(participant.matrix_user_id),
            "livekit_room": scrub_surrogates(participant.livekit_room),
            "livekit_identity": scrub_surrogates(participant.livekit_identity),
            "registered_at": format_rfc3339(participant.registered_at),
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )


def decode_record(value: "str | bytes") -> Participant:
    """A stored value back into a :class:`Participant`; ParticipantRecordError if it is not one."""
    try:
        text = value.decode("utf-8") if isinstance(value, bytes) else value
        document: Any = json.loads(text, parse_constant=reject_constant)
    except (ValueError, UnicodeDecodeError):
        raise ParticipantRecordError("not JSON") from None
    if not isinstance(document, dict):
        raise ParticipantRecordError("not a JSON object")
    fields = {}
    for name in _MEMBERS:
        member = document.get(name)
        if not isinstance(member, str) or not member:
            raise ParticipantRecordError(f"{name} is missing or not a string")
        fields[name] = member
    registered = document.get("registered_at")
    if not isinstance(registered, str):
        raise ParticipantRecordError("registered_at is missing or not a string")
    try:
        fields["registered_at"] = parse_rfc3339(registered)
    except ValueError as e:
        raise ParticipantRecordError(f"registered_at: {e}") from None
    return Participant(**fields)
