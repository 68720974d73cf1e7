"""The admission queue: parsed requests are handled a few per reactor turn, /healthz first."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from rtcauthd.inbound.admission import AdmissionQueue
from rtcauthd.inbound.site import RtcAuthSite


class Queued:
    def __init__(self, path: bytes, name: str = "") -> None:
        self.path = path
        self.name = name or path.decode()
        self._disconnected = False


class Turns:
    """Models the reactor's turns: a call scheduled during a turn runs in the next one.

    (``task.Clock.advance(0)`` would also run calls scheduled while it runs.)
    """

    def __init__(self) -> None:
        self.pending: list = []

    def callLater(self, delay, f, *args):
        assert delay == 0
        self.pending.append((f, args))
        return (f, args)

    def seconds(self) -> float:
        return 0.0

    def turn(self) -> None:
        due, self.pending = self.pending, []
        for f, args in due:
            f(*args)


class AdmissionQueueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Turns()
        self.handled: list[str] = []
        self.queue = AdmissionQueue(self.clock, lambda r: self.handled.append(r.name), batch=3)

    def test_requests_wait_for_the_next_turn_and_run_a_batch_at_a_time_in_order(self) -> None:
        for i in range(7):
            self.queue.admit(Queued(b"/get_token", f"r{i}"))
        self.assertEqual(self.handled, [])
        self.clock.turn()
        self.assertEqual(self.handled, ["r0", "r1", "r2"])
        self.clock.turn()
        self.assertEqual(self.handled, ["r0", "r1", "r2", "r3", "r4", "r5"])
        self.clock.turn()
        self.assertEqual(self.handled, [f"r{i}" for i in range(7)])
        self.assertEqual(len(self.queue), 0)
        self.assertEqual(self.clock.pending, [])
        self.assertEqual(self.queue.peak, 7)

    def test_healthz_is_handled_at_once_ahead_of_the_queue(self) -> None:
        for i in range(5):
            self.queue.admit(Queued(b"/sfu/get", f"r{i}"))
        self.queue.admit(Queued(b"/healthz"))
        self.assertEqual(self.handled, ["/healthz"])
        self.assertEqual(len(self.queue), 5)

    def test_a_client_that_left_while_queued_is_skipped(self) -> None:
        gone = Queued(b"/get_token", "gone")
        self.queue.admit(gone)
        self.queue.admit(Queued(b"/get_token", "stays"))
        gone._disconnected = True
        self.clock.turn()
        self.assertEqual(self.handled, ["stays"])

    def test_a_handler_that_raises_does_not_stall_the_requests_behind_it(self) -> None:
        def handle(request):
            if request.name == "bad":
                raise RuntimeError("boom")
            self.handled.append(request.name)

        queue = AdmissionQueue(self.clock, handle, batch=2)
        for name in ("bad", "a", "b", "c"):
            queue.admit(Queued(b"/get_token", name))
        self.clock.turn()
        self.assertEqual(self.handled, ["a"])
        self.clock.turn()
        self.assertEqual(self.handled, ["a", "b", "c"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_a_classifier_that_raises_sends_the_request_to_the_other_lane(self) -> None:
        def broken(request):
            raise RuntimeError("boom")

        queue = AdmissionQueue(self.clock, lambda r: self.handled.append(r.name), classify=broken)
        queue.admit(Queued(b"/get_token", "kept"))
        self.clock.turn()
        self.assertEqual(self.handled, ["kept"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_batch_must_be_positive(self) -> None:
        self.assertRaises(ValueError, AdmissionQueue, self.clock, lambda r: None, batch=0)


class Echo(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes] = []

    def render(self, request):
        self.seen.append(request.path)
        return request.path


class SiteAdmissionTests(SynchronousTestCase):
    """Through the real Site and HTTPChannel, on in-memory transports."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.turns = Turns()
        self.resource = Echo()
        self.site = RtcAuthSite(
            self.resource, max_body=1024, reactor=self.reactor, clock=self.turns, admission_batch=2
        )

    def send(self, path: bytes) -> StringTransport:
        peer = IPv4Address("TCP", "192.0.2.1", 40000)
        protocol = self.site.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        return transport

    def test_healthz_is_answered_while_earlier_requests_wait(self) -> None:
        waiting = [self.send(b"/get_token") for _ in range(4)]
        probe = self.send(b"/healthz")
        self.assertEqual(self.resource.seen, [b"/healthz"])
        self.assertIn(b"200 OK", probe.value())
        self.assertEqual([t.value() for t in waiting], [b""] * 4)
        self.turns.turn()
        self.assertEqual(self.resource.seen, [b"/healthz", b"/get_token", b"/get_token"])
        self.turns.turn()
        self.assertTrue(all(b"200 OK" in t.value() for t in waiting))

    def test_the_queue_length_is_a_gauge(self) -> None:
        self.send(b"/get_token")
        self.send(b"/sfu/get")
        self.send(b"/get_token")
        gauge = lambda: self.site._metrics.registry.get_sample_value("rtcauthd_inbound_queued")  # noqa: E731
        self.assertEqual(gauge(), 3.0)
        self.turns.turn()
        self.assertEqual(gauge(), 1.0)

    def test_a_queued_request_counts_as_in_flight_until_answered(self) -> None:
        self.send(b"/get_token")
        idle = self.site.when_idle()
        self.assertNoResult(idle)
        self.turns.turn()
        self.successResultOf(idle)


