"""The doctor's orchestration on a fake clock: concurrency, the report deadline, crashes.

The loopback suite (tests/doctor) proves the diagnoses; here a network that never
answers proves the time bound deterministically: a dead host's report is complete at
the deadline (12 s with the default --timeout of 5 s), not a moment later.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.outbound.errors import FailureKind
from rtcauthd.doctor.context import DoctorOptions
from rtcauthd.doctor.dns import Answer
from rtcauthd.doctor.net import Network
from rtcauthd.doctor.probes import ProbeError
from rtcauthd.doctor.report import Result, Status
from rtcauthd.doctor.runner import CHECKS, CheckSpec, deadline_for, diagnose
from rtcauthd.outbound.client import HTTPClient
from rtcauthd.matrix.resolver import ServerResolver


class NeverAgent:
    """An IAgent whose requests never get an answer (a blackholed host)."""

    def __init__(self) -> None:
        self.requests = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        self.requests.append((method, uri))
        return Deferred()


class NeverDNS:
    def __init__(self) -> None:
        self.lookups = []

    def addresses(self, name):
        self.lookups.append(name)
        return Deferred()

    def lookup(self, name, kind):
        return Deferred()

    def lookupService(self, name, timeout=None):
        return Deferred()


class NeverProbes:
    def tcp_connect(self, address, port):
        return Deferred()

    def certificate(self, host, port, *, verify=True):
        return Deferred()


class RefusingProbes:
    def tcp_connect(self, address, port):
        from twisted.internet.defer import fail

        return fail(ProbeError("connect", "connection refused"))

    certificate = lambda self, host, port, verify=True: RefusingProbes.tcp_connect(self, host, port)


class NoSuchHostDNS:
    def addresses(self, name):
        return succeed((Answer(name, "A", nxdomain=True), Answer(name, "AAAA", nxdomain=True)))


class RefusingAgent:
    def request(self, method, uri, headers=None, bodyProducer=None):
        from twisted.internet.defer import fail

        from rtcauthd.outbound.client import OutboundError

        return fail(OutboundError(FailureKind.CONNECT, "connect", "connection refused"))


def network(clock, *, dns, agent, probes, timeout: float = 5.0) -> Network:
    """Like build_network's, every bound being the doctor's --timeout."""
    closed = []
    http = HTTPClient(clock=clock, agent=agent, timeout=timeout)
    net = Network(
        dns=dns,
        http=http,
        federation=HTTPClient(clock=clock, agent=agent, timeout=timeout),
        resolver=ServerResolver(clock=clock, http=http, srv_resolver=dns, well_known_timeout=timeout),
        probes=probes,
        close=lambda: closed.append(True) or succeed(None),
    )
    net.closed = closed
    return net


class DeadlineTests(SynchronousTestCase):
    def test_dead_host_report_is_complete_at_the_deadline(self):
        clock = Clock()
        net = network(clock, dns=NeverDNS(), agent=NeverAgent(), probes=NeverProbes())
        options = DoctorOptions(server_name="dead.example", timeout=5.0, access_token="t")
        d = Deferred.fromCoroutine(diagnose(options, reactor=clock, network=net))
        self.assertEqual(deadline_for(5.0), 12.0)
        clock.pump([0.5] * 23)
        self.assertNoResult(d)
        clock.advance(0.5)
        report = self.successResultOf(d)
        self.assertAlmostEqual(report.elapsed, 12.0)
        self.assertEqual(report.exit_status, 1)
        by_check = {r.check: r for r in report.results}
        self.assertEqual(by_check["dns"].status, Status.FAIL)
        self.assertEqual(
            by_check["dns"].message,
            "did not finish within 12 s, the report's time limit (2.4 × --timeout)",
        )
        # Bounded steps end earlier, with their own reason.
        self.assertEqual(by_check["well-known"].status, Status.FAIL)
        self.assertEqual(
            by_check["well-known"].message,
            "cannot fetch https://dead.example/.well-known/matrix/client: no complete answer within 5 s",
        )
        self.assertEqual(by_check["rtc-focus"].status, Status.SKIP)
        self.assertEqual(by_check["client-api"].status, Status.SKIP)
        # Every check is in the report, in order, and nothing is left running. (The
        # application-service check has no line outside application-service mode.)
        self.assertEqual([r.check for r in report.results], [s.id for s in CHECKS if s.id != "appservice"])
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(net.closed, [True])

    def test_deadline_scales_with_timeout(self):
        clock = Clock()
        net = network(clock, dns=NeverDNS(), agent=NeverAgent(), probes=NeverProbes(), timeout=1.0)
        d = Deferred.fromCoroutine(diagnose(DoctorOptions(server_name="dead.example", timeout=1.0), reactor=clock, network=net))
        clock.pump([0.2] * 11)
        self.assertNoResult(d)
        clock.advance(0.2)
        report = self.successResultOf(d)
        self.assertIn("did not finish within 2.4 s", {r.check: r for r in report.results}["dns"].message)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_fast_failures_need_no_deadline(self):
        clock = Clock()
        net = network(clock, dns=NoSuchHostDNS(), agent=RefusingAgent(), probes=RefusingProbes())
        d = Deferred.fromCoroutine(diagnose(DoctorOptions(server_name="gone.example"), reactor=clock, network=net))
        report = self.successResultOf(d)
        self.assertEqual(report.elapsed, 0.0)
        by_check = {r.check: r for r in report.results}
        self.assertEqual(by_check["dns"].message, "gone.example does not exist in DNS (NXDOMAIN)")
        self.assertEqual(by_check["well-known"].message,
                         "cannot fetch https://gone.example/.well-known/matrix/client: connection refused")
        self.assertEqual(clock.getDelayedCalls(), [])


class RobustnessTests(SynchronousTestCase):
    def test_a_crashing_check_is_reported_not_fatal(self):
        async def boom(ctx):
            raise RuntimeError("boom")

        async def fine(ctx):
            return [Result("fine", "Fine", Status.PASS, "ok")]

        clock = Clock()
        net = network(clock, dns=NeverDNS(), agent=NeverAgent(), probes=NeverProbes())
        specs = (CheckSpec("boom", "Boom", boom), CheckSpec("fine", "Fine", fine))
        report = self.successResultOf(
            Deferred.fromCoroutine(diagnose(DoctorOptions(server_name="example.com"), reactor=clock, network=net, specs=specs))
        )
        self.assertEqual(
            [(r.check, r.status, r.message) for r in report.results],
            [("boom", Status.FAIL, "internal error in doctor: RuntimeError: boom"), ("fine", Status.PASS, "ok")],
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_invalid_server_name(self):
        report = self.successResultOf(
            Deferred.fromCoroutine(diagnose(DoctorOptions(server_name="exa mple.com"), reactor=Clock(), network=None))
        )
        self.assertEqual(len(report.results), 1)
        self.assertEqual(report.results[0].status, Status.FAIL)
        self.assertEqual(
            report.results[0].message,
            "'exa mple.com' is not a Matrix server name: hostname may only contain A-Z, a-z, 0-9, '-' and '.'",
        )

    def test_probe_errors_are_per_address(self):
        class HalfProbes(NeverProbes):
            def tcp_connect(self, address, port):
                if ":" in address:
                    from twisted.internet.defer import fail

                    return fail(ProbeError("connect", "connection refused"))
                return succeed(None)

        class TwoFamilies:
            def addresses(self, name):
                return succeed((Answer(name, "A", ("192.0.2.1",)), Answer(name, "AAAA", ("2001:db8::1",))))

        clock = Clock()
        net = network(clock, dns=TwoFamilies(), agent=RefusingAgent(), probes=HalfProbes())
        specs = tuple(s for s in CHECKS if s.id == "reach")
        report = self.successResultOf(
            Deferred.fromCoroutine(diagnose(DoctorOptions(server_name="example.com"), reactor=clock, network=net, specs=specs))
        )
        self.assertEqual(
            [(r.check, r.status, r.message) for r in report.results],
            [
                ("reach-ipv4", Status.PASS, "IPv4 192.0.2.1 accepts connections on port 443"),
                ("reach-ipv6", Status.FAIL, "IPv6 address published but unreachable: [2001:db8::1]:443: connection refused"),
            ],
        )
