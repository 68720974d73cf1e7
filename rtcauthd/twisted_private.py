"""The only place rtcauthd touches Twisted's private API, each use with the reason.

Checked against Twisted 22.4 (the ``setup.cfg`` floor) through 26.10 (the pin);
``tests/unit/test_twisted_private.py`` fails loudly if a name disappears, so an upgrade
that breaks one is caught in CI rather than as a noisy log or a wrong exit status.
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet import _sslverify
from twisted.internet.ssl import platformTrust
from twisted.web import client as _web_client
from twisted.web.client import HTTPConnectionPool
from zope.interface import implementer


class _QuietClientFactory(_web_client._HTTP11ClientFactory):
    noisy = False  # no "Starting factory ..." line for every outbound connection


def make_pool_quiet(pool: HTTPConnectionPool) -> HTTPConnectionPool:
    """Stop ``pool`` logging every connection it opens.

    No public hook: the pool builds its protocol factory from the private ``_factory``
    class attribute, and ``_HTTP11ClientFactory`` is private too.
    """
    pool._factory = _QuietClientFactory
    return pool


class _TrackedClientProtocol(_web_client.HTTP11ClientProtocol):
    def __init__(self, quiescentCallback, on_lost) -> None:
        super().__init__(quiescentCallback)
        self._on_lost = on_lost

    def connectionLost(self, reason) -> None:
        _web_client.HTTP11ClientProtocol.connectionLost(self, reason)
        self._on_lost(self)


class TrackedClientFactory(_QuietClientFactory):
    """A quiet pool factory whose connections report ``connectionLost`` to ``on_lost``.

    The bounded pool (rtcauthd.outbound.pool) counts the connections it has open per host;
    Twisted's pool never needs to and has no hook, so this subclasses the private factory.
    """

    def __init__(self, quiescentCallback, metadata, on_lost) -> None:
        super().__init__(quiescentCallback, metadata)
        self._on_lost = on_lost

    def buildProtocol(self, addr):
        return _TrackedClientProtocol(self._quiescentCallback, self._on_lost)


def retrying_connection(connection, new_connection):
    """A pooled connection that retries an idempotent request once on a fresh one if the
    server had closed it meanwhile, as Twisted's own pool hands them out (private class)."""
    return _web_client._RetryingHTTP11ClientProtocol(connection, new_connection)


def standard_endpoint_factory(reactor, policy, connect_timeout: float):
    """What ``Agent(reactor, policy, connectTimeout)`` connects with: TCP for http, TLS by
    ``policy`` for https, through ``HostnameEndpoint``. Private class; rtcauthd wraps it
    (``ReusedEndpoints``) so an endpoint is not rebuilt on every request."""
    return _web_client._StandardEndpointFactory(reactor, policy, connect_timeout, None)


def forget_exit_signal(reactor) -> None:
    """Make a clean SIGTERM stop exit 0.

    twistd re-raises the signal that stopped the reactor after shutdown (exit 143), and
    the reactor records it only in the private ``_exitSignal``. systemd counts 143 as a
    failure for ``Type=notify`` units without ``SuccessExitStatus``; operators expect 0.
    """
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None


@implementer(_sslverify.IOpenSSLTrustRoot)
class _SystemAndBundleTrust:
    def __init__(self, bundle) -> None:
        self._platform = platformTrust()
        self._bundle = bundle

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        self._platform._addCACertsToContext(context)
        self._bundle._addCACertsToContext(context)


def system_and_bundle_trust(bundle):
    """Trust the platform's roots plus the certificates of a CA bundle (``RTCAUTH_CA_FILE``).

    Twisted has no public way to combine trust roots: ``CertificateOptions`` calls the
    private-named ``_addCACertsToContext`` of the private ``IOpenSSLTrustRoot`` (unchanged
    since Twisted 14.0), so this delegates to the two stock roots through it.
    """
    return _SystemAndBundleTrust(bundle)

