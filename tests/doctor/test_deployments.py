"""``rtcauth doctor`` against whole deployments on loopback (real sockets, TLS, DNS).

Each test starts a correct deployment of ``example.test`` (tests/doctor/fakes.py), breaks
one link, runs the doctor in-process through its real network stack (pointed at our DNS
server and TLS port, trusting our test CA) and asserts the exact diagnosis. The
post-mortem's six causes each have a test here (see ``PostMortemTests``).
"""

from __future__ import annotations

from typing import Optional

from twisted.internet import reactor
from twisted.trial import unittest

from rtcauthd.doctor.report import Report, Result, Status, render_json, render_text
from tests.doctor.fakes import (
    ACCESS_TOKEN,
    HS_HOST,
    LIVEKIT_KEY,
    SERVER,
    SERVICE_HOST,
    SERVICE_PREFIX,
    SFU_HOST,
    USER_ID,
    Deployment,
    coroutine_test,
)
from tests.support.certs import self_signed


class DoctorCase(unittest.TestCase):
    """Starts a deployment per test; ``diagnose`` runs the doctor against it."""

    ipv6 = True

    def setUp(self) -> None:
        self.deployment = Deployment(reactor=reactor, ipv6=self.ipv6)
        self._started = False

    def start(self) -> None:
        if not self._started:
            self.deployment.start()
            self._started = True
            self.addCleanup(self.deployment.stop)

    async def diagnose(self, **kwargs) -> Report:
        self.start()
        report = await self.deployment.doctor(**kwargs)
        return report

    def results(self, report: Report, check: str, title: Optional[str] = None) -> list[Result]:
        found = [r for r in report.results if r.check == check and (title is None or r.title == title)]
        if not found:
            self.fail(f"no {check!r} line in the report:\n{render_text(report)}")
        return found

    def line(self, report: Report, check: str, title: Optional[str] = None) -> Result:
        found = self.results(report, check, title)
        self.assertEqual(len(found), 1, render_text(report))
        return found[0]

    def assertLine(self, report: Report, check: str, status: Status, *needles: str, title=None) -> Result:
        result = self.line(report, check, title)
        self.assertEqual(result.status, status, f"{result}\n\n{render_text(report)}")
        for needle in needles:
            self.assertIn(needle, result.message, render_text(report))
        return result

    def assertFix(self, result: Result, *needles: str) -> None:
        text = "\n".join(result.fix)
        for needle in needles:
            self.assertIn(needle, text)


