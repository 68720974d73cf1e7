"""Request decoding with Go semantics (docs/endpoints.md#request-bodies) and validation order (docs/endpoints.md#token-endpoint, docs/endpoints.md#legacy-token-endpoint, docs/endpoints.md#delegation-endpoint)."""

from __future__ import annotations

import json

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd import errors
from rtcauthd.errors import MatrixError
from rtcauthd.inbound.models import LegacyTokenRequest, TokenRequest

VALID = {
    "room_id": "!room:example.com",
    "slot_id": "m.call#ROOM",
    "openid_token": {
        "access_token": "syt_abc",
        "token_type": "Bearer",
        "matrix_server_name": "example.com",
        "expires_in": 3600,
    },
    "member": {"id": "member-1", "claimed_user_id": "@alice:example.com", "claimed_device_id": "DEVICE"},
}


def body(obj) -> bytes:
    return json.dumps(obj).encode()


def with_(**changes):
    obj = json.loads(json.dumps(VALID))
    for key, value in changes.items():
        if "__" in key:
            outer, inner = key.split("__")
            if value is ...:
                obj[outer].pop(inner, None)
            else:
                obj[outer][inner] = value
        elif value is ...:
            obj.pop(key, None)
        else:
            obj[key] = value
    return obj


class DecodeTests(SynchronousTestCase):
    def assertNotJSON(self, raw: bytes, cls=TokenRequest):
        with self.assertRaises(MatrixError) as cm:
            cls.decode(raw)
        self.assertEqual(
            (cm.exception.status, cm.exception.errcode, cm.exception.message),
            (400, "M_NOT_JSON", "Error reading request"),
            raw,
        )

    def test_not_json_table(self):
        for raw in (
            b"",
            b" \t\r\n",
            b"{not json",
            b"{invalid json}",
            b'{"room_id":"a",}',
            b"{'room_id':'a'}",
            b'{"room_id":"a"/*c*/}',
            b"[]",
            b'"string"',
            b"42",
            b"true",
            b"\xef\xbb\xbf{}",
            b'{"unknown":1}',
            b'{"openid_token":{"extra":1}}',
            b'{"member":{"extra":1}}',
            b'{"delay_timeout":"8000"}',
            b'{"room_id":123}',
            b'{"member":[]}',
            b'{"openid_token":"x"}',
            b'{"openid_token":{"expires_in":true}}',
            b'{"delay_timeout":8000.0}',
            b'{"delay_timeout":8e3}',
            b'{"delay_timeout":9223372036854775808}',
            b'{"delay_timeout":-9223372036854775809}',
            b'{"delay_timeout":NaN}',
            b'{"delay_timeout":Infinity}',
            b'{"delay_timeout":-Infinity}',
            b"[" * 100000,
        ):
            self.assertNotJSON(raw)

    def test_null_and_empty_object_decode_to_zero_values(self):
        for raw in (b"null", b"{}", b" {} "):
            r = TokenRequest.decode(raw)
            self.assertEqual((r.room_id, r.member.id, r.openid_token.access_token, r.delay_timeout), ("", "", "", 0))

    def test_case_insensitive_keys_and_exact_preference(self):
        r = TokenRequest.decode(b'{"ROOM_ID":"a","Member":{"Claimed_User_Id":"@u:x"}}')
        self.assertEqual((r.room_id, r.member.claimed_user_id), ("a", "@u:x"))
        # Go's folding of the Kelvin sign and the long s
        r = LegacyTokenRequest.decode('{"ro\u017fm":"x","openid_token":{"expires_in":1}}'.replace("ro\u017fm", "room").encode())
        self.assertEqual(r.room, "x")
        r = TokenRequest.decode('{"\u017flot_id":"s"}'.encode())
        self.assertEqual(r.slot_id, "s")

    def test_duplicates_last_wins_null_keeps_and_objects_merge(self):
        self.assertEqual(TokenRequest.decode(b'{"room_id":"a","room_id":"b"}').room_id, "b")
        self.assertEqual(TokenRequest.decode(b'{"room_id":"a","room_id":null}').room_id, "a")
        r = TokenRequest.decode(b'{"member":{"id":"x"},"member":{"claimed_user_id":"y"}}')
        self.assertEqual((r.member.id, r.member.claimed_user_id), ("x", "y"))

    def test_trailing_bytes_ignored(self):
        self.assertEqual(TokenRequest.decode(b'{"room_id":"a"}garbage').room_id, "a")

    def test_invalid_utf8_becomes_replacement_per_byte(self):
        self.assertEqual(TokenRequest.decode(b'{"room_id":"a\xffb"}').room_id, "a\ufffdb")
        self.assertEqual(TokenRequest.decode(b'{"room_id":"\xe2\x82A"}').room_id, "\ufffd\ufffdA")
        self.assertEqual(TokenRequest.decode(b'{"room_id":"\xed\xa0\x80"}').room_id, "\ufffd" * 3)

    def test_lone_surrogate_escape_becomes_replacement(self):
        self.assertEqual(TokenRequest.decode(b'{"room_id":"\\ud800x"}').room_id, "\ufffdx")
        self.assertEqual(TokenRequest.decode(b'{"room_id":"\\ud83d\\ude00"}').room_id, "\U0001f600")

    def test_int64_bounds(self):
        self.assertEqual(TokenRequest.decode(b'{"delay_timeout":9223372036854775807}').delay_timeout, 2**63 - 1)
        self.assertEqual(TokenRequest.decode(b'{"delay_timeout":-0}').delay_timeout, 0)

    def test_access_token_not_in_repr(self):
        self.assertNotIn("syt_abc", repr(TokenRequest.decode(body(VALID))))

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200))
    def test_arbitrary_bytes_never_crash(self, raw):
        for cls in (TokenRequest, LegacyTokenRequest):
            try:
                cls.decode(raw)
            except MatrixError as e:
                self.assertEqual(e.errcode, "M_NOT_JSON")

    @settings(max_examples=200, deadline=None)
    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
            lambda children: st.lists(children) | st.dictionaries(st.text(), children),
            max_leaves=10,
        )
    )
    def test_arbitrary_json_gives_a_request_or_not_json(self, value):
        raw = json.dumps(value).encode()
        try:
            TokenRequest.decode(raw)
        except MatrixError as e:
            self.assertEqual(e.errcode, "M_NOT_JSON")


