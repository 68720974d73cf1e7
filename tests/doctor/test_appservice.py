"""``rtcauth doctor`` against application-service deployments on loopback (issue 14).

Each test starts a correct application-service deployment (tests/doctor/fake_appservice.py:
Synapse's transports, proxy, is_joined and AS ping; the service's hs_token, url and
membership checks), makes one of the mistakes operators make, runs the doctor in-process
through its real network stack and asserts the diagnosis and the YAML it tells them to write.
"""

from __future__ import annotations

from twisted.internet import reactor

from rtcauthd import errors
from rtcauthd.doctor.report import Status, render_json, render_text
from tests.doctor.fake_appservice import AS_TOKEN, HS_TOKEN, PROXY_URL, SENDER, ASDeployment
from tests.doctor.fakes import ACCESS_TOKEN, SERVER, SERVICE_HOST, SERVICE_PREFIX, SFU_HOST, coroutine_test
from tests.doctor.test_deployments import DoctorCase

SFU_URL = f"wss://{SFU_HOST}"
SERVICE_URL = f"https://{SERVICE_HOST}{SERVICE_PREFIX}"
AS_LINES = ("appservice", "as-registration", "as-token", "as-ping", "as-proxy", "as-is-joined", "as-delayed-events")


class ASCase(DoctorCase):
    def setUp(self) -> None:
        self.deployment = ASDeployment(reactor=reactor)
        self._started = False

    async def diagnose_as(self, *, token: bool = True, env: dict | None = None):
        """The doctor with the service's AS env file (and a user's token unless told not to)."""
        self.start()
        config = self.deployment.as_env_file(**(env or {}))
        return await self.diagnose(access_token=ACCESS_TOKEN if token else None, config_file=config)

    def statuses(self, report, ids=AS_LINES) -> dict:
        by_id = {r.check: r.status.value for r in report.results}
        return {i: by_id.get(i) for i in ids}


class CorrectASDeploymentTests(ASCase):
    @coroutine_test
    async def test_correct_deployment_passes_with_token_and_config(self):
        report = await self.diagnose_as()
        text = render_text(report)
        self.assertEqual(report.exit_status, 0, text)
        self.assertEqual(report.count(Status.FAIL) + report.count(Status.WARN), 0, text)
        self.assertLine(report, "transports", Status.PASS, f"a livekit transport with url {SFU_URL} (= LIVEKIT_URL)",
                        f"livekit_service_url {SERVICE_URL}", "(read with --access-token)")
        self.assertLine(report, "appservice", Status.PASS, f"the application service of {SERVER}",
                        f"registration {self.deployment.registration_path}")
        self.assertLine(report, "as-registration", Status.PASS, "id 'rtcauthd'")
        self.assertLine(report, "as-token", Status.PASS, f"it acts as {SENDER}")
        self.assertLine(report, "as-ping", Status.SKIP, "the registration's url is null")
        self.assertLine(report, "as-proxy", Status.PASS, "Synapse routes rtc/livekit/get_token to the service",
                        f"the url {SFU_URL}", "sent with --access-token")
        self.assertLine(report, "as-is-joined", Status.PASS, "may ask is_joined")
        self.assertLine(report, "as-delayed-events", Status.PASS, "no throttling in a burst of 10")
        # The proxied probe reached the service as the token's user; secrets stay out of the report.
        self.assertIn(("get_token", "@alice:" + SERVER), self.deployment.as_service.calls)
        for secret in (AS_TOKEN, HS_TOKEN, ACCESS_TOKEN):
            self.assertNotIn(secret, render_json(report))

    @coroutine_test
    async def test_ping_passes_when_the_registration_has_a_url(self):
        self.deployment.write_registration(url=PROXY_URL)
        report = await self.diagnose_as()
        self.assertEqual(report.exit_status, 0, render_text(report))
        self.assertLine(report, "as-ping", Status.PASS, f"Synapse reached the service at {PROXY_URL}",
                        "accepted the hs_token (3 ms)")
        self.assertIn(("ping", None), self.deployment.as_service.calls)

    @coroutine_test
    async def test_config_without_token_uses_the_as_token(self):
        """--config alone: the transports and the proxy are read with the service's as_token."""
        report = await self.diagnose_as(token=False)
        self.assertEqual(report.exit_status, 0, render_text(report))
        self.assertLine(report, "transports", Status.PASS, "(read with the service's as_token)")
        self.assertLine(report, "as-proxy", Status.PASS, "sent with the service's as_token")
        self.assertIn(("get_token", SENDER), self.deployment.as_service.calls)
        self.assertLine(report, "token-flow", Status.SKIP, "needs --access-token")

    @coroutine_test
    async def test_without_token_or_config_says_what_was_not_checked(self):
        report = await self.diagnose()
        result = self.assertLine(report, "transports", Status.SKIP, "not checked", "needs an access token")
        self.assertIn("whether its url equals the service's LIVEKIT_URL", result.details[0])
        self.assertIn("proxied get_token", result.details[0])
        self.assertFix(result, "--access-token", "--config ENVFILE")
        self.assertEqual(self.statuses(report), dict.fromkeys(AS_LINES))  # no AS line at all
        self.assertEqual(report.exit_status, 0, render_text(report))


