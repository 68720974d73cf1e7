"""The persisted form of a delayed-leave job, byte-compatible with lk-jwt-service.

An operator may swap rtcauthd and lk-jwt-service (Go, or the Rust v0.7) over one live
Redis, so the value is produced exactly as Go's ``encoding/json`` writes upstream's
struct, with v0.7's ``OwnerUserId`` member last, and the hash field as v0.7 writes it
(docs/redis-format.md#key-field-value). Values are read back with Go's leniency
(docs/redis-format.md#reading-records): member names match case-insensitively, unknown
members are ignored, missing members are zero values, ``DelayTimeout`` is a strict int64
and ``RestartedAt`` is RFC 3339.

Times are kept as float unix seconds; they are converted by arithmetic rather than
``datetime`` because Go's zero time (year 1) and year-0 values must round-trip too.
"""

from __future__ import annotations

import re
from typing import Any

import attr

from rtcauthd.leave.record import JobParams
from rtcauthd.livekit.naming import string_array_json
from rtcauthd.gojson import (
    INT64_MAX,
    INT64_MIN,
    STRICT_DECODER,
    JSONObject,
    decode_utf8_per_byte,
    fold_key,
    go_json_dumps,
    scrub_surrogates,
)

__all__ = [
    "GO_ZERO_TIME",
    "JOBS_KEY",
    "StoredJob",
    "StoredJobError",
    "decode_value",
    "encode_field",
    "encode_value",
    "format_rfc3339",
    "parse_rfc3339",
]

_NS_PER_S = 1_000_000_000

#: The one hash every job lives in, as upstream names it (docs/redis-format.md#key-field-value).
JOBS_KEY = b"lk-jwt:jobs"

#: Go's zero ``time.Time`` (0001-01-01T00:00:00Z) in unix seconds: what a record without
#: ``RestartedAt`` decodes to; such a job is long expired.
GO_ZERO_TIME = -62135596800.0


class StoredJobError(ValueError):
    """A stored value that Go's decoder would refuse; the entry is skipped, not deleted."""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class StoredJob:
    """One ``lk-jwt:jobs`` record: the job's :class:`JobParams` plus what only Redis needs,
    when the delay was last reset (float unix seconds)."""

    params: JobParams
    restarted_at: float

    @property
    def key(self) -> tuple[str, str]:
        """The job key (LiveKit room alias, LiveKit identity); one job per key."""
        return self.params.key

    @property
    def expires_at(self) -> float:
        """When the homeserver fires the delayed event unless it is restarted again."""
        return self.restarted_at + self.params.delay_timeout_ns / _NS_PER_S


# --------------------------------------------------------------------------- encoding


def encode_field(room: str, identity: str) -> str:
    """The hash field: ``[room, identity]`` serialised as the hashes are (v0.7, no HTML escaping)."""
    if not isinstance(room, str) or not isinstance(identity, str):
        raise TypeError("a job field is made of two strings")
    return string_array_json([room, identity])


def encode_value(job: StoredJob) -> str:
    """The hash value: Go ``json.Marshal`` of upstream's struct, in struct order.

    ``OwnerUserId`` is always written, ``""`` for a job without owner, as v0.7 does.
    """
    params = job.params
    return go_json_dumps(
        {
            "Params": {
                "DelayId": params.delay_id,
                "DelayTimeout": int(params.delay_timeout_ns),
                "ServerName": params.server_name,
                "LiveKitRoom": params.room,
                "LiveKitIdentity": params.identity,
                "OwnerUserId": params.owner_user_id or "",
            },
            "RestartedAt": format_rfc3339(job.restarted_at),
        }
    )


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (any year, incl. 0)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


def _civil_from_days(days: int) -> tuple[int, int, int]:
    """Inverse of :func:`_days_from_civil`."""
    days += 719468
    era = days // 146097
    day_of_era = days - era * 146097
    year_of_era = (day_of_era - day_of_era // 1460 + day_of_era // 36524 - day_of_era // 146096) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    mp = (5 * day_of_year + 2) // 153
    day = day_of_year - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return year_of_era + era * 400 + (month <= 2), month, day


def format_rfc3339(unix_seconds: float) -> str:
    """UTC RFC 3339 with ``Z``, microseconds, trailing fraction zeros trimmed (Go style).

    Go refuses to marshal years outside 0..9999, so do we.
    """
    total_us = round(unix_seconds * 1_000_000)
    secs, micros = divmod(total_us, 1_000_000)
    days, second_of_day = divmod(secs, 86400)
    year, month, day = _civil_from_days(days)
    if not 0 <= year <= 9999:
        raise ValueError(f"year {year} outside [0,9999]")
    hour, rest = divmod(second_of_day, 3600)
    minute, second = divmod(rest, 60)
    text = f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}"
    if micros:
        text += "." + f"{micros:06d}".rstrip("0")
    return text + "Z"


