"""What one MSC4140 ``restart``/``send`` answer means for the retry loop (docs/delegated-leave.md#answer-classification).

Classification is pure (status, headers, body, now) so the parity-critical rules — 404,
409, 429 hints in three forms, everything else transient — are tested without any HTTP.
Whether 404 is fatal (``restart``) or success (``send``) is the caller's decision; here it
is only reported as ``NOT_FOUND``. A 409 (the event was already finalised the other way)
can never turn into success, so it is ``CONFLICT``, final for both actions. The answer to
the delay look-up is read here too (:func:`delay_from_lookup`).
"""

from __future__ import annotations

import calendar
import enum
import json
import re
from typing import Any, Mapping, Optional, Union

import attr
from twisted.web.http_headers import Headers

from rtcauthd.gojson import INT64_MAX, INT64_MIN, JSONObject, reject_constant
from rtcauthd.outbound.errors import FailureKind, OutboundError


class CsApiUnresolvable(Exception):
    """The client-server API base URL of the homeserver could not be found (docs/delegated-leave.md#client-server-api).

    ``restart``/``send`` attempts fail with this instead of answering an Outcome; it ends
    the retry loop at once (restart → ``CsApiUrlNotFound``, send → job done unsent).
    """


class DelayedEventUnknown(OutboundError):
    """The homeserver has no usable pending delayed event of that ID for that user and room.

    An OutboundError so that callers handling every look-up failure alike still can; the
    delegation route answers this one 400 and all others 503 (docs/delegated-leave.md#the-delay-look-up).
    """


def _errcode(body: bytes) -> Optional[str]:
    try:
        document = json.loads(body.decode("utf-8"), parse_constant=reject_constant)
    except (ValueError, UnicodeDecodeError):
        return None
    code = document.get("errcode") if isinstance(document, dict) else None
    return code if isinstance(code, str) else None


def _positive_int(document: Mapping[str, Any], key: str) -> int:
    value = document.get(key)
    if value is None:
        return 0
    if type(value) is not int:
        raise OutboundError(FailureKind.BAD_BODY, "delayed event lookup", f"{key} is not an integer")
    return value


def delay_from_lookup(status: int, body: bytes, room_id: Optional[str]) -> int:
    """The delay in ms from a look-up answer (docs/delegated-leave.md#the-delay-look-up).

    ``delay_ms`` when positive, else the older revisions' ``delay``; an event of another
    room (when ``room_id`` is given) or without a positive delay is unknown.
    """
    step = "delayed event lookup"
    if status == 404:
        raise DelayedEventUnknown(FailureKind.HTTP_STATUS, step, "HTTP 404", status=404, code=_errcode(body))
    if status != 200:
        raise OutboundError(
            FailureKind.HTTP_STATUS, step, f"HTTP {status}", status=status, code=_errcode(body)
        )
    try:
        document = json.loads(body.decode("utf-8"), parse_constant=reject_constant)
    except (ValueError, UnicodeDecodeError):
        raise OutboundError(FailureKind.BAD_BODY, step, "answer is not JSON", status=200) from None
    if not isinstance(document, dict):
        raise OutboundError(FailureKind.BAD_BODY, step, "answer is not a JSON object", status=200)
    event_room = document.get("room_id")
    if event_room is not None and not isinstance(event_room, str):
        raise OutboundError(FailureKind.BAD_BODY, step, "room_id is not a string", status=200)
    if room_id is not None and event_room != room_id:
        raise DelayedEventUnknown(FailureKind.INVALID, step, "the delayed event belongs to another room", status=200)
    delay_ms = _positive_int(document, "delay_ms")
    if delay_ms <= 0:
        delay_ms = _positive_int(document, "delay")
    if delay_ms <= 0:
        raise DelayedEventUnknown(FailureKind.INVALID, step, "the delayed event has no positive delay", status=200)
    return delay_ms


class OutcomeKind(enum.Enum):
    OK = "ok"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    RETRY = "retry"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Outcome:
    """One attempt's result; ``retry_after`` is a server hint in seconds (429 only)."""

    kind: OutcomeKind
    retry_after: Optional[float] = None
    status: Optional[int] = None
    detail: str = ""

    @classmethod
    def ok(cls, status: Optional[int] = None) -> "Outcome":
        return cls(OutcomeKind.OK, status=status)

    @classmethod
    def not_found(cls, status: Optional[int] = 404) -> "Outcome":
        return cls(OutcomeKind.NOT_FOUND, status=status)

    @classmethod
    def conflict(cls, status: Optional[int] = 409) -> "Outcome":
        return cls(OutcomeKind.CONFLICT, status=status, detail="HTTP 409")

    @classmethod
    def retry(
        cls, retry_after: Optional[float] = None, *, status: Optional[int] = None, detail: str = ""
    ) -> "Outcome":
        return cls(OutcomeKind.RETRY, retry_after=retry_after, status=status, detail=detail)


HeadersLike = Union[Headers, Mapping[str, Any], None]


def classify_delayed_event_response(
    status: int, headers: HeadersLike, body: bytes, now: float
) -> Outcome:
    """Map a final HTTP answer of ``restart``/``send`` to an :class:`Outcome` (docs/delegated-leave.md#answer-classification).

    ``now`` (unix seconds) is needed to turn an HTTP-date ``Retry-After`` into a delay.
    """
    if status in (200, 204):
        return Outcome.ok(status)
    if status == 404:
        return Outcome.not_found(status)
    if status == 409:
        return Outcome.conflict(status)
    if status != 429:
        return Outcome.retry(status=status, detail=f"HTTP {status}")
    hint = _retry_after_header(_first_header(headers, "Retry-After"), now)
    if hint is None:
        # Only when the header gives nothing usable is the body consulted.
        hint = _retry_after_body(body)
    return Outcome.retry(hint, status=status, detail="HTTP 429")


