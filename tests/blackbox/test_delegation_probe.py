"""Element Call's delegation probe against the real daemon (docs/delegated-leave.md#the-delegation-probe).

The probe is an empty, credential-less POST; Element Call relaxes its leave timings only
when the answer is not a 404 and carries ``Access-Control-Allow-Origin: *``.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from tests.blackbox.harness import CORS_HEADERS, BlackBoxCase, matrix_error_body


class DelegationProbeTests(BlackBoxCase, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        BlackBoxCase.setUp(self)
        self.hs = self.make_homeserver()
        self.lk = self.make_livekit()
        self.daemon = yield self.start_daemon(self.service_env(livekit_url=self.lk.url,
                                                               full_access=self.hs.server_name))

    @defer.inlineCallbacks
    def test_empty_unauthenticated_post_is_not_404_and_has_cors(self):
        for body, headers in [(None, {}), (b"", {}), (None, {"Origin": "https://call.example.org"})]:
            result = yield self.daemon.request("POST", "/delegate_delayed_leave", body, headers)
            self.assertNotEqual(result.code, 404)
            self.assertEqual((result.code, result.body),
                             (400, matrix_error_body("M_NOT_JSON", "Error reading request")), self.daemon_logs())
            for name, value in CORS_HEADERS.items():
                self.assertEqual(result.header(name), value, f"header {name}")
        self.assertEqual(self.hs.requests, [])
        self.assertEqual(self.lk.calls, [])