class CorrectDeploymentTests(DoctorCase):
    @coroutine_test
    async def test_correct_deployment_passes(self):
        report = await self.diagnose()
        self.assertEqual(report.exit_status, 0, render_text(report))
        port = self.deployment.front.port
        self.assertLine(report, "dns", Status.PASS, f"{SERVER} has A 127.0.0.1 and AAAA ::1")
        self.assertLine(report, "reach-ipv4", Status.PASS, f"IPv4 127.0.0.1 accepts connections on port {port}")
        self.assertLine(report, "reach-ipv6", Status.PASS, f"IPv6 ::1 accepts connections on port {port}")
        self.assertLine(
            report, "well-known", Status.PASS,
            f"https://{SERVER}/.well-known/matrix/client: m.homeserver https://{HS_HOST}",
            "Access-Control-Allow-Origin: *",
        )
        self.assertLine(report, "rtc-focus", Status.PASS, f"livekit_service_url https://{SERVICE_HOST}{SERVICE_PREFIX}")
        self.assertLine(report, "service", Status.PASS, "answers /healthz and /get_token")
        self.assertLine(report, "service-cors", Status.PASS, "allow POST with Content-Type from any origin")
        tls = self.results(report, "tls")
        self.assertEqual({r.title for r in tls}, {f"TLS {SERVER}", f"TLS {HS_HOST}", f"TLS {SERVICE_HOST}"})
        for result in tls:
            self.assertEqual(result.status, Status.PASS, result)
            self.assertIn("certificate valid, issued by rtcauthd test CA", result.message)
        self.assertLine(
            report, "federation", Status.PASS,
            f"OpenID userinfo reachable via {HS_HOST}:{port} (delegated by .well-known/matrix/server)",
            "a made-up token gets 401 M_UNKNOWN_TOKEN",
        )
        self.assertLine(report, "client-api", Status.PASS, f"https://{HS_HOST} serves the client API")
        self.assertLine(report, "msc4140", Status.PASS, "advertises org.matrix.msc4140")
        self.assertLine(report, "token-flow", Status.SKIP, "needs --access-token")
        self.assertLine(report, "delayed-events", Status.SKIP, "needs --access-token")
        self.assertLine(report, "livekit", Status.SKIP, "needs --config ENVFILE")
        self.assertEqual(report.count(Status.FAIL) + report.count(Status.WARN), 0)
        # Federation really went through the delegation to the homeserver.
        self.assertIn(("GET", "/_matrix/federation/v1/openid/userinfo"), self.deployment.homeserver.requests)

    @coroutine_test
    async def test_full_flow_with_token_and_config_passes(self):
        self.start()
        env = self.deployment.env_file()
        report = await self.diagnose(access_token=ACCESS_TOKEN, config_file=env)
        self.assertEqual(report.exit_status, 0, render_text(report))
        self.assertEqual(report.count(Status.FAIL) + report.count(Status.WARN) + report.count(Status.SKIP), 0,
                         render_text(report))
        self.assertLine(report, "token-flow", Status.PASS, f"{USER_ID} got a LiveKit JWT", "claims match MSC4195")
        self.assertLine(report, "delayed-events", Status.PASS, "no throttling in a burst of 10")
        self.assertLine(report, "config", Status.PASS, f"LIVEKIT_URL wss://{SFU_HOST}", f"key {LIVEKIT_KEY}")
        self.assertLine(report, "livekit-api", Status.PASS, f"LiveKit accepted the key {LIVEKIT_KEY!r}")
        self.assertLine(report, "sfu-url", Status.PASS, f"wss://{SFU_HOST} (LIVEKIT_URL) is reachable")
        webhook = self.assertLine(report, "livekit-webhook", Status.INFO, "signed with LIVEKIT_KEY")
        self.assertIn(f"api_key: {LIVEKIT_KEY}", webhook.details[0])
        self.assertIn(f"- https://{SERVICE_HOST}{SERVICE_PREFIX}/sfu_webhook", webhook.details[0])
        self.assertIn(f"TLS {SFU_HOST}", {r.title for r in self.results(report, "tls")})
        self.assertEqual(self.deployment.sfu.rooms, ["rtcauth-doctor-probe"])
        # The token never leaks into the report.
        self.assertNotIn(ACCESS_TOKEN, render_json(report))
        self.assertNotIn("oidc_", render_json(report))

    @coroutine_test
    async def test_text_report_fits_80_columns(self):
        self.deployment.homeserver.msc4140 = False
        self.deployment.service.strip_prefix = False
        self.deployment.listen_ipv6 = False
        report = await self.diagnose()
        text = render_text(report)
        self.assertIn("\n✗ Auth service: ", text)
        self.assertIn("\n! MSC4140: ", text)
        self.assertIn("\n    fix: Strip the prefix.", text)
        # Two more broken set-ups with long fixes (config snippets).
        del self.deployment.server_host.client_well_known["org.matrix.msc4143.rtc_foci"]
        text += render_text(await self.diagnose(access_token=ACCESS_TOKEN, config_file=self.deployment.env_file()))
        self.deployment.server_host.client_well_known = None
        text += render_text(await self.diagnose())
        self.assertIn("no MatrixRTC authorization service is advertised", text)
        self.assertIn("the bare server name serves no client well-known", text)
        for line in text.splitlines():
            self.assertLessEqual(len(line), 80, line)


