"""LiveKit room alias and identity derivation (docs/authorization.md#identities-and-room-aliases)."""

from __future__ import annotations

import base64
import hashlib
import json
import re

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.gojson import go_json_dumps
from rtcauthd.store.model import encode_field as job_field  # the Redis field of docs/redis-format.md#key-field-value
from rtcauthd.livekit.naming import (
    LEGACY_SLOT_ID,
    H,
    appservice_identity,
    identity,
    legacy_identity,
    legacy_room_alias,
    room_alias,
    string_array_json,
)

# docs/authorization.md#worked-examples: (input, exact bytes hashed, sha256 hex, H)
VECTORS = [
    (  # 1
        ["!roomid:example.com", "slot1234"],
        b'["!roomid:example.com","slot1234"]',
        "3bce37ed6dfe8e6ccc563a083f7b4dc1b9be5f11d093688aa4e03b6aac37a927",
        "O8437W3+jmzMVjoIP3tNwbm+XxHQk2iKpOA7aqw3qSc",
    ),
    (  # 2
        ["!roomid:example.com", "slot123", "random123"],
        b'["!roomid:example.com","slot123","random123"]',
        "20c78377e2b7308a894c8db4117048adea4a92184e46f7f7abc7f1deb96b8539",
        "IMeDd+K3MIqJTI20EXBIrepKkhhORvf3q8fx3rlrhTk",
    ),
    (  # 3
        ["@alice:example.com", "DEVICE123", "memberABC"],
        b'["@alice:example.com","DEVICE123","memberABC"]',
        "27e4f8e6d1abbb173e1eb50ea89265c90495df79bbdbc0a67b8fafb7cfd25ab5",
        "J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU",
    ),
    (  # 4
        ["!room:example.com", "m.call#ROOM"],
        b'["!room:example.com","m.call#ROOM"]',
        "92b8f6760c70d8ae843a6f617b819f409e89b125567c9f1aec19328d97129b1b",
        "krj2dgxw2K6EOm9he4GfQJ6JsSVWfJ8a7BkyjZcSmxs",
    ),
    (  # 5
        ["!room:example.com", "m.call#"],
        b'["!room:example.com","m.call#"]',
        "86b4349777efd51234b020549f736ee7d06efdbddfee15976cc2cb7c530b34e6",
        "hrQ0l3fv1RI0sCBUn3Nu59Bu/b3f7hWXbMLLfFMLNOY",
    ),
    (  # 6
        ["@alice:127.0.0.1:8448", "DEVICE", "member-1"],
        b'["@alice:127.0.0.1:8448","DEVICE","member-1"]',
        "734c7721a6ad16019bf1a39d8d3c1020aa09241e69861034b5ea224cda8da972",
        "c0x3IaatFgGb8aOdjTwQIKoJJB5phhA0teoiTNqNqXI",
    ),
    (  # 7
        ["testRoom", "m.call#ROOM"],
        b'["testRoom","m.call#ROOM"]',
        "78879ff7c749704c69eb3ec0b25341c26a17576bb18177db430c4766ca4eea44",
        "eIef98dJcExp6z7AslNBwmoXV2uxgXfbQwxHZspO6kQ",
    ),
    (  # 8: v0.7 value (was the Go-escaped one below)
        ["!a&b<c>d:example.com", "m.call#ROOM"],
        b'["!a&b<c>d:example.com","m.call#ROOM"]',
        "ce2005744b9eaafd7f9c7ed470275cbe22258db6e3ddd74c328298e5e5e8ca52",
        "ziAFdEueqv1/nH7UcCdcviIljbbj3ddMMoKY5eXoylI",
    ),
    (  # 9
        ["!r\u00e4um:example.com", "m.call#ROOM"],
        b'["!r\xc3\xa4um:example.com","m.call#ROOM"]',
        "6f919da64414b9a767b87c229dc2eb8c9f489628821082fe094eb7a2e274704e",
        "b5GdpkQUuadnuHwincLrjJ9IliiCEIL+CU63ouJ0cE4",
    ),
    (  # 10
        ['a"b\\c\nd\te\x01f\bg\f', "m.call#ROOM"],
        b'["a\\"b\\\\c\\nd\\te\\u0001f\\bg\\f","m.call#ROOM"]',
        "5fe4f9224ffeefe0c201a67255cbc8b81d59c2da4fc668bff0c59cef5b4d5189",
        "X+T5Ik/+7+DCAaZyVcvIuB1ZwtpPxmi/8MWc71tNUYk",
    ),
    (  # 11: v0.7 value (was the Go-escaped one below)
        ["a\u2028b", "m.call#ROOM"],
        b'["a\xe2\x80\xa8b","m.call#ROOM"]',
        "f491849b013f50bd863c32bd42f5690c70602b9eb8ae413b0c20ffa3742d5565",
        "9JGEmwE/UL2GPDK9QvVpDHBgK564rkE7DCD/o3QtVWU",
    ),
    (  # 12: the MSC4195 appendix identity, as the application-service routes derive it
        ["@alice:example.com", "memberABC"],
        b'["@alice:example.com","memberABC"]',
        "337567b0b5eb91bc480c83573bae2ef0f6731720fd6581624142d1d9db21598b",
        "M3VnsLXrkbxIDINXO64u8PZzFyD9ZYFiQULR2dshWYs",
    ),
    (  # 13
        ["@alice:example.com", "member-1"],
        b'["@alice:example.com","member-1"]',
        "a0282f4e2fe52c7ccb5c8f344c05ed5f9fef544e02d37726cd81f78b23049ae6",
        "oCgvTi/lLHzLXI80TAXtX5/vVE4C03cmzYH3iyMEmuY",
    ),
    (  # 14
        ["@bob:remote.example", "memberXYZ"],
        b'["@bob:remote.example","memberXYZ"]',
        "83ffa3199d38a39d2f9c5c97699455258fbd418165a9345e22717ceb6a6d7891",
        "g/+jGZ04o50vnFyXaZRVJY+9QYFlqTReInF862pteJE",
    ),
]

