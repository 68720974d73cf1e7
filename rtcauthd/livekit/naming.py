"""LiveKit room aliases and participant identities (docs/authorization.md#identities-and-room-aliases).

Room names and identities are pseudonymous hashes (MSC4195) so that the SFU never sees
Matrix room or user IDs. They must be byte-for-byte what lk-jwt-service v0.7 derives:
clients, the SFU and a shared Redis all meet on these strings. The hashed bytes are the
JSON array as v0.7 writes it (docs/authorization.md#hash-function), which for string
arrays is also Matrix canonical JSON; Go's HTML escaping is no longer applied.
"""

from __future__ import annotations

import base64
import hashlib
import json

from rtcauthd.gojson import scrub_surrogates

__all__ = [
    "LEGACY_SLOT_ID",
    "H",
    "appservice_identity",
    "identity",
    "legacy_identity",
    "legacy_room_alias",
    "room_alias",
    "string_array_json",
]

# The slot the legacy /sfu/get endpoint implies for every room (docs/authorization.md#hash-inputs).
LEGACY_SLOT_ID = "m.call#ROOM"


def _strings(parts) -> list[str]:
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"expected str, not {type(part).__name__}")
    return list(parts)


def string_array_json(parts) -> str:
    """The JSON array of ``parts`` that hashes and Redis job fields are made of.

    Only ``"``, ``\\`` and U+0000–U+001F are escaped (short forms where JSON has them,
    else lower-case ``\\u00xx``); everything else is written raw. A lone surrogate,
    which only Python text can hold, becomes U+FFFD as the request decoder would have
    made it.
    """
    strings = [scrub_surrogates(part) for part in _strings(parts)]
    return json.dumps(strings, ensure_ascii=False, separators=(",", ":"))


def H(*parts: str) -> str:
    """Unpadded standard Base64 of SHA-256 of :func:`string_array_json` of ``[parts...]``."""
    digest = hashlib.sha256(string_array_json(parts).encode("utf-8")).digest()
    return base64.b64encode(digest).decode("ascii").rstrip("=")


def room_alias(room_id: str, slot_id: str) -> str:
    """The LiveKit room name for a Matrix room and MatrixRTC slot."""
    return H(room_id, slot_id)


def legacy_room_alias(room: str) -> str:
    """The LiveKit room name for a legacy ``/sfu/get`` request."""
    return H(room, LEGACY_SLOT_ID)


def identity(user_id: str, device_id: str, member_id: str) -> str:
    """The identity on the legacy OpenID routes (``/get_token``, ``/delegate_delayed_leave``)."""
    return H(user_id, device_id, member_id)


def appservice_identity(user_id: str, member_id: str) -> str:
    """The identity on the application-service routes: no device, as MSC4195 computes it."""
    return H(user_id, member_id)


def legacy_identity(user_id: str, device_id: str) -> str:
    """The legacy (``/sfu/get``) identity: ``<user>:<device>``, deliberately not hashed."""
    return f"{user_id}:{device_id}"
