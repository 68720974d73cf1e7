"""Classification of MSC4140 restart/send answers (docs/delegated-leave.md#answer-classification)."""

from __future__ import annotations

import json
from email.utils import parsedate_to_datetime

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from rtcauthd.matrix.delayed_events import (
    Outcome,
    OutcomeKind,
    classify_delayed_event_response,
    parse_http_date,
)

# 1994-11-06T08:49:37Z, computed independently of the code under test.
EPOCH_1994 = parsedate_to_datetime("Sun, 06 Nov 1994 08:49:37 GMT").timestamp()
IMF = "Sun, 06 Nov 1994 08:49:37 GMT"
RFC850 = "Sunday, 06-Nov-94 08:49:37 GMT"
ASCTIME = "Sun Nov  6 08:49:37 1994"


def classify429(retry_after=None, body: bytes = b"", now: float = 0.0) -> Outcome:
    headers = Headers()
    if retry_after is not None:
        headers.setRawHeaders(b"Retry-After", [retry_after.encode("latin-1")])
    return classify_delayed_event_response(429, headers, body, now)


def ms_body(value) -> bytes:
    return json.dumps({"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": value}).encode()


class StatusTests(SynchronousTestCase):
    def test_200_and_204_are_ok(self) -> None:
        for status in (200, 204):
            outcome = classify_delayed_event_response(status, Headers(), b"{}", 0.0)
            self.assertEqual(outcome.kind, OutcomeKind.OK, status)
            self.assertIsNone(outcome.retry_after)

    def test_404_is_not_found(self) -> None:
        outcome = classify_delayed_event_response(
            404, Headers(), b'{"errcode":"M_NOT_FOUND","error":"Delayed event not found"}', 0.0
        )
        self.assertEqual(outcome.kind, OutcomeKind.NOT_FOUND)

    def test_409_is_a_conflict(self) -> None:
        # MSC4140: the event is already finalised the other way; any body, any headers
        for body in (b'{"errcode":"M_UNKNOWN","error":"already cancelled"}', b"", b"not json"):
            headers = Headers({b"Retry-After": [b"5"]})
            outcome = classify_delayed_event_response(409, headers, body, 0.0)
            self.assertEqual((outcome.kind, outcome.status, outcome.retry_after), (OutcomeKind.CONFLICT, 409, None))

    def test_5xx_is_transient_without_hint(self) -> None:
        for status in (500, 502, 503, 504, 599):
            outcome = classify_delayed_event_response(status, Headers(), b"", 0.0)
            self.assertEqual((outcome.kind, outcome.retry_after), (OutcomeKind.RETRY, None), status)

    def test_every_other_status_is_transient(self) -> None:
        # 409 is no longer here: MSC4140 gives it a final meaning (test_409_is_a_conflict)
        for status in (100, 101, 201, 202, 203, 206, 301, 302, 307, 400, 401, 403, 408,
                       418, 421, 423, 425, 451):
            outcome = classify_delayed_event_response(status, Headers(), b"", 0.0)
            self.assertEqual(outcome.kind, OutcomeKind.RETRY, status)
            self.assertIsNone(outcome.retry_after, status)
            self.assertEqual(outcome.status, status)

    def test_retry_after_ignored_outside_429(self) -> None:
        headers = Headers({b"Retry-After": [b"5"]})
        outcome = classify_delayed_event_response(503, headers, ms_body(9000), 0.0)
        self.assertIsNone(outcome.retry_after)


