"""The doctor's findings and their two renderings: 80-column text and JSON.

Why one :class:`Result` per line: an operator scans the marks (✓ pass, ! warning,
✗ fail, - skipped, i for information such as config to copy) and reads only the failing lines and their fixes; a machine reads the
same list as JSON. Exit status 0 means no check failed (warnings and skips allowed).
"""

from __future__ import annotations

import enum
import json
import textwrap
from typing import Iterable

import attr

WIDTH = 80


class Status(enum.Enum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"
    INFO = "info"  # something to print for the operator, not a verdict


MARKS = {Status.PASS: "✓", Status.WARN: "!", Status.FAIL: "✗", Status.SKIP: "-", Status.INFO: "i"}
#: For terminals that cannot print the Unicode marks.
ASCII_MARKS = {Status.PASS: "+", Status.WARN: "!", Status.FAIL: "x", Status.SKIP: "-", Status.INFO: "i"}


def _strings(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Result:
    """One line of the report.

    ``details`` are extra facts; ``fix`` says what to change (each a paragraph; a
    paragraph starting with two spaces is preformatted, e.g. a config snippet).
    """

    check: str
    title: str
    status: Status
    message: str
    details: tuple[str, ...] = attr.ib(default=(), converter=_strings)
    fix: tuple[str, ...] = attr.ib(default=(), converter=_strings)

    def as_json(self) -> dict:
        return {
            "id": self.check,
            "title": self.title,
            "status": self.status.value,
            "message": self.message,
            "details": list(self.details),
            "fix": list(self.fix),
        }


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Report:
    server_name: str
    results: tuple[Result, ...]
    elapsed: float
    https_port: int = 443
    timeout: float = 5.0

    def count(self, status: Status) -> int:
        return sum(1 for r in self.results if r.status is status)

    @property
    def ok(self) -> bool:
        return self.count(Status.FAIL) == 0

    @property
    def exit_status(self) -> int:
        return 0 if self.ok else 1

    def summary(self) -> str:
        def plural(n: int, word: str) -> str:
            return f"{n} {word}" + ("" if n == 1 else "s")

        return ", ".join(
            [
                f"{self.count(Status.PASS)} passed",
                plural(self.count(Status.WARN), "warning"),
                f"{self.count(Status.FAIL)} failed",
                f"{self.count(Status.SKIP)} skipped",
            ]
        )


def _wrap(text: str, first: str, rest: str, width: int) -> list[str]:
    if text.startswith("  "):  # preformatted: own lines, relative indentation kept
        block = [rest + "  " + line for line in textwrap.dedent(text).split("\n")]
        return ([first.rstrip()] if first.strip() else []) + block
    return textwrap.wrap(
        text,
        width=width,
        initial_indent=first,
        subsequent_indent=rest,
        break_long_words=False,
        break_on_hyphens=False,
    ) or [first.rstrip()]


def render_text(report: Report, *, width: int = WIDTH, unicode: bool = True) -> str:
    """The human report: one wrapped line (or a few) per result, fixes indented."""
    marks = MARKS if unicode else ASCII_MARKS
    port = "" if report.https_port == 443 else f", HTTPS port {report.https_port}"
    lines = [f"rtcauth doctor {report.server_name} (timeout {report.timeout:g} s{port})", ""]
    for result in report.results:
        lines += _wrap(f"{marks[result.status]} {result.title}: {result.message}", "", "  ", width)
        for detail in result.details:
            lines += _wrap(detail, "    ", "    ", width)
        for index, fix in enumerate(result.fix):
            lines += _wrap(fix, "    fix: " if index == 0 else "         ", "         ", width)
    lines += ["", f"{report.summary()} in {report.elapsed:.1f} s"]
    return "\n".join(lines) + "\n"


def render_json(report: Report) -> str:
    """The machine report (one JSON object)."""
    document = {
        "server_name": report.server_name,
        "ok": report.ok,
        "exit_status": report.exit_status,
        "summary": {status.value: report.count(status) for status in Status},
        "elapsed_seconds": round(report.elapsed, 3),
        "https_port": report.https_port,
        "timeout_seconds": report.timeout,
        "checks": [r.as_json() for r in report.results],
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
