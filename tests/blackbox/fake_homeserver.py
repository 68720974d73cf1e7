"""A Matrix homeserver fake for black-box tests, served over TLS on loopback.

It answers the federation OpenID userinfo endpoint from a token table and records every
request it gets (and every TCP connection, so a test can tell "refused before connecting"
from "TLS failed before any request").  The same listener also plays the user's
client-server API for delegated leave: ``/.well-known/matrix/client`` (when told what to
publish) and the MSC4140 management endpoints ``…/delayed_events/<id>/<action>`` (under
any path prefix), which behave like Synapse 1.163 (docs/delegated-leave.md#msc4140): no access token
needed, 200 ``{}`` while the delayed event is scheduled, 404 once it was sent or
cancelled or if it never existed; answers can be scripted per delay ID (e.g. a 429 with
``Retry-After``).

For application-service mode (docs/appservice.md#homeserver-calls) it also plays the
homeserver behind the AS: ``/_matrix/client/versions`` (``unstable_features`` set by the
test), MSC4502 ``is_joined`` (stable and unstable forms, from membership tables),
MSC4512 ``fed_proxy`` (the remote server's answer scripted by the test), ``joined_members``
(from the same tables; 403 like Synapse for rooms it was told it left), the MSC4140
single-event look-up and the stable management paths; every such call is recorded with
the bearer token and ``user_id`` it carried.
"""

from __future__ import annotations

import json
import re
from typing import Callable, Optional, Sequence
from urllib.parse import parse_qs, unquote

import attr
from twisted.internet import ssl
from twisted.logger import Logger
from twisted.web import resource, server

from tests.blackbox.harness import FakeServer
from tests.support.certs import CertPair, TestCA

log = Logger()

USERINFO_PATH = "/_matrix/federation/v1/openid/userinfo"

