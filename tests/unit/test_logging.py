"""Log observer: level filter, text and JSON lines, and the secret scrubber."""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.logging import RtcAuthObserver, scrub

JWT = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJkZXZrZXkifQ.Rlnvqwg4Kv9NsctP_IFAKk7_KGSMgbfuPLSQ6gteo6E"


class ObserverTests(SynchronousTestCase):
    def make(self, level="info", fmt="text", secrets=("s3cr3t-value",)):
        stream = io.StringIO()
        settings = {"level": level, "format": fmt, "secrets": secrets}
        publisher = LogPublisher(RtcAuthObserver(stream, settings=settings))
        return Logger(namespace="rtcauthd.test", observer=publisher), stream

    def test_level_filter(self):
        log, stream = self.make(level="warn")
        log.debug("dropped {x}", x=1)
        log.info("dropped too")
        log.warn("kept {x}", x=2)
        log.error("kept error")
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertIn("[warn] rtcauthd.test: kept 2", lines[0])
        self.assertIn("[error]", lines[1])

    def test_debug_level_shows_debug(self):
        log, stream = self.make(level="debug")
        log.debug("visible")
        self.assertIn("visible", stream.getvalue())

    def test_json_lines_carry_fields(self):
        log, stream = self.make(fmt="json")
        log.info("issued token for {user_id}", user_id="@alice:example.com", status=200)
        record = json.loads(stream.getvalue())
        self.assertEqual(record["message"], "issued token for @alice:example.com")
        self.assertEqual(record["user_id"], "@alice:example.com")
        self.assertEqual(record["status"], 200)
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["namespace"], "rtcauthd.test")

    def test_secrets_scrubbed_in_both_formats(self):
        for fmt in ("text", "json"):
            log, stream = self.make(fmt=fmt)
            log.info(
                "oops {url} {secret} {jwt}",
                url="https://hs/_matrix/federation/v1/openid/userinfo?access_token=syt_topsecret&x=1",
                secret="s3cr3t-value",
                jwt=JWT,
            )
            out = stream.getvalue()
            for leaked in ("syt_topsecret", "s3cr3t-value", JWT):
                self.assertNotIn(leaked, out, fmt)
            self.assertIn("access_token=<redacted>&x=1", out)

    def test_failure_traceback_included(self):
        log, stream = self.make()
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("it broke", failure=Failure())
        self.assertIn("ZeroDivisionError", stream.getvalue())

    def test_scrub_leaves_normal_text(self):
        self.assertEqual(scrub("hello world", ("secret",)), "hello world")


class ForgedLineTests(SynchronousTestCase):
    """Client-supplied field values cannot add, end or colour a log line (issue 12)."""

    FORGED = "evil.example\n2026-12-02T00:00:00+0000 [critical] rtcauthd: forged\r\x1b[31m\u2028\x00"

    def make(self, fmt):
        stream = io.StringIO()
        publisher = LogPublisher(RtcAuthObserver(stream, settings={"level": "debug", "format": fmt, "secrets": ()}))
        return Logger(namespace="rtcauthd.test", observer=publisher), stream

    def test_text_line_stays_one_line(self):
        log, stream = self.make("text")
        log.warn("lookup of {server_name} failed: {error}", server_name=self.FORGED, error=ValueError(self.FORGED))
        text = stream.getvalue()
        self.assertEqual(text.count("\n"), 1)
        for char in "\r\x1b\u2028\x00":
            self.assertNotIn(char, text)
        self.assertIn("evil.example\\n2026-12-02T00:00:00+0000 [critical] rtcauthd: forged\\r\\x1b[31m\\u2028\\x00", text)

    def test_json_line_stays_one_object_and_keeps_the_raw_field(self):
        log, stream = self.make("json")
        log.warn("lookup of {server_name} failed", server_name=self.FORGED)
        [line] = stream.getvalue().splitlines()
        record = json.loads(line)
        self.assertEqual(record["server_name"], self.FORGED)  # the field is data, escaped by JSON
        self.assertNotIn("\n", record["message"])

    def test_format_specs_still_work(self):
        log, stream = self.make("text")
        log.info("waited {wait:.3f} s for {count} of {what}", wait=0.12345, count=3, what=object)
        self.assertIn("waited 0.123 s for 3 of <class 'object'>", stream.getvalue())


class LogSummaryTests(SynchronousTestCase):
    """A flood of one kind of failure is a line per window, with the count left out."""

    def test_one_line_per_window_per_key_with_the_count(self):
        from twisted.internet.task import Clock

        from rtcauthd.logging import LogSummary

        clock = Clock()
        summary = LogSummary(clock, window=10)
        self.assertEqual(summary.allow("a"), 0)
        self.assertEqual([summary.allow("a") for _ in range(5)], [None] * 5)
        self.assertEqual(summary.allow("b"), 0)  # another kind is not held back
        clock.advance(10)
        self.assertEqual(summary.allow("a"), 5)
        self.assertIsNone(summary.allow("a"))

    def test_keys_are_bounded(self):
        from twisted.internet.task import Clock

        from rtcauthd.logging import LogSummary

        clock = Clock()
        summary = LogSummary(clock, window=10, max_keys=10)
        for i in range(100):
            summary.allow(i)
            clock.advance(1)
            self.assertLessEqual(len(summary._seen), 10)
        for i in range(100):  # all within one window
            summary.allow(f"burst-{i}")
            self.assertLessEqual(len(summary._seen), 10)
