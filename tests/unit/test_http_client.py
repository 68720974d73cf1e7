"""The bounded outbound HTTP helper: time bound, size bound, IPv6 literals, error steps."""

from __future__ import annotations

from urllib.parse import quote

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from rtcauthd.outbound.client import HTTPClient, OutboundError
from rtcauthd.outbound.errors import FailureKind
from tests.support.outbound import assert_fails_with, failed_with


class Echo(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.pending = []

    def render(self, request):
        if request.path == b"/hang":
            self.pending.append(request)
            return NOT_DONE_YET
        if request.path == b"/stream":
            request.write(b"x" * 100)  # chunked, no Content-Length
            request.write(b"y" * 100)
            request.finish()
            return NOT_DONE_YET
        return b"%s %s host=%s body=%s" % (
            request.method,
            request.uri,
            request.getHeader(b"host"),
            request.content.read(),
        )


class HTTPClientTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.server = Echo()
        self.agent = RequestTraversalAgent(self.server)
        self.http = HTTPClient(clock=self.clock, agent=self.agent, timeout=3, max_body=150)

    def request(self, *args, **kwargs):
        d = self.http.request(*args, **kwargs)
        self.agent.flush()
        return d

    def test_ipv6_literal_url_and_body(self):
        response = self.successResultOf(self.request(b"POST", "http://[::1]:7880/twirp?x=1", body=b"{}"))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.body, b"POST /twirp?x=1 host=[::1]:7880 body={}")

    def test_timeout_names_the_step(self):
        d = self.request(b"GET", "http://127.0.0.1/hang", step="userinfo")
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        error = failed_with(self, d, FailureKind.TIMEOUT)
        self.assertEqual(error.step, "userinfo")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_timer_left_after_success(self):
        self.successResultOf(self.request(b"GET", "http://127.0.0.1/"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_body_cap_with_and_without_length(self):
        self.server.putChild  # noqa: B018 - Echo is a leaf; paths select behaviour
        failed_with(self, self.request(b"POST", "http://127.0.0.1/", body=b"z" * 200), FailureKind.TOO_LARGE)
        failed_with(self, self.request(b"GET", "http://127.0.0.1/stream"), FailureKind.TOO_LARGE)
        ok = self.successResultOf(self.request(b"GET", "http://127.0.0.1/stream", max_body=1000))
        self.assertEqual(len(ok.body), 200)

    def test_unparsable_url_fails_the_deferred_instead_of_raising(self):
        for url in ("http://127.0.0.1:443x/", "http://[::1/"):
            error = self.failureResultOf(self.request(b"GET", url, step="twirp"), OutboundError).value
            self.assertEqual(error.step, "twirp")
            self.assertIn("invalid URL", error.detail)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_non_ascii_url_is_an_error_not_a_crash(self):
        error = self.failureResultOf(self.request(b"GET", "http://exämple.org/"), OutboundError).value
        self.assertIn("not ASCII", error.detail)

    def test_transport_error_described_without_traceback(self):
        class Refusing:
            def request(self, *a, **k):
                return fail(ConnectionRefusedError("127.0.0.1:1"))

        http = HTTPClient(clock=self.clock, agent=Refusing())
        error = self.failureResultOf(http.request(b"GET", "http://127.0.0.1:1/", step="connect"), OutboundError).value
        self.assertEqual(error.step, "connect")
        self.assertIn("ConnectionRefusedError", error.detail)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RedirectConnectionTests(TestCase):
    """A redirect chain must not leave a connection open per hop (real sockets)."""

    @inlineCallbacks
    def test_closing_redirect_agents_close_every_3xx_connection(self):
        from twisted.internet import protocol, reactor
        from twisted.web.client import Agent

        from rtcauthd.outbound.client import GoRedirectAgent, connection_pool

        open_connections = set()

        class Hops(protocol.Protocol):
            """302 after 302, each announcing a body it never finishes sending."""

            def connectionMade(self):
                open_connections.add(self)
                self.buffer = b""

            def connectionLost(self, reason):
                open_connections.discard(self)

            def dataReceived(self, data):
                self.buffer += data
                if b"\r\n\r\n" not in self.buffer:
                    return
                line, self.buffer = self.buffer.split(b"\r\n")[0], b""
                hop = int(line.split()[1].rsplit(b"/", 1)[1]) if b"/hop/" in line else 0
                if hop < 5:
                    self.transport.write(
                        b"HTTP/1.1 302 Found\r\nLocation: /hop/%d\r\nContent-Length: 100\r\n\r\nx" % (hop + 1)
                    )
                else:
                    self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

        listener = reactor.listenTCP(0, protocol.Factory.forProtocol(Hops), interface="127.0.0.1")
        self.addCleanup(listener.stopListening)
        url = f"http://127.0.0.1:{listener.getHost().port}/start"
        for agent_class in (GoRedirectAgent,):
            pool = connection_pool(reactor)
            http = HTTPClient(clock=reactor, agent=agent_class(Agent(reactor, pool=pool), limit=10), timeout=5)
            response = yield http.request(b"GET", url)
            self.assertEqual(response.code, 404)
            yield pool.closeCachedConnections()
            for _ in range(40):  # the server sees the aborted connections close
                if not open_connections:
                    break
                yield deferLater(reactor, 0.05, lambda: None)
            self.assertEqual(open_connections, set(), agent_class.__name__)


class GoRedirectTests(SynchronousTestCase):
    """Go's redirect rules for the client-server API calls (docs/delegated-leave.md#restart-and-send-calls)."""

    def setUp(self):
        from rtcauthd.outbound.client import GoRedirectAgent

        class Hops(Resource):
            isLeaf = True

            def __init__(self):
                super().__init__()
                self.seen = []
                self.auth = []

            def render(self, request):
                body = request.content.read()
                self.seen.append((request.method, request.path, body))
                self.auth.append((request.getHeader(b"host"), request.getHeader(b"authorization")))
                if request.path.startswith(b"/away/"):
                    request.setResponseCode(int(request.path.split(b"/")[2]))
                    request.setHeader(b"Location", request.args[b"to"][0])
                    return b""
                if request.path.startswith(b"/old/"):
                    code = int(request.path.split(b"/")[2])
                    request.setResponseCode(code)
                    request.setHeader(b"Location", b"/new/x")
                    return b""
                if request.path == b"/loop":
                    request.setResponseCode(302)
                    request.setHeader(b"Location", b"/loop")
                    return b""
                return b"done"

        self.clock = Clock()
        self.server = Hops()
        self.agent = RequestTraversalAgent(self.server)
        self.http = HTTPClient(clock=self.clock, agent=GoRedirectAgent(self.agent, limit=10))

    def post(self, path):
        d = self.http.request(b"POST", "http://127.0.0.1" + path, body=b"{}")
        self.agent.flush()
        return d

    def test_307_and_308_repeat_the_post_with_its_body(self):
        for code in (307, 308):
            self.server.seen.clear()
            self.assertEqual(self.successResultOf(self.post(f"/old/{code}")).body, b"done")
            self.assertEqual(self.server.seen[-1], (b"POST", b"/new/x", b"{}"))

    def test_301_302_303_turn_the_post_into_a_bodyless_get(self):
        for code in (301, 302, 303):
            self.server.seen.clear()
            self.successResultOf(self.post(f"/old/{code}"))
            self.assertEqual(self.server.seen[-1], (b"GET", b"/new/x", b""))

    def test_credentials_stay_with_their_origin(self):
        token = b"Bearer as_token_SECRET"
        same = ["http://127.0.0.1/new/x", "http://127.0.0.1:80/new/x", "/new/x", "HTTP://127.0.0.1/new/x"]
        other = ["http://elsewhere.example/new/x", "https://127.0.0.1/new/x", "http://127.0.0.1:8080/new/x"]
        for code in (302, 307):
            for location, forwarded in [(loc, token) for loc in same] + [(loc, None) for loc in other]:
                self.server.auth.clear()
                d = self.http.request(
                    b"POST", "http://127.0.0.1/away/%d?to=%s" % (code, quote(location, safe="")),
                    headers={"Authorization": token.decode()}, body=b"{}",
                )
                self.agent.flush()
                self.successResultOf(d)
                self.assertEqual([a for _h, a in self.server.auth], [token, forwarded], (code, location))

    def test_gives_up_after_the_limit(self):
        error = self.failureResultOf(self.post("/loop"), OutboundError).value
        self.assertIn("stopped after 10 redirects", error.detail)
        self.assertEqual(len(self.server.seen), 11)
