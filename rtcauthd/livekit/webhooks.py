"""Verification and parsing of LiveKit webhooks (docs/livekit.md#webhooks).

Anyone can POST to ``/sfu_webhook``; only a body signed by the SFU with our API key may
move a delayed-leave job, because a forged ``participant_left`` would make the service
send somebody's leave event. The checks run in upstream's order (docs/livekit.md#webhook-verification) so that the same
request is refused for the same reason. PyJWT splits the token and checks the signature;
around it stay what go-jose does and PyJWT does not: unpadded base64url only (PyJWT takes
``=``), strict JSON, go-jose's claim types, and the time claims against the injected
clock with go-jose's leeway (PyJWT reads the wall clock). PyJWT also refuses base64 with
stray trailing bits, which Go tolerates and no SFU writes.

The body is read as protobuf JSON (protojson), which is looser than plain JSON decoding
in some ways (lowerCamel or snake_case names, enums by name or number, int64 as
strings) and stricter in others (duplicate fields are an error). Field and enum names
come from LiveKit's generated classes, but the reading is by hand: protobuf's
``json_format.Parse`` accepts what protojson refuses (a non-object for a message field,
both spellings of one field, enum numbers like ``1.5``, ``true`` or ``2**32``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
from decimal import Decimal
from typing import Any, Optional

import attr
import jwt
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from jwt.utils import base64url_decode
from livekit.protocol import models as lk_models, webhook as lk_webhook
from twisted.internet.interfaces import IReactorTime

from rtcauthd.gojson import INT64_MAX, INT64_MIN, JSONObject, reject_constant
from rtcauthd.livekit.jws import ALGORITHM, JWS, secret_bytes
from rtcauthd.livekit.presence import SIGNAL_CONNECTED, SIGNAL_CONNECTION_ABORTED, SIGNAL_DISCONNECTED_INTENTIONALLY

__all__ = [
    "LEEWAY_SECONDS",
    "SIGNAL_CONNECTED",
    "SIGNAL_CONNECTION_ABORTED",
    "SIGNAL_DISCONNECTED_INTENTIONALLY",
    "WebhookEvent",
    "WebhookRejected",
    "WebhookVerifier",
    "signal_for",
]

#: go-jose's default leeway for exp / nbf / iat
LEEWAY_SECONDS = 60

#: livekit.DisconnectReason CLIENT_INITIATED
CLIENT_INITIATED: int = lk_models.CLIENT_INITIATED
_DISCONNECT_REASONS = {v.name: v.number for v in lk_models.DisconnectReason.DESCRIPTOR.values}

# Rejection reasons (for the log; the HTTP answer is always 200).
R_NO_AUTH = "missing Authorization header"
R_MALFORMED = "malformed token"
R_ALG = "token algorithm is not HS256"
R_CLAIMS = "malformed token claims"
R_NO_SECRET = "API secret could not be found"
R_SIGNATURE = "invalid token signature"
R_NOT_YET = "token not valid yet"
R_EXPIRED = "token is expired"
R_NO_EXPIRY = "token has no exp claim"
R_FUTURE_IAT = "token issued in the future"
R_CHECKSUM = "sha256 checksum of body does not match"
R_BODY = "body is not a valid WebhookEvent"


class WebhookRejected(Exception):
    """The webhook must not be acted on; ``reason`` says why (safe to log)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attr.s(frozen=True, slots=True, auto_attribs=True)
class WebhookEvent:
    """The fields of ``livekit.WebhookEvent`` that drive jobs (docs/livekit.md#webhook-fields); absent means empty."""

    event: str = ""
    room_name: str = ""
    participant_identity: str = ""
    disconnect_reason: int = 0
    id: str = ""


def signal_for(event: WebhookEvent) -> Optional[str]:
    """The job signal a webhook event produces (docs/livekit.md#webhook-signals), or None if it is ignored."""
    if event.event == "participant_joined":
        return SIGNAL_CONNECTED
    if event.event in ("participant_left", "participant_connection_aborted"):
        if event.disconnect_reason == CLIENT_INITIATED:
            return SIGNAL_DISCONNECTED_INTENTIONALLY
        return SIGNAL_CONNECTION_ABORTED
    return None


# --------------------------------------------------------------------------- JWT

# Go's RawURLEncoding: URL alphabet, no padding, no whitespace (PyJWT also takes ``=``).
_B64URL = re.compile(r"[A-Za-z0-9_-]*", re.ASCII)


