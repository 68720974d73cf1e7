"""FederationAgent: SSRF filter on connected addresses, docs/federation.md#resolution targets, timeouts, and
real-socket checks for happy eyeballs, IPv6 literals, Host headers and TLS."""

from __future__ import annotations

import json
import tempfile
from typing import Optional

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from rtcauthd.outbound.client import HTTPClient, OutboundError
from rtcauthd.matrix import federation_agent as agent_module
from rtcauthd.matrix.guarded_connect import HostResolution
from rtcauthd.matrix.federation import FederationClient
from rtcauthd.matrix.federation_agent import (
    FederationAgent,
    build_federation_agent,
)
from rtcauthd.matrix.ipfilter import IPRangeFilter
from rtcauthd.matrix.resolver import ServerResolver
from rtcauthd.outbound.errors import FailureKind, OutboundError
from rtcauthd.outbound.pool import BoundedConnectionPool, strangers_pool
from tests.support.outbound import assert_fails_with, failed_with
from rtcauthd.tls import TLSPolicy
from tests.support.certs import TestCA, self_signed
from tests.unit.test_resolver import FakeSRV, FakeWebAgent, WellKnownSite

PUBLIC_V4 = "93.184.216.34"
PUBLIC_V4_B = "8.8.4.4"
HAPPY_EYEBALLS_DELAY = 0.3

@implementer(IHostnameResolver)
class FakeNameResolver:
    """A/AAAA answers from a dict: name -> [ip, ...] or a list of such lists (one per
    lookup, to model DNS rebinding). Unknown names resolve to nothing."""

    def __init__(self, answers: Optional[dict] = None) -> None:
        self.answers: dict[str, list] = dict(answers or {})
        self.queries: list[tuple[str, int]] = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        self.queries.append((hostName, portNumber))
        receiver.resolutionBegan(HostResolution(hostName))
        value = self.answers.get(hostName, [])
        if value and isinstance(value[0], list):  # successive answers
            value = value.pop(0) if len(value) > 1 else value[0]
        for ip in value:
            kind = IPv6Address if ":" in ip else IPv4Address
            receiver.addressResolved(kind("TCP", ip, portNumber))
        receiver.resolutionComplete()
        return receiver


