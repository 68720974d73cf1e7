"""The stored-job format shared with lk-jwt-service (docs/redis-format.md#key-field-value, docs/redis-format.md#reading-records)."""

from __future__ import annotations

import calendar
import datetime

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.leave.record import JobParams
from rtcauthd.store.model import (
    GO_ZERO_TIME,
    StoredJob,
    StoredJobError,
    decode_value,
    encode_field,
    encode_value,
    format_rfc3339,
    parse_rfc3339,
)

ROOM = "krj2dgxw2K6EOm9he4GfQJ6JsSVWfJ8a7BkyjZcSmxs"
IDENTITY = "J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU"

#: docs/redis-format.md#key-field-value, byte for byte, as the Go service writes it
SPEC_VALUE = (
    '{"Params":{"DelayId":"syd_integration_1","DelayTimeout":8000000000,"ServerName":"example.com",'
    '"LiveKitRoom":"krj2dgxw2K6EOm9he4GfQJ6JsSVWfJ8a7BkyjZcSmxs",'
    '"LiveKitIdentity":"J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU"},'
    '"RestartedAt":"2026-07-23T10:15:30.123456789Z"}'
)
#: 2026-07-23T10:15:30Z, computed independently of the module under test
T_2026 = calendar.timegm((2026, 7, 23, 10, 15, 30, 0, 0, 0))


def job(**overrides) -> StoredJob:
    fields = dict(
        delay_id="syd_integration_1",
        delay_timeout_ns=8_000_000_000,
        server_name="example.com",
        room=ROOM,
        identity=IDENTITY,
        restarted_at=T_2026 + 0.123456,
    )
    fields.update(overrides)
    restarted_at = fields.pop("restarted_at")
    return StoredJob(JobParams(**fields), restarted_at)


def value_with(restarted_at: str) -> str:
    return SPEC_VALUE.replace("2026-07-23T10:15:30.123456789Z", restarted_at)


class FieldTests(SynchronousTestCase):
    def test_hashed_identity_field(self) -> None:
        self.assertEqual(
            encode_field(ROOM, IDENTITY),
            '["krj2dgxw2K6EOm9he4GfQJ6JsSVWfJ8a7BkyjZcSmxs","J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU"]',
        )

    def test_legacy_identity_field(self) -> None:
        self.assertEqual(
            encode_field(ROOM, "@alice:example.com:DEVICE123"),
            '["krj2dgxw2K6EOm9he4GfQJ6JsSVWfJ8a7BkyjZcSmxs","@alice:example.com:DEVICE123"]',
        )

    def test_no_html_escaping_and_raw_unicode(self) -> None:
        # v0.7 writes the field as it hashes (docs/redis-format.md#key-field-value)
        self.assertEqual(
            encode_field("<a&b>", "é\u2028\u2029\"\\/"),
            '["<a&b>","é\u2028\u2029\\"\\\\/"]',
        )


class EncodeTests(SynchronousTestCase):
    def test_spec_shape_with_microseconds(self) -> None:
        self.assertEqual(encode_value(job()), value_with("2026-07-23T10:15:30.123456Z"))

    def test_whole_seconds_have_no_fraction(self) -> None:
        self.assertEqual(
            encode_value(job(restarted_at=float(T_2026))), value_with("2026-07-23T10:15:30Z")
        )

    def test_trailing_zeros_trimmed(self) -> None:
        self.assertEqual(format_rfc3339(T_2026 + 0.5), "2026-07-23T10:15:30.5Z")
        self.assertEqual(format_rfc3339(T_2026 + 0.12), "2026-07-23T10:15:30.12Z")
        self.assertEqual(format_rfc3339(T_2026 + 0.000001), "2026-07-23T10:15:30.000001Z")

    def test_before_epoch_and_go_zero_time(self) -> None:
        self.assertEqual(format_rfc3339(-1.5), "1969-12-31T23:59:58.5Z")
        self.assertEqual(format_rfc3339(GO_ZERO_TIME), "0001-01-01T00:00:00Z")
        self.assertEqual(format_rfc3339(951782400.0), "2000-02-29T00:00:00Z")

    def test_years_go_cannot_marshal_are_refused(self) -> None:
        with self.assertRaises(ValueError):
            format_rfc3339(253402300800.0)  # 10000-01-01

    def test_strings_use_go_escaping(self) -> None:
        encoded = encode_value(job(delay_id="a<b>&c", server_name="ex\u2028ample"))
        self.assertIn('"DelayId":"a\\u003cb\\u003e\\u0026c"', encoded)
        self.assertIn('"ServerName":"ex\\u2028ample"', encoded)

    def test_key_and_deadline(self) -> None:
        j = job()
        self.assertEqual(j.key, (ROOM, IDENTITY))
        self.assertAlmostEqual(j.expires_at, T_2026 + 8.123456, places=6)


