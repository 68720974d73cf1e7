"""LiveKit JWTs (docs/authorization.md#livekit-tokens)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import time
import warnings

import jwt
from livekit.api import TokenVerifier
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.livekit.tokens import TokenMinter

NOW = 1785000000
# docs/authorization.md#worked-examples: the application-service identity of @alice:example.com,
# member memberABC (MSC4195's vector), and alias vector 1
IDENTITY = "M3VnsLXrkbxIDINXO64u8PZzFyD9ZYFiQULR2dshWYs"
ALIAS = "O8437W3+jmzMVjoIP3tNwbm+XxHQk2iKpOA7aqw3qSc"
LEGACY_IDENTITY = "J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU"  # vector 3: legacy /get_token, DEVICE123
REMOTE_IDENTITY = "g/+jGZ04o50vnFyXaZRVJY+9QYFlqTReInF862pteJE"  # @bob:remote.example, memberXYZ

# The minimal worked example (docs/authorization.md#participant-token): every grant explicit but
# without canPublishData, and the exact token it signs to.
EXAMPLE_TOKEN = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJkZXZrZXkiLCJzdWIiOiJNM1Zuc0xYcmtieElESU5YTzY0"
    "dThQWnpGeUQ5WllGaVFVTFIyZHNoV1lzIiwiZXhwIjoxNzg1MDAzNjAwLCJuYmYiOjE3ODUwMDAwMDAsImlhdCI6MTc4"
    "NTAwMDAwMCwiaWRlbnRpdHkiOiJNM1Zuc0xYcmtieElESU5YTzY0dThQWnpGeUQ5WllGaVFVTFIyZHNoV1lzIiwidmlk"
    "ZW8iOnsicm9vbUNyZWF0ZSI6ZmFsc2UsInJvb21Kb2luIjp0cnVlLCJyb29tIjoiTzg0MzdXMytqbXpNVmpvSVAzdE53"
    "Ym0rWHhIUWsyaUtwT0E3YXF3M3FTYyIsImNhblB1Ymxpc2giOnRydWUsImNhblN1YnNjcmliZSI6dHJ1ZSwiY2FuVXBk"
    "YXRlT3duTWV0YWRhdGEiOmZhbHNlLCJoaWRkZW4iOmZhbHNlfX0.MvQWkVM_GthF6kIiU5iZAcZkVrDcvdyIvHrcJLZJzaA"
)
EXAMPLE_PAYLOAD = (
    b'{"iss":"devkey","sub":"M3VnsLXrkbxIDINXO64u8PZzFyD9ZYFiQULR2dshWYs","exp":1785003600,'
    b'"nbf":1785000000,"iat":1785000000,"identity":"M3VnsLXrkbxIDINXO64u8PZzFyD9ZYFiQULR2dshWYs",'
    b'"video":{"roomCreate":false,"roomJoin":true,"room":"O8437W3+jmzMVjoIP3tNwbm+XxHQk2iKpOA7aqw3qSc",'
    b'"canPublish":true,"canSubscribe":true,"canUpdateOwnMetadata":false,"hidden":false}}'
)
# What rtcauthd mints for it: the same, plus canPublishData in LiveKit's field order.
MINTED_PAYLOAD = EXAMPLE_PAYLOAD.replace(
    b'"canSubscribe":true,', b'"canSubscribe":true,"canPublishData":true,'
)


def _video(room: str = ALIAS, *, can_publish: bool = True, can_update_own_metadata: bool = False) -> bytes:
    return (
        b'"video":{"roomCreate":false,"roomJoin":true,"room":"%s","canPublish":%s,"canSubscribe":true,'
        b'"canPublishData":true,"canUpdateOwnMetadata":%s,"hidden":false}}'
        % (room.encode(), b"true" if can_publish else b"false", b"true" if can_update_own_metadata else b"false")
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
    def test_worked_example_payload_bytes(self) -> None:
        token = _minter().participant_token(IDENTITY, ALIAS)
        self.assertEqual(_segment(token, 0), b'{"alg":"HS256","typ":"JWT"}')
        self.assertEqual(_segment(token, 1), MINTED_PAYLOAD)

    def test_worked_example_token_byte_exact(self) -> None:
        # the signer turns the worked example's claims into exactly its token
        minter = _minter()
        self.assertEqual(minter._sign(json.loads(EXAMPLE_PAYLOAD)), EXAMPLE_TOKEN)
        # and the minted token is that signer's output for the minted claims
        token = minter.participant_token(IDENTITY, ALIAS)
        self.assertEqual(token, minter._sign(json.loads(MINTED_PAYLOAD)))
        signing_input, _, signature = token.rpartition(".")
        expected = hmac.new(b"devsecret", signing_input.encode(), hashlib.sha256).digest()
        self.assertEqual(signature, base64.urlsafe_b64encode(expected).rstrip(b"=").decode())

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
        self.assertEqual(token, _minter().participant_token(IDENTITY, ALIAS))
        self.assertEqual(_segment(token, 1), MINTED_PAYLOAD)

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
        self.assertIs(video.can_publish_data, True)
        self.assertIs(video.can_update_own_metadata, False)
        self.assertIs(video.room_create, False)
        self.assertIs(video.hidden, False)
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


class GrantTests(_QuietTestCase):
    """The grant matrix and claim encoding (docs/authorization.md#participant-token)."""

    def video(self, token: str) -> bytes:
        payload = _segment(token, 1)
        return payload[payload.index(b'"video":'):]

    def test_defaults_publish_without_metadata_updates(self) -> None:
        self.assertEqual(self.video(_minter().participant_token(IDENTITY, ALIAS)), _video())

    def test_subscribe_only_says_false_explicitly(self) -> None:
        # LiveKit reads a missing canPublish as true
        token = _minter().participant_token(REMOTE_IDENTITY, ALIAS, can_publish=False)
        self.assertEqual(self.video(token), _video(can_publish=False))
        self.assertIn(b'"sub":"g/+jGZ04o50vnFyXaZRVJY+9QYFlqTReInF862pteJE"', _segment(token, 1))

    def test_metadata_updates_opt_in(self) -> None:
        token = _minter().participant_token(IDENTITY, ALIAS, can_update_own_metadata=True)
        self.assertEqual(self.video(token), _video(can_update_own_metadata=True))
        token = _minter().participant_token(IDENTITY, ALIAS, can_publish=False, can_update_own_metadata=True)
        self.assertEqual(self.video(token), _video(can_publish=False, can_update_own_metadata=True))

    def test_legacy_worked_examples(self) -> None:
        minter = _minter()
        head = (
            b'{"iss":"devkey","sub":"%s","exp":1785003600,"nbf":1785000000,"iat":1785000000,"identity":"%s",'
            % (LEGACY_IDENTITY.encode(), LEGACY_IDENTITY.encode())
        )
        for grants, video in (
            ({}, _video()),  # full access, default flag
            ({"can_publish": False}, _video(can_publish=False)),  # restricted
            ({"can_update_own_metadata": True}, _video(can_update_own_metadata=True)),  # opt-in
        ):
            self.assertEqual(_segment(minter.participant_token(LEGACY_IDENTITY, ALIAS, **grants), 1), head + video, grants)

    def test_grants_are_keyword_only(self) -> None:
        self.assertRaises(TypeError, _minter().participant_token, IDENTITY, ALIAS, False)

    def test_official_verifier_reads_subscribe_only(self) -> None:
        minter = _minter(now=time.time(), key="k", secret="s")
        video = TokenVerifier("k", "s").verify(minter.participant_token(IDENTITY, ALIAS, can_publish=False)).video
        self.assertIs(video.can_publish, False)
        self.assertIs(video.can_subscribe, True)
        self.assertIs(video.can_publish_data, True)
        self.assertIs(video.room_join, True)
        video = TokenVerifier("k", "s").verify(minter.participant_token(IDENTITY, ALIAS, can_update_own_metadata=True)).video
        self.assertIs(video.can_update_own_metadata, True)


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


class TokenLifetimeTests(SynchronousTestCase):
    """RTCAUTH_TOKEN_TTL_SECONDS (issue 12): short-lived join tokens; admin tokens unchanged."""

    def test_participant_ttl_from_the_config(self):
        from rtcauthd.config import load_config

        env = {"LIVEKIT_URL": "wss://x", "LIVEKIT_KEY": "k", "LIVEKIT_SECRET": "s" * 32,
               "LIVEKIT_FULL_ACCESS_HOMESERVERS": "a"}
        self.assertEqual(load_config(env).token_ttl, 3600)
        config = load_config(dict(env, RTCAUTH_TOKEN_TTL_SECONDS="300"))
        clock = Clock()
        clock.advance(NOW)
        minter = TokenMinter(api_key="k", api_secret="s" * 32, clock=clock, participant_ttl=config.token_ttl)
        claims = jwt.decode(minter.participant_token("id", "room"), "s" * 32, algorithms=["HS256"],
                            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False})
        self.assertEqual((claims["nbf"], claims["exp"]), (NOW, NOW + 300))
        admin = jwt.decode(minter.create_room_token(), "s" * 32, algorithms=["HS256"],
                           options={"verify_exp": False, "verify_nbf": False, "verify_iat": False})
        self.assertEqual(admin["exp"] - admin["nbf"], 6 * 3600)
        for bad in ("0", "-5", "x"):
            with self.assertRaises(Exception) as cm:
                load_config(dict(env, RTCAUTH_TOKEN_TTL_SECONDS=bad))
            self.assertIn("RTCAUTH_TOKEN_TTL_SECONDS", str(cm.exception))
