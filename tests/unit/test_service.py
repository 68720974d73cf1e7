"""Wiring and lifecycle on a memory reactor: listeners, IPv4 fallback, fatal start, drain."""

from __future__ import annotations

import errno
import socket

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.config import ConfigError, load_config
from rtcauthd.inbound.site import RtcAuthSite
from rtcauthd.service import LISTEN_BACKLOG, RtcAuthService, ipv4_fallback, sd_notify, with_backlog
from rtcauthd.tap import Options, build_daemon
from tests.support.daemon import build_test_daemon

ENV = {
    "LIVEKIT_URL": "ws://127.0.0.1:7880",
    "LIVEKIT_KEY": "devkey",
    "LIVEKIT_SECRET": "secret-value",
    "LIVEKIT_FULL_ACCESS_HOMESERVERS": "example.com",
}


class Reactor(MemoryReactorClock):
    """A memory reactor whose IPv6 listens fail like on an IPv4-only host, when asked to."""

    def __init__(self, ipv6=True):
        super().__init__()
        self.ipv6 = ipv6
        self.running = True

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if not self.ipv6 and ":" in interface:
            raise CannotListenError(interface, port, OSError(errno.EAFNOSUPPORT, "Address family not supported"))
        return super().listenTCP(port, factory, backlog, interface)

    def stop(self):
        self.running = False


