"""Client-visible Matrix errors and the exact strings lk-jwt-service sends (docs/endpoints.md#error-texts)."""

from __future__ import annotations

from typing import Optional

# errcodes
M_NOT_JSON = "M_NOT_JSON"
M_BAD_JSON = "M_BAD_JSON"
M_UNAUTHORIZED = "M_UNAUTHORIZED"
M_FORBIDDEN = "M_FORBIDDEN"
M_UNKNOWN = "M_UNKNOWN"
M_TOO_LARGE = "M_TOO_LARGE"
M_LIMIT_EXCEEDED = "M_LIMIT_EXCEEDED"

# error texts, byte-exact with upstream (note the ungrammatical "a `id`" in the -GT forms)
E_NOTJSON = "Error reading request"
E_ROOMSLOT = "The request body is missing `room_id` or `slot_id`"
E_MEMBER_GT = "The request body `member` is missing a `id`, `claimed_user_id` or `claimed_device_id`"
E_MEMBER_DL = "The request body `member` is missing `id`, `claimed_user_id` or `claimed_device_id`"
E_OPENID_GT = "The request body `openid_token` is missing a `access_token` or `matrix_server_name`"
E_OPENID_DL = "The request body `openid_token` is missing `access_token` or `matrix_server_name`"
E_DELAY = "The request body is missing `delay_id` or `delay_timeout`"
E_ROOM = "Missing room parameter"
E_OPENID_LG = "Missing OpenID token parameters"
E_DELEG = "Delegation of delayed events is only supported for full access users"
E_CSAPI = "Unable to resolve client-server API"
E_UNAUTH = "The request could not be authorised."
E_INTERNAL = "Internal Server Error"
E_CREATE = "Unable to create room on SFU"
E_SHUTDOWN = "Service is shutting down"
E_TOO_LARGE = "Request body too large"
# rtcauthd's own (upstream has no limits)
E_LIMIT = "Too many requests"
E_BUSY = "Too many verifications in progress, try again shortly"


class MatrixError(Exception):
    """An error answered to the client as ``{"errcode", "error"}`` with an HTTP status.

    ``retry_after_ms`` (429/503) adds Matrix's ``retry_after_ms`` member and a
    ``Retry-After`` header in whole seconds, rounded up.
    """

    def __init__(self, status: int, errcode: str, message: str, *, retry_after_ms: Optional[int] = None) -> None:
        super().__init__(status, errcode, message)
        self.status = status
        self.errcode = errcode
        self.message = message
        self.retry_after_ms = retry_after_ms

    def __repr__(self) -> str:
        return f"MatrixError({self.status}, {self.errcode!r}, {self.message!r})"


def not_json() -> MatrixError:
    return MatrixError(400, M_NOT_JSON, E_NOTJSON)


def bad_json(message: str) -> MatrixError:
    return MatrixError(400, M_BAD_JSON, message)


def unauthorized() -> MatrixError:
    return MatrixError(401, M_UNAUTHORIZED, E_UNAUTH)


# Application-service routes (docs/appservice.md#errors): errcodes and texts as upstream v0.7 sends them.
M_MISSING_TOKEN = "M_MISSING_TOKEN"
M_UNKNOWN_TOKEN = "M_UNKNOWN_TOKEN"
M_INVALID_PARAM = "M_INVALID_PARAM"

E7_HS_MISSING = "Missing homeserver access token"
E7_HS_WRONG = "Unrecognised homeserver access token"
E7_NO_USER = "Missing request authorization"
E7_NO_ORIGIN = "Missing request origin"
E7_BAD_MXID = "Malformed user identifier"
E7_URL = "The request `url` does not match this service's LiveKit URL"
E7_NOT_MEMBER = "The requesting user is not a member of the room"
E7_TARGET_NJ = "The target server is not joined to the room"
E7_SELF_NJ = "This server is not joined to the room"
E7_FOREIGN_USER = "The user_id does not belong to the origin server"
E7_MEMBERSHIP = "Unable to verify room membership"
E7_REMOTE_403 = "The requesting user is not a member of the room on the destination homeserver"
E7_REMOTE_400 = "The destination homeserver rejected the specified `url`"
E7_REMOTE_OTHER = "Unable to reach the specified homeserver"
E7_DELAY_UNKNOWN = "Unknown `delay_id`"
E7_DELAY_LOOKUP = "Unable to look up the delayed event"
# Validation texts of the flat ``member_id`` bodies (our wording; upstream's is not known).
E7V_CS = "The request body is missing `url`, `room_id`, `slot_id` or `member_id`"
E7V_SS = "The request body is missing `url`, `user_id`, `room_id`, `slot_id` or `member_id`"
E7V_DL = "The request body is missing `url`, `room_id`, `slot_id`, `member_id` or `delay_id`"
E7V_MEMBER_MISMATCH = "The request body `member_id` and `member.id` differ"