# What the Go service derived (HTML escaping: \u0026\u003c\u003e, \u2028): no longer produced
# (docs/authorization.md#worked-examples).
GO_ERA = {
    8: (b'["!a\\u0026b\\u003cc\\u003ed:example.com","m.call#ROOM"]', "kLy9IEhXw6UjK3fnqQbqCARAeUkv7JNdMQEunyDUnec"),
    11: (b'["a\\u2028b","m.call#ROOM"]', "4ZLh54C2mOO5mDhNmffuJUUNhupFA98AVg1KPJsTORc"),
}

H_SHAPE = re.compile(r"\A[A-Za-z0-9+/]{43}\Z")


# --- an independent reference: char-by-char escaping table, bytes assembled by hand ---

_REF_TABLE = {
    0x22: b'\\"',
    0x5C: b"\\\\",
    0x0A: b"\\n",
    0x0D: b"\\r",
    0x09: b"\\t",
    0x08: b"\\b",
    0x0C: b"\\f",
}


def _ref_char(cp: int) -> bytes:
    if cp in _REF_TABLE:
        return _REF_TABLE[cp]
    if cp < 0x20:
        return b"\\u00" + b"0123456789abcdef"[cp >> 4 : (cp >> 4) + 1] + b"0123456789abcdef"[cp & 15 : (cp & 15) + 1]
    if 0xD800 <= cp <= 0xDFFF:
        cp = 0xFFFD
    return chr(cp).encode("utf-8")


def reference_h(*parts: str) -> str:
    data = b"[" + b",".join(b'"' + b"".join(_ref_char(ord(c)) for c in p) + b'"' for p in parts) + b"]"
    digest = hashlib.sha256(data).digest()
    out = base64.b64encode(digest)
    assert out.endswith(b"=") and not out.endswith(b"==")
    return out[:-1].decode("ascii")