class PostMortemTests(DoctorCase):
    """The six misconfigurations that cost the post-mortem hours, one test each."""

    @coroutine_test
    async def test_1_no_authorization_service(self):
        self.start()
        del self.deployment.server_host.client_well_known["org.matrix.msc4143.rtc_foci"]
        report = await self.diagnose()
        result = self.assertLine(
            report, "rtc-focus", Status.FAIL,
            "no MatrixRTC authorization service is advertised",
            "has no org.matrix.msc4143.rtc_foci entry of type livekit",
            "the homeserver has no MSC4143 rtc/transports endpoint",
            "MISSING_MATRIX_RTC_FOCUS",
        )
        self.assertFix(result, '"org.matrix.msc4143.rtc_foci": [', '"type": "livekit"', "livekit_service_url")
        self.assertLine(report, "service", Status.SKIP, "no https:// service URL")
        self.assertEqual(report.exit_status, 1)

    @coroutine_test
    async def test_1b_advertised_service_not_running(self):
        self.deployment.zone.remove(SERVICE_HOST)
        self.deployment.zone.address(SERVICE_HOST, "127.0.0.2")  # nothing listens there
        report = await self.diagnose()
        result = self.assertLine(
            report, "service", Status.FAIL,
            f"https://{SERVICE_HOST}{SERVICE_PREFIX} is unreachable: connection refused",
        )
        self.assertFix(result, "Start rtcauthd (or lk-jwt-service)")
        self.assertLine(report, "service-cors", Status.SKIP, "unreachable")

    @coroutine_test
    async def test_2_wss_url_instead_of_https(self):
        self.start()
        foci = self.deployment.server_host.client_well_known["org.matrix.msc4143.rtc_foci"]
        foci[0]["livekit_service_url"] = f"wss://{SERVICE_HOST}{SERVICE_PREFIX}"
        report = await self.diagnose()
        result = self.assertLine(
            report, "rtc-focus", Status.FAIL,
            f"is wss://{SERVICE_HOST}{SERVICE_PREFIX}, a WebSocket (wss://) URL: it must be the "
            "https:// URL of the authorization service",
        )
        # The https:// form answers /healthz, so the fix names it exactly.
        self.assertFix(result, f'Write "livekit_service_url": "https://{SERVICE_HOST}{SERVICE_PREFIX}"')
        self.assertEqual(report.exit_status, 1)

    @coroutine_test
    async def test_2b_wss_url_of_the_sfu(self):
        self.start()
        foci = self.deployment.server_host.client_well_known["org.matrix.msc4143.rtc_foci"]
        foci[0]["livekit_service_url"] = f"wss://{SFU_HOST}"
        report = await self.diagnose()
        result = self.assertLine(report, "rtc-focus", Status.FAIL, f"is wss://{SFU_HOST}, a WebSocket (wss://) URL")
        self.assertFix(result, f"Clients POST to wss://{SFU_HOST}/get_token", "e.g. \"livekit_service_url\": \"https://")

    @coroutine_test
    async def test_3_bare_server_name_serves_no_well_known(self):
        self.start()
        document = self.deployment.server_host.client_well_known
        self.deployment.server_host.client_well_known = None
        self.deployment.homeserver.client_well_known = document
        report = await self.diagnose()
        result = self.assertLine(
            report, "well-known", Status.FAIL,
            f"https://{SERVER}/.well-known/matrix/client answers 404: the bare server name serves no client well-known",
            f"https://{HS_HOST}/.well-known/matrix/client has one, but clients only look on the server name",
        )
        self.assertFix(result, f"Serve the client well-known at https://{SERVER}/.well-known/matrix/client itself",
                       "add_header Access-Control-Allow-Origin * always;")
        self.assertLine(report, "rtc-focus", Status.SKIP, "no client well-known")
        self.assertEqual(report.exit_status, 1)

    @coroutine_test
    async def test_4_dns_wildcard_does_not_cover_the_apex(self):
        zone = self.deployment.zone
        zone.remove(SERVER)
        zone.address("*." + SERVER, "127.0.0.1")
        report = await self.diagnose()
        result = self.assertLine(
            report, "dns", Status.FAIL,
            f"{SERVER} has no A or AAAA record, but names under it resolve "
            f"(rtcauth-doctor-wildcard-probe.{SERVER} → 127.0.0.1): a DNS wildcard *.{SERVER} "
            f"does not cover the zone apex {SERVER} itself",
        )
        self.assertFix(result, f"Add address records for {SERVER} itself", f"{SERVER}.  IN  A     <IPv4 address>")
        self.assertLine(report, "reach", Status.SKIP, "no address to connect to")
        wk = self.assertLine(report, "well-known", Status.FAIL, f"cannot fetch https://{SERVER}/.well-known/matrix/client")
        self.assertFix(wk, "see the DNS, Reachability and TLS lines")
        self.assertEqual(report.exit_status, 1)

    @coroutine_test
    async def test_5_ipv6_published_but_unreachable(self):
        self.deployment.listen_ipv6 = False  # AAAA ::1 stays; nothing listens there
        report = await self.diagnose()
        port = self.deployment.front.port
        result = self.assertLine(
            report, "reach-ipv6", Status.FAIL,
            f"IPv6 address published but unreachable: [::1]:{port}: connection refused",
        )
        self.assertFix(result, "Clients that try IPv6 first", f"listen on [::]:{port}", "delete the AAAA record")
        self.assertLine(report, "reach-ipv4", Status.PASS, "IPv4 127.0.0.1 accepts connections")
        # Happy eyeballs still reaches the well-known over IPv4.
        self.assertLine(report, "well-known", Status.PASS, "m.homeserver")
        self.assertEqual(report.exit_status, 1)

    @coroutine_test
    async def test_ip_literal_server_unreachable_names_no_dns_record(self):
        self.deployment.listen_ipv6 = False
        report = await self.diagnose(server_name="[::1]")
        port = self.deployment.front.port
        result = self.assertLine(
            report, "reach-ipv6", Status.FAIL, f"IPv6 address ::1 is unreachable: [::1]:{port}: connection refused"
        )
        self.assertFix(result, f"Make ::1 answer HTTPS on port {port}")
        self.assertNotIn("AAAA", " ".join(result.fix))
        self.assertEqual(report.exit_status, 1)

    @coroutine_test
    async def test_6_homeserver_without_msc4140(self):
        self.deployment.homeserver.msc4140 = False
        report = await self.diagnose()
        result = self.assertLine(
            report, "msc4140", Status.WARN,
            "does not advertise org.matrix.msc4140 (delayed events)",
            "phantom participant",
        )
        self.assertFix(result, "max_event_delay_duration: 24h")
        self.assertEqual(report.exit_status, 0, "a warning alone does not fail the report")


