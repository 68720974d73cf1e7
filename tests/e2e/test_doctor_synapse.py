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
from tests.blackbox.harness import BlackBoxCase, DaemonProcess, ManagedProcess, daemon_base_env, free_port
from tests.doctor.fakes import FakeDNS, Zone
from tests.e2e.synapse import AppService, MatrixClient, SynapseServer, ensure_venv, skip_reason

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


class DoctorSynapseCase(BlackBoxCase, unittest.TestCase):
    """Staging and running doctor against a Synapse of the test's own (no tests here)."""

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



class DoctorAgainstSynapseTests(DoctorSynapseCase):
    """Well-known deployments (issue 6)."""

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
            # no MSC4143 here: clients read the well-known, as before
            "transports": "pass",
            "appservice": None,
            "as-proxy": None,
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


class UnprefixedAppService(AppService):
    """The registration as an older README wrote it: keys Synapse 1.163 does not read."""

    def registration_yaml(self) -> str:
        text = super().registration_yaml()
        for key in ("io.element.msc4502.scopes", "io.element.msc4512.proxy_prefix", "io.element.msc4512.proxy_url"):
            text = text.replace(key + ":", key.rsplit(".", 1)[1] + ":")
        return text


class RateLimitedAppService(AppService):
    """A registration without ``rate_limited: false``: Synapse's default applies."""

    def registration_yaml(self) -> str:
        return super().registration_yaml().replace("rate_limited: false\n", "")


class ASDoctorSynapse(HTTPSDiscoverySynapse):
    """A Synapse with rtcauthd registered as its application service; ``tweak`` edits
    homeserver.yaml (as a dict) to make one of the operators' mistakes."""

    def __init__(self, *, tweak, **kwargs) -> None:
        self.tweak = tweak
        super().__init__(**kwargs)

    def _write_config(self, ca) -> None:
        super()._write_config(ca)
        with open(self.config_path) as f:
            config = json.load(f)
        self.tweak(config)
        with open(self.config_path, "w") as f:
            json.dump(config, f, indent=1)


AS_LINES = ("transports", "appservice", "as-registration", "as-token", "as-ping", "as-proxy", "as-is-joined",
            "as-delayed-events")
PROXIED_GET_TOKEN = "/_matrix/client/unstable/io.element.msc4195/rtc/livekit/get_token"


