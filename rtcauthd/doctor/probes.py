"""Raw TCP and TLS probes below HTTP, for ``rtcauth doctor``.

Reachability is judged per published address (HTTP's happy eyeballs would hide a dead
one), and a certificate that fails verification is fetched again without it, so that
the TLS line can say what is wrong with it.
"""

from __future__ import annotations

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.python.failure import Failure
from zope.interface import implementer

from rtcauthd.outbound.errors import reason
from rtcauthd.tls import UnverifiedClientTLS


class ProbeError(Exception):
    """A TCP or TLS probe failed; ``stage`` is "connect" or "tls", ``detail`` says why."""

    def __init__(self, stage: str, detail: str, *, timed_out: bool = False) -> None:
        super().__init__(stage, detail)
        self.stage = stage
        self.detail = detail
        self.timed_out = timed_out

    def __str__(self) -> str:
        return self.detail


@implementer(IHandshakeListener)
class _HandshakeProbe(Protocol):
    """Reports the peer certificate once the handshake (and verification) succeeded."""

    def __init__(self, done: Deferred) -> None:
        self._done = done

    def handshakeCompleted(self) -> None:
        if self.transport.disconnecting:
            # Verification failed inside the handshake: connectionLost brings the reason.
            return
        certificate = self.transport.getPeerCertificate()
        if not self._done.called:
            self._done.callback(certificate.to_cryptography() if certificate is not None else None)
        self.transport.loseConnection()

    def connectionLost(self, why: Failure) -> None:
        if not self._done.called:
            self._done.errback(ProbeError("tls", reason(why.value)))


class _ProbeFactory(Factory):
    def __init__(self, done: Deferred) -> None:
        self._done = done

    def buildProtocol(self, addr):
        p = _HandshakeProbe(self._done)
        p.factory = self
        return p


class Probes:
    """Raw TCP and TLS checks below HTTP (reachability per address, certificates)."""

    def __init__(self, *, reactor, clock: IReactorTime, tls_policy, timeout: float) -> None:
        self._reactor = reactor
        self._clock = clock
        self._policy = tls_policy
        self._timeout = timeout

    def tcp_connect(self, address: str, port: int) -> "Deferred[None]":
        """Open (and close) a TCP connection to one IP address; ProbeError if impossible."""
        kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        endpoint = kind(self._reactor, address, port, timeout=self._timeout)
        d = endpoint.connect(Factory.forProtocol(Protocol))
        expired = []

        def expire() -> None:
            expired.append(True)
            d.cancel()

        timer = self._clock.callLater(self._timeout, expire)

        def connected(p) -> None:
            p.transport.loseConnection()

        def failed(failure: Failure) -> Failure:
            if expired or failure.check(net_error.TimeoutError):
                raise ProbeError("connect", f"no connection within {self._timeout:g} s", timed_out=True)
            raise ProbeError("connect", reason(failure.value))

        def stop(result):
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(stop).addCallbacks(connected, failed)

    def certificate(self, host: str, port: int, *, verify: bool = True) -> Deferred:
        """TLS handshake with ``host``; the peer's cryptography certificate.

        With ``verify`` the policy's trust roots and a host-name check apply, as for every
        other connection; without, any certificate is accepted so that it can be described.
        """
        creator = self._policy.options_for(host) if verify else UnverifiedClientTLS(CertificateOptions(), host)
        holder: list = []

        def cancel(_d: Deferred) -> None:
            if holder:
                holder[0].transport.abortConnection()
            else:
                connecting.cancel()

        done: Deferred = Deferred(cancel)
        endpoint = wrapClientTLS(
            creator, HostnameEndpoint(self._reactor, host, port, timeout=self._timeout)
        )
        connecting = endpoint.connect(_ProbeFactory(done))

        def connected(p):
            holder.append(p)

        def connect_failed(failure: Failure) -> None:
            if not done.called:
                done.errback(ProbeError("connect", reason(failure.value)))

        connecting.addCallbacks(connected, connect_failed)

        def expire() -> None:
            if done.called:
                return
            if holder:
                done.errback(ProbeError("tls", f"no TLS handshake within {self._timeout:g} s", timed_out=True))
                holder[0].transport.abortConnection()
            else:
                done.errback(ProbeError("connect", f"no connection within {self._timeout:g} s", timed_out=True))
                connecting.cancel()

        timer = self._clock.callLater(self._timeout, expire)

        def finished(result):
            if timer.active():
                timer.cancel()
            return result

        return done.addBoth(finished)
