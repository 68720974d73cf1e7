"""An application-service deployment on loopback, for ``rtcauth doctor`` tests.

:class:`ASDeployment` extends the correct well-known deployment of :mod:`tests.doctor.fakes`
with what Synapse 1.163 adds in application-service mode — MSC4143 ``/rtc/transports``,
the MSC4512 ``rtc/livekit`` proxy, MSC4502 ``is_joined``, the AS ping, the as_token's
delayed-event rate limit — and with the service's side of it (hs_token, ``url`` check,
membership). The fake homeserver reads the registration file as Synapse does (only the
namespaced keys), so a test breaks a deployment the way an operator does: by writing
the wrong YAML, or by switching a flag off.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

import yaml

from rtcauthd import errors
from tests.doctor.fakes import ACCESS_TOKEN, SERVER, SFU_HOST, USER_ID, Deployment, Homeserver, _error, _json

AS_TOKEN = "as_doctor_0123456789"
HS_TOKEN = "hs_doctor_9876543210"
AS_ID = "rtcauthd"
SENDER = "@_rtcauthd:" + SERVER
PROXY_URL = "http://127.0.0.1:8080"
IS_JOINED_SCOPE = "urn:matrix:client:io.element.msc4502:rooms:is_joined"
RTC_LIVEKIT = re.compile(r"^/_matrix/client/(unstable/[^/]+|v[^/]+)/rtc/livekit(/.*)?$")
IS_JOINED = re.compile(r"^/_matrix/client/unstable/io\.element\.msc4502/rooms/[^/]+/is_joined$")
PING = re.compile(r"^/_matrix/client/v1/appservice/([^/]+)/ping$")
#: Synapse's default rc_delayed_event_mgmt burst.
DELAYED_EVENT_BURST = 5


def registration_yaml(**changes) -> str:
    """The registration an operator writes for Synapse 1.163; ``None`` values drop a key."""
    document = {
        "id": AS_ID,
        "url": None,
        "as_token": AS_TOKEN,
        "hs_token": HS_TOKEN,
        "sender_localpart": "_rtcauthd",
        "rate_limited": False,
        "namespaces": {"users": [{"exclusive": False, "regex": "@.*:" + re.escape(SERVER)}]},
        "io.element.msc4502.scopes": [IS_JOINED_SCOPE],
        "io.element.msc4512.proxy_prefix": "rtc/livekit",
        "io.element.msc4512.proxy_url": PROXY_URL,
    }
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            document.pop(key, None)
        else:
            document[key] = value
    return yaml.safe_dump(document, sort_keys=False)


class ASService:
    """The service's application-service routes as Synapse's proxy reaches them (in-process)."""

    def __init__(self, deployment: "ASDeployment") -> None:
        self.d = deployment
        self.as_mode = True
        self.hs_token = HS_TOKEN
        self.as_token = AS_TOKEN
        self.livekit_url = f"wss://{SFU_HOST}"
        self.calls: list[tuple[str, Optional[str]]] = []

    def get_token(self, authorization: Optional[str], user: str, body: dict):
        """``(status, JSON object or raw bytes)`` as rtcauthd answers a proxied get_token."""
        self.calls.append(("get_token", user))
        if not self.as_mode:
            return 404, b"404 page not found\n"
        if authorization != "Bearer " + self.hs_token:
            return 401, {"errcode": "M_UNKNOWN_TOKEN", "error": errors.E7_HS_WRONG}
        if body.get("url") != self.livekit_url:
            return 400, {"errcode": "M_INVALID_PARAM", "error": errors.E7_URL}
        code, _answer = self.d.homeserver.is_joined_answer("Bearer " + self.as_token)
        if code != 200:
            return 502, {"errcode": "M_UNKNOWN", "error": errors.E7_MEMBERSHIP}
        return 403, {"errcode": "M_FORBIDDEN", "error": errors.E7_NOT_MEMBER}

    def ping(self, authorization: Optional[str]):
        self.calls.append(("ping", None))
        if not self.as_mode:
            return 404, b"404 page not found\n"
        if authorization != "Bearer " + self.hs_token:
            return 401, {"errcode": "M_UNKNOWN_TOKEN", "error": errors.E7_HS_WRONG}
        return 200, {}


class ASHomeserver(Homeserver):
    """The fake homeserver with Synapse's application-service features (all on by default)."""

    def __init__(self, deployment: "ASDeployment") -> None:
        super().__init__(deployment)
        self.msc4512 = True
        self.msc4502 = True
        self.msc4143 = True
        self.transports_document: Optional[dict] = None  # e.g. {} when none is configured
        self.proxy_reachable = True
        self.registration: dict = {}
        self.as_delayed_event_calls = 0

    def load_registration(self, text: str) -> None:
        """Read a registration as Synapse 1.163 does: the namespaced keys only."""
        self.registration = yaml.safe_load(text)

    def _reg(self, key: str):
        return self.registration.get(key)

    def _as(self, request_or_header) -> bool:
        header = request_or_header if isinstance(request_or_header, (str, type(None))) else (
            (request_or_header.getHeader(b"authorization") or b"").decode("ascii"))
        return bool(self._reg("as_token")) and header == "Bearer " + self._reg("as_token")

    def is_joined_answer(self, authorization: Optional[str]):
        if not self.msc4502:
            return 404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}
        if not self._as(authorization):
            return 403, {"errcode": "M_FORBIDDEN", "error": "Missing scope"}
        if IS_JOINED_SCOPE not in (self._reg("io.element.msc4502.scopes") or []):
            return 403, {"errcode": "M_FORBIDDEN", "error": f"Missing {IS_JOINED_SCOPE} scope"}
        return 200, {"joined": False}

    def route(self, request, method, path):
        if method == "GET" and path == "/_matrix/client/versions":
            features = {"org.matrix.msc4140": self.msc4140, "io.element.msc4502": self.msc4502,
                        "org.matrix.msc4143": self.msc4143}
            return lambda r: _json(r, 200, {"versions": ["v1.11"], "unstable_features": features})
        if method == "GET" and path == "/_matrix/client/v3/account/whoami" and self._as(request):
            return lambda r: _json(r, 200, {"user_id": SENDER})
        if path == "/_matrix/client/unstable/org.matrix.msc4143/rtc/transports" and method == "GET":
            return self._as_transports if self.msc4143 else None
        if RTC_LIVEKIT.match(path) and method in ("GET", "POST", "PUT", "DELETE"):
            claimed = self._reg("io.element.msc4512.proxy_prefix") and self._reg("io.element.msc4512.proxy_url")
            return self._proxy if self.msc4512 and claimed else None
        if method == "GET" and IS_JOINED.match(path):
            return lambda r: _json(r, *self.is_joined_answer((r.getHeader(b"authorization") or b"").decode()))
        if method == "POST" and PING.match(path):
            return self._ping
        if method == "POST" and path.startswith("/_matrix/client/unstable/org.matrix.msc4140/delayed_events/") \
                and self._as(request):
            return self._as_delayed_event
        return super().route(request, method, path)

    def _as_transports(self, request):
        if not (self._authorised(request) or self._as(request)):
            return _error(request, 401, "M_MISSING_TOKEN", "Missing access token.")
        if self.transports_document is not None:
            return _json(request, 200, self.transports_document)
        return _json(request, 200, {"rtc_transports": self.transports or []} if self.transports else {})

    def _proxy(self, request):
        if self._authorised(request):
            user = USER_ID
        elif self._as(request):
            user = SENDER
        elif request.getHeader(b"authorization"):
            return _error(request, 401, "M_UNKNOWN_TOKEN", "Invalid access token passed.")
        else:
            return _error(request, 401, "M_MISSING_TOKEN", "Missing access token")
        if not self.proxy_reachable:
            return _error(request, 500, "M_UNKNOWN", "Internal server error")
        body = json.loads(request.content.read() or b"{}")
        code, answer = self.d.as_service.get_token("Bearer " + str(self._reg("hs_token")), user, body)
        if isinstance(answer, bytes):
            request.setResponseCode(code)
            return answer
        return _json(request, code, answer)

    def _ping(self, request):
        if not self._as(request):
            return _error(request, 401, "M_UNKNOWN_TOKEN", "Invalid access token passed.")
        if PING.match(request.path.decode()).group(1) != self._reg("id"):
            return _error(request, 403, "M_FORBIDDEN", "Mismatching application service ID in path")
        if not self._reg("url"):
            return _error(request, 400, "M_URL_NOT_SET", "Application service URL is not set")
        code, answer = self.d.as_service.ping("Bearer " + str(self._reg("hs_token")))
        if code != 200:
            body = answer.decode() if isinstance(answer, bytes) else json.dumps(answer)
            return _json(request, 502, {"errcode": "M_BAD_STATUS", "error": "Ping returned error response",
                                        "status": code, "body": body})
        return _json(request, 200, {"duration_ms": 3})

    def _as_delayed_event(self, request):
        self.as_delayed_event_calls += 1
        if self._reg("rate_limited") is not False and self.as_delayed_event_calls > DELAYED_EVENT_BURST:
            return _json(request, 429, {"errcode": "M_LIMIT_EXCEEDED", "error": "Too Many Requests",
                                        "retry_after_ms": 1000})
        return _error(request, 404, "M_NOT_FOUND", "Delayed event not found")


