"""Reading HTTP answers and wording failures, as every check of ``rtcauth doctor`` does.

The JSON reading and the error snippet are the daemon's own (so the doctor judges an
answer as the service would); advice for a failed connection is chosen by the error's
:class:`~rtcauthd.outbound.errors.FailureKind`, never by its text.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from rtcauthd.gojson import reject_constant
from rtcauthd.matrix.federation import error_snippet
from rtcauthd.outbound.client import HTTPResponse
from rtcauthd.outbound.errors import FailureKind, OutboundError

#: Sent as ``Origin`` so that CORS answers can be judged as a browser would.
DOCTOR_ORIGIN = "https://rtcauth-doctor.invalid"


def json_of(response: HTTPResponse) -> Any:
    """The body as JSON (NaN/Infinity refused); ValueError if it is not JSON."""
    try:
        return json.loads(response.body.decode("utf-8"), parse_constant=reject_constant)
    except UnicodeDecodeError:
        raise ValueError("body is not UTF-8") from None


def json_object(response: HTTPResponse) -> dict:
    """The body if it is a JSON object, else ``{}``."""
    try:
        document = json_of(response)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


def errcode_of(response: HTTPResponse) -> Optional[str]:
    errcode = json_object(response).get("errcode")
    return errcode if isinstance(errcode, str) else None


def status_text(response: HTTPResponse) -> str:
    """``HTTP 404 (M_NOT_FOUND: ...)``: the status and the start of the answer, if any."""
    if not response.body.strip():
        return f"HTTP {response.code}"
    return f"HTTP {response.code} ({error_snippet(response.body)})"


def transport_fix(error: OutboundError, otherwise: list[str]) -> list[str]:
    """The fix for a failed connection: TLS and DNS problems have their own lines."""
    if error.kind is FailureKind.TLS:
        return ["See the TLS lines below: the certificate must be valid for this host."]
    if error.kind is FailureKind.RESOLVE:
        return ["See the DNS line: the host name has no address."]
    return otherwise


def listing(items, limit: int = 3) -> str:
    items = list(items)
    text = ", ".join(items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")
