"""Log output for twistd: level filter, text or JSON lines, and a last-line secret scrubber.

twistd builds its log observer before ``makeService`` runs, so ``tap.Options`` points
twistd's ``--logger`` at :func:`make_observer` and ``makeService`` calls
:func:`configure` with the parsed level, format and secrets before the observer starts.
Modules never log secrets; the scrubber is a safety net for what a library might print
(URLs with ``access_token=``, JWTs, the API secret).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import IO, Iterable, Optional

from twisted.logger import LogLevel, formatEvent, ILogObserver
from twisted.python.failure import Failure
from zope.interface import implementer

_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}
_ACCESS_TOKEN = re.compile(r"(access_token=)[^&\s\"']+")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}")

#: Characters that would end or forge a text log line, or hide in a terminal.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")

_JSON_RAW_CONTROLS = re.compile("[\x7f-\x9f\u2028\u2029]")

_settings: dict = {"level": "info", "format": "auto", "secrets": ()}


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``, ``\\u2028``)."""

    def one(match: "re.Match[str]") -> str:
        char = match.group(0)
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char) or (
            f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
        )

    return _CONTROL.sub(one, text)


def configure(*, level: str, log_format: str, secrets: Iterable[str]) -> None:
    """Set what the observer made by :func:`make_observer` filters, prints and scrubs."""
    _settings["level"] = level
    _settings["format"] = log_format
    # Short values (the public dev secret "secret") would redact ordinary words.
    _settings["secrets"] = tuple(s for s in secrets if s and len(s) >= 8)


def scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, "<redacted>")
    text = _ACCESS_TOKEN.sub(r"\1<redacted>", text)
    return _JWT.sub("<jwt redacted>", text)


class LogSummary:
    """Says when a repeated kind of event may be logged again: once per ``window`` seconds
    per key, with the count of those left out meanwhile — a flood of identical failures
    is a line every few seconds, not a line per request. Keys are bounded in number."""

    def __init__(self, clock, window: float = 10.0, max_keys: int = 1024) -> None:
        self._clock = clock
        self._window = window
        self._max_keys = max_keys
        self._seen: dict = {}  # key -> [next allowed time, suppressed count]

    def allow(self, key) -> Optional[int]:
        """None: leave this one out; else log it, noting the returned number left out before."""
        now = self._clock.seconds()
        entry = self._seen.get(key)
        if entry is not None and now < entry[0]:
            entry[1] += 1
            return None
        suppressed = entry[1] if entry is not None else 0
        if entry is None and len(self._seen) >= self._max_keys:
            self._seen = {k: v for k, v in self._seen.items() if now < v[0]}
            if len(self._seen) >= self._max_keys:
                self._seen = {}  # too many kinds at once: forget the counts, not the bound
        self._seen[key] = [now + self._window, 0]
        return suppressed


def _wants_json(fmt: str) -> bool:
    if fmt == "json":
        return True
    if fmt == "text":
        return False
    return bool(os.environ.get("JOURNAL_STREAM"))  # systemd journal: keep fields structured


def _safe_field(value):
    if isinstance(value, str):
        return escape_controls(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = str(value)  # an exception or other object: escaped only when it needs to be
    return escape_controls(text) if _CONTROL.search(text) else value


@implementer(ILogObserver)
class RtcAuthObserver:
    """Filters by level, renders one line per event, scrubs, writes and flushes."""

    def __init__(self, stream: IO[str], *, settings: Optional[dict] = None) -> None:
        self._stream = stream
        self._settings = settings if settings is not None else _settings

    def __call__(self, event: dict) -> None:
        level = event.get("log_level", LogLevel.info)
        threshold = _LEVELS.get(self._settings["level"], LogLevel.info)
        if level < threshold:
            return
        secrets = self._settings["secrets"]
        if _wants_json(self._settings["format"]):
            line = self._json_line(event, level)
        else:
            line = self._text_line(event, level)
        self._stream.write(scrub(line, secrets) + "\n")
        self._stream.flush()

    @staticmethod
    def _message(event: dict) -> str:
        # Field values may come from clients (a server name, a path): they cannot add lines.
        safe = {key: value if key.startswith("log_") else _safe_field(value) for key, value in event.items()}
        text = formatEvent(safe) if event.get("log_format") is not None else ""
        if not text and "message" in event:  # legacy twisted.python.log events
            text = " ".join(str(m) for m in event["message"])
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            text = f"{text}\n{failure.getTraceback()}".rstrip()
        return text

    def _text_line(self, event: dict, level: LogLevel) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(event.get("log_time", time.time())))
        namespace = event.get("log_namespace", "-")
        return f"{stamp} [{level.name}] {namespace}: {self._message(event)}"

    def _json_line(self, event: dict, level: LogLevel) -> str:
        record = {
            "time": round(event.get("log_time", time.time()), 3),
            "level": level.name,
            "namespace": event.get("log_namespace", "-"),
            "message": self._message(event),
        }
        for key, value in event.items():
            if key.startswith("log_") or key in ("message", "format", "isError", "system", "time"):
                continue
            if isinstance(value, (str, int, float, bool)) or value is None:
                record[key] = value
            else:
                record[key] = repr(value)
        line = json.dumps(record, ensure_ascii=False, default=repr)
        # JSON leaves these raw, but line readers (and str.splitlines) break on them.
        return _JSON_RAW_CONTROLS.sub(lambda m: f"\\u{ord(m.group(0)):04x}", line)


def make_observer() -> RtcAuthObserver:
    """twistd ``--logger`` factory."""
    return RtcAuthObserver(sys.stdout)