class DNSTests(DoctorCase):
    @coroutine_test
    async def test_name_without_addresses(self):
        self.deployment.zone.remove(SERVER)  # matrix.example.test etc. keep the name alive
        report = await self.diagnose()
        result = self.assertLine(report, "dns", Status.FAIL, f"{SERVER} has no A or AAAA record")
        self.assertFix(result, f"Publish an A and/or AAAA record for {SERVER}")

    @coroutine_test
    async def test_name_does_not_exist(self):
        report = await self.diagnose(server_name="nowhere.test")
        self.assertLine(report, "dns", Status.FAIL, "nowhere.test does not exist in DNS (NXDOMAIN)")


class IPLiteralTests(DoctorCase):
    @coroutine_test
    async def test_ipv6_literal_server_name(self):
        """Server names like [::1] never pass through hyperlink (docs/federation.md#tls)."""
        self.deployment.vhosts.default = self.deployment.server_host
        report = await self.diagnose(server_name="[::1]")
        port = self.deployment.front.port
        self.assertLine(report, "dns", Status.SKIP, "::1 is an IP address: nothing to look up")
        self.assertLine(report, "reach-ipv6", Status.PASS, f"IPv6 ::1 accepts connections on port {port}")
        self.assertLine(report, "well-known", Status.PASS, "https://[::1]/.well-known/matrix/client: m.homeserver")
        self.assertLine(report, "tls", Status.PASS, "certificate valid", title="TLS ::1")


class ClientDiscoveryTests(DoctorCase):
    @coroutine_test
    async def test_well_known_without_cors(self):
        self.deployment.server_host.cors = False
        report = await self.diagnose()
        result = self.assertLine(
            report, "well-known", Status.FAIL,
            f"https://{SERVER}/.well-known/matrix/client has no Access-Control-Allow-Origin header",
        )
        self.assertFix(result, "Access-Control-Allow-Origin: *")
        # Not fatal: the rest of the chain is still checked.
        self.assertLine(report, "rtc-focus", Status.PASS, "livekit_service_url")

    @coroutine_test
    async def test_well_known_without_base_url(self):
        self.start()
        del self.deployment.server_host.client_well_known["m.homeserver"]
        report = await self.diagnose()
        self.assertLine(report, "well-known", Status.FAIL, "has no m.homeserver.base_url")
        self.assertLine(report, "client-api", Status.SKIP, "no m.homeserver.base_url")

    @coroutine_test
    async def test_well_known_not_an_object(self):
        self.start()
        self.deployment.server_host.client_well_known = ["m.homeserver"]
        report = await self.diagnose()
        self.assertLine(report, "well-known", Status.FAIL, "is JSON but not an object")