def _first_header(headers: HeadersLike, name: str) -> Optional[str]:
    if headers is None:
        return None
    if isinstance(headers, Headers):
        values = headers.getRawHeaders(name)
        value: Any = values[0] if values else None
    else:
        value = None
        lname = name.lower()
        for key, candidate in headers.items():
            key_text = key.decode("latin-1") if isinstance(key, bytes) else key
            if key_text.lower() == lname:
                value = candidate[0] if isinstance(candidate, (list, tuple)) and candidate else candidate
                break
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return str(value)


_DECIMAL = re.compile(r"[+-]?[0-9]+")


def _retry_after_header(value: Optional[str], now: float) -> Optional[float]:
    """Seconds from a ``Retry-After`` value, or None when it is neither form."""
    if value is None:
        return None
    value = value.strip(" \t")  # header framing whitespace; inner spaces make it unusable
    if _DECIMAL.fullmatch(value):
        seconds = int(value)
        if INT64_MIN <= seconds <= INT64_MAX:
            return float(max(seconds, 0))
        # Out of int64 range: Go's Atoi fails, so fall through to the date forms (and fail).
    when = parse_http_date(value)
    if when is None:
        return None
    delta = when - now
    return float(max(int(delta // 1), 0))


_DAYS_SHORT = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAYS_LONG = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")

_FRACTION = r"(?:[.,][0-9]+)?"  # Go accepts fractional seconds after the seconds field
# IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT
_IMF = re.compile(
    r"([A-Za-z]{3}), ([0-9]{2}) ([A-Za-z]{3}) ([0-9]{4}) ([0-9]{1,2}):([0-9]{2}):([0-9]{2})"
    + _FRACTION
    + r" GMT"
)
# RFC 850: Sunday, 06-Nov-94 08:49:37 GMT (any zone abbreviation; Go records offset 0)
_RFC850 = re.compile(
    r"([A-Za-z]+), ([0-9]{2})-([A-Za-z]{3})-([0-9]{2}) ([0-9]{1,2}):([0-9]{2}):([0-9]{2})"
    + _FRACTION
    + r" ([A-Z]{3,5})"
)
# asctime: Sun Nov  6 08:49:37 1994
_ASCTIME = re.compile(
    r"([A-Za-z]{3}) ([A-Za-z]{3}) {1,2}([0-9]{1,2}) ([0-9]{1,2}):([0-9]{2}):([0-9]{2})"
    + _FRACTION
    + r" ([0-9]{4})"
)


def parse_http_date(value: str) -> Optional[float]:
    """Unix seconds of an HTTP-date in any of the three forms Go's ``http.ParseTime`` takes.

    The weekday is checked for spelling only (Go ignores its value); month and day-of-month
    are checked for range.
    """
    m = _IMF.fullmatch(value)
    if m:
        wday, day, mon, year, hh, mm, ss = m.groups()
        if wday.lower() not in _DAYS_SHORT:
            return None
        return _timestamp(int(year), mon, int(day), int(hh), int(mm), int(ss))
    m = _RFC850.fullmatch(value)
    if m:
        wday, day, mon, yy, hh, mm, ss, _zone = m.groups()
        if wday.lower() not in _DAYS_LONG:
            return None
        year = int(yy) + (1900 if int(yy) >= 69 else 2000)
        return _timestamp(year, mon, int(day), int(hh), int(mm), int(ss))
    m = _ASCTIME.fullmatch(value)
    if m:
        wday, mon, day, hh, mm, ss, year = m.groups()
        if wday.lower() not in _DAYS_SHORT:
            return None
        return _timestamp(int(year), mon, int(day), int(hh), int(mm), int(ss))
    return None


def _timestamp(year: int, mon: str, day: int, hh: int, mm: int, ss: int) -> Optional[float]:
    try:
        month = _MONTHS.index(mon.lower()) + 1
    except ValueError:
        return None
    if not (1 <= day <= calendar.monthrange(year, month)[1]) or hh > 23 or mm > 59 or ss > 59:
        return None
    return float(calendar.timegm((year, month, day, hh, mm, ss, 0, 0, 0)))


def _retry_after_body(body: bytes) -> Optional[float]:
    """ceil(retry_after_ms / 1000) from a Matrix 429 body, decoded with Go's struct rules.

    Go matches member names case-insensitively (last one wins), lets ``null`` keep the
    zero value, and fails the whole decode on a type mismatch (non-string ``errcode``,
    non-integer ``retry_after_ms``) — in which case there is no hint.
    """
    try:
        pairs = json.loads(
            body.decode("utf-8", errors="replace"),
            object_pairs_hook=JSONObject,
            parse_constant=reject_constant,
        )
    except ValueError:
        return None
    if not isinstance(pairs, JSONObject):
        return None  # null, arrays, numbers...: no hint
    retry_after_ms = 0
    for key, value in pairs:
        lkey = key.lower()
        if lkey == "errcode":
            if value is not None and not isinstance(value, str):
                return None
        elif lkey == "retry_after_ms":
            if value is None:
                continue
            if type(value) is not int or not INT64_MIN <= value <= INT64_MAX:
                return None
            retry_after_ms = value
    if retry_after_ms <= 0:
        return None
    return float(-(-retry_after_ms // 1000))