class DecodeGoValuesTests(SynchronousTestCase):
    def test_spec_vector(self) -> None:
        decoded = decode_value(SPEC_VALUE)
        self.assertEqual(decoded.params.delay_id, "syd_integration_1")
        self.assertEqual(decoded.params.delay_timeout_ns, 8_000_000_000)
        self.assertEqual(decoded.params.server_name, "example.com")
        self.assertEqual(decoded.key, (ROOM, IDENTITY))
        self.assertAlmostEqual(decoded.restarted_at, T_2026 + 0.123456789, places=6)

    def test_bytes_as_read_from_redis(self) -> None:
        self.assertEqual(decode_value(SPEC_VALUE.encode()), decode_value(SPEC_VALUE))

    def test_positive_offset_nine_digits(self) -> None:
        # a Go host with TZ=Europe/Berlin writes local time
        decoded = decode_value(value_with("2026-07-23T12:15:30.123456789+02:00"))
        self.assertAlmostEqual(decoded.restarted_at, T_2026 + 0.123456789, places=6)

    def test_negative_offset_across_midnight(self) -> None:
        decoded = decode_value(value_with("2026-07-23T04:45:30-05:30"))
        self.assertEqual(decoded.restarted_at, float(T_2026))
        decoded = decode_value(value_with("2026-07-22T23:15:30.5-11:00"))
        self.assertEqual(decoded.restarted_at, T_2026 + 0.5)

    def test_one_fraction_digit_and_more_than_nine(self) -> None:
        self.assertEqual(decode_value(value_with("2026-07-23T10:15:30.5Z")).restarted_at, T_2026 + 0.5)
        # Go keeps the first nine digits
        self.assertAlmostEqual(
            decode_value(value_with("2026-07-23T10:15:30.1234567899999Z")).restarted_at,
            T_2026 + 0.123456789,
            places=6,
        )

    def test_member_names_case_insensitive(self) -> None:
        text = (
            '{"params":{"delayid":"d","DELAYTIMEOUT":5,"serverName":"s","livekitroom":"r",'
            '"LIVEKITIDENTITY":"i"},"restartedat":"2026-07-23T10:15:30Z"}'
        )
        self.assertEqual(decode_value(text), StoredJob(JobParams("d", 5, "s", "r", "i"), float(T_2026)))

    def test_go_special_case_folds(self) -> None:
        # U+212A KELVIN SIGN folds to k, U+017F LONG S to s, as in Go's decoder
        text = '{"Params":{"LiveKitRoom":"r","\u017fervername":"s"}}'
        decoded = decode_value(text)
        self.assertEqual((decoded.params.room, decoded.params.server_name), ("r", "s"))
        self.assertEqual(decode_value('{"Params":{"Live\u212aitRoom":"r"}}').params.room, "r")

    def test_unknown_members_ignored(self) -> None:
        text = SPEC_VALUE[:-1] + ',"JobId":"X","Extra":{"a":[1,2.5,null]}}'
        self.assertEqual(decode_value(text), decode_value(SPEC_VALUE))
        text = SPEC_VALUE.replace('"DelayId"', '"Other":true,"DelayId"')
        self.assertEqual(decode_value(text), decode_value(SPEC_VALUE))

    def test_missing_members_are_zero_values(self) -> None:
        self.assertEqual(decode_value("{}"), StoredJob(JobParams("", 0, "", "", ""), GO_ZERO_TIME))
        decoded = decode_value('{"Params":{"LiveKitRoom":"r","LiveKitIdentity":"i"}}')
        self.assertEqual(decoded, StoredJob(JobParams("", 0, "", "r", "i"), GO_ZERO_TIME))
        # zero time + 0 ns: the restore logic sees it as long expired
        self.assertLess(decoded.expires_at, 0)

    def test_null_keeps_zero_value(self) -> None:
        self.assertEqual(decode_value("null"), StoredJob(JobParams("", 0, "", "", ""), GO_ZERO_TIME))
        decoded = decode_value('{"Params":{"DelayId":null,"DelayTimeout":null},"RestartedAt":null}')
        self.assertEqual(decoded, StoredJob(JobParams("", 0, "", "", ""), GO_ZERO_TIME))

    def test_duplicates_last_wins_and_params_merge(self) -> None:
        text = '{"Params":{"DelayId":"a","delayid":"b"},"Params":{"ServerName":"s"}}'
        decoded = decode_value(text)
        self.assertEqual((decoded.params.delay_id, decoded.params.server_name), ("b", "s"))

    def test_negative_and_extreme_int64(self) -> None:
        self.assertEqual(decode_value('{"Params":{"DelayTimeout":-1}}').params.delay_timeout_ns, -1)
        self.assertEqual(
            decode_value('{"Params":{"DelayTimeout":9223372036854775807}}').params.delay_timeout_ns, 2**63 - 1
        )

    def test_invalid_utf8_becomes_replacement_per_byte(self) -> None:
        raw = b'{"Params":{"DelayId":"a\xff\xfeb"}}'
        self.assertEqual(decode_value(raw).params.delay_id, "a\ufffd\ufffdb")

    def test_escaped_lone_surrogate_becomes_replacement(self) -> None:
        self.assertEqual(decode_value('{"Params":{"DelayId":"x\\ud800y"}}').params.delay_id, "x\ufffdy")