class TransportsTests(ASCase):
    @coroutine_test
    async def test_empty_transports(self):
        self.start()
        self.deployment.homeserver.transports_document = {}
        report = await self.diagnose_as()
        result = self.assertLine(report, "transports", Status.FAIL, "rtc/transports answers {}",
                                 "matrix_rtc has no transports", "MISSING_MATRIX_RTC_TRANSPORT")
        self.assertFix(result, "matrix_rtc:\n    transports:\n      - type: livekit",
                       f'url: "{SFU_URL}"', f'livekit_service_url: "{SERVICE_URL}"')
        self.assertEqual(report.exit_status, 1)
        # The focus in the well-known still passes: that is what makes this mistake invisible.
        self.assertLine(report, "rtc-focus", Status.PASS)

    @coroutine_test
    async def test_empty_transports_in_a_well_known_deployment(self):
        """Not only in AS mode: clients that read {} never look at the well-known."""
        self.start()
        self.deployment.homeserver.transports_document = {}
        report = await self.diagnose(access_token=ACCESS_TOKEN)
        self.assertLine(report, "transports", Status.FAIL, "rtc/transports answers {}")
        self.assertEqual(self.statuses(report), dict.fromkeys(AS_LINES))

    @coroutine_test
    async def test_transport_url_differs_from_livekit_url(self):
        self.start()
        self.deployment.homeserver.transports[0]["url"] = SFU_URL + "/"
        report = await self.diagnose_as()
        result = self.assertLine(report, "transports", Status.FAIL, f"url {SFU_URL}/ is not LIVEKIT_URL {SFU_URL}",
                                 "only a trailing '/' differs", "400 M_INVALID_PARAM")
        self.assertFix(result, "byte for byte", f'url: "{SFU_URL}"')
        proxy = self.assertLine(report, "as-proxy", Status.FAIL, f"refused the transport url {SFU_URL}/")
        self.assertFix(proxy, f'url: "{SFU_URL}"')

    @coroutine_test
    async def test_transport_url_differs_found_with_the_token_alone(self):
        """No --config: the url is compared with what the service hands out, and the proxy
        probe (as the token's user) gets the service's own 400."""
        self.start()
        self.deployment.homeserver.transports[0]["url"] = f"wss://SFU.{SERVER}"
        report = await self.diagnose(access_token=ACCESS_TOKEN)
        self.assertLine(report, "transports", Status.FAIL, "is not the url the service hands out",
                        "only upper/lower case differs")
        self.assertLine(report, "as-proxy", Status.FAIL, "refused the transport url")

    @coroutine_test
    async def test_msc4143_off_in_as_mode(self):
        self.deployment.homeserver.msc4143 = False
        report = await self.diagnose_as()
        result = self.assertLine(report, "transports", Status.FAIL, "msc4143_enabled is off")
        self.assertFix(result, "experimental_features:\n    msc4143_enabled: true", "matrix_rtc:")

    @coroutine_test
    async def test_transport_without_url_in_as_mode(self):
        self.start()
        del self.deployment.homeserver.transports[0]["url"]
        report = await self.diagnose_as()
        result = self.assertLine(report, "transports", Status.WARN, "has no url", "OpenID flow")
        self.assertFix(result, f'url: "{SFU_URL}"')