# --------------------------------------------------------------------------- decoding

_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?"
    r"(?:(Z)|([+-])([0-9]{2}):([0-9]{2}))",
    re.ASCII,
)
_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _days_in(month: int, year: int) -> int:
    if month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0):
        return 29
    return _DAYS_IN_MONTH[month - 1]


def parse_rfc3339(text: str) -> float:
    """Parse RFC 3339 as Go's ``time.Time.UnmarshalJSON`` does; unix seconds.

    ``T`` and ``Z`` are upper case only; the offset is ``Z`` or ``±hh:mm``; the fraction
    may have any number of digits, of which Go keeps nine. Raises ``ValueError``.
    """
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise ValueError(f"not RFC 3339: {text!r}")
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    if not (1 <= month <= 12 and 1 <= day <= _days_in(month, year)):
        raise ValueError(f"day out of range: {text!r}")
    if hour > 23 or minute > 59 or second > 59:
        raise ValueError(f"time out of range: {text!r}")
    offset = 0
    if m.group(8) is None:
        off_hour, off_minute = int(m.group(10)), int(m.group(11))
        if off_hour > 23 or off_minute > 59:
            raise ValueError(f"zone offset out of range: {text!r}")
        offset = (off_hour * 60 + off_minute) * 60
        if m.group(9) == "-":
            offset = -offset
    nanos = int((m.group(7) or "0")[:9].ljust(9, "0"))
    whole = _days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second - offset
    return whole + nanos / _NS_PER_S


def _clean(text: str) -> str:
    return scrub_surrogates(text)


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise StoredJobError(f"{what}: expected a string")
    return _clean(value)


def _duration(value: Any) -> int:
    if type(value) is not int:  # bool is an int subclass; JSONFraction marks 8e9 / 8.0
        raise StoredJobError("DelayTimeout: expected an integer")
    if not INT64_MIN <= value <= INT64_MAX:
        raise StoredJobError("DelayTimeout: out of int64 range")
    return value


def _time(value: Any) -> float:
    text = _string(value, "RestartedAt")
    try:
        return parse_rfc3339(text)
    except ValueError as e:
        raise StoredJobError(f"RestartedAt: {e}") from None


_PARAM_FIELDS = {
    "delayid": ("delay_id", lambda v: _string(v, "DelayId")),
    "delaytimeout": ("delay_timeout_ns", _duration),
    "servername": ("server_name", lambda v: _string(v, "ServerName")),
    "livekitroom": ("room", lambda v: _string(v, "LiveKitRoom")),
    "livekitidentity": ("identity", lambda v: _string(v, "LiveKitIdentity")),
    # v0.7; Go-era records have none, which means no owner
    "owneruserid": ("owner_user_id", lambda v: _string(v, "OwnerUserId")),
}


def _decode_params(value: Any, into: dict[str, Any]) -> None:
    if not isinstance(value, JSONObject):
        raise StoredJobError("Params: expected an object")
    for key, item in value:
        spec = _PARAM_FIELDS.get(fold_key(_clean(key)))
        if spec is None or item is None:  # unknown members are ignored, null keeps the value
            continue
        name, parse = spec
        into[name] = parse(item)


def decode_value(text: "str | bytes") -> StoredJob:
    """Decode a stored value as Go's ``json.Unmarshal`` would; ``StoredJobError`` if it can't."""
    if isinstance(text, bytes):
        text = decode_utf8_per_byte(text)
    try:
        top = STRICT_DECODER.decode(text)
    except (ValueError, RecursionError) as e:
        raise StoredJobError(f"not JSON: {e}") from None
    fields: dict[str, Any] = {
        "delay_id": "",
        "delay_timeout_ns": 0,
        "server_name": "",
        "room": "",
        "identity": "",
    }
    restarted_at = GO_ZERO_TIME
    if top is None:
        return StoredJob(JobParams(**fields), restarted_at)
    if not isinstance(top, JSONObject):
        raise StoredJobError("expected an object")
    for key, item in top:
        folded = fold_key(_clean(key))
        if item is None:
            continue
        if folded == "params":
            # a repeated Params member decodes into the struct already there (Go merges)
            _decode_params(item, fields)
        elif folded == "restartedat":
            restarted_at = _time(item)
    return StoredJob(JobParams(**fields), restarted_at)