class RetryAfterHeaderTests(SynchronousTestCase):
    def test_integer_seconds(self) -> None:
        self.assertEqual(classify429("5").retry_after, 5.0)
        self.assertEqual(classify429("0").retry_after, 0.0)
        self.assertEqual(classify429("+7").retry_after, 7.0)

    def test_negative_integer_is_zero(self) -> None:
        outcome = classify429("-3")
        self.assertEqual((outcome.kind, outcome.retry_after), (OutcomeKind.RETRY, 0.0))

    def test_surrounding_whitespace_is_framing(self) -> None:
        self.assertEqual(classify429(" 4 ").retry_after, 4.0)

    def test_plain_mapping_headers_accepted(self) -> None:
        outcome = classify_delayed_event_response(429, {"retry-after": "6"}, b"", 0.0)
        self.assertEqual(outcome.retry_after, 6.0)
        outcome = classify_delayed_event_response(429, {b"Retry-After": [b"8"]}, b"", 0.0)
        self.assertEqual(outcome.retry_after, 8.0)

    def test_header_wins_and_body_is_not_read(self) -> None:
        self.assertEqual(classify429("2", ms_body(10_000)).retry_after, 2.0)

    def test_unusable_integer_forms_fall_back_to_body(self) -> None:
        for value in ("5 s", "5.5", "1e3", "", "five", "5,", "- 5", "99999999999999999999"):
            self.assertEqual(classify429(value, ms_body(2500)).retry_after, 3.0, value)
            self.assertIsNone(classify429(value).retry_after, value)

    def test_imf_fixdate_floored_relative_to_now(self) -> None:
        self.assertEqual(classify429(IMF, now=EPOCH_1994 - 10.7).retry_after, 10.0)
        self.assertEqual(classify429(IMF, now=EPOCH_1994 - 10.0).retry_after, 10.0)
        self.assertEqual(classify429(IMF, now=EPOCH_1994 - 0.2).retry_after, 0.0)

    def test_rfc850_date(self) -> None:
        self.assertEqual(classify429(RFC850, now=EPOCH_1994 - 30).retry_after, 30.0)

    def test_asctime_date(self) -> None:
        self.assertEqual(classify429(ASCTIME, now=EPOCH_1994 - 61.5).retry_after, 61.0)
        self.assertEqual(
            classify429("Sun Nov 16 08:49:37 1994", now=EPOCH_1994).retry_after, 10 * 86400.0
        )

    def test_past_date_is_zero(self) -> None:
        self.assertEqual(classify429(IMF, now=EPOCH_1994 + 3600).retry_after, 0.0)

    def test_weekday_value_is_not_checked_only_its_spelling(self) -> None:
        self.assertEqual(
            classify429("Mon, 06 Nov 1994 08:49:37 GMT", now=EPOCH_1994 - 5).retry_after, 5.0
        )
        self.assertIsNone(classify429("Xyz, 06 Nov 1994 08:49:37 GMT", now=EPOCH_1994 - 5).retry_after)

    def test_invalid_dates_fall_back_to_body(self) -> None:
        for value in (
            "Sun, 31 Feb 1994 08:49:37 GMT",  # no such day
            "Sun, 06 Nov 1994 24:49:37 GMT",  # hour out of range
            "Sun, 06 Foo 1994 08:49:37 GMT",  # month
            "Sun, 6 Nov 1994 08:49:37 GMT",  # IMF needs two-digit day
            "Sun, 06 Nov 1994 08:49:37 UTC",  # IMF needs GMT
            "Sun, 06 Nov 1994 08:49:37 GMT extra",
            "1994-11-06T08:49:37Z",
        ):
            self.assertEqual(
                classify429(value, ms_body(1000), now=EPOCH_1994 - 100).retry_after, 1.0, value
            )

    def test_parse_http_date_two_digit_years(self) -> None:
        self.assertEqual(parse_http_date("Thursday, 01-Jan-70 00:00:00 GMT"), 0.0)
        self.assertEqual(
            parse_http_date("Friday, 01-Jan-38 00:00:00 GMT"),
            parsedate_to_datetime("Fri, 01 Jan 2038 00:00:00 GMT").timestamp(),
        )


class RetryAfterBodyTests(SynchronousTestCase):
    def test_ms_rounded_up_to_seconds(self) -> None:
        self.assertEqual(classify429(body=ms_body(1500)).retry_after, 2.0)
        self.assertEqual(classify429(body=ms_body(1000)).retry_after, 1.0)
        self.assertEqual(classify429(body=ms_body(1)).retry_after, 1.0)
        self.assertEqual(classify429(body=ms_body(60_001)).retry_after, 61.0)

    def test_unusable_values_give_no_hint(self) -> None:
        for value in (0, -5, "1500", 1500.0, 1.5, True, None, [1500], {"ms": 1}, 2**63):
            outcome = classify429(body=ms_body(value))
            self.assertEqual((outcome.kind, outcome.retry_after), (OutcomeKind.RETRY, None), value)

    def test_unparsable_bodies_give_no_hint(self) -> None:
        for body in (b"", b"not json", b"[1500]", b"null", b"1500",
                     b'{"retry_after_ms": NaN}', b'{"retry_after_ms": 1500'):
            self.assertIsNone(classify429(body=body).retry_after, body)

    def test_missing_member_gives_no_hint(self) -> None:
        self.assertIsNone(classify429(body=b'{"errcode":"M_LIMIT_EXCEEDED"}').retry_after)

    def test_member_names_match_case_insensitively_last_wins(self) -> None:
        self.assertEqual(classify429(body=b'{"Retry_After_MS": 2500}').retry_after, 3.0)
        self.assertEqual(
            classify429(body=b'{"retry_after_ms": 9000, "RETRY_AFTER_MS": 4000}').retry_after, 4.0
        )

    def test_type_error_elsewhere_voids_the_hint(self) -> None:
        self.assertIsNone(classify429(body=b'{"errcode": 5, "retry_after_ms": 3000}').retry_after)
        self.assertEqual(
            classify429(body=b'{"errcode": null, "retry_after_ms": 3000, "x": [1]}').retry_after,
            3.0,
        )