class RecordingTLSPolicy(TLSPolicy):
    """Remembers which certificate names connections were set up to verify."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.names: list[str] = []

    def options_for(self, name: str):
        self.names.append(name)
        return super().options_for(name)


class TCPStringTransport(StringTransport):
    """StringTransport with the TCP knobs HTTP11ClientProtocol sets."""

    def setTcpNoDelay(self, enabled) -> None:
        pass

    def setTcpKeepAlive(self, enabled) -> None:
        pass


def refuse_all_connections(reactor: MemoryReactorClock) -> None:
    """Fail every connection attempt the memory reactor has recorded so far."""
    for (host, port, factory, _timeout, _bind), connector in zip(reactor.tcpClients, reactor.connectors):
        if getattr(connector, "settled", False) or connector.stoppedConnecting:
            continue
        connector.settled = True
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError("refused")))
    # HostnameEndpoint notices that no address is left on its next 300 ms tick.
    reactor.advance(HAPPY_EYEBALLS_DELAY)


class MemoryAgentTests(SynchronousTestCase):
    """SSRF refusals and connection targets, on a memory reactor (no sockets)."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.names = FakeNameResolver()
        self.srv = FakeSRV()
        self.site = WellKnownSite()
        self.web = FakeWebAgent(self.site)
        self.tls = RecordingTLSPolicy()
        self.trusted: set[str] = set()
        self.ip_filter = IPRangeFilter()
        self.requests: list[defer.Deferred] = []
        self.addCleanup(self._no_leftovers)

    def _no_leftovers(self) -> None:
        refuse_all_connections(self.reactor)
        for d in self.requests:  # outcomes the test did not look at
            d.addErrback(lambda _failure: None)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def agent(self, **overrides) -> FederationAgent:
        resolver = ServerResolver(
            clock=self.reactor,
            http=HTTPClient(clock=self.reactor, agent=self.web),
            srv_resolver=self.srv,
        )
        kwargs = dict(
            resolver=resolver,
            tls_policy=self.tls,
            ip_filter=self.ip_filter,
            is_trusted=lambda name: name in self.trusted,
            _name_resolver=self.names,
        )
        kwargs.update(overrides)
        return FederationAgent(self.reactor, **kwargs)

    def request(self, server_name: str, agent: Optional[FederationAgent] = None) -> defer.Deferred:
        agent = agent or self.agent()
        d = agent.request(b"GET", b"matrix-federation://" + server_name.encode() + b"/_matrix/x?y=1")
        self.requests.append(d)
        return d

    def refused(self, server_name: str, agent: Optional[FederationAgent] = None) -> OutboundError:
        error = failed_with(self, self.request(server_name, agent), FailureKind.REFUSED)
        self.assertEqual(error.step, "connect")
        return error

    def connected_to(self) -> list[tuple[str, int]]:
        return [(host, port) for host, port, *_ in self.reactor.tcpClients]

    # -- refusals ---------------------------------------------------------------

    def test_ip_literals_of_each_blocked_class_are_refused(self) -> None:
        cases = {
            "127.0.0.1:8448": "refusing to connect to 127.0.0.1 (blocked by 127.0.0.0/8)",
            "[::1]": "refusing to connect to ::1 (blocked by ::1/128)",
            "10.0.0.5:8448": "refusing to connect to 10.0.0.5 (blocked by 10.0.0.0/8)",
            "172.16.0.1": "refusing to connect to 172.16.0.1 (blocked by 172.16.0.0/12)",
            "192.168.0.1": "refusing to connect to 192.168.0.1 (blocked by 192.168.0.0/16)",
            "169.254.169.254": "refusing to connect to 169.254.169.254 (blocked by 169.254.169.254/32)",
            "[fe80::1]": "refusing to connect to fe80::1 (blocked by fe80::/10)",
            "100.64.0.1": "refusing to connect to 100.64.0.1 (blocked by 100.64.0.0/10)",
            "[fd00::1]:443": "refusing to connect to fd00::1 (blocked by fc00::/7)",
            "224.0.0.1": "refusing to connect to 224.0.0.1 (blocked by 224.0.0.0/4)",
            "[ff02::1]": "refusing to connect to ff02::1 (blocked by ff00::/8)",
            "0.0.0.0": "refusing to connect to 0.0.0.0 (blocked by 0.0.0.0/8)",
            "[::]": "refusing to connect to :: (blocked by ::/128)",
            "[::ffff:10.0.0.5]": "refusing to connect to ::ffff:10.0.0.5 (blocked by 10.0.0.0/8)",
            "[64:ff9b::a00:5]": "refusing to connect to 64:ff9b::a00:5 (blocked by 10.0.0.0/8)",
            "255.255.255.255": "refusing to connect to 255.255.255.255 (blocked by 255.255.255.255/32)",
        }
        for server_name, detail in cases.items():
            with self.subTest(server_name=server_name):
                self.assertEqual(self.refused(server_name).detail, detail)
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.names.queries, [])  # literals never reach DNS

    def test_name_resolving_to_private_addresses_is_refused(self) -> None:
        self.names.answers["internal.test"] = ["10.0.0.5", "fd00::5"]
        error = self.refused("internal.test:8448")
        self.assertEqual(
            error.detail,
            "refusing to connect to 10.0.0.5 (blocked by 10.0.0.0/8); "
            "refusing to connect to fd00::5 (blocked by fc00::/7)",
        )
        self.assertEqual(self.reactor.tcpClients, [])

    def test_only_allowed_addresses_are_tried(self) -> None:
        self.names.answers["mixed.test"] = ["10.0.0.5", PUBLIC_V4]
        d = self.request("mixed.test:8448")
        self.assertEqual(self.connected_to(), [(PUBLIC_V4, 8448)])
        refuse_all_connections(self.reactor)
        self.assertEqual(failed_with(self, d, FailureKind.CONNECT).step, "connect")

    def test_allowlist_exception(self) -> None:
        self.ip_filter = IPRangeFilter(allowlist=["10.0.0.0/24"])
        self.names.answers["internal.test"] = ["10.0.0.5", "10.0.1.5"]
        self.request("internal.test:8448")
        self.assertEqual(self.connected_to(), [("10.0.0.5", 8448)])

    def test_trusted_server_may_be_private(self) -> None:
        self.trusted.add("internal.test:8448")
        self.names.answers["internal.test"] = ["10.0.0.5"]
        self.request("internal.test:8448")
        self.request("[::1]:8448")  # not trusted: refused
        self.assertEqual(self.connected_to(), [("10.0.0.5", 8448)])

    def test_trust_follows_the_requested_server_name_through_delegation(self) -> None:
        self.trusted.add("example.com")
        self.site.delegate("example.com", "matrix.internal.test")
        self.names.answers["matrix.internal.test"] = ["192.168.7.7"]
        self.request("example.com")
        self.assertEqual(self.connected_to(), [("192.168.7.7", 8448)])

    def test_untrusted_delegation_to_private_is_refused(self) -> None:
        self.site.delegate("evil.test", "matrix.internal.test")
        self.names.answers["matrix.internal.test"] = ["192.168.7.7"]
        error = self.refused("evil.test")
        self.assertEqual(error.detail, "refusing to connect to 192.168.7.7 (blocked by 192.168.0.0/16)")

    def test_srv_target_is_filtered(self) -> None:
        self.srv.records["_matrix-fed._tcp.example.com"] = [(0, 0, 8448, "internal.example.com.")]
        self.names.answers["internal.example.com"] = ["127.0.0.1"]
        error = self.refused("example.com")
        self.assertEqual(error.detail, "refusing to connect to 127.0.0.1 (blocked by 127.0.0.0/8)")
        self.assertEqual(self.names.queries, [("internal.example.com", 8448)])

    def test_dns_rebinding_checks_the_address_actually_used(self) -> None:
        """Each connection filters the answer it connects with, not an earlier one."""
        self.names.answers["rebind.test"] = [[PUBLIC_V4], ["10.0.0.5"]]
        agent = self.agent()
        first = self.request("rebind.test:8448", agent)
        self.assertEqual(self.connected_to(), [(PUBLIC_V4, 8448)])
        refuse_all_connections(self.reactor)
        failed_with(self, first, FailureKind.CONNECT)
        error = self.refused("rebind.test:8448", agent)
        self.assertEqual(error.detail, "refusing to connect to 10.0.0.5 (blocked by 10.0.0.0/8)")
        self.assertEqual(self.connected_to(), [(PUBLIC_V4, 8448)])

    def test_well_known_fetch_is_filtered(self) -> None:
        """build_federation_agent's well-known client refuses private addresses too."""
        agent = build_federation_agent(
            self.reactor,
            tls_policy=self.tls,
            ip_filter=self.ip_filter,
            is_trusted=lambda name: False,
            dns_resolver=self.srv,
            _name_resolver=self.names,
        )
        self.names.answers["evil.test"] = ["169.254.169.254"]
        error = self.refused("evil.test", agent)
        self.assertEqual(
            error.detail, "refusing to connect to 169.254.169.254 (blocked by 169.254.169.254/32)"
        )
        # well-known on 443 was refused first, then the 8448 fallback
        self.assertEqual(self.names.queries, [("evil.test", 443), ("evil.test", 8448)])
        self.assertEqual(self.reactor.tcpClients, [])

    def test_well_known_fetch_of_trusted_name_is_not_filtered(self) -> None:
        build = build_federation_agent(
            self.reactor,
            tls_policy=self.tls,
            ip_filter=self.ip_filter,
            is_trusted=lambda name: name == "trusted.test",
            dns_resolver=self.srv,
            _name_resolver=self.names,
        )
        self.names.answers["trusted.test"] = ["10.9.9.9"]
        d = self.request("trusted.test", build)
        self.assertEqual(self.connected_to(), [("10.9.9.9", 443)])
        refuse_all_connections(self.reactor)  # well-known down -> 8448
        self.assertEqual(self.connected_to(), [("10.9.9.9", 443), ("10.9.9.9", 8448)])
        refuse_all_connections(self.reactor)
        failed_with(self, d, FailureKind.CONNECT)

    def test_building_the_agent_has_no_side_effects(self) -> None:
        """The system DNS resolver (file read + re-read timer) is created lazily."""
        build_federation_agent(
            self.reactor, tls_policy=self.tls, ip_filter=self.ip_filter, is_trusted=lambda name: False
        )
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    # -- targets and certificate names (docs/federation.md#resolution) ------------------------

    def test_targets_and_tls_names(self) -> None:
        self.site.delegate("delegated.example", "matrix.example.net")
        self.srv.records["_matrix-fed._tcp.matrix.example.net"] = [(0, 0, 8443, "srv.example.net.")]
        self.srv.records["_matrix-fed._tcp.plain.example"] = [(0, 0, 9000, "fed.plain.example.")]
        self.site.delegate("literal.example", "[2606:4700::1]:8449")
        for name in ("srv.example.net", "fed.plain.example", "nowk.example", "port.example"):
            self.names.answers[name] = [PUBLIC_V4]
        cases = [
            ("delegated.example", (PUBLIC_V4, 8443), "matrix.example.net"),  # 3.3
            ("plain.example", (PUBLIC_V4, 9000), "plain.example"),  # 4
            ("nowk.example", (PUBLIC_V4, 8448), "nowk.example"),  # 6
            ("port.example:1234", (PUBLIC_V4, 1234), "port.example"),  # 2
            ("8.8.8.8", ("8.8.8.8", 8448), "8.8.8.8"),  # 1
            ("[2606:4700::1111]:443", ("2606:4700::1111", 443), "2606:4700::1111"),  # 1
            ("literal.example", ("2606:4700::1", 8449), "2606:4700::1"),  # 3.1
        ]
        for server_name, target, tls_name in cases:
            with self.subTest(server_name=server_name):
                self.reactor.tcpClients.clear()
                self.reactor.connectors.clear()
                self.tls.names.clear()
                d = self.request(server_name)
                self.assertEqual(self.connected_to(), [target])
                self.assertEqual(self.tls.names, [tls_name])
                refuse_all_connections(self.reactor)
                failed_with(self, d, FailureKind.CONNECT)

    def test_srv_targets_are_tried_in_turn(self) -> None:
        self.srv.records["_matrix-fed._tcp.example.com"] = [
            (0, 0, 1001, "one.example."),
            (1, 0, 1002, "two.example."),
        ]
        self.names.answers["one.example"] = [PUBLIC_V4]
        self.names.answers["two.example"] = [PUBLIC_V4_B]
        d = self.request("example.com")
        self.assertEqual(self.connected_to(), [(PUBLIC_V4, 1001)])
        refuse_all_connections(self.reactor)
        self.assertEqual(self.connected_to(), [(PUBLIC_V4, 1001), (PUBLIC_V4_B, 1002)])
        refuse_all_connections(self.reactor)
        error = failed_with(self, d, FailureKind.CONNECT)
        self.assertEqual(
            error.detail,
            "one.example:1001: ConnectionRefusedError: Connection was refused by other side: refused.; "
            "two.example:1002: ConnectionRefusedError: Connection was refused by other side: refused.",
        )

    def test_unresolvable_name(self) -> None:
        error = failed_with(self, self.request("nxdomain.test:8448"), FailureKind.RESOLVE)
        self.assertEqual(error.step, "resolve")
        self.assertIn("nxdomain.test", error.detail)

    def test_connect_timeout_is_passed_on(self) -> None:
        self.names.answers["hs.test"] = [PUBLIC_V4]
        self.request("hs.test:8448", self.agent(connect_timeout=3.5))
        self.assertEqual(self.reactor.tcpClients[0][3], 3.5)

    def test_invalid_url(self) -> None:
        agent = self.agent()
        for url in (b"https://example.com/x", b"matrix-federation://evil.com@x/y", b"matrix-federation:///x"):
            with self.subTest(url=url):
                error = failed_with(self, agent.request(b"GET", url), FailureKind.INVALID)
                self.assertEqual(error.step, "server name")

    # -- timeouts through FederationClient ----------------------------------------

    def client(self, timeout: float = 10) -> FederationClient:
        return FederationClient(http=HTTPClient(clock=self.reactor, agent=self.agent(), timeout=timeout))

    def test_homeserver_accepts_but_never_answers(self) -> None:
        self.names.answers["hs.test"] = [PUBLIC_V4]
        d = self.client().userinfo("hs.test:8448", "token")
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[0]
        self.reactor.connectors[0].settled = True
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = TCPStringTransport()
        protocol.makeConnection(transport)
        self.assertTrue(transport.value())  # the TLS ClientHello went out
        self.reactor.advance(9.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        error = self.failureResultOf(d, OutboundError).value
        self.assertEqual(error.step, "timeout")
        self.assertTrue(transport.disconnecting)

    def test_connection_never_established(self) -> None:
        self.names.answers["hs.test"] = [PUBLIC_V4, PUBLIC_V4_B]
        d = self.client(timeout=2).userinfo("hs.test:8448", "token")
        self.reactor.advance(0.3)  # happy eyeballs: second attempt after 300 ms
        self.assertEqual(self.connected_to(), [(PUBLIC_V4, 8448), (PUBLIC_V4_B, 8448)])
        self.reactor.advance(1.7)
        self.assertEqual(self.failureResultOf(d, OutboundError).value.step, "timeout")

    def test_refusal_through_client(self) -> None:
        error = self.failureResultOf(self.client().userinfo("10.0.0.5:8448", "token"), OutboundError).value
        self.assertEqual(
            (error.step, error.detail), ("connect", "refusing to connect to 10.0.0.5 (blocked by 10.0.0.0/8)")
        )


# -- real sockets ------------------------------------------------------------------------------


class Homeserver(Resource):
    """Userinfo endpoint that records the Host header of each request."""

    isLeaf = True

    def __init__(self, sub: str) -> None:
        super().__init__()
        self.sub = sub
        self.hosts: list[str] = []

    def render_GET(self, request):
        self.hosts.append(request.getHeader("host"))
        request.setHeader("content-type", "application/json")
        return json.dumps({"sub": self.sub}).encode()


class TrackingSite(Site):
    """Counts connections and lets tearDown wait until the server side has closed."""

    def __init__(self, resource) -> None:
        super().__init__(resource)
        self.connections = 0
        self._open: set = set()
        self._waiters: list[defer.Deferred] = []

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        self.connections += 1
        self._open.add(protocol)
        original = protocol.connectionLost

        def connectionLost(reason, protocol=protocol):
            self._open.discard(protocol)
            original(reason)
            if not self._open:
                waiters, self._waiters = self._waiters, []
                for waiter in waiters:
                    waiter.callback(None)

        protocol.connectionLost = connectionLost
        return protocol

    def all_closed(self) -> defer.Deferred:
        if not self._open:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        self._waiters.append(waiter)
        return waiter


class ConnectRecordingReactor:
    """The real reactor, noting each TCP connection attempt."""

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self.connects: list[tuple[str, int]] = []

    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None):
        self.connects.append((host, port))
        return self._reactor.connectTCP(host, port, factory, timeout, bindAddress)

    def __getattr__(self, name):
        return getattr(self._reactor, name)


