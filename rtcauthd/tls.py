"""Client TLS settings for every outbound HTTPS connection (docs/federation.md#tls, docs/configuration.md#insecure-tls).

Why one policy object: federation, well-known, client-server API and LiveKit calls must
all trust the same roots and honour the same insecure switch. Connection settings are
cached per certificate name because Twisted asks for them on every request; all names
share one OpenSSL context, because each context holds its own copy of the system trust
store (~0.9 MiB) and the names are attacker-chosen (docs/federation.md#tls).

With ``ca_file`` the system roots stay trusted and the bundle's certificates are added,
so a private CA for one homeserver does not break federation with everyone else.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Optional

import idna
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.compat import nativeString
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from rtcauthd.twisted_private import system_and_bundle_trust

log = Logger()

CA_FILE_VARIABLE = "RTCAUTH_CA_FILE"
#: Certificate names whose settings are kept (names can be attacker-chosen, so bounded).
OPTIONS_CACHE_SIZE = 1024

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)

_INSECURE_BANNER = (
    "TLS certificate verification is DISABLED for all outbound HTTPS "
    "(LIVEKIT_INSECURE_SKIP_VERIFY_TLS): homeservers, well-known, client-server API and "
    "LiveKit are not authenticated. Never run like this in production."
)


class TLSConfigError(Exception):
    """The TLS configuration cannot be used; the message is one line naming the variable."""


def load_ca_bundle(path: str) -> list[Certificate]:
    """Read every PEM certificate in ``path``; raise TLSConfigError if there is none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TLSConfigError(f"{CA_FILE_VARIABLE}: cannot read {path}: {e.strerror or e}") from None
    blocks = _PEM_CERTIFICATE.findall(data)
    if not blocks:
        raise TLSConfigError(f"{CA_FILE_VARIABLE}: {path} contains no PEM certificates")
    certificates = []
    for index, block in enumerate(blocks, start=1):
        try:
            certificates.append(Certificate.loadPEM(block))
        except Exception:
            raise TLSConfigError(
                f"{CA_FILE_VARIABLE}: {path}: certificate #{index} is not a valid PEM certificate"
            ) from None
    return certificates


@implementer(IOpenSSLClientConnectionCreator)
class UnverifiedClientTLS:
    """TLS without any certificate checks, still sending SNI for DNS names."""

    def __init__(self, options: CertificateOptions, name: str) -> None:
        self._options = options
        self._sni = None if is_ip_literal(name) else name.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._options.getContext(), None)
        connection.set_app_data(tlsProtocol)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        return connection


@implementer(IOpenSSLClientConnectionCreator)
class VerifyingClientTLS:
    """Verifies ``name`` per connection on a shared context (one trust store for all names)."""

    def __init__(self, options: CertificateOptions, name: str) -> None:
        self._options = options
        self._ip = is_ip_literal(name)
        self._ascii = name if self._ip else idna.encode(name).decode("ascii")

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._options.getContext(), None)
        connection.set_app_data(tlsProtocol)
        if not self._ip:
            connection.set_tlsext_host_name(self._ascii.encode("ascii"))
        service = IPAddress_ID(self._ascii) if self._ip else DNS_ID(self._ascii)

        def verify(conn, cert, errno, depth, ok) -> bool:
            if depth != 0 or not ok:
                return bool(ok)
            try:
                verify_service_identity(extract_patterns(cert), [service], [])
            except VerificationError:
                tlsProtocol.failVerification(Failure())
                return False
            except Exception:  # an exception inside an OpenSSL callback would be lost
                log.failure("while verifying a certificate name")
                return False
            return True

        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return connection


def is_ip_literal(name: str) -> bool:
    """An IPv4 or (unbracketed) IPv6 address rather than a DNS name."""
    return isIPAddress(name) or isIPv6Address(name)


@implementer(IPolicyForHTTPS)
class TLSPolicy:
    """Builds (and caches) client TLS settings per certificate name."""

    def __init__(self, *, ca_file: Optional[str] = None, insecure: bool = False) -> None:
        self._insecure = insecure
        self._cache: "OrderedDict[str, object]" = OrderedDict()
        if ca_file:
            bundle = trustRootFromCertificates(load_ca_bundle(ca_file))
            self._trust_root = system_and_bundle_trust(bundle)
            log.info("Trusting the system CA roots plus {path}", path=ca_file)
        else:
            self._trust_root = platformTrust()
        self._verified = CertificateOptions(trustRoot=self._trust_root)  # context built on first use
        if insecure:
            self._unverified = CertificateOptions()
            log.warn(_INSECURE_BANNER)

    @property
    def insecure(self) -> bool:
        return self._insecure

    def options_for(self, name: str):
        """Client TLS settings verifying ``name`` (a DNS name or an IP, no brackets)."""
        name = name.strip("[]")
        options = self._cache.get(name)
        if options is not None:
            self._cache.move_to_end(name)
            return options
        if self._insecure:
            options = UnverifiedClientTLS(self._unverified, name)
        else:
            options = VerifyingClientTLS(self._verified, name)
        self._cache[name] = options
        if len(self._cache) > OPTIONS_CACHE_SIZE:
            self._cache.popitem(last=False)
        return options

    def creatorForNetloc(self, hostname: bytes, port: int):
        """IPolicyForHTTPS, for Agent-based clients (LiveKit, client-server API)."""
        return self.options_for(nativeString(hostname))
