"""The PyJWT instance LiveKit tokens are signed and verified with.

LiveKit secrets are arbitrary strings whose exact bytes are the HMAC key in Go. PyJWT's
stock HS256 refuses secrets that look like PEM, SSH or JWK keys and warns about short
ones, so this private instance registers an HS256 that takes the key bytes as given.
"""

from __future__ import annotations

from typing import Any

import jwt
from jwt.algorithms import HMACAlgorithm

__all__ = ["JWS", "ALGORITHM", "secret_bytes"]

ALGORITHM = "HS256"


class _RawSecretHS256(HMACAlgorithm):
    def prepare_key(self, key: Any) -> bytes:
        if isinstance(key, str):
            return secret_bytes(key)
        return bytes(key)

    def check_key_length(self, key: Any) -> None:
        return None  # the operator chose the secret; LiveKit accepts any length


JWS = jwt.PyJWS(algorithms=[])
JWS.register_algorithm(ALGORITHM, _RawSecretHS256(HMACAlgorithm.SHA256))


def secret_bytes(secret: str) -> bytes:
    """The exact bytes of a secret as read from the environment (surrogates are raw bytes)."""
    return secret.encode("utf-8", "surrogateescape")