class UnparsableTests(SynchronousTestCase):
    def assertUnparsable(self, text: str, fragment: str) -> None:
        with self.assertRaises(StoredJobError) as ctx:
            decode_value(text)
        self.assertIn(fragment, str(ctx.exception))

    def test_not_json(self) -> None:
        self.assertUnparsable("{not json", "not JSON")
        self.assertUnparsable("", "not JSON")
        self.assertUnparsable(SPEC_VALUE + "x", "not JSON")
        self.assertUnparsable("\ufeff" + SPEC_VALUE, "not JSON")

    def test_wrong_top_level_or_params_type(self) -> None:
        self.assertUnparsable("[]", "expected an object")
        self.assertUnparsable('"x"', "expected an object")
        self.assertUnparsable('{"Params":"x"}', "Params: expected an object")
        self.assertUnparsable('{"Params":[]}', "Params: expected an object")

    def test_delay_timeout_must_be_a_json_integer(self) -> None:
        for literal in ('"8000000000"', "8e9", "8000000000.0", "true", "9223372036854775808", "-9223372036854775809"):
            with self.subTest(literal=literal):
                self.assertUnparsable('{"Params":{"DelayTimeout":%s}}' % literal, "DelayTimeout")

    def test_nan_is_not_json(self) -> None:
        self.assertUnparsable('{"Params":{"DelayTimeout":NaN}}', "NaN is not JSON")

    def test_string_members_must_be_strings(self) -> None:
        self.assertUnparsable('{"Params":{"LiveKitRoom":1}}', "LiveKitRoom: expected a string")
        self.assertUnparsable('{"Params":{"DelayId":{}}}', "DelayId: expected a string")

    def test_restarted_at_must_be_rfc3339(self) -> None:
        bad = [
            "2026-07-23 10:15:30Z",
            "2026-07-23t10:15:30Z",
            "2026-07-23T10:15:30z",
            "2026-07-23T10:15:30",
            "2026-07-23T10:15:30.Z",
            "2026-07-23T10:15:30,5Z",
            "2026-02-30T10:15:30Z",
            "2025-02-29T10:15:30Z",
            "2026-07-23T24:00:00Z",
            "2026-07-23T23:59:60Z",
            "2026-07-23T10:15:30+24:00",
            "2026-07-23T10:15:30+02:60",
            "2026-07-23T10:15:30+0200",
            "2026-7-23T10:15:30Z",
            "\u0662026-07-23T10:15:30Z",  # non-ASCII digit
            "",
        ]
        for text in bad:
            with self.subTest(text=text):
                self.assertUnparsable(value_with(text), "RestartedAt")
        self.assertUnparsable(SPEC_VALUE.replace('"2026-07-23T10:15:30.123456789Z"', "1785000000"), "RestartedAt")


class RoundTripTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(
        text=st.text(),
        delay=st.integers(min_value=-(2**63), max_value=2**63 - 1),
        micros=st.integers(min_value=-62135596800 * 10**6, max_value=253402300799 * 10**6),
    )
    def test_decode_inverts_encode(self, text: str, delay: int, micros: int) -> None:
        clean = text.encode("utf-8", "replace").decode("utf-8")  # no surrogates: not storable
        original = StoredJob(JobParams(clean, delay, clean, clean + "r", "i" + clean), micros / 10**6)
        decoded = decode_value(encode_value(original))
        self.assertEqual(decoded.key, original.key)
        self.assertEqual((decoded.params.delay_id, decoded.params.delay_timeout_ns), (clean, delay))
        self.assertEqual(round(decoded.restarted_at * 10**6), round(original.restarted_at * 10**6))

    @settings(max_examples=200, deadline=None)
    @given(st.datetimes(timezones=st.just(datetime.timezone.utc)))
    def test_format_agrees_with_datetime(self, moment: datetime.datetime) -> None:
        seconds = calendar.timegm(moment.timetuple())
        m = moment
        expected = f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
        if moment.microsecond:
            expected += "." + f"{moment.microsecond:06d}".rstrip("0")
        unix = seconds + moment.microsecond / 10**6
        if abs(unix) < 2**50 / 10**6:  # where a float holds every microsecond with margin
            self.assertEqual(format_rfc3339(unix), expected + "Z")
        self.assertEqual(parse_rfc3339(expected + "Z"), seconds + moment.microsecond / 10**6)
