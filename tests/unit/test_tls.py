"""TLSPolicy: CA bundle loading, per-name caching, insecure mode, and real handshakes
through the plain agent (IPv6 literal, SNI, system + bundle trust)."""

from __future__ import annotations

import os
import tempfile

from twisted.internet import defer
from twisted.internet.ssl import PrivateCertificate
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.iweb import IPolicyForHTTPS

from rtcauthd import tls as tls_module
from rtcauthd.outbound.client import HTTPClient, OutboundError
from rtcauthd.matrix.federation_agent import build_plain_agent
from rtcauthd.tls import TLSConfigError, TLSPolicy
from tests.support.certs import TestCA, self_signed
from tests.unit.test_federation_agent import TrackingSite


class CAFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp()

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def assertConfigError(self, path: str, message: str) -> None:
        with self.assertRaises(TLSConfigError) as cm:
            TLSPolicy(ca_file=path)
        self.assertEqual(str(cm.exception), message)
        self.assertNotIn("\n", str(cm.exception))

    def test_missing_file(self) -> None:
        path = os.path.join(self.directory, "nope.pem")
        self.assertConfigError(path, f"RTCAUTH_CA_FILE: cannot read {path}: No such file or directory")

    def test_directory(self) -> None:
        self.assertConfigError(self.directory, f"RTCAUTH_CA_FILE: cannot read {self.directory}: Is a directory")

    def test_no_certificates(self) -> None:
        path = self.write("empty.pem", b"just some text\n")
        self.assertConfigError(path, f"RTCAUTH_CA_FILE: {path} contains no PEM certificates")

    def test_broken_certificate(self) -> None:
        good = TestCA().cert_pem
        path = self.write("broken.pem", good + b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        self.assertConfigError(path, f"RTCAUTH_CA_FILE: {path}: certificate #2 is not a valid PEM certificate")

    def test_bundle_with_several_certificates(self) -> None:
        path = self.write("bundle.pem", TestCA("one").cert_pem + b"\n" + TestCA("two").cert_pem)
        self.assertEqual(len(tls_module.load_ca_bundle(path)), 2)

    def test_key_only_file_has_no_certificates(self) -> None:
        path = self.write("key.pem", TestCA().issue(["x.test"]).key_pem)
        self.assertConfigError(path, f"RTCAUTH_CA_FILE: {path} contains no PEM certificates")


class CacheTests(SynchronousTestCase):
    def test_provides_ipolicyforhttps(self) -> None:
        self.assertTrue(IPolicyForHTTPS.providedBy(TLSPolicy()))

    def test_options_cached_per_name(self) -> None:
        policy = TLSPolicy()
        first = policy.options_for("example.com")
        self.assertIs(policy.options_for("example.com"), first)
        self.assertIsNot(policy.options_for("example.org"), first)
        self.assertIs(policy.creatorForNetloc(b"example.com", 443), first)

    def test_brackets_are_stripped(self) -> None:
        policy = TLSPolicy()
        self.assertIs(policy.options_for("[::1]"), policy.options_for("::1"))
        self.assertIs(policy.creatorForNetloc(b"::1", 8448), policy.options_for("::1"))

    def test_cache_is_bounded(self) -> None:
        self.patch(tls_module, "OPTIONS_CACHE_SIZE", 2)
        policy = TLSPolicy()
        a = policy.options_for("a.test")
        policy.options_for("b.test")
        policy.options_for("a.test")  # refresh a
        policy.options_for("c.test")  # evicts b
        self.assertIs(policy.options_for("a.test"), a)
        self.assertEqual(list(policy._cache), ["c.test", "a.test"])

    def test_all_names_share_one_context(self) -> None:
        """Names are attacker-chosen; a context per name costs a trust store each (~0.9 MiB)."""
        policy = TLSPolicy()
        a = policy.options_for("a.test").clientConnectionForTLS(None)
        b = policy.options_for("127.1.2.3").clientConnectionForTLS(None)
        self.assertIs(a.get_context(), b.get_context())
        self.assertEqual(a.get_servername(), b"a.test")
        self.assertIsNone(b.get_servername())

    def test_insecure_cached_too(self) -> None:
        events: list[dict] = []
        self.patch(tls_module, "log", Logger(observer=events.append))
        policy = TLSPolicy(insecure=True)
        self.assertIs(policy.options_for("example.com"), policy.options_for("example.com"))


class InsecureWarningTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict] = []
        self.patch(tls_module, "log", Logger(observer=self.events.append))

    def warnings(self) -> list[dict]:
        return [e for e in self.events if e["log_level"].name == "warn"]

    def test_one_loud_warning(self) -> None:
        policy = TLSPolicy(insecure=True)
        policy.options_for("a.test")
        policy.options_for("b.test")
        warnings = self.warnings()
        self.assertEqual(len(warnings), 1)
        self.assertIn("TLS certificate verification is DISABLED", warnings[0]["log_format"])
        self.assertTrue(policy.insecure)

    def test_no_warning_when_verifying(self) -> None:
        TLSPolicy().options_for("a.test")
        self.assertEqual(self.warnings(), [])


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"hello"


