"""Rendering of doctor reports: 80-column text with marks and fixes, and JSON."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.doctor.report import Report, Result, Status, render_json, render_text

LONG = (
    "https://example.com/.well-known/matrix/client answers 404: the bare server name serves "
    "no client well-known; https://matrix.example.com/.well-known/matrix/client has one"
)


def report(*results: Result, elapsed: float = 1.25, https_port: int = 443) -> Report:
    return Report("example.com", tuple(results), elapsed, https_port, 5.0)


class TextTests(SynchronousTestCase):
    def test_marks_and_summary(self):
        text = render_text(
            report(
                Result("dns", "DNS", Status.PASS, "example.com has A 192.0.2.1"),
                Result("msc4140", "MSC4140", Status.WARN, "not advertised"),
                Result("well-known", "Client discovery", Status.FAIL, "404"),
                Result("token-flow", "Token flow", Status.SKIP, "needs --access-token"),
                Result("livekit-webhook", "LiveKit webhook", Status.INFO, "copy this"),
            )
        )
        lines = text.splitlines()
        self.assertEqual(lines[0], "rtcauth doctor example.com (timeout 5 s)")
        self.assertEqual(lines[2:7], [
            "✓ DNS: example.com has A 192.0.2.1",
            "! MSC4140: not advertised",
            "✗ Client discovery: 404",
            "- Token flow: needs --access-token",
            "i LiveKit webhook: copy this",
        ])
        self.assertEqual(lines[-1], "1 passed, 1 warning, 1 failed, 1 skipped in 1.2 s")

    def test_header_names_a_non_default_port(self):
        text = render_text(report(https_port=8443))
        self.assertEqual(text.splitlines()[0], "rtcauth doctor example.com (timeout 5 s, HTTPS port 8443)")

    def test_long_lines_wrap_at_80_with_hanging_indent(self):
        result = Result(
            "well-known", "Client discovery", Status.FAIL, LONG,
            details=["redirected to https://www.example.com/.well-known/matrix/client and then elsewhere"],
            fix=["Serve the client well-known at https://example.com/.well-known/matrix/client "
                 "itself, with Access-Control-Allow-Origin: *.", "A second paragraph of advice."],
        )
        lines = render_text(report(result)).splitlines()[2:-2]
        self.assertTrue(all(len(line) <= 80 for line in lines), lines)
        self.assertTrue(lines[0].startswith("✗ Client discovery: https://example.com/"))
        self.assertTrue(lines[1].startswith("  ") and not lines[1].startswith("   "))
        fix_lines = [i for i, line in enumerate(lines) if line.startswith("    fix: ")]
        self.assertEqual(len(fix_lines), 1)
        # Continuation lines of the fix align under its text; the second paragraph too.
        self.assertTrue(lines[fix_lines[0] + 1].startswith("         ") and lines[fix_lines[0] + 1][9] != " ")
        self.assertEqual(lines[-1], "         A second paragraph of advice.")

    def test_preformatted_paragraphs_keep_their_layout(self):
        result = Result(
            "delayed-events", "Delayed events", Status.WARN, "throttled",
            fix=["Raise the limit:", "  rc_delayed_event_mgmt:\n    per_second: 100"],
            details=["  webhook:\n    api_key: key"],
        )
        lines = render_text(report(result)).splitlines()[2:-2]
        self.assertEqual(lines, [
            "! Delayed events: throttled",
            "      webhook:",
            "        api_key: key",
            "    fix: Raise the limit:",
            "           rc_delayed_event_mgmt:",
            "             per_second: 100",
        ])

    def test_preformatted_first_fix_gets_its_own_label_line(self):
        result = Result("x", "X", Status.FAIL, "bad", fix=["  key: value"])
        self.assertEqual(render_text(report(result)).splitlines()[3:5], ["    fix:", "           key: value"])

    def test_ascii_marks(self):
        text = render_text(report(Result("a", "A", Status.PASS, "ok"), Result("b", "B", Status.FAIL, "bad")), unicode=False)
        self.assertIn("\n+ A: ok\n", text)
        self.assertIn("\nx B: bad\n", text)
        text.encode("ascii")


class ExitStatusTests(SynchronousTestCase):
    def test_warnings_and_skips_do_not_fail(self):
        r = report(Result("a", "A", Status.WARN, "w"), Result("b", "B", Status.SKIP, "s"), Result("c", "C", Status.INFO, "i"))
        self.assertTrue(r.ok)
        self.assertEqual(r.exit_status, 0)

    def test_one_failure_fails(self):
        r = report(Result("a", "A", Status.PASS, "p"), Result("b", "B", Status.FAIL, "f"))
        self.assertFalse(r.ok)
        self.assertEqual(r.exit_status, 1)


class JSONTests(SynchronousTestCase):
    def test_document(self):
        r = report(
            Result("dns", "DNS", Status.PASS, "ok"),
            Result("reach-ipv6", "Reachability", Status.FAIL, "IPv6 address published but unreachable",
                   details=["d"], fix=["delete the AAAA record"]),
        )
        document = json.loads(render_json(r))
        self.assertEqual(document["server_name"], "example.com")
        self.assertIs(document["ok"], False)
        self.assertEqual(document["exit_status"], 1)
        self.assertEqual(document["summary"], {"pass": 1, "warn": 0, "fail": 1, "skip": 0, "info": 0})
        self.assertEqual(document["elapsed_seconds"], 1.25)
        self.assertEqual(document["checks"][1], {
            "id": "reach-ipv6",
            "title": "Reachability",
            "status": "fail",
            "message": "IPv6 address published but unreachable",
            "details": ["d"],
            "fix": ["delete the AAAA record"],
        })
