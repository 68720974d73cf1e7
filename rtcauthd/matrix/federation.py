"""OpenID userinfo over federation: which Matrix user does this token belong to?

docs/federation.md#userinfo. The homeserver named in the request is asked, over federation,
whom the OpenID access token belongs to; the answer is only believed for users of that
very server (a homeserver can never vouch for another server's users). Every failure
is an :class:`OutboundError` whose ``step`` says where it failed ("server name",
"resolve", "connect", "tls", "timeout", "body too large", "status 401", "bad json",
"sub mismatch", "request"); callers turn all of them into the same 401 and log the step
and detail. The access token is part of the
URL, so neither the URL nor the token ever appears in a message or log line.
"""

from __future__ import annotations

import json
from urllib.parse import urlencode

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from rtcauthd.gojson import reject_constant
from rtcauthd.outbound.errors import FailureKind
from rtcauthd.outbound.client import HTTPClient, HTTPResponse, OutboundError
from rtcauthd.matrix.servername import InvalidServerName, parse_server_name

log = Logger()

USERINFO_PATH = "/_matrix/federation/v1/openid/userinfo"
USERINFO_MAX_BODY = 64 * 1024
#: How much of an error body goes into the failure detail.
ERROR_SNIPPET_LENGTH = 200
#: Tokens at least this long are blanked out of failure details (belt and braces).
MIN_SCRUB_LENGTH = 6


#: The step a userinfo failure is logged (and counted) under, by the kind of outbound failure.
_USERINFO_STEPS = {
    FailureKind.INVALID: "server name",
    FailureKind.RESOLVE: "resolve",
    FailureKind.REFUSED: "connect",
    FailureKind.CONNECT: "connect",
    FailureKind.TLS: "tls",
    FailureKind.TIMEOUT: "timeout",
    FailureKind.TOO_LARGE: "body too large",
}


class FederationClient:
    """Looks up OpenID userinfo through an HTTPClient wrapping the FederationAgent."""

    def __init__(self, *, http: HTTPClient) -> None:
        self._http = http

    def userinfo(self, server_name: str, access_token: str) -> "Deferred[str]":
        """The user ID the homeserver vouches for, or an OutboundError (see the module docstring)."""
        try:
            parse_server_name(server_name)
        except InvalidServerName as e:
            return fail(OutboundError(FailureKind.INVALID, "server name", e.reason))
        if not isinstance(access_token, str):
            return fail(OutboundError(FailureKind.INVALID, "request", "access token is not a string"))
        # url.Values.Encode: space -> '+', all but A-Z a-z 0-9 - _ . ~ percent-encoded.
        query = urlencode({"access_token": access_token})
        url = f"matrix-federation://{server_name}{USERINFO_PATH}?{query}".encode("ascii")
        log.debug("OpenID userinfo lookup on {server_name}{path}", server_name=server_name, path=USERINFO_PATH)
        d = self._http.request(b"GET", url, max_body=USERINFO_MAX_BODY, step="userinfo")

        def transport_failed(failure: Failure) -> Failure:
            raise _userinfo_error(failure)

        def scrub(failure: Failure) -> Failure:
            error = failure.value
            if not isinstance(error, OutboundError):  # a bug in the answer check
                error = _userinfo_error(failure)
            detail = error.detail
            for secret in (access_token, query.partition("=")[2]):
                if len(secret) >= MIN_SCRUB_LENGTH:
                    detail = detail.replace(secret, "<redacted>")
            raise OutboundError(error.kind, error.step, detail, status=error.status, code=error.code) from None

        d.addErrback(transport_failed)
        d.addCallback(_check_answer, server_name)
        d.addErrback(scrub)
        return d


def _userinfo_error(failure: Failure) -> OutboundError:
    """The transport's failure, under the userinfo step its kind stands for."""
    error = failure.value
    if not isinstance(error, OutboundError):
        log.failure("Unexpected userinfo failure", failure)
        return OutboundError(FailureKind.OTHER, "internal", f"{type(error).__name__}: {error}")
    step = _USERINFO_STEPS.get(error.kind, "request")
    return OutboundError(error.kind, step, error.detail, status=error.status, code=error.code)


def _check_answer(response: HTTPResponse, server_name: str) -> str:
    if not 200 <= response.code < 300:
        raise OutboundError(
            FailureKind.HTTP_STATUS, f"status {response.code}", error_snippet(response.body), status=response.code
        )
    try:
        document = json.loads(response.body.decode("utf-8"), parse_constant=reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise OutboundError(FailureKind.BAD_BODY, "bad json", f"userinfo body is not JSON: {e}") from None
    if not isinstance(document, dict):
        raise OutboundError(FailureKind.BAD_BODY, "bad json", "userinfo body is not a JSON object")
    sub = document.get("sub")
    if not isinstance(sub, str):
        raise OutboundError(FailureKind.BAD_BODY, "bad json", "userinfo has no string 'sub'")
    _localpart, colon, domain = sub.partition(":")
    if not colon or domain != server_name:
        raise OutboundError(
            FailureKind.BAD_BODY,
            "sub mismatch", f"homeserver {server_name!r} answered for {sub!r}, not one of its users"
        )
    return sub


def error_snippet(body: bytes) -> str:
    """errcode/error of a Matrix error body, else the start of the body."""
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        document = None
    if isinstance(document, dict) and isinstance(document.get("errcode"), str):
        message = document.get("error")
        text = document["errcode"] + (f": {message}" if isinstance(message, str) else "")
    else:
        text = body.decode("utf-8", "replace")
    text = " ".join(text.split())
    if len(text) > ERROR_SNIPPET_LENGTH:
        text = text[:ERROR_SNIPPET_LENGTH] + "..."
    return text or "(empty body)"

