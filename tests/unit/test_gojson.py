"""Go ``encoding/json`` compatible encoding (docs/authorization.md#hash-function, docs/endpoints.md#response-bodies, docs/redis-format.md#key-field-value)."""

from __future__ import annotations

import json

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.gojson import go_json_dumps, go_json_string, scrub_surrogates

# Every code point, surrogates included, with the troublesome ones made likely.
SPECIAL = '<>&\u2028\u2029"\\/\b\f\n\r\t\x00\x01\x0b\x1f\x7f\u00e4\U0001f600\ufffd'
any_char = st.one_of(
    st.characters(),
    st.integers(0xD800, 0xDFFF).map(chr),
    st.integers(0, 0x1F).map(chr),
    st.sampled_from(SPECIAL),
)
any_text = st.lists(any_char, max_size=30).map("".join)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | any_text,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(any_text, children, max_size=4),
    max_leaves=12,
)


def _scrubbed(value):
    """What a JSON decoder gives back for a value we encoded (surrogates -> U+FFFD)."""
    if isinstance(value, str):
        return scrub_surrogates(value)
    if isinstance(value, list):
        return [_scrubbed(v) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out[scrub_surrogates(k)] = _scrubbed(v)
        return out
    return value


class StringEscapingTests(SynchronousTestCase):
    """One test per row of the docs/authorization.md#hash-function table."""

    def test_quote_and_backslash(self) -> None:
        self.assertEqual(go_json_string('a"b\\c'), '"a\\"b\\\\c"')

    def test_lf_cr_tab(self) -> None:
        self.assertEqual(go_json_string("\n\r\t"), '"\\n\\r\\t"')

    def test_backspace_and_formfeed_use_short_escapes(self) -> None:
        # Go >= 1.22 writes \b and \f, not \u0008 / \u000c
        self.assertEqual(go_json_string("\b\f"), '"\\b\\f"')

    def test_other_controls_lowercase_hex(self) -> None:
        self.assertEqual(go_json_string("\x00\x01\x0b\x1a\x1f"), '"\\u0000\\u0001\\u000b\\u001a\\u001f"')

    def test_html_characters_escaped(self) -> None:
        self.assertEqual(go_json_string("<a&b>"), '"\\u003ca\\u0026b\\u003e"')

    def test_line_and_paragraph_separators_escaped(self) -> None:
        self.assertEqual(go_json_string("a\u2028b\u2029c"), '"a\\u2028b\\u2029c"')

    def test_del_non_ascii_and_slash_raw(self) -> None:
        self.assertEqual(go_json_string("\x7f/\u00e4\u20ac\U0001f600"), '"\x7f/\u00e4\u20ac\U0001f600"')

    def test_lone_surrogates_become_raw_replacement_character(self) -> None:
        self.assertEqual(go_json_string("a\ud800b\udfffc"), '"a\ufffdb\ufffdc"')
        # the output can always be encoded as UTF-8
        self.assertEqual(go_json_string("\udc80").encode("utf-8"), b'"\xef\xbf\xbd"')

    def test_ordinary_text_unchanged(self) -> None:
        self.assertEqual(go_json_string("!room:example.com"), '"!room:example.com"')


class DumpsTests(SynchronousTestCase):
    def test_scalars(self) -> None:
        self.assertEqual(go_json_dumps(None), "null")
        self.assertEqual(go_json_dumps(True), "true")
        self.assertEqual(go_json_dumps(False), "false")
        self.assertEqual(go_json_dumps(0), "0")
        self.assertEqual(go_json_dumps(-42), "-42")
        self.assertEqual(go_json_dumps(8000000000), "8000000000")

    def test_bool_is_not_an_int(self) -> None:
        self.assertEqual(go_json_dumps([True, 1, False, 0]), "[true,1,false,0]")

    def test_containers_no_whitespace(self) -> None:
        self.assertEqual(go_json_dumps([]), "[]")
        self.assertEqual(go_json_dumps({}), "{}")
        self.assertEqual(go_json_dumps(("a", ["b", {"c": None}])), '["a",["b",{"c":null}]]')

    def test_dict_keeps_insertion_order(self) -> None:
        self.assertEqual(go_json_dumps({"z": 1, "a": 2, "m": 3}), '{"z":1,"a":2,"m":3}')

    def test_keys_are_escaped_too(self) -> None:
        self.assertEqual(go_json_dumps({"<k>": "&"}), '{"\\u003ck\\u003e":"\\u0026"}')

    def test_error_body_shape(self) -> None:
        # docs/endpoints.md#response-bodies
        self.assertEqual(
            go_json_dumps({"errcode": "M_BAD_JSON", "error": "Missing room parameter"}),
            '{"errcode":"M_BAD_JSON","error":"Missing room parameter"}',
        )

    def test_redis_job_value_example(self) -> None:
        # docs/redis-format.md#key-field-value, byte for byte
        value = {
            "Params": {
                "DelayId": "syd_integration_1",
                "DelayTimeout": 8000 * 1000000,
                "ServerName": "example.com",
                "LiveKitRoom": "krj2dgxw2K6EOm9he4GfQJ6JsSVWfJ8a7BkyjZcSmxs",
                "LiveKitIdentity": "J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU",
            },
            "RestartedAt": "2026-07-23T10:15:30.123456789Z",
        }
        self.assertEqual(
            go_json_dumps(value),
            '{"Params":{"DelayId":"syd_integration_1","DelayTimeout":8000000000,'
            '"ServerName":"example.com","LiveKitRoom":"krj2dgxw2K6EOm9he4GfQJ6JsSVWfJ8a7BkyjZcSmxs",'
            '"LiveKitIdentity":"J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU"},'
            '"RestartedAt":"2026-07-23T10:15:30.123456789Z"}',
        )

    def test_float_refused(self) -> None:
        e = self.assertRaises(TypeError, go_json_dumps, [1.5])
        self.assertEqual(str(e), "cannot Go-JSON-encode float")

    def test_non_string_key_refused(self) -> None:
        e = self.assertRaises(TypeError, go_json_dumps, {1: "a"})
        self.assertEqual(str(e), "Go JSON object keys must be str, not int")

    def test_other_types_refused(self) -> None:
        self.assertRaises(TypeError, go_json_dumps, b"bytes")
        self.assertRaises(TypeError, go_json_dumps, {"a": object()})

    def test_scrub_surrogates(self) -> None:
        self.assertEqual(scrub_surrogates("a\ud83d\ude00b"), "a\ufffd\ufffdb")
        self.assertEqual(scrub_surrogates("plain \U0001f600"), "plain \U0001f600")


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(json_values)
    def test_round_trips_through_a_json_decoder(self, value) -> None:
        text = go_json_dumps(value)
        self.assertEqual(json.loads(text), _scrubbed(value))

    @settings(max_examples=200, deadline=None)
    @given(any_text)
    def test_output_is_utf8_and_free_of_html_specials(self, text) -> None:
        out = go_json_string(text)
        out.encode("utf-8")  # never contains a surrogate
        for ch in "<>&\u2028\u2029":
            self.assertNotIn(ch, out)
        self.assertFalse(any(ord(c) < 0x20 for c in out))

    @settings(max_examples=200, deadline=None)
    @given(st.lists(any_text, max_size=5))
    def test_matches_python_json_plus_html_escaping(self, strings) -> None:
        # The docs/authorization.md#hash-function "Python recipe" as an independent implementation for string arrays.
        clean = [scrub_surrogates(s) for s in strings]
        recipe = json.dumps(clean, ensure_ascii=False, separators=(",", ":"))
        for raw, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
            recipe = recipe.replace(raw, esc)
        self.assertEqual(go_json_dumps(strings), recipe)
