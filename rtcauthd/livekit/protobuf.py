"""Just enough of the protobuf wire format for two tiny Twirp messages (protocol.md §7).

Why hand-rolled: rtcauthd sends two requests of two or three scalar fields and only
has to check that a 200 answer is a well-formed message (upstream fails the call if it
cannot unmarshal it) and read ``Room.creation_time``. A generated-code dependency would
be far larger than this file.
"""

from __future__ import annotations

from typing import Union

from rtcauthd.gojson import scrub_surrogates

__all__ = [
    "ProtobufError",
    "Fixed64",
    "Fixed32",
    "Group",
    "WIRE_VARINT",
    "WIRE_FIXED64",
    "WIRE_LEN",
    "WIRE_START_GROUP",
    "WIRE_END_GROUP",
    "WIRE_FIXED32",
    "encode_varint",
    "encode_tag",
    "varint_field",
    "len_field",
    "string_field",
    "decode_message",
    "as_int64",
    "last_varint",
    "last_string",
]

WIRE_VARINT = 0
WIRE_FIXED64 = 1
WIRE_LEN = 2
WIRE_START_GROUP = 3
WIRE_END_GROUP = 4
WIRE_FIXED32 = 5

_MAX_FIELD = (1 << 29) - 1
_U64 = (1 << 64) - 1
_MAX_DEPTH = 100  # bounds recursion on hostile input (Go's limit is 10000)



class Fixed64(int):
    """A fixed64 value (kept apart from varints: a wire-type mismatch is an unknown field)."""


class Fixed32(int):
    """A fixed32 value."""


class Group(bytes):
    """The raw body of a (deprecated) group."""


Value = Union[int, bytes]


class ProtobufError(ValueError):
    """The bytes are not a well-formed protobuf message."""


# --- encoding ---------------------------------------------------------------------


def encode_varint(value: int) -> bytes:
    """Base-128 varint; negative numbers are written as their 64-bit two's complement."""
    if value < 0:
        value &= _U64
    if value > _U64:
        raise ValueError("varint out of 64-bit range")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_tag(field: int, wire_type: int) -> bytes:
    if not 1 <= field <= _MAX_FIELD:
        raise ValueError(f"invalid field number {field}")
    return encode_varint((field << 3) | wire_type)


def varint_field(field: int, value: int) -> bytes:
    """One varint field. proto3 omits zero values; callers decide (this always writes)."""
    return encode_tag(field, WIRE_VARINT) + encode_varint(value)


def len_field(field: int, data: bytes) -> bytes:
    """One length-delimited field (bytes, embedded message)."""
    return encode_tag(field, WIRE_LEN) + encode_varint(len(data)) + data


def string_field(field: int, text: str) -> bytes:
    """One string field, UTF-8; surrogates become U+FFFD as everywhere else."""
    return len_field(field, scrub_surrogates(text).encode("utf-8"))


# --- decoding ---------------------------------------------------------------------


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    end = len(data)
    for i in range(10):
        if pos >= end:
            raise ProtobufError("truncated varint")
        byte = data[pos]
        pos += 1
        if i == 9 and byte > 1:
            raise ProtobufError("varint overflows 64 bits")
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
    raise ProtobufError("varint longer than 10 bytes")


def _walk(
    data: bytes, pos: int, group: int, out: dict[int, list[Value]], depth: int = 0
) -> tuple[int, int]:
    """Parse fields from ``pos`` to the end, or to the end-group tag of ``group``.

    Returns (offset of the end-group tag, offset after it); both are the end of the data
    at top level.
    """
    end = len(data)
    while pos < end:
        tag_start = pos
        key, pos = _read_varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if not 1 <= field <= _MAX_FIELD:
            raise ProtobufError(f"invalid field number {field}")
        value: Value
        if wire_type == WIRE_VARINT:
            value, pos = _read_varint(data, pos)
        elif wire_type == WIRE_FIXED64:
            if pos + 8 > end:
                raise ProtobufError(f"truncated fixed64 in field {field}")
            value, pos = Fixed64(int.from_bytes(data[pos : pos + 8], "little")), pos + 8
        elif wire_type == WIRE_FIXED32:
            if pos + 4 > end:
                raise ProtobufError(f"truncated fixed32 in field {field}")
            value, pos = Fixed32(int.from_bytes(data[pos : pos + 4], "little")), pos + 4
        elif wire_type == WIRE_LEN:
            length, pos = _read_varint(data, pos)
            if length > end - pos:
                raise ProtobufError(f"length {length} of field {field} exceeds the message")
            value, pos = data[pos : pos + length], pos + length
        elif wire_type == WIRE_START_GROUP:
            # Deprecated but valid; Go skips unknown groups, so must we. Keep the raw body.
            if depth >= _MAX_DEPTH:
                raise ProtobufError("groups nested too deeply")
            body_end, after = _walk(data, pos, field, {}, depth + 1)
            value, pos = Group(data[pos:body_end]), after
        elif wire_type == WIRE_END_GROUP:
            if field != group:
                raise ProtobufError(f"unexpected end of group {field}")
            return tag_start, pos
        else:
            raise ProtobufError(f"invalid wire type {wire_type} in field {field}")
        out.setdefault(field, []).append(value)
    if group:
        raise ProtobufError(f"group {group} is not terminated")
    return end, end


def decode_message(data: bytes) -> dict[int, list[Value]]:
    """Walk one message into ``{field_number: [values in wire order]}``.

    Varints are unsigned ints, fixed values :class:`Fixed64`/:class:`Fixed32` ints,
    length-delimited values bytes and groups :class:`Group` bytes. Embedded messages
    are not descended into. Raises :class:`ProtobufError`.
    """
    out: dict[int, list[Value]] = {}
    _walk(bytes(data), 0, 0, out)
    return out


def as_int64(value: int) -> int:
    """Reinterpret an unsigned 64-bit varint as a signed int64."""
    return value - (1 << 64) if value >= 1 << 63 else value


def last_varint(message: dict[int, list[Value]], field: int, default: int = 0) -> int:
    """A scalar field's value: the last occurrence wins, as in protobuf."""
    for value in reversed(message.get(field, [])):
        if isinstance(value, int) and not isinstance(value, (Fixed64, Fixed32)):
            return value
    return default


def last_string(message: dict[int, list[Value]], field: int, default: str = "") -> str:
    """A string field's value (last occurrence); invalid UTF-8 is an error, as in Go."""
    for value in reversed(message.get(field, [])):
        if isinstance(value, bytes) and not isinstance(value, Group):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtobufError(f"string field {field} is not valid UTF-8") from None
    return default
