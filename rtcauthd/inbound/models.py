"""Request bodies of the three POST endpoints, decoded with Go's ``encoding/json`` semantics.

Upstream decodes into fixed structs with unknown fields disallowed; clients (Element Call,
Element X) and upstream's black-box suite depend on the exact outcomes of docs/endpoints.md#request-bodies:
any decode problem is 400 M_NOT_JSON, ``null`` leaves the zero value, keys match fields
case-insensitively (exact match preferred), the last duplicate wins, integers are strict
int64, bytes after the first JSON value are ignored, invalid UTF-8 becomes U+FFFD per byte.
Validation (rules V/L/D, first failure wins) then gives the exact M_BAD_JSON messages.
"""

from __future__ import annotations

from typing import Any, Mapping

import attr

from rtcauthd import errors
from rtcauthd.errors import MatrixError
from rtcauthd.gojson import (
    INT64_MAX,
    INT64_MIN,
    JSONObject,
    decode_first_value,
    fold_key,
    scrub_surrogates,
)


class DecodeError(Exception):
    """The body is not what Go's decoder would accept (always answered as M_NOT_JSON)."""


def decode_json_value(body: bytes) -> Any:
    """The first JSON value of ``body`` (trailing bytes ignored), objects as pair lists."""
    try:
        return decode_first_value(body)
    except (ValueError, RecursionError) as e:
        raise DecodeError(str(e)) from None


def _clean_string(value: str) -> str:
    # Escaped lone surrogates ("\ud800") decode to surrogate code points in Python; Go
    # yields U+FFFD. Valid pairs were already combined by the decoder.
    return scrub_surrogates(value)