class HandshakeTests(TestCase):
    """Real TLS on loopback through build_plain_agent (the LiveKit / CS-API agent)."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.directory = tempfile.mkdtemp()
        self.ca = TestCA()
        self.ca_file = self.ca.write_ca(self.directory)

    def serve(self, pair, interface: str = "127.0.0.1"):
        site = TrackingSite(Hello())
        options = PrivateCertificate.loadPEM(pair.combined_pem).options()
        sni: list = []
        options.getContext().set_tlsext_servername_callback(lambda conn: sni.append(conn.get_servername()))
        listener = self.reactor.listenSSL(0, site, options, interface=interface)

        @defer.inlineCallbacks
        def shut_down():
            yield listener.stopListening()
            yield site.all_closed()

        self.addCleanup(shut_down)
        return listener.getHost().port, sni

    def get(self, policy: TLSPolicy, url: str) -> defer.Deferred:
        http = HTTPClient(clock=self.reactor, agent=build_plain_agent(self.reactor, tls_policy=policy), timeout=10)
        return http.request(b"GET", url.encode("ascii"), step="test").addCallback(lambda r: (r.code, r.body))

    @defer.inlineCallbacks
    def test_ipv6_literal_url_with_ca_file(self):
        port, sni = self.serve(self.ca.issue(["::1"]), interface="::1")
        result = yield self.get(TLSPolicy(ca_file=self.ca_file), f"https://[::1]:{port}/")
        self.assertEqual(result, (200, b"hello"))
        self.assertEqual(sni, [None])  # no SNI for IP literals

    @defer.inlineCallbacks
    def test_ca_file_is_read_once(self):
        policy = TLSPolicy(ca_file=self.ca_file)
        os.unlink(self.ca_file)
        port, _sni = self.serve(self.ca.issue(["127.0.0.1"]))
        result = yield self.get(policy, f"https://127.0.0.1:{port}/")
        self.assertEqual(result, (200, b"hello"))

    @defer.inlineCallbacks
    def test_sni_for_dns_names(self):
        port, sni = self.serve(self.ca.issue(["localhost"]))
        result = yield self.get(TLSPolicy(ca_file=self.ca_file), f"https://localhost:{port}/")
        self.assertEqual(result, (200, b"hello"))
        self.assertEqual(sni[-1], b"localhost")

    @defer.inlineCallbacks
    def test_wrong_name_refused(self):
        port, _sni = self.serve(self.ca.issue(["other.test"]))
        error = yield self.assertFailure(self.get(TLSPolicy(ca_file=self.ca_file), f"https://127.0.0.1:{port}/"), OutboundError)
        self.assertIn("VerificationError", error.detail)

    @defer.inlineCallbacks
    def test_names_verified_per_connection_on_the_shared_context(self):
        port, _sni = self.serve(self.ca.issue(["127.0.0.1"]))
        policy = TLSPolicy(ca_file=self.ca_file)
        error = yield self.assertFailure(self.get(policy, f"https://localhost:{port}/"), OutboundError)
        self.assertIn("VerificationError", error.detail)
        result = yield self.get(policy, f"https://127.0.0.1:{port}/")
        self.assertEqual(result, (200, b"hello"))
        error = yield self.assertFailure(self.get(policy, f"https://localhost:{port}/"), OutboundError)
        self.assertIn("VerificationError", error.detail)

    @defer.inlineCallbacks
    def test_self_signed_refused_by_default(self):
        port, _sni = self.serve(self_signed(["127.0.0.1"]))
        error = yield self.assertFailure(self.get(TLSPolicy(), f"https://127.0.0.1:{port}/"), OutboundError)
        self.assertIn("certificate verify failed", error.detail)

    @defer.inlineCallbacks
    def test_insecure_accepts_anything_and_still_sends_sni(self):
        port, sni = self.serve(self_signed(["wrong.test"]))
        policy = TLSPolicy(insecure=True)
        result = yield self.get(policy, f"https://localhost:{port}/")
        self.assertEqual(result, (200, b"hello"))
        self.assertEqual(sni[-1], b"localhost")
        result = yield self.get(policy, f"https://127.0.0.1:{port}/")
        self.assertEqual(result, (200, b"hello"))
        self.assertEqual(sni[-1], None)

    @defer.inlineCallbacks
    def test_ca_file_adds_to_system_roots(self):
        """With a CA file, certificates from the system roots still verify."""
        system_ca = TestCA("pretend system root")
        system_file = system_ca.write_ca(self.directory, "system.crt")
        # OpenSSL's default verify paths honour these variables: they stand in for /etc/ssl.
        self._set_env("SSL_CERT_FILE", system_file)
        self._set_env("SSL_CERT_DIR", os.path.join(self.directory, "none"))
        policy = TLSPolicy(ca_file=self.ca_file)
        port_bundle, _ = self.serve(self.ca.issue(["127.0.0.1"]))
        port_system, _ = self.serve(system_ca.issue(["127.0.0.1"]))
        result = yield self.get(policy, f"https://127.0.0.1:{port_bundle}/")
        self.assertEqual(result, (200, b"hello"))
        result = yield self.get(policy, f"https://127.0.0.1:{port_system}/")
        self.assertEqual(result, (200, b"hello"))
        # control: without the bundle only the "system" CA is trusted
        error = yield self.assertFailure(self.get(TLSPolicy(), f"https://127.0.0.1:{port_bundle}/"), OutboundError)
        self.assertIn("certificate verify failed", error.detail)

    def _set_env(self, name: str, value: str) -> None:
        old = os.environ.get(name)
        os.environ[name] = value

        def restore():
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old

        self.addCleanup(restore)