class RealSocketTests(TestCase):
    """Loopback TLS homeservers on a real reactor."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.ca = TestCA()
        directory = tempfile.mkdtemp()
        self.ca_file = self.ca.write_ca(directory)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(self.pool.closeCachedConnections)
        self.names = FakeNameResolver()
        self.srv = FakeSRV()
        self.site = WellKnownSite()
        self.web = FakeWebAgent(self.site)

    def serve(self, pair, sub: str, interface: str = "127.0.0.1", port: int = 0):
        homeserver = Homeserver(sub)
        site = TrackingSite(homeserver)
        options = PrivateCertificate.loadPEM(pair.combined_pem).options()
        listener = self.reactor.listenSSL(port, site, options, interface=interface)

        @defer.inlineCallbacks
        def shut_down():
            # client side first, so the server side is not left waiting for its idle timeout
            yield self.pool.closeCachedConnections()
            yield listener.stopListening()
            yield site.all_closed()

        self.addCleanup(shut_down)
        return homeserver, site, listener.getHost().port

    def client(self, *, insecure: bool = False, trusted=(), allow=(), reactor=None, ip_filter=None) -> FederationClient:
        ip_filter = ip_filter if ip_filter is not None else IPRangeFilter(allowlist=list(allow))
        self.strangers = strangers_pool(self.reactor, ip_filter)
        self.addCleanup(self.strangers.closeCachedConnections)
        resolver = ServerResolver(
            clock=self.reactor,
            http=HTTPClient(clock=self.reactor, agent=self.web),
            srv_resolver=self.srv,
        )
        agent = FederationAgent(
            reactor or self.reactor,
            resolver=resolver,
            tls_policy=TLSPolicy(ca_file=None if insecure else self.ca_file, insecure=insecure),
            ip_filter=ip_filter,
            is_trusted=lambda name: name in trusted,
            pool=self.pool,
            stranger_pool=self.strangers,
            _name_resolver=self.names,
        )
        return FederationClient(http=HTTPClient(clock=self.reactor, agent=agent, timeout=10))

    @defer.inlineCallbacks
    def test_happy_eyeballs_dead_ipv6_live_ipv4(self):
        homeserver, _site, port = self.serve(self.ca.issue(["hs.test"]), "")
        homeserver.sub = f"@alice:hs.test:{port}"
        # ::1 on this port has no listener (connection refused); 127.0.0.1 answers.
        self.names.answers["hs.test"] = ["::1", "127.0.0.1"]
        reactor = ConnectRecordingReactor(self.reactor)
        client = self.client(allow=["127.0.0.1", "::1"], reactor=reactor)
        user_id = yield client.userinfo(f"hs.test:{port}", "token")
        self.assertEqual(user_id, f"@alice:hs.test:{port}")
        self.assertEqual(homeserver.hosts, [f"hs.test:{port}"])
        self.assertEqual(reactor.connects, [("::1", port), ("127.0.0.1", port)])

    @defer.inlineCallbacks
    def test_ipv6_literal_server_name(self):
        homeserver, _site, port = self.serve(self.ca.issue(["::1"]), "", interface="::1")
        server_name = f"[::1]:{port}"
        homeserver.sub = f"@bob:{server_name}"
        client = self.client(trusted={server_name})
        user_id = yield client.userinfo(server_name, "token")
        self.assertEqual(user_id, f"@bob:{server_name}")
        self.assertEqual(homeserver.hosts, [server_name])

    @defer.inlineCallbacks
    def test_ipv6_literal_refused_unless_trusted_or_allowed(self):
        homeserver, site, port = self.serve(self.ca.issue(["::1"]), "", interface="::1")
        error = yield self.assertFailure(self.client().userinfo(f"[::1]:{port}", "token"), OutboundError)
        self.assertEqual(error.detail, "refusing to connect to ::1 (blocked by ::1/128)")
        self.assertEqual(site.connections, 0)

    @defer.inlineCallbacks
    def test_delegation_end_to_end(self):
        """well-known -> m.server -> SRV -> A: Host and certificate name are the delegate."""
        homeserver, _site, port = self.serve(self.ca.issue(["matrix.example.test"]), "@carol:example.test")
        self.site.delegate("example.test", "matrix.example.test")
        self.srv.records["_matrix-fed._tcp.matrix.example.test"] = [(0, 0, port, "srv-target.example.test.")]
        self.names.answers["srv-target.example.test"] = ["127.0.0.1"]
        user_id = yield self.client(trusted={"example.test"}).userinfo("example.test", "token")
        self.assertEqual(user_id, "@carol:example.test")
        self.assertEqual(homeserver.hosts, ["matrix.example.test"])

    @defer.inlineCallbacks
    def test_certificate_for_srv_target_is_not_enough(self):
        _homeserver, _site, port = self.serve(self.ca.issue(["srv-target.example.test"]), "@carol:example.test")
        self.srv.records["_matrix-fed._tcp.example.test"] = [(0, 0, port, "srv-target.example.test.")]
        self.names.answers["srv-target.example.test"] = ["127.0.0.1"]
        error = yield self.assertFailure(
            self.client(trusted={"example.test"}).userinfo("example.test", "token"), OutboundError
        )
        self.assertEqual(error.step, "tls")

    @defer.inlineCallbacks
    def test_self_signed_refused_without_insecure(self):
        homeserver, site, port = self.serve(self_signed(["127.0.0.1"]), "")
        server_name = f"127.0.0.1:{port}"
        error = yield self.assertFailure(
            self.client(trusted={server_name}).userinfo(server_name, "token"), OutboundError
        )
        self.assertEqual(error.step, "tls")
        self.assertIn("certificate verify failed", error.detail)
        self.assertEqual(homeserver.hosts, [])  # no userinfo request was sent

    @defer.inlineCallbacks
    def test_self_signed_accepted_with_insecure(self):
        homeserver, _site, port = self.serve(self_signed(["wrong.name"]), "")
        server_name = f"127.0.0.1:{port}"
        homeserver.sub = f"@dave:{server_name}"
        user_id = yield self.client(insecure=True, trusted={server_name}).userinfo(server_name, "token")
        self.assertEqual(user_id, f"@dave:{server_name}")

    @defer.inlineCallbacks
    def test_trusted_pooled_connection_not_reused_for_untrusted_name(self):
        """Two server names delegating to one host: the filter still applies to the
        untrusted one even though a kept-alive connection to that host exists."""
        homeserver, site, port = self.serve(self.ca.issue(["hs.test"]), "@x:trusted.test")
        self.site.delegate("trusted.test", f"hs.test:{port}")
        self.site.delegate("evil.test", f"hs.test:{port}")
        self.names.answers["hs.test"] = ["127.0.0.1"]
        client = self.client(trusted={"trusted.test"})
        user_id = yield client.userinfo("trusted.test", "token")
        self.assertEqual(user_id, "@x:trusted.test")
        error = yield self.assertFailure(client.userinfo("evil.test", "token"), OutboundError)
        self.assertEqual(error.detail, "refusing to connect to 127.0.0.1 (blocked by 127.0.0.0/8)")
        self.assertEqual(site.connections, 1)
        self.assertEqual(len(homeserver.hosts), 1)

    @defer.inlineCallbacks
    def test_connections_are_kept_alive(self):
        homeserver, site, port = self.serve(self.ca.issue(["hs.test"]), "")
        homeserver.sub = f"@erin:hs.test:{port}"
        self.names.answers["hs.test"] = ["127.0.0.1"]
        client = self.client(trusted={f"hs.test:{port}"})
        for _ in range(3):
            user_id = yield client.userinfo(f"hs.test:{port}", "token")
            self.assertEqual(user_id, homeserver.sub)
        self.assertEqual(site.connections, 1)
        self.assertEqual(len(homeserver.hosts), 3)

    @defer.inlineCallbacks
    def test_untrusted_servers_get_keep_alive_too(self):
        homeserver, site, port = self.serve(self.ca.issue(["hs.test"]), "")
        homeserver.sub = f"@erin:hs.test:{port}"
        self.names.answers["hs.test"] = ["127.0.0.1"]
        client = self.client(allow={"127.0.0.0/8"})  # allowed, but nobody vouched for it
        for _ in range(3):
            user_id = yield client.userinfo(f"hs.test:{port}", "token")
            self.assertEqual(user_id, homeserver.sub)
        self.assertEqual(site.connections, 1)
        self.assertEqual([name for name, _port in self.names.queries], ["hs.test"])

    @defer.inlineCallbacks
    def test_reused_connection_stays_on_the_address_that_was_checked(self):
        """DNS rebinding after a connection was pooled: the next request reuses the
        connection to the checked address; it never reaches the new, blocked one."""
        homeserver, site, port = self.serve(self.ca.issue(["hs.test"]), "")
        homeserver.sub = f"@erin:hs.test:{port}"
        self.names.answers["hs.test"] = ["127.0.0.1"]
        client = self.client(allow={"127.0.0.0/8"})
        yield client.userinfo(f"hs.test:{port}", "token")
        self.names.answers["hs.test"] = ["10.0.0.1"]
        user_id = yield client.userinfo(f"hs.test:{port}", "token")
        self.assertEqual(user_id, homeserver.sub)
        self.assertEqual((site.connections, len(homeserver.hosts)), (1, 2))
        [connection] = [c for idle in self.strangers._connections.values() for c in idle]
        self.assertEqual(connection.transport.getPeer().host, "127.0.0.1")

    @defer.inlineCallbacks
    def test_reused_connection_is_checked_again(self):
        """A pooled connection whose address the filter no longer admits is dropped, and
        the request connects afresh through the filter (and is refused)."""
        homeserver, site, port = self.serve(self.ca.issue(["hs.test"]), "")
        homeserver.sub = f"@erin:hs.test:{port}"
        self.names.answers["hs.test"] = ["127.0.0.1"]
        switch = SwitchableFilter(IPRangeFilter(allowlist=["127.0.0.0/8"]))
        client = self.client(ip_filter=switch)
        yield client.userinfo(f"hs.test:{port}", "token")
        switch.current = IPRangeFilter()
        error = yield self.assertFailure(client.userinfo(f"hs.test:{port}", "token"), OutboundError)
        self.assertEqual(error.detail, "refusing to connect to 127.0.0.1 (blocked by 127.0.0.0/8)")
        self.assertEqual((site.connections, len(homeserver.hosts)), (1, 1))

    @defer.inlineCallbacks
    def test_pool_key_includes_the_certificate_name(self):
        """Two names on one address and port get a connection each, each verified for its name."""
        homeserver, site, port = self.serve(self.ca.issue(["a.test", "b.test"]), "")
        self.names.answers["a.test"] = ["127.0.0.1"]
        self.names.answers["b.test"] = ["127.0.0.1"]
        client = self.client(allow={"127.0.0.0/8"})
        for name in ("a.test", "b.test", "a.test", "b.test"):
            homeserver.sub = f"@erin:{name}:{port}"
            yield client.userinfo(f"{name}:{port}", "token")
        self.assertEqual(site.connections, 2)
        self.assertEqual(homeserver.hosts, [f"a.test:{port}", f"b.test:{port}"] * 2)


    @defer.inlineCallbacks
    def test_concurrent_requests_queue_for_pooled_connections(self):
        """More requests at once than the host may have connections: they wait for one,
        and a second burst after warm-up opens no connection at all."""
        homeserver, site, port = self.serve(self.ca.issue(["hs.test"]), "")
        server_name = f"hs.test:{port}"
        homeserver.sub = f"@erin:{server_name}"
        self.names.answers["hs.test"] = ["127.0.0.1"]
        self.pool = BoundedConnectionPool(self.reactor, max_open_per_host=4, max_idle_per_host=4)
        client = self.client(trusted={server_name})
        for _burst in range(2):
            users = yield defer.gatherResults([client.userinfo(server_name, "token") for _ in range(24)])
            self.assertEqual(set(users), {homeserver.sub})
            self.assertEqual(site.connections, 4)
        self.assertEqual((self.pool.opened, len(homeserver.hosts)), (4, 48))


class SwitchableFilter:
    """An IP filter the test can replace while connections are pooled."""

    def __init__(self, current: IPRangeFilter) -> None:
        self.current = current

    def check(self, ip: str):
        return self.current.check(ip)


class Redirector(Resource):
    """Well-known host that redirects before answering."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.evil_location = b""

    def render_GET(self, request):
        if request.path == b"/.well-known/matrix/server":
            request.redirect(b"/real")
            return b""
        if request.path == b"/loop":
            request.redirect(b"/loop")
            return b""
        if request.path == b"/evil":
            request.redirect(self.evil_location)
            return b""
        return b'{"m.server": "delegated.test:443"}'


