"""Request bodies of the application-service routes (docs/appservice.md#request-bodies).

Decoded with the legacy routes' Go-style decoder (unknown keys and wrong types are
M_NOT_JSON). The member ID may come flat (``member_id``, MSC4195) or as the ``member``
object matrix-js-sdk 43 sends; its ``claimed_*`` members are type-checked and ignored,
because on these routes the caller's identity comes from the homeserver, never the body.
"""

from __future__ import annotations

from typing import Any, Mapping

import attr

from rtcauthd import errors
from rtcauthd.inbound.models import _MEMBER_FIELDS, Member, _decode_body, _int64, _scalar, _string, _struct

_MEMBER = _struct(Member, _MEMBER_FIELDS)


def _member_id(fields: Mapping[str, Any]) -> str:
    """The one member ID of a body; ``member_id`` and ``member.id`` must agree when both are given."""
    flat = fields["member_id"]
    nested = fields["member"].id if fields["member"] is not None else ""
    if flat and nested and flat != nested:
        raise errors.bad_json(errors.E7V_MEMBER_MISMATCH)
    return flat or nested


def _none_member(value: Any, current: Any):
    # An absent ``member`` stays None; a repeated one merges, as the decoder does for structs.
    return None if value is None and current is None else _MEMBER(value, current)


_COMMON = {
    "url": _scalar(_string),
    "room_id": _scalar(_string),
    "slot_id": _scalar(_string),
    "member_id": _scalar(_string),
    "member": _none_member,
}


def _decode(body: bytes, fields: Mapping[str, Any]) -> dict[str, Any]:
    decoded = _decode_body(body, fields)
    decoded["member_id"] = _member_id(decoded)
    del decoded["member"]
    return decoded


_CS_FIELDS = dict(_COMMON, server_name=_scalar(_string))
_SS_FIELDS = dict(_COMMON, user_id=_scalar(_string))
_DL_FIELDS = dict(_COMMON, delay_id=_scalar(_string), delay_timeout=_scalar(_int64))


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ClientTokenRequest:
    """C-S ``get_token``; ``server_name`` "" means this server."""

    url: str
    room_id: str
    slot_id: str
    member_id: str
    server_name: str

    @classmethod
    def decode(cls, body: bytes) -> "ClientTokenRequest":
        return cls(**_decode(body, _CS_FIELDS))

    def validate(self) -> None:
        if not (self.url and self.room_id and self.slot_id and self.member_id):
            raise errors.bad_json(errors.E7V_CS)

    def relayed(self, user_id: str) -> dict[str, str]:
        """The S-S body sent through fed_proxy: this body without ``server_name``, plus ``user_id``."""
        return {
            "user_id": user_id,
            "url": self.url,
            "room_id": self.room_id,
            "slot_id": self.slot_id,
            "member_id": self.member_id,
        }


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ServerTokenRequest:
    """S-S ``get_token``, relayed by a remote homeserver for one of its users."""

    url: str
    user_id: str
    room_id: str
    slot_id: str
    member_id: str

    @classmethod
    def decode(cls, body: bytes) -> "ServerTokenRequest":
        return cls(**_decode(body, _SS_FIELDS))

    def validate(self) -> None:
        if not (self.url and self.user_id and self.room_id and self.slot_id and self.member_id):
            raise errors.bad_json(errors.E7V_SS)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ClientDelegationRequest:
    """C-S ``delegate_delayed_leave``; a ``delay_timeout`` is accepted and ignored (the delay is looked up)."""

    url: str
    room_id: str
    slot_id: str
    member_id: str
    delay_id: str
    delay_timeout: int

    @classmethod
    def decode(cls, body: bytes) -> "ClientDelegationRequest":
        return cls(**_decode(body, _DL_FIELDS))

    def validate(self) -> None:
        if not (self.url and self.room_id and self.slot_id and self.member_id and self.delay_id):
            raise errors.bad_json(errors.E7V_DL)
