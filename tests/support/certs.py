"""A throw-away CA and leaf certificates for TLS tests (no network, no openssl binary).

Tests need homeservers on a private PKI so that rtcauthd verifies them through
RTCAUTH_CA_FILE instead of switching verification off.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Iterable

import attr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


@attr.s(frozen=True, auto_attribs=True)
class CertPair:
    cert_pem: bytes
    key_pem: bytes

    def write(self, directory: str, stem: str) -> tuple[str, str]:
        """Write ``stem.crt`` and ``stem.key``; return their paths."""
        cert_path = os.path.join(directory, stem + ".crt")
        key_path = os.path.join(directory, stem + ".key")
        with open(cert_path, "wb") as f:
            f.write(self.cert_pem)
        with open(key_path, "wb") as f:
            f.write(self.key_pem)
        return cert_path, key_path

    @property
    def combined_pem(self) -> bytes:
        """Key and certificate in one PEM, as twisted.internet.ssl's ``ssl:`` endpoints take."""
        return self.key_pem + self.cert_pem


class TestCA:
    """A self-signed CA that issues leaf certificates for DNS names and IP addresses."""

    __test__ = False  # not a test case

    def __init__(self, common_name: str = "rtcauthd test CA") -> None:
        self._key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        self._name = name
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def write_ca(self, directory: str, filename: str = "ca.crt") -> str:
        path = os.path.join(directory, filename)
        with open(path, "wb") as f:
            f.write(self.cert_pem)
        return path

    def issue(self, names: Iterable[str], *, days: int = 30, expired: bool = False) -> CertPair:
        """A leaf for ``names``: each is an IP address (IP SAN) or a DNS name (DNS SAN)."""
        names = list(names)
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n.strip("[]"))))
            except ValueError:
                sans.append(x509.DNSName(n))
        if expired:
            start, end = now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)
        else:
            start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=days)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return CertPair(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def self_signed(names: Iterable[str]) -> CertPair:
    """A leaf signed by a CA nobody trusts (stands in for a self-signed certificate)."""
    return TestCA("untrusted").issue(names)