class Posted:
    """A parsed request as the classifier sees it."""

    def __init__(self, path: bytes, body: bytes = b"", authorization: bytes | None = None, name: str = "") -> None:
        from io import BytesIO

        from twisted.web.http_headers import Headers

        self.path = path
        self.content = BytesIO(body)
        self.requestHeaders = Headers({b"Authorization": [authorization]} if authorization else {})
        self.name = name or path.decode()
        self._disconnected = False


def token_request(server_name, name: str = "") -> Posted:
    import json

    body = json.dumps({"room": "!r:x", "openid_token": {"access_token": "t", "matrix_server_name": server_name}})
    return Posted(b"/get_token", body.encode(), name=name)


class ServedFirstTests(SynchronousTestCase):
    def setUp(self) -> None:
        from rtcauthd.inbound.admission import served_first

        self.classify = served_first(lambda name: name == "ours.example", hs_token="secret-hs")

    def lane(self, request):
        return self.classify(request).name

    def test_lanes(self) -> None:
        self.assertEqual(self.lane(Posted(b"/healthz")), "NOW")
        self.assertEqual(self.lane(token_request("ours.example")), "FIRST")
        self.assertEqual(self.lane(token_request("stranger.example")), "NEXT")
        self.assertEqual(self.lane(Posted(b"/sfu/get", b"not json")), "NEXT")
        self.assertEqual(self.lane(Posted(b"/get_token", b'{"openid_token": 5}')), "NEXT")
        self.assertEqual(self.lane(token_request(["ours.example"])), "NEXT")
        self.assertEqual(self.lane(Posted(b"/get_token", b"[" * 5000)), "NEXT")  # too deep for json
        self.assertEqual(self.lane(Posted(b"/get_token", b"[" * 3000)), "NEXT")
        padded = token_request("ours.example").content.getvalue()[:-1] + b', "pad": "' + b"x" * 5000 + b'"}'
        self.assertEqual(self.lane(Posted(b"/get_token", padded)), "NEXT")  # larger than a token request
        self.assertEqual(self.lane(Posted(b"/sfu_webhook")), "NEXT")
        as_path = b"/_matrix/client/unstable/org.matrix.msc4195/rtc/livekit/get_token"
        self.assertEqual(self.lane(Posted(as_path, authorization=b"Bearer secret-hs")), "FIRST")
        self.assertEqual(self.lane(Posted(as_path, authorization=b"Bearer wrong")), "NEXT")
        self.assertEqual(self.lane(Posted(as_path)), "NEXT")

    def test_without_as_mode_no_bearer_is_trusted(self) -> None:
        from rtcauthd.inbound.admission import served_first

        classify = served_first(lambda name: False)
        as_path = b"/_matrix/client/v1/rtc/livekit/get_token"
        self.assertEqual(classify(Posted(as_path, authorization=b"Bearer ")).name, "NEXT")

    def test_the_first_lane_goes_first_but_the_other_keeps_one_slot(self) -> None:
        from rtcauthd.inbound.admission import AdmissionQueue

        turns, handled = Turns(), []
        queue = AdmissionQueue(turns, lambda r: handled.append(r.name), batch=3, classify=self.classify)
        for i in range(4):
            queue.admit(token_request("stranger.example", f"s{i}"))
        for i in range(4):
            queue.admit(token_request("ours.example", f"o{i}"))
        turns.turn()
        self.assertEqual(handled, ["o0", "o1", "s0"])
        turns.turn()
        self.assertEqual(handled[3:], ["o2", "o3", "s1"])
        turns.turn()
        self.assertEqual(handled[6:], ["s2", "s3"])
        self.assertEqual(len(queue), 0)
