"""End to end: ``rtcauth doctor`` against a real Synapse and the real daemon (issue 6, item 4).

Each test stages a whole deployment on loopback and runs the ``rtcauth`` console script
as an operator would, with ``--json``:

- a Synapse of its own (the shared cluster advertises a plain-http focus, which doctor
  rightly fails), whose server name is ``127.0.0.1:<tls port>`` and whose client
  well-known advertises the service we want; ``public_baseurl`` is the TLS listener, so
  ``m.homeserver.base_url`` is https as clients require;
- rtcauthd (the real daemon) with a TLS listener, certificate from this test's CA;
- a fake SFU (Twirp) behind TLS, so ``LIVEKIT_URL`` is a genuine ``wss://`` URL;
- a loopback DNS server with an empty zone, given as ``--dns-server``: doctor must not
  need DNS for an IP-literal deployment, and if it asked, nothing would leave loopback.

How doctor reads ``127.0.0.1:PORT``: it fetches the client well-known on the host name
only (``https://127.0.0.1/.well-known/matrix/client``, as the client-server spec says),
on ``--https-port`` (default 443), and probes reachability and the server name's TLS on
that port too; only the federation check uses the port in the server name.  Synapse
serves the well-known on its federation TLS listener, so ``--https-port`` is that port.
The DNS check is skipped for an IP address.

Opt out explicitly with RTCAUTH_SKIP_SYNAPSE=1, like the rest of the suite.
"""

from __future__ import annotations

import json
import os
import secrets
import sys

from twisted.internet import defer, reactor, ssl
from twisted.trial import unittest
from twisted.trial.unittest import FailTest

from tests.blackbox.fake_livekit import FakeLiveKit
from tests.blackbox.harness import BlackBoxCase, ManagedProcess, daemon_base_env, free_port
from tests.doctor.fakes import FakeDNS, Zone
from tests.e2e.synapse import MatrixClient, SynapseServer, ensure_venv, skip_reason

#: Generous bound for the doctor child to finish on a shared machine; never asserted.
DOCTOR_DEADLINE = 60.0
#: doctor's per-operation bound; its whole report is cut off at 2.4 times this.
DOCTOR_TIMEOUT = "10"
USERINFO = "/_matrix/federation/v1/openid/userinfo"


def rtcauth_path() -> str:
    return os.path.join(os.path.dirname(sys.executable), "rtcauth")


class HTTPSDiscoverySynapse(SynapseServer):
    """A Synapse whose well-known names its TLS listener as ``m.homeserver.base_url``.

    The shared cluster publishes its plain-http client port there (right for its tests,
    wrong for browsers, and doctor says so); this one is a deployment doctor can pass.
    """

    def _write_config(self, ca) -> None:
        super()._write_config(ca)
        with open(self.config_path) as f:
            config = json.load(f)
        config["public_baseurl"] = self.federation_url + "/"
        with open(self.config_path, "w") as f:
            json.dump(config, f, indent=1)