class _Invalid(Exception):
    pass


_JSON = json.JSONDecoder(parse_constant=reject_constant)


def _json_object(data: bytes) -> dict[str, Any]:
    # Go's JSON rules (UTF-8, no NaN); PyJWT's json.loads takes UTF-16 and NaN.
    try:
        value = _JSON.decode(data.decode("utf-8"))
    except (ValueError, RecursionError, _Invalid):
        raise _Invalid() from None
    if not isinstance(value, dict):
        raise _Invalid()
    return value


def _numeric_date(value: Any) -> Optional[int]:
    # go-jose NumericDate: any JSON number, truncated to whole seconds; null = absent.
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid()
    if isinstance(value, float) and not math.isfinite(value):
        raise _Invalid()  # 1e400: Go's ParseFloat reports it out of range
    return int(value)


def _optional_string(claims: dict[str, Any], name: str) -> str:
    value = claims.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _Invalid()
    return value


def _check_registered_claims(claims: dict[str, Any]) -> None:
    # What go-jose's Claims struct would refuse to unmarshal; PyJWT does not type-check these.
    for name in ("iss", "sub", "jti"):
        _optional_string(claims, name)
    aud = claims.get("aud")
    if aud is not None and not isinstance(aud, str):
        if not isinstance(aud, list) or not all(isinstance(a, str) for a in aud):
            raise _Invalid()
    for name in ("exp", "nbf", "iat"):
        _numeric_date(claims.get(name))


# --------------------------------------------------------------------------- protojson
# By hand because json_format.Parse is laxer than protojson (module docstring).


class _Fraction(Decimal):
    """A JSON number written with a fraction or exponent, kept exact."""


_BODY_DECODER = json.JSONDecoder(
    object_pairs_hook=JSONObject, parse_float=_Fraction, parse_constant=reject_constant
)

_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (INT64_MIN, INT64_MAX)
_DECIMAL = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?", re.ASCII)


def _pb_string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid()
    if any("\ud800" <= ch <= "\udfff" for ch in value):
        raise _Invalid()  # protojson refuses strings that are not valid UTF-8
    return value


def _pb_integer(value: Any, bounds: tuple[int, int], allow_string: bool) -> int:
    # protojson takes integral JSON numbers (also 1.0 / 1e2), or the same quoted.
    if isinstance(value, str):
        if not allow_string or len(value) > 64 or not _DECIMAL.fullmatch(value):
            raise _Invalid()  # (an int64 never needs 64 characters; int() of 5000 digits raises)
        value = _Fraction(value) if any(c in value for c in ".eE") else int(value)
    if isinstance(value, Decimal):
        # adjusted() bounds the magnitude before int() could build a huge number
        if value.adjusted() > 30 or value != value.to_integral_value():
            raise _Invalid()
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid()
    if not bounds[0] <= value <= bounds[1]:
        raise _Invalid()
    return value


def _pb_enum(value: Any, names: dict[str, int]) -> int:
    # Names are exact; unknown names are dropped (DiscardUnknown); numbers are any int32.
    if isinstance(value, str):
        return names.get(value, 0)
    return _pb_integer(value, _INT32, allow_string=False)


def _pb_fields(value: Any, known: dict[str, str]) -> dict[str, Any]:
    """Known fields of a protojson object by canonical name; null means unset."""
    if not isinstance(value, JSONObject):
        raise _Invalid()
    seen: dict[str, Any] = {}
    for key, item in value:
        name = known.get(key)
        if name is None:
            continue  # unknown field, discarded
        if name in seen:
            raise _Invalid()  # duplicate, also across the camel / snake spellings
        seen[name] = item
    return {name: item for name, item in seen.items() if item is not None}


def _json_names(message: Descriptor, *fields: str) -> dict[str, str]:
    """Both protojson spellings (lowerCamel and proto name) of the fields read or checked."""
    names: dict[str, str] = {}
    for name in fields:
        names[message.fields_by_name[name].json_name] = name
        names[name] = name
    return names


_EVENT = lk_webhook.WebhookEvent.DESCRIPTOR
_EVENT_FIELDS = _json_names(
    _EVENT, "event", "room", "participant", "egress_info", "ingress_info", "track", "id",
    "created_at", "num_dropped",
)
_ROOM_FIELDS = _json_names(lk_models.Room.DESCRIPTOR, "name")
_PARTICIPANT_FIELDS = _json_names(lk_models.ParticipantInfo.DESCRIPTOR, "identity", "disconnect_reason")
_INTEGER_BOUNDS = {FieldDescriptor.TYPE_INT32: _INT32, FieldDescriptor.TYPE_INT64: _INT64}


