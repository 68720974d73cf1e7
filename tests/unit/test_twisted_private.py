"""Fails loudly when a Twisted upgrade removes a private name rtcauthd relies on."""

from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web import client as web_client
from twisted.web.client import HTTPConnectionPool

from rtcauthd import twisted_private


class PrivateNamesStillExist(unittest.TestCase):
    def test_http11_client_factory(self):
        self.assertTrue(
            hasattr(web_client, "_HTTP11ClientFactory"),
            "twisted.web.client._HTTP11ClientFactory is gone: update rtcauthd/twisted_private.py",
        )

    def test_pool_builds_connections_from_its_factory_attribute(self):
        pool = HTTPConnectionPool(Clock())
        self.assertIs(
            pool._factory,
            web_client._HTTP11ClientFactory,
            "HTTPConnectionPool._factory changed: update rtcauthd/twisted_private.py",
        )

    def test_retrying_connection_wrapper(self):
        self.assertTrue(
            hasattr(web_client, "_RetryingHTTP11ClientProtocol"),
            "twisted.web.client._RetryingHTTP11ClientProtocol is gone: update rtcauthd/twisted_private.py",
        )

    def test_standard_endpoint_factory(self):
        from twisted.web.client import URI

        factory = twisted_private.standard_endpoint_factory(Clock(), None, 5)
        self.assertIsNotNone(factory.endpointForURI(URI.fromBytes(b"http://example.org/")))

    def test_reactor_records_exit_signal(self):
        from twisted.internet import reactor

        self.assertTrue(
            hasattr(reactor, "_exitSignal"),
            "reactor._exitSignal is gone: clean SIGTERM stops would exit 143",
        )


    def test_trust_roots_are_added_through_the_private_method(self):
        from twisted.internet import _sslverify
        from twisted.internet.ssl import platformTrust

        self.assertTrue(hasattr(_sslverify, "IOpenSSLTrustRoot"), "twisted.internet._sslverify.IOpenSSLTrustRoot is gone")
        self.assertTrue(
            hasattr(platformTrust(), "_addCACertsToContext"),
            "trust roots no longer have _addCACertsToContext: RTCAUTH_CA_FILE would break",
        )


class Behaviour(unittest.TestCase):
    def test_quiet_pool_factory_is_not_noisy(self):
        pool = twisted_private.make_pool_quiet(HTTPConnectionPool(Clock()))
        self.assertFalse(pool._factory.noisy)
        self.assertTrue(issubclass(pool._factory, web_client._HTTP11ClientFactory))

    def test_forget_exit_signal_clears_it(self):
        class FakeReactor:
            _exitSignal = 15

        reactor = FakeReactor()
        twisted_private.forget_exit_signal(reactor)
        self.assertIsNone(reactor._exitSignal)

    def test_forget_exit_signal_tolerates_reactors_without_it(self):
        twisted_private.forget_exit_signal(object())
