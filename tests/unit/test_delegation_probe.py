"""Element Call's delegation probe (docs/delegated-leave.md#the-delegation-probe).

Element Call POSTs nothing, without credentials or custom headers, to
``/delegate_delayed_leave`` and counts any status but 404 as "delegation supported"; a
missing CORS header makes the browser hide the answer, which reads as "not supported".
These tests pin both halves, and that the probe reaches neither the homeserver nor the SFU.
"""

from __future__ import annotations

from tests.unit.test_app import AppTestCase


class DelegationProbeTests(AppTestCase):
    def assertProbeAnswer(self, response, body):
        self.assertNotEqual(response.code, 404)
        self.assertMatrixError(response, body, 400, "M_NOT_JSON", "Error reading request")
        self.assertCORS(response)
        self.assertEqual(self.homeservers.calls, [])
        self.assertEqual(self.delegation.jobs, [])
        self.assertEqual(self.rooms.created, [])

    def test_post_without_body(self):
        """What fetch() sends for ``{method: "POST"}``: no body, no Content-Type."""
        response, body = self.raw_request(b"POST", b"/delegate_delayed_leave")
        self.assertProbeAnswer(response, body)

    def test_post_with_empty_body(self):
        response, body = self.request("POST", "/delegate_delayed_leave", b"")
        self.assertProbeAnswer(response, body)

    def test_post_with_origin_header(self):
        """A browser adds Origin to the cross-origin simple request; the answer is the same."""
        response, body = self.request("POST", "/delegate_delayed_leave", b"",
                                      headers={"Origin": "https://call.example.org"})
        self.assertProbeAnswer(response, body)