class RegistrationTests(ASCase):
    @coroutine_test
    async def test_unprefixed_keys(self):
        self.deployment.write_registration(
            io__element__msc4502__scopes=None, io__element__msc4512__proxy_prefix=None,
            io__element__msc4512__proxy_url=None, scopes=["urn:matrix:client:io.element.msc4502:rooms:is_joined"],
            proxy_prefix="rtc/livekit", proxy_url=PROXY_URL)
        report = await self.diagnose_as()
        reg = self.assertLine(report, "as-registration", Status.FAIL,
                              "uses proxy_prefix, proxy_url, scopes, which Synapse ignores",
                              "proxies nothing", "is_joined answers 403")
        self.assertFix(reg, "io.element.msc4512.proxy_prefix: \"rtc/livekit\"",
                       f'io.element.msc4512.proxy_url: "{PROXY_URL}"', "io.element.msc4502.scopes:")
        self.assertLine(report, "as-proxy", Status.FAIL, "Synapse does not route", "lacks the io.element.msc4512 proxy keys")
        self.assertLine(report, "as-is-joined", Status.FAIL, "lacks the is_joined scope")
        self.assertEqual(report.exit_status, 1)

    @coroutine_test
    async def test_proxy_url_with_a_path(self):
        self.deployment.write_registration(io__element__msc4512__proxy_url=PROXY_URL + "/livekit/jwt")
        report = await self.diagnose_as()
        reg = self.assertLine(report, "as-registration", Status.FAIL, "has a path")
        self.assertFix(reg, f'io.element.msc4512.proxy_url: "{PROXY_URL}"')

    @coroutine_test
    async def test_rate_limited_registration_is_throttled(self):
        self.deployment.write_registration(rate_limited=None)
        report = await self.diagnose_as()
        result = self.assertLine(report, "as-delayed-events", Status.WARN, "throttled", "after 5 in a burst")
        self.assertFix(result, "rate_limited: false")

    @coroutine_test
    async def test_tokens_from_variables_skip_the_file_checks(self):
        report = await self.diagnose_as(env={"LIVEKIT_AS_REGISTRATION_FILE": "", "LIVEKIT_AS_TOKEN": AS_TOKEN,
                                             "LIVEKIT_HS_TOKEN": HS_TOKEN})
        self.assertEqual(report.exit_status, 0, render_text(report))
        self.assertLine(report, "as-registration", Status.SKIP, "not LIVEKIT_AS_REGISTRATION_FILE")
        self.assertLine(report, "as-ping", Status.SKIP, "needs the registration's id")

    @coroutine_test
    async def test_wrong_server_name(self):
        report = await self.diagnose_as(env={"LIVEKIT_HS_SERVER_NAME": "other.test"})
        result = self.assertLine(report, "appservice", Status.FAIL, "LIVEKIT_HS_SERVER_NAME is 'other.test'")
        self.assertFix(result, f"LIVEKIT_HS_SERVER_NAME={SERVER}")
        self.assertEqual(self.statuses(report, ("as-proxy",)), {"as-proxy": None})


