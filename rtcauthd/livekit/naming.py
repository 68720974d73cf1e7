"""LiveKit room aliases and participant identities (docs/authorization.md#identities-and-room-aliases).

Room names and identities are pseudonymous hashes (MSC4195) so that the SFU never sees
Matrix room or user IDs. They must be byte-for-byte what the Go service derives:
clients, the SFU and a shared Redis all meet on these strings, so the serialisation is
Go's JSON encoder (with HTML escaping), not Matrix canonical JSON.
"""

from __future__ import annotations

import base64
import hashlib

from rtcauthd.gojson import go_json_dumps

__all__ = [
    "LEGACY_SLOT_ID",
    "H",
    "room_alias",
    "legacy_room_alias",
    "identity",
    "legacy_identity",
]

# The slot the legacy /sfu/get endpoint implies for every room (docs/authorization.md#hash-inputs).
LEGACY_SLOT_ID = "m.call#ROOM"


def _strings(parts: tuple) -> list[str]:
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"expected str, not {type(part).__name__}")
    return list(parts)


def H(*parts: str) -> str:
    """Unpadded standard Base64 of SHA-256 of Go's JSON encoding of ``[parts...]``."""
    encoded = go_json_dumps(_strings(parts)).encode("utf-8")
    digest = hashlib.sha256(encoded).digest()
    return base64.b64encode(digest).decode("ascii").rstrip("=")


def room_alias(room_id: str, slot_id: str) -> str:
    """The LiveKit room name for a Matrix room and MatrixRTC slot."""
    return H(room_id, slot_id)


def legacy_room_alias(room: str) -> str:
    """The LiveKit room name for a legacy ``/sfu/get`` request."""
    return H(room, LEGACY_SLOT_ID)


def identity(user_id: str, device_id: str, member_id: str) -> str:
    """The pseudonymous LiveKit identity for a verified user, device and membership."""
    return H(user_id, device_id, member_id)


def legacy_identity(user_id: str, device_id: str) -> str:
    """The legacy (``/sfu/get``) identity: ``<user>:<device>``, deliberately not hashed."""
    return f"{user_id}:{device_id}"
