"""Go ``encoding/json`` compatible encoding (protocol.md §5.1, §2.3, §13.2).

Why not ``json.dumps``: LiveKit room aliases and identities are SHA-256 hashes of Go's
``json.Marshal`` output, and the Redis job records are shared with the Go service, so
the bytes have to match Go exactly. Go differs from Python in HTML escaping (``<``,
``>``, ``&``, U+2028, U+2029 become ``\\u003c`` ...), in never ``\\u``-escaping other
non-ASCII text, and it has no floats here that we would need. Dicts are encoded in
insertion order, which is how Go encodes *structs* (callers build them in struct
order); Go sorts *map* keys, so callers encoding a Go map must sort themselves.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["go_json_dumps", "go_json_string", "scrub_surrogates"]

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