class ASDeployment(Deployment):
    """A correct application-service deployment: Synapse and the service share one registration."""

    def __init__(self, *, reactor, ipv6: bool = False) -> None:
        super().__init__(reactor=reactor, ipv6=ipv6)
        self.homeserver = ASHomeserver(self)
        self.vhosts.addHost(b"matrix." + SERVER.encode("ascii"), self.homeserver)
        self.as_service = ASService(self)
        self.registration_path = os.path.join(self.tmp, "registration.yaml")
        self.write_registration()

    def write_registration(self, *, synapse_too: bool = True, **changes) -> None:
        """The service's registration file; Synapse loads the same text unless told otherwise."""
        text = registration_yaml(**changes)
        with open(self.registration_path, "w") as f:
            f.write(text)
        if synapse_too:
            self.homeserver.load_registration(text)

    def start(self) -> None:
        super().start()
        self.homeserver.transports = [
            {"type": "livekit", "url": f"wss://{SFU_HOST}", "livekit_service_url": self.service_url}
        ]

    def as_env_file(self, **overrides: str) -> str:
        """The service's env file in application-service mode (tokens from the registration)."""
        settings = {"LIVEKIT_AS_REGISTRATION_FILE": self.registration_path, "LIVEKIT_HS_SERVER_NAME": SERVER}
        settings.update(overrides)
        return self.env_file(**settings)


__all__ = ["ACCESS_TOKEN", "AS_TOKEN", "ASDeployment", "HS_TOKEN", "SENDER", "registration_yaml"]