class DoctorAgainstASSynapseTests(DoctorSynapseCase):
    """Application-service deployments (issue 14): Synapse proxies to the real daemon."""

    @defer.inlineCallbacks
    def as_deployment(self, name: str, *, tweak=lambda config: None, appservice_class=AppService,
                      service=lambda hs: {}, ping: bool = False):
        """Synapse with the registration and transport, rtcauthd in AS mode (plain HTTP on
        proxy_url, TLS for the well-known's focus), a fake SFU on the transport's port."""
        tls_port, fed_port = free_port("127.0.0.1"), free_port("127.0.0.1")
        appservice = appservice_class(id="rtcauthd", server_name=f"127.0.0.1:{fed_port}",
                                      service_port=free_port("127.0.0.1"), sfu_port=free_port("127.0.0.1"), ping=ping)
        hs = ASDoctorSynapse(name=name, workdir=os.path.join(self.workdir, "synapse-" + name), venv=self.venv,
                             ca=self.ca, rtc_foci_url=f"https://127.0.0.1:{tls_port}", appservice=appservice,
                             fed_port=fed_port, tweak=tweak)
        self.addCleanup(hs.stop)
        hs.spawn()
        sfu = FakeLiveKit()
        sfu.listen(host="127.0.0.1", port=appservice.sfu_port)
        self.addCleanup(sfu.stop)
        settings = self.service_env(
            livekit_url=appservice.sfu_url, full_access=hs.server_name,
            RTCAUTH_FEDERATION_IP_RANGE_ALLOWLIST="127.0.0.0/8",
            LIVEKIT_HS_SERVER_NAME=hs.server_name, LIVEKIT_AS_REGISTRATION_FILE=hs.registration_path,
            LIVEKIT_CS_API_URL_OVERRIDES=f"{hs.server_name}={hs.client_url}")
        settings.update(service(hs))
        cert_path, key_path = self.ca.issue(["127.0.0.1"]).write(self.workdir, "service-" + name)
        tls = f"ssl:{tls_port}:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}"
        daemon = DaemonProcess(workdir=os.path.join(self.workdir, "daemon-" + name), env=settings,
                               port=appservice.service_port, args=["--listen", tls])
        self.addCleanup(daemon.cleanup)
        self.__dict__.setdefault("_daemons", []).append(daemon)
        yield defer.gatherResults([hs.wait_ready(reactor), daemon.start()], consumeErrors=True)
        env_path = os.path.join(self.home, "rtcauthd.env")
        with open(env_path, "w") as f:
            f.write("".join(f"{key}={value}\n" for key, value in settings.items()))
        user, token_file = yield self.register(hs)
        self.secrets = [hs.appservice.as_token, hs.appservice.hs_token, user.access_token] + [
            value for key, value in settings.items() if key.endswith("_TOKEN") and value]
        return hs, daemon, env_path, token_file

    @defer.inlineCallbacks
    def diagnose(self, name: str, **kwargs):
        hs, daemon, env_path, token_file = yield self.as_deployment(name, **kwargs)
        mark = hs.log_mark()
        code, report, output = yield self.doctor(hs, "--access-token", "@" + token_file, "--config", env_path)
        context = f"{output}\n{daemon.describe()}\n{hs.describe()}"
        for secret in self.secrets:  # no token of either side, nor the user's, is printed
            self.assertNotIn(secret, output)
        return hs, mark, code, self.checks(report), context

    @defer.inlineCallbacks
    def test_correct_as_deployment_passes(self):
        """Synapse routes the proxied get_token to rtcauthd, which checks membership through
        is_joined (403 for doctor's made-up room); the transport url is LIVEKIT_URL."""
        hs, mark, code, checks, context = yield self.diagnose("as-ok")
        self.assertEqual(code, 0, context)
        self.assert_status(checks, {"transports": "pass", "appservice": "pass", "as-registration": "pass",
                                    "as-token": "pass", "as-ping": "skip", "as-proxy": "pass",
                                    "as-is-joined": "pass", "as-delayed-events": "pass"}, context)
        sfu_url = hs.appservice.sfu_url
        self.assertEqual(checks["transports"]["message"],
                         f"a livekit transport with url {sfu_url} (= LIVEKIT_URL), livekit_service_url "
                         f"{hs.appservice.service_url} (read with --access-token)")
        self.assertIn(f"accepted the hs_token and the url {sfu_url}", checks["as-proxy"]["message"])
        self.assertEqual(checks["as-token"]["message"],
                         f"Synapse knows the service's as_token (it acts as {hs.appservice.sender})")
        self.assertIn("url is null", checks["as-ping"]["message"])
        # The service itself answered the proxied probe: Synapse relayed its 403.
        self.assertEqual(len(self.access(hs, mark, PROXIED_GET_TOKEN, "rtcauth-doctor", 403)), 1, hs.describe())

    @defer.inlineCallbacks
    def test_empty_transports(self):
        """msc4143_enabled without matrix_rtc: Synapse answers {} and doctor fails it."""
        hs, _mark, code, checks, context = yield self.diagnose("as-empty", tweak=lambda c: c.pop("matrix_rtc"))
        self.assertEqual(code, 1, context)
        transports = checks["transports"]
        self.assertEqual(transports["status"], "fail", context)
        self.assertIn("rtc/transports answers {} (read with --access-token): msc4143_enabled is on but "
                      "matrix_rtc has no transports", transports["message"])
        self.assertIn(f'url: "{hs.appservice.sfu_url}"', "\n".join(transports["fix"]))
        # Everything else of AS mode works (the probe sends LIVEKIT_URL itself).
        self.assert_status(checks, {"as-proxy": "pass", "as-is-joined": "pass", "as-token": "pass"}, context)

    @defer.inlineCallbacks
    def test_wrong_transport_url_and_msc4502_off(self):
        """The transport url has a trailing '/' and is_joined is not switched on: the real
        daemon answers 400 M_INVALID_PARAM for the url before it asks is_joined, which doctor
        finds missing on its own."""

        def tweak(config):
            config["matrix_rtc"]["transports"][0]["url"] += "/"
            del config["experimental_features"]["msc4502_enabled"]

        hs, _mark, code, checks, context = yield self.diagnose("as-url", tweak=tweak)
        sfu_url = hs.appservice.sfu_url
        self.assertEqual(code, 1, context)
        self.assert_status(checks, {"transports": "fail", "as-proxy": "fail", "as-is-joined": "fail",
                                    "as-token": "pass", "as-registration": "pass"}, context)
        self.assertEqual(checks["transports"]["message"],
                         f"the livekit transport's url {sfu_url}/ is not LIVEKIT_URL {sfu_url} (only a trailing "
                         "'/' differs): every token request through the homeserver gets 400 M_INVALID_PARAM")
        self.assertIn(f"refused the transport url {sfu_url}/ (400 M_INVALID_PARAM)", checks["as-proxy"]["message"])
        self.assertIn("msc4502_enabled is off", checks["as-is-joined"]["message"])
        self.assertIn("msc4502_enabled: true", "\n".join(checks["as-is-joined"]["fix"]))

    @defer.inlineCallbacks
    def test_msc4512_off(self):
        """Without msc4512_enabled Synapse has no rtc/livekit route: clients get 404."""
        _hs, _mark, code, checks, context = yield self.diagnose(
            "as-4512", tweak=lambda c: c["experimental_features"].pop("msc4512_enabled"))
        self.assertEqual(code, 1, context)
        proxy = checks["as-proxy"]
        self.assertEqual(proxy["status"], "fail", context)
        self.assertIn("msc4512_enabled is off", proxy["message"])
        self.assertIn("msc4512_enabled: true", "\n".join(proxy["fix"]))
        self.assert_status(checks, {"as-registration": "pass", "as-is-joined": "pass", "transports": "pass"}, context)

    @defer.inlineCallbacks
    def test_unprefixed_registration_keys(self):
        """Synapse starts with the unprefixed keys and silently proxies nothing."""
        _hs, _mark, code, checks, context = yield self.diagnose("as-keys", appservice_class=UnprefixedAppService)
        self.assertEqual(code, 1, context)
        self.assert_status(checks, {"as-registration": "fail", "as-proxy": "fail", "as-is-joined": "fail"}, context)
        self.assertIn("uses proxy_prefix, proxy_url, scopes, which Synapse ignores", checks["as-registration"]["message"])
        self.assertIn("lacks the io.element.msc4512 proxy keys", checks["as-proxy"]["message"])
        self.assertIn("lacks the is_joined scope", checks["as-is-joined"]["message"])

    @defer.inlineCallbacks
    def test_hs_token_mismatch(self):
        """The service was given its own copy of the registration, with another hs_token:
        the real daemon refuses Synapse's ping and every proxied request."""

        def service(hs):
            path = os.path.join(self.home, "registration-copy.yaml")
            with open(hs.registration_path) as f:
                text = f.read().replace(hs.appservice.hs_token, "hs_not_the_registered_one")
            with open(path, "w") as f:
                f.write(text)
            return {"LIVEKIT_AS_REGISTRATION_FILE": path}

        _hs, _mark, code, checks, context = yield self.diagnose("as-hs-token", service=service, ping=True)
        self.assertEqual(code, 1, context)
        self.assert_status(checks, {"as-proxy": "fail", "as-ping": "fail", "as-token": "pass",
                                    "as-registration": "pass", "as-is-joined": "pass"}, context)
        self.assertIn("the service refused Synapse's hs_token (M_UNKNOWN_TOKEN): Synapse's registration and the "
                      "service have different hs_tokens", checks["as-proxy"]["message"])
        self.assertIn("the service refused Synapse's hs_token (HTTP 401)", checks["as-ping"]["message"])
        self.assertIn("app_service_config_files:", "\n".join(checks["as-ping"]["fix"]))

    @defer.inlineCallbacks
    def test_ping_and_the_default_delayed_event_rate_limit(self):
        """The registration has a url (Synapse pings the daemon) but no ``rate_limited: false``,
        and homeserver.yaml keeps Synapse's default rc_delayed_event_mgmt: the as_token's
        restarts are throttled, which doctor warns about with the registration line to add."""
        hs, _mark, code, checks, context = yield self.diagnose(
            "as-ratelimit", appservice_class=RateLimitedAppService, ping=True,
            tweak=lambda c: c.pop("rc_delayed_event_mgmt"))
        self.assertEqual(code, 0, context)  # a warning, not a failure
        self.assert_status(checks, {"as-ping": "pass", "as-delayed-events": "warn", "as-proxy": "pass"}, context)
        self.assertIn(f"Synapse reached the service at {hs.appservice.service_url} and it accepted the hs_token",
                      checks["as-ping"]["message"])
        self.assertIn("Synapse throttled delayed-event restarts sent with the service's as_token",
                      checks["as-delayed-events"]["message"])
        self.assertIn("rate_limited: false", "\n".join(checks["as-delayed-events"]["fix"]))