class DoctorAgainstSynapseTests(BlackBoxCase, unittest.TestCase):
    skip = skip_reason()
    timeout = 300  # the first test may create the Synapse virtualenv

    def setUp(self):
        BlackBoxCase.setUp(self)
        self.venv = ensure_venv()
        self.home = os.path.join(self.workdir, "operator")
        os.makedirs(self.home)
        # An empty zone: every query doctor made would be recorded here (and answered NXDOMAIN).
        self.zone = Zone()
        self.dns = FakeDNS(self.zone, reactor=reactor)
        self.dns.start()
        self.addCleanup(self.dns.stop)
        # The SFU over TLS, so LIVEKIT_URL is a real wss:// URL (verified with RTCAUTH_CA_FILE).
        self.lk = FakeLiveKit()
        sfu_cert = self.ca.issue(["127.0.0.1"])
        self.lk.listen_ssl("127.0.0.1", ssl.PrivateCertificate.loadPEM(sfu_cert.combined_pem).options())
        self.addCleanup(self.lk.stop)
        self.sfu_url = f"wss://127.0.0.1:{self.lk.port}"

    # -- the deployment -------------------------------------------------------------------

    def make_synapse(self, name: str, rtc_foci_url: str) -> HTTPSDiscoverySynapse:
        hs = HTTPSDiscoverySynapse(name=name, workdir=os.path.join(self.workdir, "synapse-" + name),
                                   venv=self.venv, ca=self.ca, rtc_foci_url=rtc_foci_url)
        self.addCleanup(hs.stop)
        hs.spawn()
        return hs

    def service_settings(self, hs: SynapseServer) -> dict[str, str]:
        return self.service_env(livekit_url=self.sfu_url, full_access=hs.server_name,
                                RTCAUTH_FEDERATION_IP_RANGE_ALLOWLIST="127.0.0.0/8")

    def make_tls_daemon(self, hs: SynapseServer, tls_port: int):
        """rtcauthd on plain HTTP (the harness's readiness probe) and on TLS at ``tls_port``."""
        cert_path, key_path = self.ca.issue(["127.0.0.1"]).write(self.workdir, "service")
        listen = f"ssl:{tls_port}:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}"
        return self.make_daemon(self.service_settings(hs), args=["--listen", listen])

    def env_file(self, hs: SynapseServer) -> str:
        """The service's settings as an env file, for ``doctor --config``."""
        path = os.path.join(self.home, "rtcauthd.env")
        with open(path, "w") as f:
            for key, value in self.service_settings(hs).items():
                f.write(f"{key}={value}\n")
        return path

    @defer.inlineCallbacks
    def register(self, hs: SynapseServer):
        """A user of ``hs`` and a file holding their access token (for ``--access-token @FILE``)."""
        client = MatrixClient(reactor, hs)
        try:
            user = yield client.register("doctor-" + secrets.token_hex(4))
        finally:
            yield client.close()
        path = os.path.join(self.home, "token")
        with open(path, "w") as f:
            f.write(user.access_token + "\n")
        return user, path

    # -- running doctor -------------------------------------------------------------------

    @defer.inlineCallbacks
    def doctor(self, hs: SynapseServer, *extra: str):
        """Run the console script; ``(exit code, parsed JSON report, raw output)``."""
        child = ManagedProcess(
            argv=[rtcauth_path(), "doctor", hs.server_name, "--json",
                  "--ca-file", self.ca_file,
                  "--https-port", str(hs.fed_port),
                  "--dns-server", self.dns.address,
                  "--timeout", DOCTOR_TIMEOUT, *extra],
            env=daemon_base_env(self.home), cwd=self.home, reactor=reactor,
        )
        child.spawn()
        try:
            code, _signal = yield child.wait_ended(DOCTOR_DEADLINE)
        except FailTest:
            yield child.kill()
            raise FailTest(f"rtcauth doctor did not finish within {DOCTOR_DEADLINE:g}s\n" + child.describe())
        output = child.output
        try:
            report = json.loads(output)
        except ValueError:
            raise FailTest(f"rtcauth doctor --json printed no JSON (exit {code}):\n{output}\n" + hs.describe())
        return code, report, output

    def checks(self, report: dict) -> dict:
        """The report's lines by id; TLS (one line per host) is under ``tls`` as a list."""
        by_id: dict = {"tls": []}
        for check in report["checks"]:
            if check["id"] == "tls":
                by_id["tls"].append(check)
                continue
            self.assertNotIn(check["id"], by_id, f"two lines with id {check['id']}: {report}")
            by_id[check["id"]] = check
        return by_id

    def assert_status(self, checks: dict, expected: dict[str, str], context: str) -> None:
        got = {name: checks[name]["status"] if name in checks else None for name in expected}
        self.assertEqual(got, expected, context)

    def access(self, hs: SynapseServer, mark: int, containing: str, agent: str, status: int) -> list[str]:
        """Synapse's access-log lines for requests by ``agent`` answered with ``status``."""
        return [line for line in hs.access_lines(mark, containing=containing)
                if f'"{agent}" [' in line and f" {status} \"" in line]

    # -- tests ----------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_correct_deployment_passes(self):
        """The well-known advertises rtcauthd's https URL: exit 0, every link of the chain
        checked, including the full token flow with a real user's access token."""
        tls_port = free_port("127.0.0.1")
        service_url = f"https://127.0.0.1:{tls_port}"
        hs = self.make_synapse("ok", service_url)
        daemon = self.make_tls_daemon(hs, tls_port)
        yield defer.gatherResults([hs.wait_ready(reactor), daemon.start()], consumeErrors=True)
        user, token_file = yield self.register(hs)
        mark = hs.log_mark()

        code, report, output = yield self.doctor(
            hs, "--access-token", "@" + token_file, "--config", self.env_file(hs))

        context = f"{output}\n{daemon.describe()}\n{hs.describe()}"
        checks = self.checks(report)
        self.assertEqual((code, report["ok"], report["summary"]["fail"]), (0, True, 0), context)
        self.assertEqual(report["server_name"], hs.server_name)
        self.assert_status(checks, {
            "dns": "skip",
            "reach-ipv4": "pass",
            "well-known": "pass",
            "rtc-focus": "pass",
            "service": "pass",
            "service-cors": "pass",
            "federation": "pass",
            "client-api": "pass",
            "msc4140": "pass",
            "token-flow": "pass",
            "delayed-events": "pass",
            "config": "pass",
            "livekit-api": "pass",
            # a loopback SFU is, rightly, not reachable for clients elsewhere
            "sfu-url": "warn",
            "livekit-webhook": "info",
        }, context)
        self.assertNotIn("reach-ipv6", checks)  # an IPv4 literal has no other family
        self.assertEqual(checks["dns"]["message"], "127.0.0.1 is an IP address: nothing to look up")
        self.assertEqual(checks["reach-ipv4"]["message"], f"IPv4 127.0.0.1 accepts connections on port {hs.fed_port}")
        self.assertEqual(
            checks["well-known"]["message"],
            f"https://127.0.0.1/.well-known/matrix/client: m.homeserver {hs.federation_url}, "
            "Access-Control-Allow-Origin: *",
        )
        self.assertEqual(checks["rtc-focus"]["message"], f"livekit_service_url {service_url} (from the well-known)")
        self.assertEqual(checks["service"]["message"], f"{service_url} answers /healthz and /get_token")
        self.assertEqual(
            checks["federation"]["message"],
            f"OpenID userinfo reachable via {hs.server_name}; a made-up token gets 401 M_UNKNOWN_TOKEN, as it should",
        )
        self.assertEqual(checks["msc4140"]["message"], "the homeserver advertises org.matrix.msc4140 (delayed events)")
        self.assertEqual(
            checks["token-flow"]["message"],
            f"{user.user_id} got a LiveKit JWT from {service_url}/get_token; its claims match "
            "MSC4195 (identity, room alias, join/publish/subscribe grants)",
        )
        self.assertEqual(
            checks["sfu-url"]["message"],
            f"{self.sfu_url} (LIVEKIT_URL) names an internal host: clients elsewhere cannot reach it",
        )
        # One TLS line per host:port: the server name (= homeserver), the service, the SFU.
        self.assertEqual(
            [(c["title"], c["status"], c["details"][0]) for c in checks["tls"]],
            [("TLS 127.0.0.1", "pass", "used as server name, homeserver"),
             (f"TLS 127.0.0.1:{tls_port}", "pass", "used as auth service"),
             (f"TLS 127.0.0.1:{self.lk.port}", "pass", "used as SFU")],
            context,
        )
        for line in checks["tls"]:
            self.assertTrue(line["message"].startswith("certificate valid, issued by rtcauthd test CA"), line)

        # What really happened: doctor's own probe of userinfo (401), then rtcauthd verifying
        # the OpenID token doctor obtained for the user (200), both at the real Synapse.
        self.assertEqual(len(self.access(hs, mark, USERINFO, "rtcauth-doctor", 401)), 1, hs.describe())
        self.assertEqual(len(self.access(hs, mark, USERINFO, "rtcauthd", 200)), 1, hs.describe())
        self.assertEqual(len(self.access(hs, mark, "/delayed_events/rtcauth-doctor-probe/restart",
                                         "rtcauth-doctor", 404)), 10, hs.describe())
        # CreateRoom twice: doctor's key probe, and the service for the user's token.
        self.assertEqual(len(self.lk.create_room_requests), 2, [(c.method, c.path) for c in self.lk.calls])
        self.assertIn("rtcauth-doctor-probe", [c.name for c in self.lk.create_room_requests])
        # An IP-literal deployment needs no DNS at all; the access token is never printed.
        self.assertEqual(self.zone.queries, [])
        self.assertNotIn(user.access_token, output)
        self.assertNotIn("eyJ", output)  # nor the service's JWT

    @defer.inlineCallbacks
    def test_sfu_wss_url_in_well_known_fails(self):
        """The classic mistake: the well-known advertises the SFU's wss:// URL. Exit 1, the
        RTC focus line names the wss:// URL and asks for the service's https:// URL; the
        service and the token flow cannot be checked; everything else still passes."""
        hs = self.make_synapse("wss", self.sfu_url)
        yield hs.wait_ready(reactor)
        _user, token_file = yield self.register(hs)
        sfu_calls = len(self.lk.calls)

        code, report, output = yield self.doctor(
            hs, "--access-token", "@" + token_file, "--config", self.env_file(hs))

        context = f"{output}\n{hs.describe()}"
        checks = self.checks(report)
        self.assertEqual((code, report["ok"], report["summary"]["fail"]), (1, False, 1), context)
        self.assert_status(checks, {
            "dns": "skip",
            "reach-ipv4": "pass",
            "well-known": "pass",
            "rtc-focus": "fail",
            "service": "skip",
            "federation": "pass",
            "client-api": "pass",
            "msc4140": "pass",
            "token-flow": "skip",
            "delayed-events": "pass",
            "livekit-api": "pass",
        }, context)
        focus = checks["rtc-focus"]
        self.assertEqual(
            focus["message"],
            f"livekit_service_url in the well-known is {self.sfu_url}, a WebSocket (wss://) URL: "
            "it must be the https:// URL of the authorization service",
        )
        self.assertEqual(len(focus["fix"]), 1, focus)
        self.assertIn(f"Clients POST to {self.sfu_url}/get_token, which a WebSocket URL cannot answer. "
                      "Write the https:// URL where rtcauthd (or lk-jwt-service) is served", focus["fix"][0])
        self.assertIn("The SFU's wss:// URL belongs in the service's LIVEKIT_URL", focus["fix"][0])
        self.assertEqual(checks["service"]["message"], "no https:// service URL to check (see RTC focus)")
        self.assertEqual(checks["token-flow"]["message"], "no service URL (see above)")
        # doctor tried the https:// twin of the wss:// URL: the SFU is no authorization service.
        requests = [(c.method, c.path) for c in self.lk.calls[sfu_calls:]]
        self.assertEqual(requests.count(("GET", "/healthz")), 1, requests)
        self.assertEqual(self.zone.queries, [])

    @defer.inlineCallbacks
    def test_service_wss_url_in_well_known_names_the_https_url(self):
        """wss:// in front of the *service's* address: doctor finds the service answering
        /healthz at the https:// twin and tells the operator exactly what to write."""
        tls_port = free_port("127.0.0.1")
        hs = self.make_synapse("wss-service", f"wss://127.0.0.1:{tls_port}")
        daemon = self.make_tls_daemon(hs, tls_port)
        yield defer.gatherResults([hs.wait_ready(reactor), daemon.start()], consumeErrors=True)

        code, report, output = yield self.doctor(hs)

        context = f"{output}\n{daemon.describe()}\n{hs.describe()}"
        checks = self.checks(report)
        self.assertEqual((code, report["summary"]["fail"]), (1, 1), context)
        focus = checks["rtc-focus"]
        self.assertEqual(focus["status"], "fail", context)
        self.assertEqual(
            focus["message"],
            f"livekit_service_url in the well-known is wss://127.0.0.1:{tls_port}, a WebSocket (wss://) URL: "
            "it must be the https:// URL of the authorization service",
        )
        self.assertEqual(
            focus["fix"],
            [f'Write "livekit_service_url": "https://127.0.0.1:{tls_port}" — it answers /healthz like the '
             f"service does. Clients POST to wss://127.0.0.1:{tls_port}/get_token, which a WebSocket URL "
             "cannot answer."],
        )
        self.assertEqual(self.zone.queries, [])
