"""OpenID userinfo over federation: which Matrix user does this token belong to?

protocol.md §9.1. The homeserver named in the request is asked, over federation,
whom the OpenID access token belongs to; the answer is only believed for users of that
very server (a homeserver can never vouch for another server's users). Every failure
is an :class:`OpenIDError` whose ``step`` says where it failed; callers turn all of
them into the same 401 and log the step and detail. The access token is part of the
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
from rtcauthd.outbound.client import BodyTooLarge, HTTPClient, HTTPResponse, OutboundError, RequestTimedOut
from rtcauthd.matrix.federation_agent import AddressRefusedError, ConnectFailed, TLSFailed
from rtcauthd.matrix.resolver import ResolveError
from rtcauthd.matrix.servername import InvalidServerName, parse_server_name

log = Logger()

USERINFO_PATH = "/_matrix/federation/v1/openid/userinfo"
USERINFO_MAX_BODY = 64 * 1024
#: How much of an error body goes into the failure detail.
ERROR_SNIPPET_LENGTH = 200
#: Tokens at least this long are blanked out of failure details (belt and braces).
MIN_SCRUB_LENGTH = 6


class OpenIDError(OutboundError):
    """The userinfo lookup failed at ``step`` ("server name", "resolve", "connect",
    "tls", "timeout", "status 401", "bad json", "sub mismatch", ...)."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(FailureKind.OTHER, step, detail)


class FederationClient:
    """Looks up OpenID userinfo through an HTTPClient wrapping the FederationAgent."""

    def __init__(self, *, http: HTTPClient) -> None:
        self._http = http

    def userinfo(self, server_name: str, access_token: str) -> "Deferred[str]":
        """The user ID the homeserver vouches for, or an OpenIDError."""
        try:
            parse_server_name(server_name)
        except InvalidServerName as e:
            return fail(OpenIDError("server name", e.reason))
        if not isinstance(access_token, str):
            return fail(OpenIDError("request", "access token is not a string"))
        # url.Values.Encode: space -> '+', all but A-Z a-z 0-9 - _ . ~ percent-encoded.
        query = urlencode({"access_token": access_token})
        url = f"matrix-federation://{server_name}{USERINFO_PATH}?{query}".encode("ascii")
        log.debug("OpenID userinfo lookup on {server_name}{path}", server_name=server_name, path=USERINFO_PATH)
        d = self._http.request(b"GET", url, max_body=USERINFO_MAX_BODY, step="userinfo")

        def scrub(failure: Failure) -> Failure:
            error = failure.value
            if not isinstance(error, OpenIDError):
                error = _as_openid_error(failure)
            detail = error.detail
            for secret in (access_token, query.partition("=")[2]):
                if len(secret) >= MIN_SCRUB_LENGTH:
                    detail = detail.replace(secret, "<redacted>")
            raise OpenIDError(error.step, detail) from None

        d.addCallback(_check_answer, server_name)
        d.addErrback(scrub)
        return d


def _as_openid_error(failure: Failure) -> OpenIDError:
    error = failure.value
    detail = error.detail if isinstance(error, OutboundError) else f"{type(error).__name__}: {error}"
    if isinstance(error, RequestTimedOut):
        return OpenIDError("timeout", detail)
    if isinstance(error, BodyTooLarge):
        return OpenIDError("body too large", detail)
    if isinstance(error, ResolveError):
        step = "server name" if error.step.endswith("server name") else "resolve"
        return OpenIDError(step, detail)
    if isinstance(error, (AddressRefusedError, ConnectFailed)):
        return OpenIDError("connect", detail)
    if isinstance(error, TLSFailed):
        return OpenIDError("tls", detail)
    if isinstance(error, OutboundError):
        return OpenIDError("request", detail)
    log.failure("Unexpected userinfo failure", failure)
    return OpenIDError("internal", detail)


def _check_answer(response: HTTPResponse, server_name: str) -> str:
    if not 200 <= response.code < 300:
        raise OpenIDError(f"status {response.code}", error_snippet(response.body))
    try:
        document = json.loads(response.body.decode("utf-8"), parse_constant=reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise OpenIDError("bad json", f"userinfo body is not JSON: {e}") from None
    if not isinstance(document, dict):
        raise OpenIDError("bad json", "userinfo body is not a JSON object")
    sub = document.get("sub")
    if not isinstance(sub, str):
        raise OpenIDError("bad json", "userinfo has no string 'sub'")
    _localpart, colon, domain = sub.partition(":")
    if not colon or domain != server_name:
        raise OpenIDError(
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

