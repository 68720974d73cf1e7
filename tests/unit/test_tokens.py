"""LiveKit JWTs (docs/authorization.md#livekit-tokens)."""

from __future__ import annotations

import base64
import datetime
import json
import time
import warnings

import jwt
from livekit.api import TokenVerifier
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.livekit.tokens import TokenMinter

NOW = 1785000000
IDENTITY = "J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU"  # docs/authorization.md#worked-examples vector 3
ALIAS = "O8437W3+jmzMVjoIP3tNwbm+XxHQk2iKpOA7aqw3qSc"  # docs/authorization.md#worked-examples vector 1

EXAMPLE_TOKEN = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJkZXZrZXkiLCJzdWIiOiJKK1Q0NXRHcnV4YytIclVP"
    "cUpKbHlRU1YzM203MjhDbWU0K3Z0OC9TV3JVIiwiZXhwIjoxNzg1MDAzNjAwLCJuYmYiOjE3ODUwMDAwMDAsImlh"
    "dCI6MTc4NTAwMDAwMCwiaWRlbnRpdHkiOiJKK1Q0NXRHcnV4YytIclVPcUpKbHlRU1YzM203MjhDbWU0K3Z0OC9T"
    "V3JVIiwidmlkZW8iOnsicm9vbUpvaW4iOnRydWUsInJvb20iOiJPODQzN1czK2ptek1Wam9JUDN0TndibStYeEhR"
    "azJpS3BPQTdhcXczcVNjIiwiY2FuUHVibGlzaCI6dHJ1ZSwiY2FuU3Vic2NyaWJlIjp0cnVlLCJjYW5VcGRhdGVP"
    "d25NZXRhZGF0YSI6dHJ1ZX19.Rlnvqwg4Kv9NsctP_IFAKk7_KGSMgbfuPLSQ6gteo6E"
)
EXAMPLE_PAYLOAD = (
    b'{"iss":"devkey","sub":"J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU","exp":1785003600,'
    b'"nbf":1785000000,"iat":1785000000,"identity":"J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU",'
    b'"video":{"roomJoin":true,"room":"O8437W3+jmzMVjoIP3tNwbm+XxHQk2iKpOA7aqw3qSc",'
    b'"canPublish":true,"canSubscribe":true,"canUpdateOwnMetadata":true}}'
)


# Short test secrets (the docs/authorization.md#participant-token example uses "devsecret") make PyJWT >= 2.10 warn.
try:
    from jwt.warnings import InsecureKeyLengthWarning as _KEY_WARNING
except ImportError:  # older PyJWT
    _KEY_WARNING = None  # type: ignore[assignment,misc]


class _QuietTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        if _KEY_WARNING is not None:
            quiet = warnings.catch_warnings()
            quiet.__enter__()
            self.addCleanup(quiet.__exit__, None, None, None)
            warnings.simplefilter("ignore", _KEY_WARNING)


def _segment(token: str, index: int) -> bytes:
    part = token.split(".")[index]
    assert "=" not in part and "+" not in part and "/" not in part, part
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _minter(now: float = NOW, key: str = "devkey", secret: str = "devsecret") -> TokenMinter:
    clock = Clock()
    clock.advance(now)
    return TokenMinter(api_key=key, api_secret=secret, clock=clock)


class ParticipantTokenTests(_QuietTestCase):
    def test_worked_example_byte_exact(self) -> None:
        self.assertEqual(_minter().participant_token(IDENTITY, ALIAS), EXAMPLE_TOKEN)

    def test_header_and_payload_bytes(self) -> None:
        token = _minter().participant_token(IDENTITY, ALIAS)
        self.assertEqual(_segment(token, 0), b'{"alg":"HS256","typ":"JWT"}')
        self.assertEqual(_segment(token, 1), EXAMPLE_PAYLOAD)

    def test_pyjwt_verifies_signature(self) -> None:
        token = _minter().participant_token(IDENTITY, ALIAS)
        claims = jwt.decode(token, "devsecret", algorithms=["HS256"], options={"verify_exp": False})
        self.assertEqual(claims["iss"], "devkey")
        self.assertRaises(
            jwt.InvalidSignatureError,
            jwt.decode, token, "wrongsecret", algorithms=["HS256"], options={"verify_exp": False},
        )

    def test_fractional_clock_truncated(self) -> None:
        token = _minter(NOW + 0.999).participant_token(IDENTITY, ALIAS)
        self.assertEqual(token, EXAMPLE_TOKEN)

    def test_times_follow_the_clock(self) -> None:
        clock = Clock()
        clock.advance(NOW)
        minter = TokenMinter(api_key="devkey", api_secret="devsecret", clock=clock)
        clock.advance(125)
        claims = json.loads(_segment(minter.participant_token(IDENTITY, ALIAS), 1))
        self.assertEqual((claims["nbf"], claims["iat"], claims["exp"]), (NOW + 125, NOW + 125, NOW + 125 + 3600))
        self.assertEqual(minter.now(), NOW + 125)

    def test_legacy_identity_is_go_escaped_and_reads_back(self) -> None:
        ident = "@a<b>&c:example.com:DEV"
        token = _minter().participant_token(ident, ALIAS)
        payload = _segment(token, 1)
        self.assertIn(b'"sub":"@a\\u003cb\\u003e\\u0026c:example.com:DEV"', payload)
        claims = jwt.decode(token, "devsecret", algorithms=["HS256"], options={"verify_exp": False})
        self.assertEqual((claims["sub"], claims["identity"]), (ident, ident))

    def test_official_verifier_reads_grants(self) -> None:
        # TokenVerifier checks exp/nbf against the real clock, so mint at real time.
        minter = _minter(now=time.time(), key="APIkey", secret="s3cr3t-value")
        token = minter.participant_token(IDENTITY, ALIAS)
        claims = TokenVerifier("APIkey", "s3cr3t-value", leeway=datetime.timedelta(0)).verify(token)
        self.assertEqual(claims.identity, IDENTITY)
        video = claims.video
        self.assertIs(video.room_join, True)
        self.assertEqual(video.room, ALIAS)
        self.assertIs(video.can_publish, True)
        self.assertIs(video.can_subscribe, True)
        self.assertIs(video.can_update_own_metadata, True)
        self.assertIsNone(video.room_create)
        self.assertIsNone(video.room_admin)
        self.assertEqual((claims.name, claims.metadata, claims.kind), ("", "", ""))

    def test_official_verifier_rejects_wrong_secret_and_key(self) -> None:
        token = _minter(now=time.time(), key="APIkey", secret="right").participant_token(IDENTITY, ALIAS)
        self.assertRaises(jwt.InvalidSignatureError, TokenVerifier("APIkey", "wrong").verify, token)
        self.assertRaises(jwt.InvalidIssuerError, TokenVerifier("otherkey", "right").verify, token)

    def test_official_verifier_rejects_expired(self) -> None:
        token = _minter(now=time.time() - 3600 - 120, key="k", secret="s").participant_token(IDENTITY, ALIAS)
        self.assertRaises(jwt.ExpiredSignatureError, TokenVerifier("k", "s").verify, token)

    def test_empty_key_or_secret_refused(self) -> None:
        clock = Clock()
        for key, secret in (("", "s"), ("k", ""), ("", "")):
            e = self.assertRaises(ValueError, TokenMinter, api_key=key, api_secret=secret, clock=clock)
            self.assertEqual(str(e), "LiveKit API key and secret must both be non-empty")