class WellKnownAgentTests(TestCase):
    """build_well_known_agent on real sockets: redirects, and the filter on each hop."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        ca = TestCA()
        self.resource = Redirector()
        site = TrackingSite(self.resource)
        options = PrivateCertificate.loadPEM(ca.issue(["wk.test", "internal.test"]).combined_pem).options()
        listener = reactor.listenSSL(0, site, options, interface="127.0.0.1")
        self.port = listener.getHost().port
        self.names = FakeNameResolver({"wk.test": ["127.0.0.1"], "internal.test": ["127.0.0.1"]})
        agent = agent_module.build_well_known_agent(
            reactor,
            tls_policy=TLSPolicy(ca_file=ca.write_ca(tempfile.mkdtemp())),
            ip_filter=IPRangeFilter(),
            is_trusted=lambda host: host == "wk.test",
            _name_resolver=self.names,
        )
        self.http = HTTPClient(clock=reactor, agent=agent, timeout=10)

        @defer.inlineCallbacks
        def shut_down():
            yield listener.stopListening()
            yield site.all_closed()

        self.addCleanup(shut_down)

    def get(self, path: str) -> defer.Deferred:
        return self.http.request(b"GET", f"https://wk.test:{self.port}{path}".encode(), step="well-known")

    @defer.inlineCallbacks
    def test_follows_redirects(self):
        response = yield self.get("/.well-known/matrix/server")
        self.assertEqual((response.code, response.body), (200, b'{"m.server": "delegated.test:443"}'))

    @defer.inlineCallbacks
    def test_redirect_loop_gives_up(self):
        error = yield self.assertFailure(self.get("/loop"), OutboundError)
        self.assertIn("stopped after", error.detail)

    @defer.inlineCallbacks
    def test_each_redirect_hop_is_filtered(self):
        self.resource.evil_location = f"https://internal.test:{self.port}/real".encode()
        error = yield assert_fails_with(self, self.get("/evil"), FailureKind.REFUSED)
        self.assertEqual(error.detail, "refusing to connect to 127.0.0.1 (blocked by 127.0.0.0/8)")