SPECIAL = '<>&\u2028\u2029"\\/\b\f\n\r\t\x00\x01\x1f\x7f:#!@\u00e4\U0001f600\ufffd'
any_char = st.one_of(
    st.characters(),
    st.integers(0xD800, 0xDFFF).map(chr),
    st.integers(0, 0x1F).map(chr),
    st.sampled_from(SPECIAL),
)
any_id = st.lists(any_char, max_size=24).map("".join)


class VectorTests(SynchronousTestCase):
    def test_bytes_hashed(self) -> None:
        for n, (parts, exact, _sha, _h) in enumerate(VECTORS, 1):
            self.assertEqual(string_array_json(parts).encode("utf-8"), exact, f"vector {n}")

    def test_sha256(self) -> None:
        for n, (_parts, exact, sha, _h) in enumerate(VECTORS, 1):
            self.assertEqual(hashlib.sha256(exact).hexdigest(), sha, f"vector {n}")

    def test_h(self) -> None:
        for n, (parts, _exact, _sha, expected) in enumerate(VECTORS, 1):
            self.assertEqual(H(*parts), expected, f"vector {n}")

    def test_reference_agrees_on_vectors(self) -> None:
        for n, (parts, _exact, _sha, expected) in enumerate(VECTORS, 1):
            self.assertEqual(reference_h(*parts), expected, f"vector {n}")

    def test_named_helpers(self) -> None:
        self.assertEqual(room_alias("!roomid:example.com", "slot1234"), VECTORS[0][3])
        self.assertEqual(identity("@alice:example.com", "DEVICE123", "memberABC"), VECTORS[2][3])
        self.assertEqual(room_alias("!room:example.com", "m.call#"), VECTORS[4][3])
        self.assertEqual(identity("@alice:127.0.0.1:8448", "DEVICE", "member-1"), VECTORS[5][3])

    def test_legacy_alias(self) -> None:
        self.assertEqual(LEGACY_SLOT_ID, "m.call#ROOM")
        self.assertEqual(legacy_room_alias("!room:example.com"), VECTORS[3][3])
        self.assertEqual(legacy_room_alias("testRoom"), VECTORS[6][3])

    def test_go_era_values_are_not_produced(self) -> None:
        for n, (go_bytes, wrong) in GO_ERA.items():
            parts = VECTORS[n - 1][0]
            self.assertNotEqual(H(*parts), wrong, f"vector {n}")
            # and they really are the hashes of Go's HTML-escaped bytes (so the negative is meaningful)
            self.assertEqual(go_json_dumps(parts).encode("utf-8"), go_bytes, f"vector {n}")
            self.assertEqual(
                base64.b64encode(hashlib.sha256(go_bytes).digest()).decode().rstrip("="), wrong
            )

    def test_matrix_canonical_json_for_string_arrays(self) -> None:
        # MSC4195 names canonical JSON; for arrays of strings it is exactly these bytes
        for n, (parts, exact, _sha, _h) in enumerate(VECTORS, 1):
            canonical = json.dumps(parts, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            self.assertEqual(canonical, exact, f"vector {n}")

    def test_appservice_identity(self) -> None:
        self.assertEqual(appservice_identity("@alice:example.com", "memberABC"), VECTORS[11][3])
        self.assertEqual(appservice_identity("@alice:example.com", "member-1"), VECTORS[12][3])
        self.assertEqual(appservice_identity("@bob:remote.example", "memberXYZ"), VECTORS[13][3])
        # the legacy identity of the same user and member is a different participant
        self.assertNotEqual(
            appservice_identity("@alice:example.com", "memberABC"),
            identity("@alice:example.com", "DEVICE123", "memberABC"),
        )


class LegacyIdentityTests(SynchronousTestCase):
    def test_not_hashed(self) -> None:
        self.assertEqual(legacy_identity("@alice:example.com", "DEVICE123"), "@alice:example.com:DEVICE123")

    def test_empty_device(self) -> None:
        self.assertEqual(legacy_identity("@alice:example.com", ""), "@alice:example.com:")


class JobFieldTests(SynchronousTestCase):
    def test_hashed_job(self) -> None:
        # docs/redis-format.md#key-field-value
        self.assertEqual(
            job_field("krj2dgxw2K6EOm9he4GfQJ6JsSVWfJ8a7BkyjZcSmxs", "J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU"),
            '["krj2dgxw2K6EOm9he4GfQJ6JsSVWfJ8a7BkyjZcSmxs","J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU"]',
        )

    def test_legacy_job(self) -> None:
        self.assertEqual(
            job_field("krj2dgxw2K6EOm9he4GfQJ6JsSVWfJ8a7BkyjZcSmxs", "@alice:example.com:DEVICE123"),
            '["krj2dgxw2K6EOm9he4GfQJ6JsSVWfJ8a7BkyjZcSmxs","@alice:example.com:DEVICE123"]',
        )

    def test_not_html_escaped(self) -> None:
        # the hashes' serialisation (docs/redis-format.md#key-field-value), no longer Go's
        self.assertEqual(job_field("r", "@a<b>:x&y:D\u2028"), '["r","@a<b>:x&y:D\u2028"]')
        self.assertEqual(job_field("r", 'a"\\\n\x01'), '["r","a\\"\\\\\\n\\u0001"]')


class TypeTests(SynchronousTestCase):
    def test_non_strings_refused(self) -> None:
        e = self.assertRaises(TypeError, H, "a", None)
        self.assertEqual(str(e), "expected str, not NoneType")
        self.assertRaises(TypeError, room_alias, b"!r:x", "s")
        self.assertRaises(TypeError, job_field, "r", 1)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(any_id, any_id)
    def test_alias_matches_reference(self, room_id: str, slot_id: str) -> None:
        alias = room_alias(room_id, slot_id)
        self.assertEqual(alias, reference_h(room_id, slot_id))
        self.assertRegex(alias, H_SHAPE)
        self.assertEqual(alias, room_alias(room_id, slot_id))  # deterministic

    @settings(max_examples=300, deadline=None)
    @given(any_id, any_id, any_id)
    def test_identity_matches_reference(self, user_id: str, device_id: str, member_id: str) -> None:
        ident = identity(user_id, device_id, member_id)
        self.assertEqual(ident, reference_h(user_id, device_id, member_id))
        self.assertRegex(ident, H_SHAPE)
        self.assertEqual(ident, identity(user_id, device_id, member_id))

    @settings(max_examples=200, deadline=None)
    @given(any_id, any_id)
    def test_appservice_identity_matches_reference(self, user_id: str, member_id: str) -> None:
        ident = appservice_identity(user_id, member_id)
        self.assertEqual(ident, reference_h(user_id, member_id))
        self.assertRegex(ident, H_SHAPE)

    @settings(max_examples=200, deadline=None)
    @given(any_id, any_id, any_id, any_id, any_id)
    def test_identity_and_alias_domains_are_separate(self, u, d, m, r, s) -> None:
        self.assertNotEqual(identity(u, d, m), room_alias(r, s))
        # no quoting trick folds three strings into two
        self.assertNotEqual(identity(u, d, m), room_alias(u + '","' + d, m))

    @settings(max_examples=200, deadline=None)
    @given(any_id, any_id)
    def test_job_field_is_parseable_and_faithful(self, room: str, ident: str) -> None:
        field = job_field(room, ident)
        field.encode("utf-8")
        decoded = json.loads(field)
        self.assertEqual(len(decoded), 2)
        self.assertEqual(field, string_array_json(decoded))
        self.assertEqual(field, json.dumps(decoded, ensure_ascii=False, separators=(",", ":")))