class FocusTests(DoctorCase):
    def _move_focus_to_homeserver(self):
        self.start()
        entries = self.deployment.server_host.client_well_known.pop("org.matrix.msc4143.rtc_foci")
        self.deployment.homeserver.transports = entries

    @coroutine_test
    async def test_focus_from_rtc_transports_with_token(self):
        self._move_focus_to_homeserver()
        report = await self.diagnose(access_token=ACCESS_TOKEN)
        self.assertLine(report, "rtc-focus", Status.PASS, "(from the homeserver's rtc/transports)")
        self.assertLine(report, "service", Status.PASS, "answers /healthz")
        self.assertLine(report, "token-flow", Status.PASS, f"{USER_ID} got a LiveKit JWT")
        self.assertLine(report, "sfu-url", Status.PASS, f"wss://{SFU_HOST} (the URL the service hands to clients) is reachable")

    @coroutine_test
    async def test_focus_from_rtc_transports_needs_token(self):
        self._move_focus_to_homeserver()
        report = await self.diagnose()
        result = self.assertLine(report, "rtc-focus", Status.WARN, "can only be read with a token")
        self.assertFix(result, "--access-token")

    @coroutine_test
    async def test_trailing_slash(self):
        self.start()
        foci = self.deployment.server_host.client_well_known["org.matrix.msc4143.rtc_foci"]
        foci[0]["livekit_service_url"] += "/"
        report = await self.diagnose()
        self.assertLine(report, "rtc-focus", Status.WARN, "ends with '/'", "/livekit/jwt//get_token")

    @coroutine_test
    async def test_plain_http_url(self):
        self.start()
        foci = self.deployment.server_host.client_well_known["org.matrix.msc4143.rtc_foci"]
        foci[0]["livekit_service_url"] = f"http://{SERVICE_HOST}{SERVICE_PREFIX}"
        report = await self.diagnose()
        self.assertLine(report, "rtc-focus", Status.FAIL, "is plain http: browsers on https pages refuse it")


class ServiceTests(DoctorCase):
    @coroutine_test
    async def test_prefix_not_stripped(self):
        self.deployment.service.strip_prefix = False
        report = await self.diagnose()
        result = self.assertLine(
            report, "service", Status.FAIL,
            f"https://{SERVICE_HOST}{SERVICE_PREFIX}/healthz answers 404: the reverse proxy probably "
            f"passes the path prefix {SERVICE_PREFIX} on to the service",
        )
        self.assertFix(result, f"handle_path {SERVICE_PREFIX}/*", f"location {SERVICE_PREFIX}/ {{ proxy_pass")

    @coroutine_test
    async def test_proxy_without_upstream(self):
        self.deployment.service.running = False
        report = await self.diagnose()
        self.assertLine(report, "service", Status.FAIL, "answers HTTP 502: the reverse proxy cannot reach the service")

    @coroutine_test
    async def test_service_without_cors(self):
        self.deployment.service.cors = False
        report = await self.diagnose()
        result = self.assertLine(
            report, "service-cors", Status.FAIL,
            f"browsers cannot call https://{SERVICE_HOST}{SERVICE_PREFIX}: OPTIONS /get_token: no "
            "Access-Control-Allow-Origin",
        )
        self.assertIn("OPTIONS /get_token: Access-Control-Allow-Methods lacks POST", result.details)
        self.assertIn("POST /get_token: no Access-Control-Allow-Origin", result.details)
        self.assertLine(report, "service", Status.PASS, "answers /healthz")


