"""``rtcauth doctor`` as an operator runs it: the console script in a child process.

The deployment (DNS server, TLS virtual hosts, fake homeserver, service and SFU) runs in
the test process; the child is pointed at it with --dns-server, --https-port and
--ca-file, exactly the options staging users have.
"""

from __future__ import annotations

import json
import os
import sys

from twisted.internet import protocol, reactor
from twisted.trial import unittest

from tests.blackbox.harness import ManagedProcess, daemon_base_env
from tests.doctor.fakes import ACCESS_TOKEN, SERVER, SERVICE_HOST, SERVICE_PREFIX, Deployment, Zone, FakeDNS, coroutine_test

#: Generous bound for the child to finish (shared CPUs); never asserted as a duration.
EXIT_DEADLINE = 40.0


def rtcauth_path() -> str:
    return os.path.join(os.path.dirname(sys.executable), "rtcauth")


class _Tarpit(protocol.Protocol):
    """Accepts a connection and never says a word (a hung web server)."""

    def dataReceived(self, data: bytes) -> None:
        pass


class DoctorCLITests(unittest.TestCase):
    def setUp(self) -> None:
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(self.home)

    def deployment(self) -> Deployment:
        deployment = Deployment(reactor=reactor)
        deployment.start()
        self.addCleanup(deployment.stop)
        return deployment

    async def doctor(self, *args: str) -> tuple[int, str]:
        child = ManagedProcess(
            argv=[rtcauth_path(), "doctor", *args], env=daemon_base_env(self.home), cwd=self.home, reactor=reactor
        )
        child.spawn()
        code, _signal = await child.wait_ended(EXIT_DEADLINE)
        return code, child.output

    def options(self, deployment: Deployment) -> list[str]:
        return [
            "--dns-server", deployment.dns.address,
            "--https-port", str(deployment.front.port),
            "--ca-file", deployment.ca_file,
        ]

    @coroutine_test
    async def test_correct_deployment_exits_0(self):
        deployment = self.deployment()
        code, output = await self.doctor(SERVER, *self.options(deployment))
        self.assertEqual(code, 0, output)
        self.assertIn(f"rtcauth doctor {SERVER} (timeout 5 s, HTTPS port {deployment.front.port})", output)
        self.assertIn(f"✓ DNS: {SERVER} has A 127.0.0.1 and AAAA ::1\n", output)
        self.assertIn(f"✓ RTC focus: livekit_service_url https://{SERVICE_HOST}{SERVICE_PREFIX}", output)
        self.assertIn("- Token flow: needs --access-token\n", output)
        self.assertRegex(output, r"\n\d+ passed, 0 warnings, 0 failed, 3 skipped in \d+\.\d s\n")
        self.assertTrue(all(len(line) <= 80 for line in output.splitlines()), output)

    @coroutine_test
    async def test_json_full_flow(self):
        deployment = self.deployment()
        token_file = os.path.join(self.home, "token")
        with open(token_file, "w") as f:
            f.write(ACCESS_TOKEN + "\n")
        code, output = await self.doctor(
            SERVER, *self.options(deployment), "--json", "--access-token", "@" + token_file,
            "--config", deployment.env_file(),
        )
        self.assertEqual(code, 0, output)
        document = json.loads(output)
        self.assertIs(document["ok"], True)
        self.assertEqual(document["summary"]["fail"], 0)
        self.assertEqual(document["summary"]["skip"], 0)
        statuses = {c["id"]: c["status"] for c in document["checks"]}
        for check in ("dns", "well-known", "rtc-focus", "service", "federation", "token-flow",
                      "delayed-events", "livekit-api"):
            self.assertEqual(statuses[check], "pass", check)
        self.assertNotIn(ACCESS_TOKEN, output)

    @coroutine_test
    async def test_misconfiguration_exits_1(self):
        deployment = self.deployment()
        deployment.server_host.client_well_known["org.matrix.msc4143.rtc_foci"][0]["livekit_service_url"] = (
            f"wss://{SERVICE_HOST}{SERVICE_PREFIX}"
        )
        code, output = await self.doctor(SERVER, *self.options(deployment))
        self.assertEqual(code, 1, output)
        flowing = " ".join(output.split())  # undo the 80-column wrapping
        self.assertIn("✗ RTC focus: livekit_service_url in the well-known is "
                      f"wss://{SERVICE_HOST}{SERVICE_PREFIX}, a WebSocket (wss://) URL", flowing)
        self.assertIn(f'fix: Write "livekit_service_url": "https://{SERVICE_HOST}{SERVICE_PREFIX}"', flowing)

    @coroutine_test
    async def test_dead_host_report_is_bounded(self):
        zone = Zone()
        zone.address("dead.test", "127.0.0.1")
        dns = FakeDNS(zone, reactor=reactor)
        dns.start()
        self.addCleanup(dns.stop)
        tarpit = reactor.listenTCP(0, protocol.Factory.forProtocol(_Tarpit), interface="127.0.0.1")
        self.addCleanup(tarpit.stopListening)
        code, output = await self.doctor(
            "dead.test", "--dns-server", dns.address, "--https-port", str(tarpit.getHost().port),
            "--timeout", "1", "--json",
        )
        self.assertEqual(code, 1, output)
        checks = {c["id"]: c for c in json.loads(output)["checks"]}
        self.assertEqual(
            checks["well-known"]["message"],
            "cannot fetch https://dead.test/.well-known/matrix/client: no complete answer within 1 s",
        )
        self.assertEqual(checks["tls"]["message"], "no TLS handshake within 1 s")
        self.assertEqual(checks["reach-ipv4"]["status"], "pass")  # the tarpit does accept TCP

    @coroutine_test
    async def test_usage_error(self):
        code, output = await self.doctor(SERVER, "--dns-server", "resolver.example")
        self.assertEqual(code, 1)
        self.assertEqual(
            output, "rtcauth doctor: --dns-server: 'resolver.example': the DNS server must be an IP address (HOST:PORT)\n"
        )
