"""The homeserver calls of application-service mode (docs/appservice.md#homeserver-calls).

Only ever made to the configured homeserver (``LIVEKIT_HS_SERVER_NAME``'s client-server
API), because they carry the as_token: ``/versions`` (feature detection, unauthenticated,
cached per base URL), MSC4502 ``is_joined``, the MSC4512 ``fed_proxy`` relay and the
membership sweep's ``joined_members`` (docs/membership.md#homeserver-requests). Every
failure is an :class:`OutboundError`; the as_token goes only into the Authorization header,
never into a URL, a log line or an error text.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional
from urllib.parse import quote, urlencode

import attr
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from rtcauthd.gojson import reject_constant
from rtcauthd.outbound.client import HTTPClient
from rtcauthd.outbound.errors import FailureKind, OutboundError

log = Logger()

VERSIONS_CACHE_SECONDS = 3600.0
VERSIONS_TIMEOUT = 10.0
IS_JOINED_TIMEOUT = 10.0
FED_PROXY_TIMEOUT = 30.0
JOINED_MEMBERS_TIMEOUT = 30.0
MAX_BODY = 64 * 1024
#: A joined_members answer lists every member with name and avatar: ~150 bytes each.
JOINED_MEMBERS_MAX_BODY = 16 * 1024 * 1024

MSC4502 = "io.element.msc4502"
MSC4502_STABLE = "io.element.msc4502.stable"
MSC4512_STABLE = "io.element.msc4512.stable"
IS_JOINED_PREFIX_STABLE = "/_matrix/client/v3"
IS_JOINED_PREFIX_UNSTABLE = "/_matrix/client/unstable/io.element.msc4502"
FED_PROXY_PATH_UNSTABLE = "/_matrix/client/unstable/io.element.msc4512/appservice/fed_proxy"
FED_PROXY_PATH_STABLE = "/_matrix/client/v1/appservice/fed_proxy"

#: Keeps room IDs' ``!`` and ``:`` raw (as upstream sends them) and escapes ``/ ? # %`` and the rest.
_SEGMENT_SAFE = "!$&'()*+,;=:@"


def path_segment(value: str) -> str:
    """``value`` as exactly one path segment (dot segments escaped too)."""
    segment = quote(value, safe=_SEGMENT_SAFE)
    if segment in (".", ".."):
        segment = segment.replace(".", "%2E")
    return segment


def _json(body: bytes, step: str) -> Any:
    try:
        return json.loads(body.decode("utf-8"), parse_constant=reject_constant)
    except (ValueError, UnicodeDecodeError):
        raise OutboundError(FailureKind.BAD_BODY, step, "answer is not JSON") from None


def _errcode(body: bytes) -> Optional[str]:
    try:
        document = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    code = document.get("errcode") if isinstance(document, dict) else None
    return code if isinstance(code, str) else None


def _status_error(step: str, code: int, body: bytes) -> OutboundError:
    errcode = _errcode(body)
    detail = f"HTTP {code}" + (f" {errcode}" if errcode else "")
    return OutboundError(FailureKind.HTTP_STATUS, step, detail, status=code, code=errcode)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class FedProxyAnswer:
    """What the remote server answered through ``fed_proxy``: its status and JSON (or None)."""

    status: int
    content: Any


class HomeserverAppservice:
    """The as_token calls to our own homeserver; ``http`` must not follow redirects (the
    Authorization header would travel with them) and verifies TLS."""

    def __init__(
        self,
        *,
        clock: IReactorTime,
        http: HTTPClient,
        as_token: str,
        versions_cache_seconds: float = VERSIONS_CACHE_SECONDS,
    ) -> None:
        self._clock = clock
        self._http = http
        self._as_token = as_token
        self._cache_seconds = versions_cache_seconds
        self._versions: dict[str, tuple[Mapping[str, Any], float]] = {}

    def __repr__(self) -> str:
        return "HomeserverAppservice(as_token=<redacted>)"

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._as_token}", "Accept": "application/json"}

    async def unstable_features(self, base_url: str) -> Mapping[str, Any]:
        """``unstable_features`` of ``GET /_matrix/client/versions`` (only answers that parse are cached)."""
        cached = self._versions.get(base_url)
        if cached is not None:
            features, expires = cached
            if self._clock.seconds() < expires:
                return features
            del self._versions[base_url]
        step = "homeserver versions"
        document = await self._get_object(
            base_url.rstrip("/") + "/_matrix/client/versions",
            step,
            VERSIONS_TIMEOUT,
            MAX_BODY,
            headers={"Accept": "application/json"},  # public: no as_token
        )
        features = document.get("unstable_features")
        if features is None:
            features = {}
        if not isinstance(features, dict):
            raise OutboundError(FailureKind.BAD_BODY, step, "unstable_features is not an object")
        self._versions[base_url] = (features, self._clock.seconds() + self._cache_seconds)
        return features

    async def _is_joined_prefix(self, base_url: str) -> str:
        features = await self.unstable_features(base_url)
        if features.get(MSC4502_STABLE) is True:
            return IS_JOINED_PREFIX_STABLE
        if features.get(MSC4502) is True:
            return IS_JOINED_PREFIX_UNSTABLE
        raise OutboundError(
            FailureKind.BAD_BODY, "is_joined", "homeserver does not support is_joined (MSC4502)"
        )

    async def _get_object(
        self, url: str, step: str, timeout: float, max_body: int, *, headers: Optional[dict] = None
    ) -> dict:
        """A GET (with the as_token unless ``headers`` are given) whose 2xx answer must be a JSON object."""
        response = await self._http.request(
            b"GET", url, headers=self._auth() if headers is None else headers, timeout=timeout, max_body=max_body,
            step=step,
        )
        if not 200 <= response.code < 300:
            raise _status_error(step, response.code, response.body)
        document = _json(response.body, step)
        if not isinstance(document, dict):
            raise OutboundError(FailureKind.BAD_BODY, step, "answer is not a JSON object")
        return document

    async def is_joined(
        self, base_url: str, room_id: str, *, mxid: Optional[str] = None, server_name: Optional[str] = None
    ) -> bool:
        """MSC4502: is the user ``mxid`` (or the server ``server_name``) joined to ``room_id``?"""
        if (mxid is None) == (server_name is None):
            raise ValueError("exactly one of mxid and server_name")
        prefix = await self._is_joined_prefix(base_url)
        query = urlencode({"mxid": mxid} if mxid is not None else {"server_name": server_name})
        url = f"{base_url.rstrip('/')}{prefix}/rooms/{path_segment(room_id)}/is_joined?{query}"
        step = "is_joined"
        document = await self._get_object(url, step, IS_JOINED_TIMEOUT, MAX_BODY)
        joined = document.get("joined", False)
        if not isinstance(joined, bool):
            raise OutboundError(FailureKind.BAD_BODY, step, "joined is not a boolean")
        return joined

    async def joined_members(self, base_url: str, room_id: str) -> frozenset:
        """The user IDs joined to ``room_id`` as the homeserver sees them (no masquerading).

        Fails with OutboundError; ``status`` 403 is Synapse's "no namespace user in the room".
        """
        url = f"{base_url.rstrip('/')}/_matrix/client/v3/rooms/{path_segment(room_id)}/joined_members"
        step = "joined_members"
        document = await self._get_object(url, step, JOINED_MEMBERS_TIMEOUT, JOINED_MEMBERS_MAX_BODY)
        joined = document.get("joined")
        if not isinstance(joined, dict):
            raise OutboundError(FailureKind.BAD_BODY, step, "answer has no joined object")
        return frozenset(joined)

    async def fed_proxy(self, base_url: str, destination: str, path: str, body: Mapping[str, Any]) -> FedProxyAnswer:
        """MSC4512: ``POST path`` with ``body`` on ``destination``, sent by our homeserver.

        Fails when the homeserver itself refuses or cannot deliver (any non-2xx of its own);
        a remote answer of any status is returned as :class:`FedProxyAnswer`.
        """
        features = await self.unstable_features(base_url)
        proxy = FED_PROXY_PATH_STABLE if features.get(MSC4512_STABLE) is True else FED_PROXY_PATH_UNSTABLE
        payload = json.dumps(
            {"destination": destination, "method": "POST", "path": path, "body": dict(body)},
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode("utf-8")
        headers = self._auth()
        headers["Content-Type"] = "application/json"
        step = "fed_proxy"
        response = await self._http.request(
            b"POST",
            base_url.rstrip("/") + proxy,
            headers=headers,
            body=payload,
            timeout=FED_PROXY_TIMEOUT,
            max_body=MAX_BODY,
            step=step,
        )
        if not 200 <= response.code < 300:
            raise _status_error(step, response.code, response.body)
        document = _json(response.body, step)
        status = document.get("status") if isinstance(document, dict) else None
        if type(status) is not int:
            raise OutboundError(FailureKind.BAD_BODY, step, "answer has no integer status")
        return FedProxyAnswer(status=status, content=document.get("content"))