class TLSTests(DoctorCase):
    @coroutine_test
    async def test_certificate_for_another_name(self):
        self.deployment.certificates[SERVICE_HOST] = self.deployment.ca.issue([f"other.{SERVER}"])
        report = await self.diagnose()
        result = self.assertLine(
            report, "tls", Status.FAIL, f"certificate is for other.{SERVER}, not {SERVICE_HOST}",
            title=f"TLS {SERVICE_HOST}",
        )
        self.assertFix(result, f"includes {SERVICE_HOST}")
        service = self.assertLine(report, "service", Status.FAIL, "is unreachable: TLS: the certificate does not cover this host name")
        self.assertFix(service, "See the TLS lines")
        self.assertLine(report, "tls", Status.PASS, "certificate valid", title=f"TLS {HS_HOST}")

    @coroutine_test
    async def test_untrusted_certificate(self):
        self.deployment.certificates[SERVICE_HOST] = self_signed([SERVICE_HOST])
        report = await self.diagnose()
        result = self.assertLine(
            report, "tls", Status.FAIL, "certificate is not trusted: issued by 'untrusted'",
            title=f"TLS {SERVICE_HOST}",
        )
        self.assertFix(result, "--ca-file", "RTCAUTH_CA_FILE")

    @coroutine_test
    async def test_certificate_expiring_soon_is_a_warning(self):
        self.deployment.certificates[HS_HOST] = self.deployment.ca.issue([HS_HOST], days=10)
        report = await self.diagnose()
        result = self.assertLine(report, "tls", Status.WARN, "certificate expires in 10 days", title=f"TLS {HS_HOST}")
        self.assertFix(result, "certbot renew")
        self.assertEqual(report.exit_status, 0)

    @coroutine_test
    async def test_expired_certificate(self):
        self.deployment.certificates[HS_HOST] = self.deployment.ca.issue([HS_HOST], expired=True)
        report = await self.diagnose()
        self.assertLine(report, "tls", Status.FAIL, "certificate expired on", title=f"TLS {HS_HOST}")


class HomeserverTests(DoctorCase):
    @coroutine_test
    async def test_federation_port_closed(self):
        self.start()
        self.deployment.server_host.server_well_known = {"m.server": f"{HS_HOST}:1"}
        report = await self.diagnose()
        result = self.assertLine(
            report, "federation", Status.FAIL,
            f"OpenID userinfo unreachable via {HS_HOST}:1 (delegated by .well-known/matrix/server)",
            "connection refused",
        )
        self.assertFix(result, "federation (or openid) resource")

    @coroutine_test
    async def test_federation_listener_without_openid(self):
        self.start()
        self.deployment.server_host.server_well_known = {"m.server": f"{SERVICE_HOST}:{self.deployment.front.port}"}
        report = await self.diagnose()
        result = self.assertLine(report, "federation", Status.FAIL, "answers 404 for OpenID userinfo")
        self.assertFix(result, "add the openid (or federation) resource")

    @coroutine_test
    async def test_base_url_is_not_a_client_api(self):
        self.start()
        self.deployment.server_host.client_well_known["m.homeserver"]["base_url"] = f"https://{SFU_HOST}"
        report = await self.diagnose()
        self.assertLine(report, "client-api", Status.FAIL, f"https://{SFU_HOST}/_matrix/client/versions answers HTTP 404")