def _string(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DecodeError("expected a string")
    return _clean_string(value)


def _int64(value: Any) -> int:
    if value is None:
        return 0
    if type(value) is not int:  # bool is an int subclass; JSONFraction marks 1.0 and 1e3
        raise DecodeError("expected an integer")
    if not INT64_MIN <= value <= INT64_MAX:
        raise DecodeError("integer out of int64 range")
    return value


def _decode_struct(value: Any, fields: Mapping[str, Any], into: dict[str, Any] | None = None) -> dict[str, Any]:
    """Decode a JSON object into the named fields, Go style.

    Absent fields keep their zero value; ``null`` leaves a field as it was; a repeated
    object key decodes into the struct already there (Go merges, it does not reset).
    """
    result = into if into is not None else {name: decode(None, None) for name, decode in fields.items()}
    if value is None:
        return result
    if not isinstance(value, JSONObject):
        raise DecodeError("expected an object")
    folded = {fold_key(name): name for name in fields}
    for key, item in value:
        key = _clean_string(key)
        name = key if key in fields else folded.get(fold_key(key))
        if name is None:
            raise DecodeError("unknown field")
        if item is not None:
            result[name] = fields[name](item, result[name])
    return result


def _struct(cls: type, fields: Mapping[str, Any]):
    def decode(value: Any, current: Any):
        previous = None if current is None else attr.asdict(current)
        return cls(**_decode_struct(value, fields, previous))

    return decode


def _scalar(parse):
    def decode(value: Any, _current: Any):
        return parse(value)

    return decode


@attr.s(frozen=True, slots=True, auto_attribs=True)
class OpenIDToken:
    access_token: str = attr.ib(default="", repr=False)  # never in a log line
    token_type: str = ""
    matrix_server_name: str = ""
    expires_in: int = 0


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Member:
    id: str = ""
    claimed_user_id: str = ""
    claimed_device_id: str = ""


_OPENID_FIELDS = {
    "access_token": _scalar(_string),
    "token_type": _scalar(_string),
    "matrix_server_name": _scalar(_string),
    "expires_in": _scalar(_int64),
}
_MEMBER_FIELDS = {
    "id": _scalar(_string),
    "claimed_user_id": _scalar(_string),
    "claimed_device_id": _scalar(_string),
}


def _decode_body(body: bytes, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Top level: an object or ``null``; anything else, or any decode error, is M_NOT_JSON."""
    try:
        return _decode_struct(decode_json_value(body), fields)
    except DecodeError:
        raise errors.not_json() from None


def _delay_pair_invalid(delay_id: str, delay_timeout: int) -> bool:
    """V4/L3: exactly one of {delay_id non-empty, delay_timeout > 0} is an error."""
    return bool(delay_id) != (delay_timeout > 0)


_TOKEN_FIELDS = {
    "room_id": _scalar(_string),
    "slot_id": _scalar(_string),
    "openid_token": _struct(OpenIDToken, _OPENID_FIELDS),
    "member": _struct(Member, _MEMBER_FIELDS),
    "delay_id": _scalar(_string),
    "delay_timeout": _scalar(_int64),
    "delay_cs_api_url": _scalar(_string),
}


@attr.s(frozen=True, slots=True, auto_attribs=True)
class TokenRequest:
    """POST /get_token (MSC4195) and POST /delegate_delayed_leave share this shape."""

    room_id: str
    slot_id: str
    openid_token: OpenIDToken
    member: Member
    delay_id: str
    delay_timeout: int
    delay_cs_api_url: str

    @classmethod
    def decode(cls, body: bytes) -> "TokenRequest":
        return cls(**_decode_body(body, _TOKEN_FIELDS))

    def validate_for_token(self) -> None:
        """Rules V1–V4 (docs/endpoints.md#token-endpoint), first failure wins."""
        if not self.room_id or not self.slot_id:
            raise errors.bad_json(errors.E_ROOMSLOT)
        m = self.member
        if not m.id or not m.claimed_user_id or not m.claimed_device_id:
            raise errors.bad_json(errors.E_MEMBER_GT)
        if not self.openid_token.access_token or not self.openid_token.matrix_server_name:
            raise errors.bad_json(errors.E_OPENID_GT)
        if _delay_pair_invalid(self.delay_id, self.delay_timeout):
            raise errors.bad_json(errors.E_DELAY)

    def validate_for_delegation(self) -> None:
        """Rules D1–D4 (docs/endpoints.md#delegation-endpoint), first failure wins."""
        if not self.room_id or not self.slot_id:
            raise errors.bad_json(errors.E_ROOMSLOT)
        m = self.member
        if not m.id or not m.claimed_user_id or not m.claimed_device_id:
            raise errors.bad_json(errors.E_MEMBER_DL)
        if not self.openid_token.access_token or not self.openid_token.matrix_server_name:
            raise errors.bad_json(errors.E_OPENID_DL)
        if not self.delay_id or self.delay_timeout <= 0:
            raise errors.bad_json(errors.E_DELAY)

    @property
    def wants_delegation(self) -> bool:
        return bool(self.delay_id)


_LEGACY_FIELDS = {
    "room": _scalar(_string),
    "openid_token": _struct(OpenIDToken, _OPENID_FIELDS),
    "device_id": _scalar(_string),
    "delay_id": _scalar(_string),
    "delay_timeout": _scalar(_int64),
    "delay_cs_api_url": _scalar(_string),
}


@attr.s(frozen=True, slots=True, auto_attribs=True)
class LegacyTokenRequest:
    """POST /sfu/get (pre-Matrix-2.0)."""

    room: str
    openid_token: OpenIDToken
    device_id: str
    delay_id: str
    delay_timeout: int
    delay_cs_api_url: str

    @classmethod
    def decode(cls, body: bytes) -> "LegacyTokenRequest":
        return cls(**_decode_body(body, _LEGACY_FIELDS))

    def validate(self) -> None:
        """Rules L1–L3 (docs/endpoints.md#legacy-token-endpoint)."""
        if not self.room:
            raise errors.bad_json(errors.E_ROOM)
        if not self.openid_token.access_token or not self.openid_token.matrix_server_name:
            raise errors.bad_json(errors.E_OPENID_LG)
        if _delay_pair_invalid(self.delay_id, self.delay_timeout):
            raise errors.bad_json(errors.E_DELAY)

    @property
    def wants_delegation(self) -> bool:
        return bool(self.delay_id)


__all__ = [
    "DecodeError",
    "LegacyTokenRequest",
    "Member",
    "MatrixError",
    "OpenIDToken",
    "TokenRequest",
    "decode_json_value",
]