class ValidationTests(SynchronousTestCase):
    def assertBadJSON(self, obj, message, check):
        with self.assertRaises(MatrixError) as cm:
            check(obj)
        self.assertEqual((cm.exception.status, cm.exception.errcode, cm.exception.message), (400, "M_BAD_JSON", message))

    def token(self, obj):
        TokenRequest.decode(body(obj)).validate_for_token()

    def delegation(self, obj):
        TokenRequest.decode(body(obj)).validate_for_delegation()

    def legacy(self, obj):
        LegacyTokenRequest.decode(body(obj)).validate()

    def test_get_token_order(self):
        self.assertBadJSON({}, errors.E_ROOMSLOT, self.token)
        self.assertBadJSON(with_(slot_id=""), errors.E_ROOMSLOT, self.token)
        self.assertBadJSON(with_(room_id=..., member__id=""), errors.E_ROOMSLOT, self.token)
        for field in ("id", "claimed_user_id", "claimed_device_id"):
            self.assertBadJSON(with_(**{f"member__{field}": ""}), errors.E_MEMBER_GT, self.token)
        self.assertBadJSON(with_(member__id="", openid_token=None), errors.E_MEMBER_GT, self.token)
        self.assertBadJSON(with_(openid_token__access_token=""), errors.E_OPENID_GT, self.token)
        self.assertBadJSON(with_(openid_token__matrix_server_name=...), errors.E_OPENID_GT, self.token)
        self.assertBadJSON(with_(delay_id="d"), errors.E_DELAY, self.token)
        self.assertBadJSON(with_(delay_id="d", delay_timeout=0), errors.E_DELAY, self.token)
        self.assertBadJSON(with_(delay_id="d", delay_timeout=-5), errors.E_DELAY, self.token)
        self.assertBadJSON(with_(delay_timeout=8000), errors.E_DELAY, self.token)
        self.token(with_(delay_timeout=-1))  # no delay id and no positive timeout: fine
        self.token(with_(delay_id="d", delay_timeout=8000, delay_cs_api_url="https://ignored"))
        self.token(VALID)

    def test_delegation_order(self):
        self.assertBadJSON({}, errors.E_ROOMSLOT, self.delegation)
        self.assertBadJSON(with_(member__claimed_device_id=""), errors.E_MEMBER_DL, self.delegation)
        self.assertBadJSON(with_(openid_token__access_token=""), errors.E_OPENID_DL, self.delegation)
        self.assertBadJSON(VALID, errors.E_DELAY, self.delegation)
        self.assertBadJSON(with_(delay_id="d", delay_timeout=0), errors.E_DELAY, self.delegation)
        self.assertBadJSON(with_(delay_timeout=10), errors.E_DELAY, self.delegation)
        self.delegation(with_(delay_id="d", delay_timeout=10))

    def test_delegation_timeout_as_string_is_not_json(self):
        with self.assertRaises(MatrixError) as cm:
            TokenRequest.decode(body(with_(delay_id="d", delay_timeout="7200000")))
        self.assertEqual(cm.exception.errcode, "M_NOT_JSON")

    def test_legacy_order(self):
        legacy = {"room": "!r:x", "openid_token": VALID["openid_token"], "device_id": "D"}
        self.assertBadJSON({}, errors.E_ROOM, self.legacy)
        self.assertBadJSON({"room": "!r:x"}, errors.E_OPENID_LG, self.legacy)
        self.assertBadJSON(dict(legacy, delay_id="x"), errors.E_DELAY, self.legacy)
        self.legacy(dict(legacy, device_id=None))
        self.legacy({"room": "!r:x", "openid_token": VALID["openid_token"]})
        with self.assertRaises(MatrixError):
            LegacyTokenRequest.decode(body(dict(legacy, member={})))  # not a legacy field