class TokenFlowTests(DoctorCase):
    @coroutine_test
    async def test_access_token_rejected(self):
        report = await self.diagnose(access_token="syt_wrong")
        self.assertLine(report, "token-flow", Status.FAIL, "does not accept --access-token", "401")

    @coroutine_test
    async def test_service_cannot_verify_openid_token(self):
        self.start()
        self.deployment.homeserver.openid_tokens = _Forgetful()
        report = await self.diagnose(access_token=ACCESS_TOKEN)
        result = self.assertLine(report, "token-flow", Status.FAIL, "the service refused the OpenID token", "M_UNAUTHORIZED")
        self.assertFix(result, "Federation line")

    @coroutine_test
    async def test_jwt_with_wrong_claims(self):
        self.start()
        env = self.deployment.env_file(LIVEKIT_SECRET="not-the-secret-the-service-signs-with")
        self.deployment.sfu.secret = "not-the-secret-the-service-signs-with"
        report = await self.diagnose(access_token=ACCESS_TOKEN, config_file=env)
        self.assertLine(report, "token-flow", Status.FAIL, "its signature does not verify with the configured LIVEKIT_SECRET")

    @coroutine_test
    async def test_sfu_url_handed_to_clients_unreachable(self):
        self.deployment.service.sfu_url = "wss://livekit.internal.test:7880"
        report = await self.diagnose(access_token=ACCESS_TOKEN)
        result = self.assertLine(
            report, "sfu-url", Status.FAIL, "wss://livekit.internal.test:7880 (the URL the service hands to clients) is unreachable"
        )
        self.assertFix(result, "public wss:// URL")

    @coroutine_test
    async def test_delayed_event_rate_limit(self):
        self.deployment.homeserver.delayed_event_burst = 5
        report = await self.diagnose(access_token=ACCESS_TOKEN)
        result = self.assertLine(
            report, "delayed-events", Status.WARN,
            "throttled unauthenticated delayed-event restarts after 5 requests in a burst",
        )
        self.assertIn("retry after 1000 ms, about 1 request(s)/s per IP", result.details[0])
        self.assertIn("about 8 participants", result.details[0])
        self.assertFix(result, "rc_delayed_event_mgmt:", "per_second:")
        self.assertEqual(self.deployment.homeserver.delayed_event_calls, 6)

    @coroutine_test
    async def test_delayed_event_management_needs_a_token(self):
        self.deployment.homeserver.delayed_event_endpoint = "auth"
        report = await self.diagnose(access_token=ACCESS_TOKEN)
        self.assertLine(
            report, "delayed-events", Status.WARN,
            "the homeserver requires a token to manage delayed events (HTTP 401 (M_MISSING_TOKEN",
            "the service calls without one, so delegated leave will fail",
        )

    @coroutine_test
    async def test_no_delayed_event_endpoint(self):
        self.deployment.homeserver.delayed_event_endpoint = None
        report = await self.diagnose(access_token=ACCESS_TOKEN)
        result = self.assertLine(
            report, "delayed-events", Status.WARN, "the homeserver has no MSC4140 delayed-event management endpoint"
        )
        self.assertFix(result, "max_event_delay_duration")
        self.assertEqual(self.deployment.homeserver.delayed_event_calls, 0)


class _Forgetful(dict):
    """An OpenID token table that issues tokens but never recognises them."""

    def get(self, key, default=None):
        return default


class LiveKitTests(DoctorCase):
    @coroutine_test
    async def test_wrong_secret(self):
        self.start()
        env = self.deployment.env_file(LIVEKIT_SECRET="a-wrong-secret-of-sufficient-length-00")
        report = await self.diagnose(config_file=env)
        result = self.assertLine(
            report, "livekit-api", Status.FAIL,
            f"LiveKit refused the API key {LIVEKIT_KEY!r} (HTTP 401, unauthenticated)",
        )
        self.assertFix(result, "keys: in livekit.yaml")

    @coroutine_test
    async def test_livekit_unreachable(self):
        self.start()
        env = self.deployment.env_file(LIVEKIT_URL=f"wss://{SFU_HOST}:1")
        report = await self.diagnose(config_file=env)
        self.assertLine(report, "livekit-api", Status.FAIL, "cannot reach LiveKit's API", "connection refused")
        self.assertLine(report, "sfu-url", Status.FAIL, f"wss://{SFU_HOST}:1 (LIVEKIT_URL) is unreachable")

    @coroutine_test
    async def test_server_not_full_access(self):
        self.start()
        env = self.deployment.env_file(LIVEKIT_FULL_ACCESS_HOMESERVERS=HS_HOST)
        report = await self.diagnose(config_file=env)
        result = self.assertLine(
            report, "config", Status.WARN,
            f"{SERVER} is not in LIVEKIT_FULL_ACCESS_HOMESERVERS ({HS_HOST}): its users are restricted",
        )
        self.assertFix(result, f"LIVEKIT_FULL_ACCESS_HOMESERVERS={SERVER}")

    @coroutine_test
    async def test_broken_config(self):
        self.start()
        env = self.deployment.env_file(LIVEKIT_URL="")
        report = await self.diagnose(config_file=env)
        self.assertLine(report, "config", Status.FAIL, "LIVEKIT_KEY* / LIVEKIT_SECRET* and LIVEKIT_URL must be set")
