"""Hostile input through the real daemon: the spec's error, never a 500, a crash or a call out.

Each request below is answered with the error docs/endpoints.md#status-codes gives it; afterwards the daemon
still serves, the fake homeserver and SFU saw nothing they should not have, and the log
holds no traceback.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.trial import unittest

from tests.blackbox.harness import BlackBoxCase, matrix_error_body
from tests.blackbox.test_token_service import get_token_body, sfu_get_body

UNAUTHORISED = matrix_error_body("M_UNAUTHORIZED", "The request could not be authorised.")
NOT_JSON = matrix_error_body("M_NOT_JSON", "Error reading request")

#: matrix_server_name values chosen by an attacker: each must end in 401 without any
#: outbound request (invalid syntax, or loopback for a non-full-access server).
HOSTILE_SERVER_NAMES = [
    "evil.com/x",
    "a@b",
    "[::1]:8448",
    "127.0.0.1:1",
    "host:99999",
    "xn--",
    "xn--zz-invalid-.example",
    "xn--a.example",
    "a" * 300,
    "example.com:",
    "[::1",
    "exa mple.com",
    "ex\u00e4mple.com",
    "169.254.169.254",
    "localhost:9",
    "example.com/../x",
    "example.com?x=1",
    "example.com#x",
]


class BadInputTests(BlackBoxCase, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.hs = self.make_homeserver()
        self.lk = self.make_livekit()
        self.hs.add_token("good-token", f"@alice:{self.hs.server_name}")
        self.daemon = yield self.start_daemon(
            self.service_env(livekit_url=self.lk.url, full_access=self.hs.server_name, RTCAUTH_MAX_BODY_BYTES="8192")
        )

    @defer.inlineCallbacks
    def test_hostile_server_names_are_401_and_nothing_is_contacted(self):
        for name in HOSTILE_SERVER_NAMES:
            for path, body in (("/get_token", get_token_body(name, "t")), ("/sfu/get", sfu_get_body(name, "t"))):
                result = yield self.daemon.post_json(path, body)
                self.assertEqual((result.code, result.body), (401, UNAUTHORISED), (path, name))
        self.assertEqual(self.hs.requests, [])
        self.assertEqual(self.lk.calls, [])
        self.assertNotIn("Traceback", self.daemon.output)

    @defer.inlineCallbacks
    def test_malformed_bodies(self):
        bodies = [
            b"",
            b"{",
            b"[]",
            b"null garbage",  # null → zero values → first validation message
            b'{"room_id": 1}',
            b'{"room_id": "r", "extra": true}',
            b'{"delay_timeout": 1e3}',
            b'{"delay_timeout": NaN}',
            b"\xff\xfe{}",
            b"\xef\xbb\xbf{}",
            b'{"openid_token": {"access_token": ["x"]}}',
            b"[" * 5000,
            b'{"member": {"claimed_user_id": null, "nested": {}}}',
        ]
        for raw in bodies:
            result = yield self.daemon.request("POST", "/get_token", raw, headers={"Content-Type": "application/json"})
            self.assertIn(result.code, (400,), raw)
            if raw.startswith(b"null"):
                self.assertEqual(json.loads(result.body)["errcode"], "M_BAD_JSON")
            else:
                self.assertEqual(result.body, NOT_JSON, raw)
        too_big = json.dumps(get_token_body(self.hs.server_name, "good-token", room_id="!" + "r" * 9000)).encode()
        result = yield self.daemon.request("POST", "/get_token", too_big)
        self.assertEqual((result.code, result.json()["errcode"]), (413, "M_TOO_LARGE"))
        self.assertEqual(self.hs.requests, [])
        self.assertEqual(self.lk.calls, [])
        # and the daemon still works
        result = yield self.daemon.post_json("/get_token", get_token_body(self.hs.server_name, "good-token"))
        self.assertEqual(result.code, 200)
        self.assertNotIn("Traceback", self.daemon.output)

    @defer.inlineCallbacks
    def test_wrong_methods_and_empty_strings(self):
        for method in ("GET", "PUT", "DELETE", "PATCH"):
            result = yield self.daemon.request(method, "/get_token")
            self.assertEqual((result.code, result.body), (405, b""))
        body = get_token_body(self.hs.server_name, "good-token")
        body["member"]["claimed_device_id"] = ""
        result = yield self.daemon.post_json("/get_token", body)
        self.assertEqual(result.code, 400)
        self.assertEqual(result.json()["errcode"], "M_BAD_JSON")
        self.assertEqual(self.hs.requests, [])
