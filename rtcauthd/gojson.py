"""Go ``encoding/json`` compatible encoding and strict decoding (docs/endpoints.md#response-bodies, docs/endpoints.md#request-bodies, docs/redis-format.md).

Why not ``json.dumps``: response bodies, JWT claims and the Redis job values are written
as the Go service writes them, so the bytes match Go exactly (the hashes and the job
field follow v0.7 instead, see ``rtcauthd/livekit/naming.py``). Go differs from Python in
HTML escaping (``<``, ``>``, ``&``, U+2028, U+2029 become ``\\u003c`` ...), in never
``\\u``-escaping other non-ASCII text, and it has no floats here that we would need. Dicts are encoded in
insertion order, which is how Go encodes *structs* (callers build them in struct
order); Go sorts *map* keys, so callers encoding a Go map must sort themselves.
"""

from __future__ import annotations

import codecs
import json
import re
from typing import Any

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "JSONFraction",
    "JSONObject",
    "NotJSON",
    "STRICT_DECODER",
    "decode_first_value",
    "decode_utf8_per_byte",
    "fold_key",
    "go_json_dumps",
    "go_json_string",
    "go_quote",
    "reject_constant",
    "scrub_surrogates",
]

# Characters that Go's encoder does not write raw, plus surrogates, which cannot be
# written as UTF-8 at all.
_NEEDS_ESCAPE = re.compile('[\x00-\x1f"\\\\<>&\u2028\u2029\ud800-\udfff]')

_SHORT_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\b": "\\b",  # Go >= 1.22; older Go wrote \u0008
    "\f": "\\f",  # Go >= 1.22; older Go wrote \u000c
}

_SURROGATES = re.compile("[\ud800-\udfff]")


def _escape(match: "re.Match[str]") -> str:
    ch = match.group()
    short = _SHORT_ESCAPES.get(ch)
    if short is not None:
        return short
    if "\ud800" <= ch <= "\udfff":
        # A lone surrogate only exists in Python text; Go's decoder would already have
        # turned it into U+FFFD, which Go's encoder then writes raw.
        return "\ufffd"
    return "\\u%04x" % ord(ch)


def scrub_surrogates(text: str) -> str:
    """Replace every surrogate code point by U+FFFD, as Go's JSON decoder would have.

    Use before encoding text to UTF-8 for other wire formats (protobuf) so that the
    same string maps to the same bytes everywhere.
    """
    return _SURROGATES.sub("\ufffd", text)


def go_json_string(text: str) -> str:
    """One JSON string literal, quoted, exactly as Go's ``json.Marshal`` writes it."""
    return '"' + _NEEDS_ESCAPE.sub(_escape, text) + '"'


def go_json_dumps(obj: Any) -> str:
    """Encode ``obj`` like Go's ``json.Marshal`` (HTML escaping on, no whitespace).

    Supports str, int, bool, None, list/tuple and dict with str keys. Floats are
    refused: Go's float formatting is not reproduced and nothing here needs it.
    """
    parts: list[str] = []
    _encode(obj, parts)
    return "".join(parts)


def _encode(obj: Any, out: list[str]) -> None:
    if isinstance(obj, str):
        out.append(go_json_string(obj))
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif obj is None:
        out.append("null")
    elif isinstance(obj, int):
        out.append(str(int(obj)))
    elif isinstance(obj, (list, tuple)):
        out.append("[")
        for i, item in enumerate(obj):
            if i:
                out.append(",")
            _encode(item, out)
        out.append("]")
    elif isinstance(obj, dict):
        out.append("{")
        for i, (key, value) in enumerate(obj.items()):
            if not isinstance(key, str):
                raise TypeError(f"Go JSON object keys must be str, not {type(key).__name__}")
            if i:
                out.append(",")
            out.append(go_json_string(key))
            out.append(":")
            _encode(value, out)
        out.append("}")
    else:
        raise TypeError(f"cannot Go-JSON-encode {type(obj).__name__}")


# --------------------------------------------------------------------------- decoding
# What every peer of ours (clients, Redis records written by Go, Twirp errors, Matrix 429
# bodies, webhooks) is decoded with: Go's decoders reject NaN/Infinity, keep integers and
# fractions apart, see duplicate members, and turn each invalid UTF-8 byte into U+FFFD.


#: Go's int64, the type of every integer field we decode
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class NotJSON(ValueError):
    """Not JSON as Go reads it (NaN, Infinity, ...)."""


class JSONObject(list):
    """A JSON object as its (key, value) pairs in document order, so duplicates stay visible."""


class JSONFraction(float):
    """A JSON number written with a fraction or exponent: never a Go integer."""


def reject_constant(name: str) -> Any:
    raise NotJSON(f"{name} is not JSON")


#: objects → JSONObject, fractions → JSONFraction, NaN/Infinity → NotJSON
STRICT_DECODER = json.JSONDecoder(
    parse_float=JSONFraction, parse_constant=reject_constant, object_pairs_hook=JSONObject
)


def fold_key(name: str) -> str:
    """Go's case-insensitive member match, including its Kelvin-sign and long-s folds."""
    return name.replace("\u212a", "k").replace("\u017f", "s").lower()


def _per_byte_replace(error: UnicodeDecodeError) -> tuple[str, int]:
    # Python's "replace" folds a truncated multi-byte sequence into one U+FFFD; Go
    # replaces every offending byte. Replace the first byte and let decoding resume.
    return "\ufffd", error.start + 1


codecs.register_error("rtcauthd-go-replace", _per_byte_replace)


def decode_utf8_per_byte(data: bytes) -> str:
    """UTF-8 text as Go sees it: each invalid byte becomes its own U+FFFD."""
    return data.decode("utf-8", errors="rtcauthd-go-replace")


_JSON_WHITESPACE = " \t\r\n"


def decode_first_value(data: bytes) -> Any:
    """The first JSON value of ``data`` as Go's streaming decoder reads it: leading JSON
    whitespace skipped, bytes after the value ignored, objects as :class:`JSONObject`.
    Raises ValueError (or RecursionError for absurd nesting) when there is none."""
    text = decode_utf8_per_byte(data)
    start = len(text) - len(text.lstrip(_JSON_WHITESPACE))
    if start == len(text):
        raise NotJSON("no JSON value")
    value, _end = STRICT_DECODER.raw_decode(text, start)
    return value


def go_quote(text: str) -> str:
    """Go's ``%q``: double quotes; quotes, backslashes and unprintables escaped."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        elif ch in _GO_SHORT:
            out.append(_GO_SHORT[ch])
        elif ord(ch) < 0x80:
            out.append("\\x%02x" % ord(ch))
        elif ord(ch) <= 0xFFFF:
            out.append("\\u%04x" % ord(ch))
        else:
            out.append("\\U%08x" % ord(ch))
    return '"' + "".join(out) + '"'


_GO_SHORT = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}