def _parse_event(body: bytes) -> WebhookEvent:
    try:
        text = body.decode("utf-8")
        top = _BODY_DECODER.decode(text)
    except (ValueError, RecursionError):
        raise _Invalid() from None
    fields = _pb_fields(top, _EVENT_FIELDS)
    room = _pb_fields(fields.get("room", JSONObject()), _ROOM_FIELDS)
    participant = _pb_fields(fields.get("participant", JSONObject()), _PARTICIPANT_FIELDS)
    for other in ("egress_info", "ingress_info", "track"):
        if other in fields and not isinstance(fields[other], JSONObject):
            raise _Invalid()
    for number in ("created_at", "num_dropped"):
        if number in fields:
            bounds = _INTEGER_BOUNDS[_EVENT.fields_by_name[number].type]
            _pb_integer(fields[number], bounds, allow_string=True)
    return WebhookEvent(
        event=_pb_string(fields.get("event", "")),
        room_name=_pb_string(room.get("name", "")),
        participant_identity=_pb_string(participant.get("identity", "")),
        disconnect_reason=_pb_enum(participant.get("disconnect_reason", 0), _DISCONNECT_REASONS),
        id=_pb_string(fields.get("id", "")),
    )


# --------------------------------------------------------------------------- verifier


class WebhookVerifier:
    """Checks ``Authorization`` + body of a LiveKit webhook and returns the event."""

    def __init__(self, *, api_key: str, api_secret: str, clock: IReactorTime) -> None:
        self._api_key = api_key
        self._secret = secret_bytes(api_secret)
        self._clock = clock

    def verify(self, authorization: Optional[str], body: bytes) -> WebhookEvent:
        """The event, or ``WebhookRejected`` for the first failing check of docs/livekit.md#webhook-verification."""
        if not authorization:
            raise WebhookRejected(R_NO_AUTH)
        parts = authorization.split(".")
        if len(parts) != 3 or not all(_B64URL.fullmatch(part) for part in parts):
            raise WebhookRejected(R_MALFORMED)
        try:
            # Unverified first: the checks before the signature's come in upstream's order.
            token = JWS.decode_complete(authorization, options={"verify_signature": False})
            header = _json_object(base64url_decode(parts[0]))  # Go's JSON rules, not Python's
        except (jwt.InvalidTokenError, _Invalid):
            raise WebhookRejected(R_MALFORMED) from None
        if header.get("alg") != ALGORITHM:
            raise WebhookRejected(R_ALG)
        try:
            claims = _json_object(token["payload"])
            _check_registered_claims(claims)
            issuer = _optional_string(claims, "iss")
        except _Invalid:
            raise WebhookRejected(R_CLAIMS) from None

        # Only our own key has a secret; an empty key or secret never matches.
        if not issuer or issuer != self._api_key or not self._secret:
            raise WebhookRejected(R_NO_SECRET)

        try:
            JWS.decode_complete(authorization, self._secret, algorithms=[ALGORITHM])
        except jwt.InvalidTokenError:
            raise WebhookRejected(R_SIGNATURE) from None

        try:
            # go-jose decodes the private claims together with the signature check
            claimed = _optional_string(claims, "sha256")
        except _Invalid:
            raise WebhookRejected(R_CLAIMS) from None

        now = self._clock.seconds()
        nbf = _numeric_date(claims.get("nbf"))
        exp = _numeric_date(claims.get("exp"))
        iat = _numeric_date(claims.get("iat"))
        if nbf is not None and now + LEEWAY_SECONDS < nbf:
            raise WebhookRejected(R_NOT_YET)
        if exp is None:
            # Deliberately stricter than upstream: a captured token without exp would act forever.
            raise WebhookRejected(R_NO_EXPIRY)
        if now - LEEWAY_SECONDS > exp:
            raise WebhookRejected(R_EXPIRED)
        if iat is not None and now + LEEWAY_SECONDS < iat:
            raise WebhookRejected(R_FUTURE_IAT)

        digest = base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")
        if not hmac.compare_digest(claimed.encode("utf-8", "surrogatepass"), digest.encode("ascii")):
            raise WebhookRejected(R_CHECKSUM)

        try:
            return _parse_event(body)
        except _Invalid:
            raise WebhookRejected(R_BODY) from None