class SynapseSideTests(ASCase):
    @coroutine_test
    async def test_msc4512_off(self):
        self.deployment.homeserver.msc4512 = False
        report = await self.diagnose_as()
        result = self.assertLine(report, "as-proxy", Status.FAIL, "Synapse does not route",
                                 "404 (M_UNRECOGNIZED", "msc4512_enabled is off", "clients get 404")
        self.assertFix(result, "experimental_features:\n    msc4512_enabled: true")
        self.assertLine(report, "as-registration", Status.PASS)

    @coroutine_test
    async def test_msc4502_off(self):
        self.deployment.homeserver.msc4502 = False
        report = await self.diagnose_as()
        joined = self.assertLine(report, "as-is-joined", Status.FAIL, "no is_joined endpoint", "msc4502_enabled is off")
        self.assertFix(joined, "msc4502_enabled: true")
        self.assertLine(report, "as-proxy", Status.FAIL, errors.E7_MEMBERSHIP)

    @coroutine_test
    async def test_hs_token_mismatch(self):
        """The service was given another copy of the registration, with another hs_token."""
        self.deployment.write_registration(synapse_too=False, hs_token="hs_other", url=PROXY_URL)
        self.deployment.homeserver.registration["url"] = PROXY_URL
        self.deployment.as_service.hs_token = "hs_other"
        report = await self.diagnose_as()
        proxy = self.assertLine(report, "as-proxy", Status.FAIL, "refused Synapse's hs_token", "different hs_tokens")
        self.assertFix(proxy, "app_service_config_files:",
                       f"LIVEKIT_AS_REGISTRATION_FILE={self.deployment.registration_path}")
        self.assertLine(report, "as-ping", Status.FAIL, "refused Synapse's hs_token (HTTP 401)")
        self.assertNotIn("hs_other", render_json(report))

    @coroutine_test
    async def test_as_token_mismatch(self):
        self.deployment.write_registration(synapse_too=False, as_token="as_other")
        report = await self.diagnose_as()
        result = self.assertLine(report, "as-token", Status.FAIL, "Synapse does not know the service's as_token")
        self.assertFix(result, "app_service_config_files:")
        self.assertNotIn("as_other", render_json(report))

    @coroutine_test
    async def test_proxy_url_unreachable(self):
        self.deployment.homeserver.proxy_reachable = False
        report = await self.diagnose_as()
        result = self.assertLine(report, "as-proxy", Status.FAIL, f"Synapse cannot reach the service at {PROXY_URL}")
        self.assertFix(result, "io.element.msc4512.proxy_url must be where Synapse reaches")

    @coroutine_test
    async def test_service_not_in_as_mode(self):
        """The operator's env file lacks the AS settings: Synapse forwards to a standalone service."""
        self.deployment.as_service.as_mode = False
        self.start()
        report = await self.diagnose(access_token=ACCESS_TOKEN, config_file=self.deployment.env_file())
        self.assertLine(report, "as-proxy", Status.FAIL, "something answers HTTP 404",
                        "the service is not in application-service mode")

    @coroutine_test
    async def test_fixes_fit_80_columns(self):
        self.deployment.write_registration(io__element__msc4512__proxy_prefix=None, proxy_prefix="rtc/livekit",
                                           rate_limited=None)
        self.deployment.homeserver.msc4502 = False
        text = render_text(await self.diagnose_as())
        self.deployment.homeserver.transports_document = {}
        text += render_text(await self.diagnose_as())
        for line in text.splitlines():
            self.assertLessEqual(len(line), 80, line)


class TokenOnlyTests(ASCase):
    """Only --access-token: the proxied path is still checked, as the token's user."""

    @coroutine_test
    async def test_msc4512_off(self):
        self.deployment.homeserver.msc4512 = False
        report = await self.diagnose(access_token=ACCESS_TOKEN)
        result = self.assertLine(report, "as-proxy", Status.FAIL, "Synapse does not route",
                                 "msc4512_enabled is off, or Synapse did not load a registration claiming rtc/livekit")
        self.assertFix(result, "msc4512_enabled: true", "io.element.msc4512.proxy_prefix")
        self.assertEqual(self.statuses(report, ("appservice", "as-token")), {"appservice": None, "as-token": None})

    @coroutine_test
    async def test_hs_token_mismatch(self):
        self.deployment.as_service.hs_token = "hs_other"
        report = await self.diagnose(access_token=ACCESS_TOKEN)
        self.assertLine(report, "as-proxy", Status.FAIL, "refused Synapse's hs_token")

    @coroutine_test
    async def test_correct_deployment(self):
        report = await self.diagnose(access_token=ACCESS_TOKEN)
        self.assertEqual(report.exit_status, 0, render_text(report))
        self.assertLine(report, "transports", Status.PASS, "(= the url the service hands out)")
        self.assertLine(report, "as-proxy", Status.PASS, "sent with --access-token")
