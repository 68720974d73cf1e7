"""A Matrix homeserver fake for black-box tests, served over TLS on loopback.

It answers the federation OpenID userinfo endpoint from a token table and records every
request it gets (and every TCP connection, so a test can tell "refused before connecting"
from "TLS failed before any request").  Routes are a table so that later suites can add
the MSC4140 delayed-event and ``.well-known`` endpoints without touching the plumbing.
"""

from __future__ import annotations

import json
import re
from typing import Callable, Optional
from urllib.parse import parse_qs

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
    """A canned HTTP response."""

    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def json(cls, status: int, obj) -> "Answer":
        return cls(status, json.dumps(obj).encode("utf-8"))


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
        request.setResponseCode(answer.status)
        request.setHeader(b"content-type", answer.content_type.encode("ascii"))
        return answer.body

    def _write(self, request: server.Request, answer: Answer, gone: list) -> None:
        if gone:  # client went away meanwhile
            return
        request.setResponseCode(answer.status)
        request.setHeader(b"content-type", answer.content_type.encode("ascii"))
        request.write(answer.body)
        request.finish()