#: What Synapse answers for an unknown / expired OpenID token, and for none at all.
SYNAPSE_UNKNOWN_TOKEN = (401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Access Token unknown or expired"})
SYNAPSE_MISSING_TOKEN = (401, {"errcode": "M_MISSING_TOKEN", "error": "Access Token required"})
UNRECOGNIZED = {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}

WELL_KNOWN_CLIENT_PATH = "/.well-known/matrix/client"
#: MSC4140 unstable management form (docs/delegated-leave.md#management-endpoints), after an optional base-URL prefix.
DELAYED_EVENTS_RE = (
    r"(?P<prefix>(?:/[^/]+)*?)/_matrix/client/unstable/org\.matrix\.msc4140/delayed_events/"
    r"(?P<segment>[^/]*)/(?P<action>[^/]*)"
)
#: MSC4140 stable management form (``/_matrix/client/v1/delayed_events/<id>/<action>``).
STABLE_DELAYED_EVENTS_RE = (
    r"(?P<prefix>(?:/[^/]+)*?)/_matrix/client/v1/delayed_events/(?P<segment>[^/]*)/(?P<action>[^/]*)"
)
#: MSC4140 single delayed event (the look-up), both forms.
DELAYED_EVENT_LOOKUP_RE = (
    r"(?P<prefix>(?:/[^/]+)*?)/_matrix/client/(?P<form>unstable/org\.matrix\.msc4140|v1)/delayed_events/"
    r"(?P<segment>[^/]*)"
)
VERSIONS_PATH = "/_matrix/client/versions"
IS_JOINED_RE = (
    r"/_matrix/client/(?P<form>v3|unstable/io\.element\.msc4502)/rooms/(?P<room>[^/]*)/is_joined"
)
JOINED_MEMBERS_RE = r"/_matrix/client/v3/rooms/(?P<room>[^/]*)/joined_members"
FED_PROXY_RE = r"/_matrix/client/(?P<form>unstable/io\.element\.msc4512|v1)/appservice/fed_proxy"
#: What Synapse answers an application service that is not registered (wrong as_token).
SYNAPSE_UNKNOWN_AS_TOKEN = (401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Unrecognised access token"})
#: What Synapse answers for an unknown or already processed delay ID.
SYNAPSE_DELAYED_EVENT_NOT_FOUND = (404, {"errcode": "M_NOT_FOUND", "error": "Delayed event not found"})


@attr.s(auto_attribs=True, frozen=True)
class RecordedRequest:
    """What the homeserver saw.  ``query`` has ``access_token`` taken out (it is kept
    apart in ``access_token``) so that assertions on the rest stay readable."""

    method: str
    path: str
    query: dict
    access_token: Optional[str]
    host: Optional[str]
    headers: dict
    body: bytes
    peer_host: str


@attr.s(auto_attribs=True, frozen=True)
class Answer:
    """A canned HTTP response (``headers``: extra ``(name, value)`` pairs)."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple = ()

    @classmethod
    def json(cls, status: int, obj, headers: Sequence[tuple[str, str]] = ()) -> "Answer":
        return cls(status, json.dumps(obj).encode("utf-8"), headers=tuple(headers))

    @classmethod
    def rate_limited(cls, retry_after_seconds: Optional[int] = None, retry_after_ms: Optional[int] = None) -> "Answer":
        """Synapse's 429 ``M_LIMIT_EXCEEDED`` (with ``Retry-After`` and/or ``retry_after_ms``)."""
        body = {"errcode": "M_LIMIT_EXCEEDED", "error": "Too Many Requests"}
        if retry_after_ms is not None:
            body["retry_after_ms"] = retry_after_ms
        headers = [("Retry-After", str(retry_after_seconds))] if retry_after_seconds is not None else []
        return cls.json(429, body, headers)


@attr.s(auto_attribs=True, frozen=True)
class DelayedEventCall:
    """One call to a delayed-event management endpoint.

    ``delay_id`` is the percent-decoded path segment, ``segment`` the raw one, ``prefix``
    the path before ``/_matrix`` (a base-URL path prefix), ``at`` the fake's clock.
    """

    delay_id: str
    segment: str
    action: str
    prefix: str
    at: float
    status: int
    request: RecordedRequest
    #: "unstable" or "stable" (``/_matrix/client/v1/delayed_events``)
    form: str = "unstable"

    @property
    def bearer(self) -> Optional[str]:
        return _bearer(self.request)

    @property
    def user_id(self) -> Optional[list]:
        return self.request.query.get("user_id")


def _bearer(recorded: RecordedRequest) -> Optional[str]:
    values = recorded.headers.get("authorization") or []
    if len(values) == 1 and values[0].startswith("Bearer "):
        return values[0][len("Bearer "):]
    return None


@attr.s(auto_attribs=True, frozen=True)
class AppserviceCall:
    """One as_token call: ``kind`` is "is_joined", "fed_proxy" or "lookup"; ``form`` the path form."""

    kind: str
    form: str
    status: int
    request: RecordedRequest
    #: is_joined: the room ID from the path; lookup: the delay ID
    subject: str = ""
    #: reactor time of the call (joined_members only; spacing checks of the sweep)
    at: float = 0.0

    @property
    def bearer(self) -> Optional[str]:
        return _bearer(self.request)


@attr.s(auto_attribs=True)
class DelayedEventInfo:
    """What the homeserver knows of one scheduled delayed event (for the look-up)."""

    room_id: str = "!room:example.com"
    user_id: Optional[str] = None
    delay_ms: int = 3_600_000


#: Life cycle of a delayed event on the fake (what Synapse would know about it).
SCHEDULED, SENT, CANCELLED = "scheduled", "sent", "cancelled"


#: A route handler gets the request, the path regex match and the recorded request.
Handler = Callable[[server.Request, "re.Match[str]", RecordedRequest], Answer]


class _Root(resource.Resource):
    isLeaf = True

    def __init__(self, fake: "FakeHomeserver") -> None:
        super().__init__()
        self._fake = fake

    def render(self, request):
        return self._fake._render(request)


class FakeHomeserver(FakeServer):
    """Userinfo from ``tokens`` ({access token: user id}); behaviour switches below."""

    def __init__(self, *, reactor=None) -> None:
        super().__init__(_Root(self), reactor=reactor)
        self.tokens: dict[str, str] = {}
        self.requests: list[RecordedRequest] = []
        self._routes: list[tuple[str, "re.Pattern[str]", Handler]] = []
        self._latency = 0.0
        self._hang = False
        self._userinfo_answer: Optional[Answer] = None
        self.add_route("GET", re.escape(USERINFO_PATH), self._userinfo)
        #: delay ID → SCHEDULED / SENT / CANCELLED; unknown IDs get 404 like Synapse.
        self.delayed_events: dict[str, str] = {}
        self._delayed_scripts: dict[str, list[Answer]] = {}
        self.delayed_event_calls: list[DelayedEventCall] = []
        self._well_known_client: Optional[Answer] = None
        self.add_route("GET", re.escape(WELL_KNOWN_CLIENT_PATH), self._well_known)
        self.add_route("POST", DELAYED_EVENTS_RE, self._delayed_event)
        self.add_route("POST", STABLE_DELAYED_EVENTS_RE, self._stable_delayed_event)
        # -- application-service mode
        #: ``unstable_features`` of /versions; None: /versions answers 404.
        self.unstable_features: Optional[dict] = {"io.element.msc4502": True}
        #: the as_token the homeserver accepts on is_joined / fed_proxy / look-up (None: any)
        self.as_token: Optional[str] = None
        #: room ID → joined user IDs / joined server names
        self.joined_users: dict[str, set] = {}
        self.joined_servers: dict[str, set] = {}
        self.delayed_event_info: dict[str, DelayedEventInfo] = {}
        #: the fed_proxy answer: (HTTP status, JSON) of the homeserver itself
        self.fed_proxy_answer: Answer = Answer.json(200, {"status": 404, "content": UNRECOGNIZED})
        self.appservice_calls: list[AppserviceCall] = []
        #: when set, every delayed-event look-up gets this answer
        self.lookup_answer: Optional[Answer] = None
        #: rooms whose joined_members Synapse refuses (no namespace user left in them)
        self.left_rooms: set = set()
        #: when set, every joined_members request gets this answer
        self.joined_members_answer: Optional[Answer] = None
        self.add_route("GET", re.escape(VERSIONS_PATH), self._versions)
        self.add_route("GET", IS_JOINED_RE, self._is_joined)
        self.add_route("POST", FED_PROXY_RE, self._fed_proxy)
        self.add_route("GET", JOINED_MEMBERS_RE, self._joined_members)
        self.add_route("GET", DELAYED_EVENT_LOOKUP_RE, self._lookup_delayed_event)

    # -- set-up -------------------------------------------------------------------------

    def listen(
        self,
        *,
        host: str = "127.0.0.1",
        ca: Optional[TestCA] = None,
        cert: Optional[CertPair] = None,
        port: int = 0,
    ) -> str:
        """Serve HTTPS on ``host`` with ``cert`` (or a certificate from ``ca`` for ``host``);
        return the server name (``127.0.0.1:PORT`` / ``[::1]:PORT``)."""
        if cert is None:
            if ca is None:
                raise ValueError("give a CA or a certificate")
            cert = ca.issue([host])
        options = ssl.PrivateCertificate.loadPEM(cert.combined_pem).options()
        self.listen_ssl(host, options, port)
        return self.server_name

    @property
    def server_name(self) -> str:
        return self.hostport

    @property
    def client_api_url(self) -> str:
        """This fake as a client-server API base URL (same TLS listener)."""
        return f"https://{self.hostport}"

    def add_token(self, token: str, user_id: str) -> None:
        self.tokens[token] = user_id

    def add_route(self, method: str, path_regex: str, handler: Handler) -> None:
        """Answer ``method`` on paths fully matching ``path_regex`` with ``handler``."""
        self._routes.append((method, re.compile(path_regex), handler))

    # -- behaviour switches -------------------------------------------------------------

    def answer_slowly(self, seconds: float) -> None:
        """Delay every response by ``seconds``."""
        self._latency = seconds

    def never_answer(self) -> None:
        """Accept requests and never respond (until stop() drops the connections)."""
        self._hang = True

    def answer_userinfo_with(self, status: int, body: "bytes | dict", content_type: str = "application/json") -> None:
        """Answer userinfo with this, whatever the token."""
        if not isinstance(body, bytes):
            body = json.dumps(body).encode("utf-8")
        self._userinfo_answer = Answer(status, body, content_type)

    def answer_normally(self) -> None:
        self._latency = 0.0
        self._hang = False
        self._userinfo_answer = None

    def publish_client_well_known(self, document: "dict | bytes | None", status: int = 200) -> None:
        """Serve ``document`` at ``/.well-known/matrix/client`` (None: 404, the default)."""
        if document is None:
            self._well_known_client = None
        elif isinstance(document, bytes):
            self._well_known_client = Answer(status, document)
        else:
            self._well_known_client = Answer.json(status, document)

    # -- delayed events (MSC4140) -------------------------------------------------------

    def schedule_delayed_event(self, delay_id: str, *, user_id: Optional[str] = None,
                               room_id: str = "!room:example.com", delay_ms: int = 3_600_000) -> None:
        """The client scheduled a delayed event with this ID: restart/send now succeed, and
        the look-up made as ``user_id`` (when given) finds it in ``room_id``."""
        self.delayed_events[delay_id] = SCHEDULED
        if user_id is not None:
            self.delayed_event_info[delay_id] = DelayedEventInfo(room_id=room_id, user_id=user_id, delay_ms=delay_ms)

    def fire_delayed_event(self, delay_id: str) -> None:
        """The homeserver sent the event by itself (timeout): further calls get 404."""
        self.delayed_events[delay_id] = SENT

    def script_delayed_event(self, delay_id: str, *answers: Answer) -> None:
        """Answer the next calls for ``delay_id`` with these, in order, then as usual."""
        self._delayed_scripts.setdefault(delay_id, []).extend(answers)

    def delayed_calls(self, delay_id: Optional[str] = None, action: Optional[str] = None) -> list[DelayedEventCall]:
        return [
            c for c in self.delayed_event_calls
            if (delay_id is None or c.delay_id == delay_id) and (action is None or c.action == action)
        ]

    def restarts(self, delay_id: str) -> list[DelayedEventCall]:
        return self.delayed_calls(delay_id, "restart")

    def sends(self, delay_id: str) -> list[DelayedEventCall]:
        return self.delayed_calls(delay_id, "send")

    # -- application-service mode ---------------------------------------------------------

    def join(self, room_id: str, *members: str) -> None:
        """Users (``@…``) and servers (anything else) joined to ``room_id``."""
        for member in members:
            table = self.joined_users if member.startswith("@") else self.joined_servers
            table.setdefault(room_id, set()).add(member)

    def leave(self, room_id: str, *members: str) -> None:
        """Users or servers no longer joined to ``room_id`` (a leave, kick or ban)."""
        for member in members:
            table = self.joined_users if member.startswith("@") else self.joined_servers
            table.get(room_id, set()).discard(member)

    def answer_fed_proxy(self, status: int, content, *, http_status: int = 200) -> None:
        """The remote answered ``status`` / ``content`` (Synapse wraps it in a 200); with
        another ``http_status`` the homeserver itself fails with ``content`` as its body."""
        if http_status == 200:
            self.fed_proxy_answer = Answer.json(200, {"status": status, "content": content})
        else:
            self.fed_proxy_answer = Answer.json(http_status, content)

    def as_calls(self, kind: Optional[str] = None) -> list[AppserviceCall]:
        return [c for c in self.appservice_calls if kind is None or c.kind == kind]

    @property
    def versions_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == VERSIONS_PATH]

    # -- views --------------------------------------------------------------------------

    @property
    def userinfo_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == USERINFO_PATH]

    # -- serving ------------------------------------------------------------------------

    def _userinfo(self, request, match, recorded: RecordedRequest) -> Answer:
        if self._userinfo_answer is not None:
            return self._userinfo_answer
        if recorded.access_token is None:
            return Answer.json(*SYNAPSE_MISSING_TOKEN)
        user_id = self.tokens.get(recorded.access_token)
        if user_id is None:
            return Answer.json(*SYNAPSE_UNKNOWN_TOKEN)
        return Answer.json(200, {"sub": user_id})

    def _well_known(self, request, match, recorded: RecordedRequest) -> Answer:
        if self._well_known_client is None:
            return Answer.json(404, UNRECOGNIZED)
        return self._well_known_client

    def _as_refusal(self, recorded: RecordedRequest) -> Optional[Answer]:
        if self.as_token is not None and _bearer(recorded) != self.as_token:
            return Answer.json(*SYNAPSE_UNKNOWN_AS_TOKEN)
        return None

    def _versions(self, request, match, recorded: RecordedRequest) -> Answer:
        if self.unstable_features is None:
            return Answer.json(404, UNRECOGNIZED)
        return Answer.json(200, {"versions": ["v1.11", "v1.12"], "unstable_features": self.unstable_features})

    def _is_joined(self, request, match, recorded: RecordedRequest) -> Answer:
        room_id = unquote(match.group("room"))
        form = "stable" if match.group("form") == "v3" else "unstable"
        answer = self._as_refusal(recorded)
        if answer is None:
            mxid = recorded.query.get("mxid")
            server_name = recorded.query.get("server_name")
            if mxid and not server_name:
                joined = mxid[0] in self.joined_users.get(room_id, set())
                answer = Answer.json(200, {"joined": joined})
            elif server_name and not mxid:
                joined = server_name[0] in self.joined_servers.get(room_id, set())
                answer = Answer.json(200, {"joined": joined})
            else:
                answer = Answer.json(400, {"errcode": "M_INVALID_PARAM", "error": "mxid or server_name"})
        self.appservice_calls.append(AppserviceCall("is_joined", form, answer.status, recorded, room_id))
        return answer

    def _joined_members(self, request, match, recorded: RecordedRequest) -> Answer:
        room_id = unquote(match.group("room"))
        answer = self._as_refusal(recorded) or self.joined_members_answer
        if answer is None and room_id in self.left_rooms:
            answer = Answer.json(403, {"errcode": "M_FORBIDDEN", "error": f"User not in room {room_id}"})
        if answer is None:
            joined = {user: {"display_name": None, "avatar_url": None} for user in self.joined_users.get(room_id, ())}
            answer = Answer.json(200, {"joined": joined})
        self.appservice_calls.append(AppserviceCall("joined_members", "v3", answer.status, recorded, room_id,
                                                   self.reactor.seconds()))
        return answer

    def _fed_proxy(self, request, match, recorded: RecordedRequest) -> Answer:
        form = "stable" if match.group("form") == "v1" else "unstable"
        answer = self._as_refusal(recorded) or self.fed_proxy_answer
        self.appservice_calls.append(AppserviceCall("fed_proxy", form, answer.status, recorded))
        return answer

    def _lookup_delayed_event(self, request, match, recorded: RecordedRequest) -> Answer:
        delay_id = unquote(match.group("segment"), errors="replace")
        form = "stable" if match.group("form") == "v1" else "unstable"
        answer = self._as_refusal(recorded) or self.lookup_answer
        if answer is None:
            info = self.delayed_event_info.get(delay_id)
            asked_as = recorded.query.get("user_id", [None])[0]
            if info is None or self.delayed_events.get(delay_id) != SCHEDULED or info.user_id != asked_as:
                answer = Answer.json(*SYNAPSE_DELAYED_EVENT_NOT_FOUND)
            else:
                answer = Answer.json(200, {
                    "delay_id": delay_id, "room_id": info.room_id, "type": "org.matrix.msc3401.call.member",
                    "state_key": f"_{asked_as}_leave", "delay_ms": info.delay_ms,
                    "delayed_since_ts": int(self.reactor.seconds() * 1000), "content": {},
                })
        self.appservice_calls.append(AppserviceCall("lookup", form, answer.status, recorded, delay_id))
        return answer

    def _stable_delayed_event(self, request, match, recorded: RecordedRequest) -> Answer:
        return self._delayed_event(request, match, recorded, form="stable")

    def _delayed_event(self, request, match, recorded: RecordedRequest, form: str = "unstable") -> Answer:
        segment, action = match.group("segment"), match.group("action")
        delay_id = unquote(segment, errors="replace")
        script = self._delayed_scripts.get(delay_id)
        state = self.delayed_events.get(delay_id)
        if script:
            answer = script.pop(0)
        elif action not in ("restart", "send", "cancel"):
            answer = Answer.json(400, {"errcode": "M_INVALID_PARAM", "error": f"Unknown action {action}"})
        elif state != SCHEDULED:
            answer = Answer.json(*SYNAPSE_DELAYED_EVENT_NOT_FOUND)
        else:
            if action == "send":
                self.delayed_events[delay_id] = SENT
            elif action == "cancel":
                self.delayed_events[delay_id] = CANCELLED
            answer = Answer.json(200, {})
        self.delayed_event_calls.append(
            DelayedEventCall(
                delay_id=delay_id,
                segment=segment,
                action=action,
                prefix=match.group("prefix"),
                at=self.reactor.seconds(),
                status=answer.status,
                request=recorded,
                form=form,
            )
        )
        return answer

    def _record(self, request: server.Request) -> RecordedRequest:
        path = request.path.decode("utf-8", "replace")
        query = {
            k: v
            for k, v in parse_qs(
                request.uri.partition(b"?")[2].decode("utf-8", "replace"), keep_blank_values=True
            ).items()
        }
        tokens = query.pop("access_token", None)
        headers: dict[str, list[str]] = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            headers[name.decode("latin-1").lower()] = [v.decode("latin-1") for v in values]
        host = request.getHeader(b"host")
        recorded = RecordedRequest(
            method=request.method.decode("ascii", "replace"),
            path=path,
            query=query,
            access_token=tokens[0] if tokens else None,
            host=host.decode("latin-1") if host is not None else None,
            headers=headers,
            body=request.content.read() if request.content is not None else b"",
            peer_host=request.getClientAddress().host,
        )
        self.requests.append(recorded)
        return recorded

    def _answer_for(self, request, recorded: RecordedRequest) -> Answer:
        path_matched = False
        for method, regex, handler in self._routes:
            match = regex.fullmatch(recorded.path)
            if match is None:
                continue
            path_matched = True
            if method == recorded.method:
                return handler(request, match, recorded)
        return Answer.json(405 if path_matched else 404, UNRECOGNIZED)

    def _render(self, request: server.Request):
        recorded = self._record(request)
        answer = self._answer_for(request, recorded)
        if self._hang:
            return server.NOT_DONE_YET
        if self._latency > 0:
            gone = []
            request.notifyFinish().addErrback(lambda f: gone.append(f))
            self.call_later(self._latency, self._write, request, answer, gone)
            return server.NOT_DONE_YET
        self._head(request, answer)
        return answer.body

    def _write(self, request: server.Request, answer: Answer, gone: list) -> None:
        if gone:  # client went away meanwhile
            return
        self._head(request, answer)
        request.write(answer.body)
        request.finish()

    @staticmethod
    def _head(request: server.Request, answer: Answer) -> None:
        request.setResponseCode(answer.status)
        request.setHeader(b"content-type", answer.content_type.encode("ascii"))
        for name, value in answer.headers:
            request.setHeader(name.encode("ascii"), value.encode("latin-1"))