class AdminTokenTests(_QuietTestCase):
    def test_create_room_payload_exact(self) -> None:
        token = _minter().create_room_token()
        self.assertEqual(_segment(token, 0), b'{"alg":"HS256","typ":"JWT"}')
        self.assertEqual(
            _segment(token, 1),
            b'{"iss":"devkey","exp":1785021600,"nbf":1785000000,"iat":1785000000,"video":{"roomCreate":true}}',
        )

    def test_room_admin_payload_exact(self) -> None:
        token = _minter().room_admin_token(ALIAS)
        self.assertEqual(
            _segment(token, 1),
            b'{"iss":"devkey","exp":1785021600,"nbf":1785000000,"iat":1785000000,'
            b'"video":{"roomAdmin":true,"room":"O8437W3+jmzMVjoIP3tNwbm+XxHQk2iKpOA7aqw3qSc"}}',
        )

    def test_admin_tokens_signed_with_secret(self) -> None:
        minter = _minter()
        for token in (minter.create_room_token(), minter.room_admin_token(ALIAS)):
            claims = jwt.decode(token, "devsecret", algorithms=["HS256"], options={"verify_exp": False})
            self.assertEqual(claims["exp"] - claims["nbf"], 6 * 3600)
            self.assertNotIn("sub", claims)

    def test_official_verifier_reads_admin_grants(self) -> None:
        minter = _minter(now=time.time(), key="k", secret="s")
        create = TokenVerifier("k", "s").verify(minter.create_room_token())
        self.assertIs(create.video.room_create, True)
        self.assertEqual(create.identity, "")
        admin = TokenVerifier("k", "s").verify(minter.room_admin_token(ALIAS))
        self.assertIs(admin.video.room_admin, True)
        self.assertEqual(admin.video.room, ALIAS)
        self.assertIsNone(admin.video.room_join)


class RawSecretBytesTests(SynchronousTestCase):
    def test_secret_that_is_not_utf8_signs_with_its_exact_bytes(self):
        import base64
        import hashlib
        import hmac

        from twisted.internet.task import Clock

        secret = b"secretsecret\xff".decode("utf-8", "surrogateescape")  # as os.environ holds it
        token = TokenMinter(api_key="k", api_secret=secret, clock=Clock()).create_room_token()
        signing_input, _, signature = token.rpartition(".")
        expected = hmac.new(b"secretsecret\xff", signing_input.encode(), hashlib.sha256).digest()
        self.assertEqual(signature, base64.urlsafe_b64encode(expected).rstrip(b"=").decode())


class PyJWTKeyRulesTests(SynchronousTestCase):
    """PyJWT's own HS256 refuses key-shaped secrets and warns about short ones; LiveKit does neither."""

    def test_key_shaped_and_short_secrets_sign_with_their_bytes_without_warning(self):
        import hashlib
        import hmac

        for secret in ("-----BEGIN PUBLIC KEY-----\nx\n-----END PUBLIC KEY-----", '{"kty":"oct"}', "s"):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                token = TokenMinter(api_key="k", api_secret=secret, clock=Clock()).create_room_token()
            signing_input, _, signature = token.rpartition(".")
            expected = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
            self.assertEqual(signature, base64.urlsafe_b64encode(expected).rstrip(b"=").decode(), secret)