class BuildTests(SynchronousTestCase):
    def start(self, env=ENV, reactor=None, **kwargs):
        reactor = reactor or Reactor()
        service = build_test_daemon(load_config(env, **kwargs), reactor).service
        service.startService()
        return reactor, service

    def test_the_daemon_holds_its_wired_graph(self):
        from rtcauthd.store.memory import MemoryStore

        store = MemoryStore()
        daemon = build_test_daemon(ENV, Reactor(), store=store)
        self.assertIs(daemon.store, store)
        self.assertIs(daemon.service._site, daemon.site)
        self.assertEqual(daemon.site.max_body, daemon.config.max_body_bytes)
        self.assertIs(daemon.app.clock, daemon.reactor)
        self.assertIsNone(daemon.metrics_site)

    def test_default_bind_is_one_dual_stack_listener(self):
        reactor, service = self.start()
        self.successResultOf(service.when_ready())
        [(port, _factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (8080, "::"))
        self.assertEqual(backlog, LISTEN_BACKLOG)  # not Twisted's 50: a burst must not drop SYNs
        self.successResultOf(service.stopService())

    def test_ipv4_only_host_falls_back(self):
        reactor, service = self.start(reactor=Reactor(ipv6=False))
        self.successResultOf(service.when_ready())
        [(port, _f, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (8080, "0.0.0.0"))
        self.assertEqual(backlog, LISTEN_BACKLOG)
        self.flushLoggedErrors()
        self.successResultOf(service.stopService())

    def test_explicit_listeners(self):
        reactor, service = self.start(listen=("tcp:9001:interface=127.0.0.1", "tcp6:9002:interface=\\:\\:1"))
        self.successResultOf(service.when_ready())
        self.assertEqual([(p, i) for p, _f, _b, i in reactor.tcpServers], [(9001, "127.0.0.1"), (9002, "::1")])
        self.successResultOf(service.stopService())

    def test_listen_failure_is_fatal_with_exit_status_1(self):
        exits = []
        reactor = Reactor(ipv6=False)
        service = RtcAuthService(
            reactor=reactor, endpoints=["tcp6:9000:interface=\\:\\:1"], site=object(), exit_process=exits.append
        )
        service.startService()
        self.failureResultOf(service.when_ready(), CannotListenError)
        self.assertFalse(reactor.running)
        for trigger, args, kwargs in reactor.triggers["after"]["shutdown"]:
            trigger(*args, **kwargs)
        self.assertEqual(exits, [1])

    def test_clean_sigterm_stop_exits_zero(self):
        reactor = Reactor()
        service = RtcAuthService(reactor=reactor, endpoints=[], site=object())
        service.startService()
        reactor._exitSignal = 15  # what the reactor records on SIGTERM; twistd re-raises it
        for trigger, args, kwargs in reactor.triggers["after"]["shutdown"]:
            trigger(*args, **kwargs)
        self.assertIsNone(reactor._exitSignal)

    def in_flight_site(self, reactor):
        """A site with one request in flight; ``finish()`` ends it."""
        from twisted.web.resource import Resource
        from twisted.web.test.requesthelper import DummyChannel

        site = RtcAuthSite(Resource(), max_body=1024, reactor=reactor)
        request = site.make_request(DummyChannel())
        return site, request.finish

    def test_stop_closes_listeners_then_waits_for_in_flight_requests(self):
        reactor = Reactor()
        site, finish = self.in_flight_site(reactor)
        stopped = []

        async def after_stop():
            stopped.append(True)

        service = RtcAuthService(
            reactor=reactor, endpoints=["tcp:9000"], site=site, after_stop=after_stop
        )
        service.startService()
        [port] = service.ports
        closed = []
        port.stopListening = lambda: closed.append(True)
        d = service.stopService()
        self.assertEqual(closed, [True])  # no new connections from here on
        reactor.pump([0.05] * 20)
        self.assertNoResult(d)  # a request is still being answered
        self.assertEqual(stopped, [])
        finish()  # the last request ends: the drain is over at once, no poll, no time passing
        self.successResultOf(d)
        self.assertEqual(stopped, [True])

    def test_stop_with_nothing_in_flight_does_not_wait(self):
        reactor = Reactor()
        site, finish = self.in_flight_site(reactor)
        finish()
        service = RtcAuthService(reactor=reactor, endpoints=[], site=site)
        service.startService()
        self.successResultOf(service.stopService())
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_stop_gives_up_waiting_after_the_drain_bound(self):
        reactor = Reactor()
        site, _finish = self.in_flight_site(reactor)
        service = RtcAuthService(reactor=reactor, endpoints=[], site=site)
        service.startService()
        d = service.stopService()
        reactor.pump([0.05] * 150)  # 7.5 s
        self.assertNoResult(d)
        reactor.pump([0.05] * 12)  # past 8 s
        self.successResultOf(d)
        self.assertEqual(site.in_flight, 1)  # given up on, not forgotten

    def test_stop_during_restore_never_opens_listeners(self):
        gate = Deferred()
        reactor = Reactor()

        async def restore():
            await gate

        service = RtcAuthService(reactor=reactor, endpoints=["tcp:9000"], site=object(), before_listen=restore)
        service.startService()
        self.successResultOf(service.stopService())
        gate.callback(None)
        self.assertEqual(reactor.tcpServers, [])
        self.assertEqual(service.ports, [])

    def test_bad_metrics_endpoint_is_a_config_error(self):
        with self.assertRaises(ConfigError) as cm:
            build_daemon(load_config(dict(ENV, RTCAUTH_METRICS_LISTEN="tcp:notaport")), Reactor())
        self.assertIn("RTCAUTH_METRICS_LISTEN", str(cm.exception))

    def test_listeners_open_only_after_restore(self):
        gate = Deferred()
        reactor = Reactor()

        async def restore():
            await gate

        service = RtcAuthService(reactor=reactor, endpoints=["tcp:9000"], site=object(), before_listen=restore)
        service.startService()
        self.assertEqual(reactor.tcpServers, [])
        gate.callback(None)
        self.assertEqual(len(reactor.tcpServers), 1)

    def test_bad_endpoint_string_is_a_config_error(self):
        with self.assertRaises(ConfigError) as cm:
            build_daemon(load_config(ENV, listen=("bogus:1",)), Reactor())
        self.assertIn("bogus:1", str(cm.exception))

    def test_bad_ca_file_is_a_config_error(self):
        env = dict(ENV, RTCAUTH_CA_FILE="/nonexistent/ca.pem")
        with self.assertRaises(ConfigError) as cm:
            build_daemon(load_config(env), Reactor())
        self.assertIn("RTCAUTH_CA_FILE", str(cm.exception))


class HelperTests(SynchronousTestCase):
    def test_ipv4_fallback_only_for_wildcard(self):
        self.assertEqual(ipv4_fallback("tcp6:8080:interface=\\:\\:"), "tcp:8080:interface=0.0.0.0")
        self.assertIsNone(ipv4_fallback("tcp6:8080:interface=\\:\\:1"))
        self.assertIsNone(ipv4_fallback("tcp:8080"))

    def test_with_backlog_only_where_none_is_set(self):
        self.assertEqual(with_backlog("tcp:8080:interface=127.0.0.1"), f"tcp:8080:interface=127.0.0.1:backlog={LISTEN_BACKLOG}")
        self.assertEqual(with_backlog("tcp6:8080:interface=\\:\\:"), f"tcp6:8080:interface=\\:\\::backlog={LISTEN_BACKLOG}")
        self.assertEqual(with_backlog("tcp:8080:backlog=10"), "tcp:8080:backlog=10")
        self.assertEqual(with_backlog("systemd:domain=INET:index=0"), "systemd:domain=INET:index=0")
        self.assertEqual(with_backlog("unix:/run/rtcauthd.sock"), "unix:/run/rtcauthd.sock")

    def test_sd_notify_datagram(self):
        path = self.mktemp()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(server.close)
        server.bind(path)
        self.assertTrue(sd_notify("READY=1", environ={"NOTIFY_SOCKET": path}))
        self.assertEqual(server.recv(100), b"READY=1")
        self.assertFalse(sd_notify("READY=1", environ={}))

    def test_options_route_logging_through_our_observer(self):
        class Parent(dict):
            pass

        options = Options()
        options.parent = Parent()
        options.parseOptions(["--dev", "--listen", "tcp:1", "--listen", "unix:/x"])
        self.assertEqual(options["listen"], ["tcp:1", "unix:/x"])
        self.assertEqual(options.parent["logger"], "rtcauthd.logging.make_observer")
        usage = options.getUsage()
        for variable in ("LIVEKIT_FULL_ACCESS_HOMESERVERS", "RTCAUTH_CA_FILE", "LIVEKIT_JWT_BIND"):
            self.assertIn(variable, usage)
