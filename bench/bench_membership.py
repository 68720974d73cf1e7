"""Membership enforcement figures (issue 15 item 6). Prints figures; asserts nothing.

    .venv/bin/python bench/bench_membership.py [--participants 1000] [--rooms 50] [--interval 2] [--bans 5]

Runs the real sweep, homeserver client and Twirp client over loopback HTTP against a small
homeserver (``joined_members``, ``is_joined``) and SFU (``GetParticipant``,
``RemoveParticipant``) served in the same process:

1. homeserver requests per sweep with N connected participants in R Matrix rooms, and
   how long that sweep took;
2. time from a ban (the user disappears from ``joined_members``) to the SFU receiving
   ``RemoveParticipant``, when only the periodic sweep acts (uniformly random moment in
   the interval, so expect about interval / 2);
3. the same when the banned user's client reconnects and LiveKit reports
   ``participant_joined``: the check on join.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from livekit.protocol import models as lk_models, room as lk_room  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import Site  # noqa: E402

from rtcauthd.livekit.tokens import TokenMinter  # noqa: E402
from rtcauthd.livekit.twirp import RoomServiceClient  # noqa: E402
from rtcauthd.livekit.webhooks import WebhookEvent  # noqa: E402
from rtcauthd.matrix.appservice import HomeserverAppservice  # noqa: E402
from rtcauthd.membership.monitor import build_monitor  # noqa: E402
from rtcauthd.membership.store import MemoryParticipantStore  # noqa: E402
from rtcauthd.outbound.client import HTTPClient  # noqa: E402

KEY, SECRET = "benchkey", "bench-secret-0123456789abcdef0123456789"
SERVER = "bench.example"


class Homeserver(Resource):
    """joined_members and is_joined from ``joined`` (room -> set of users); counts requests."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.joined: dict[str, set] = {}
        self.requests: list[str] = []

    def render_GET(self, request):
        path = request.path.decode()
        self.requests.append(path)
        request.setHeader(b"Content-Type", b"application/json")
        if path == "/_matrix/client/versions":
            return json.dumps({"versions": ["v1.11"], "unstable_features": {"io.element.msc4502": True}}).encode()
        room_id = path.split("/rooms/", 1)[1].split("/", 1)[0]
        members = self.joined.get(room_id, set())
        if path.endswith("/joined_members"):
            return json.dumps({"joined": {user: {"display_name": user} for user in members}}).encode()
        mxid = request.args.get(b"mxid", [b""])[0].decode()
        return json.dumps({"joined": mxid in members}).encode()


class SFU(Resource):
    """GetParticipant answers present for everyone; RemoveParticipant is timed."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.removed: dict[str, float] = {}

    def render_POST(self, request):
        method = request.path.decode().rsplit("/", 1)[1]
        body = request.content.read()
        request.setHeader(b"Content-Type", b"application/protobuf")
        message = lk_room.RoomParticipantIdentity.FromString(body)
        if method == "RemoveParticipant":
            self.removed.setdefault(message.identity, time.monotonic())
            return b""
        return lk_models.ParticipantInfo(identity=message.identity).SerializeToString()


def populate(hs: Homeserver, rooms: int, per_room: int, register) -> list[tuple[str, str, str, str]]:
    """``rooms`` Matrix rooms of ``per_room`` joined users each; every user is handed to
    ``register(n, room_id, user_id, livekit_room, livekit_identity)`` (n counts from 0)."""
    users = []
    for r in range(rooms):
        room_id = f"!room{r}:{SERVER}"
        hs.joined[room_id] = set()
        for p in range(per_room):
            user, identity = f"@u{r}_{p}:{SERVER}", f"ID_{r}_{p}"
            hs.joined[room_id].add(user)
            register(len(users), room_id, user, f"LK_{r}", identity)
            users.append((room_id, user, f"LK_{r}", identity))
    return users


def listen(resource) -> str:
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    return f"http://127.0.0.1:{port.getHost().port}"


def wait_for(check, timeout: float = 120.0) -> defer.Deferred:
    deadline = time.monotonic() + timeout

    @defer.inlineCallbacks
    def poll():
        while not check():
            if time.monotonic() > deadline:
                raise RuntimeError("gave up waiting")
            yield task.deferLater(reactor, 0.002, lambda: None)

    return poll()


@defer.inlineCallbacks
def main(args) -> None:
    hs, sfu = Homeserver(), SFU()
    hs_url, sfu_url = listen(hs), listen(sfu)
    pool = HTTPConnectionPool(reactor)
    pool.maxPersistentPerHost = 16
    http = HTTPClient(clock=reactor, agent=Agent(reactor, pool=pool))
    tokens = TokenMinter(api_key=KEY, api_secret=SECRET, clock=reactor)
    rooms = RoomServiceClient(livekit_url="ws" + sfu_url[4:], http=http, tokens=tokens)
    config = SimpleNamespace(
        redis_url="", token_ttl=3600, hs_server_name=SERVER, membership_check_interval=args.interval
    )
    monitor = build_monitor(
        config=config, clock=reactor, homeserver=HomeserverAppservice(clock=reactor, http=http, as_token="as"),
        resolve_cs_api=lambda name: defer.succeed(hs_url), rooms=rooms, stop_job=lambda room, identity: False,
        store=MemoryParticipantStore(),
    )
    def register(n: int, room_id: str, user: str, livekit_room: str, identity: str) -> None:
        monitor.register(matrix_room_id=room_id, matrix_user_id=user, livekit_room=livekit_room,
                         livekit_identity=identity)
        monitor.tracker.joined(livekit_room, identity)

    users = populate(hs, args.rooms, args.participants // args.rooms, register)

    hs.requests.clear()
    started = time.monotonic()
    yield monitor.sweep.tick()
    took = time.monotonic() - started
    joined_requests = [p for p in hs.requests if p.endswith("/joined_members")]
    print(f"1. one sweep, {len(users)} connected participants in {args.rooms} Matrix rooms: "
          f"{len(hs.requests)} homeserver requests ({len(joined_requests)} joined_members, "
          f"{len(hs.requests) - len(joined_requests)} /versions), {took * 1000:.0f} ms, "
          f"{len(sfu.removed)} removals")

    yield monitor.start()  # sweeps every interval from now on
    latencies = []
    victims = random.Random(15).sample(users, args.bans * 2)
    for room_id, user, _lk_room, identity in victims[: args.bans]:
        yield task.deferLater(reactor, random.uniform(0, args.interval), lambda: None)
        banned = time.monotonic()
        hs.joined[room_id].discard(user)
        yield wait_for(lambda: identity in sfu.removed)
        latencies.append(sfu.removed[identity] - banned)
    print(f"2. ban -> RemoveParticipant by the sweep (interval {args.interval} s, {args.bans} bans): "
          f"min {min(latencies):.2f} s, median {statistics.median(latencies):.2f} s, max {max(latencies):.2f} s")

    on_join = []
    for room_id, user, lk_room_name, identity in victims[args.bans:]:
        hs.joined[room_id].discard(user)
        banned = time.monotonic()
        monitor.tracker.get(lk_room_name, identity).connected = False  # the kicked client reconnects:
        monitor.on_webhook(WebhookEvent(event="participant_joined", room_name=lk_room_name,
                                        participant_identity=identity))
        yield wait_for(lambda: identity in sfu.removed)
        on_join.append(sfu.removed[identity] - banned)
    print(f"3. ban + participant_joined -> RemoveParticipant by the check on join ({args.bans} times): "
          f"min {min(on_join) * 1000:.1f} ms, median {statistics.median(on_join) * 1000:.1f} ms, "
          f"max {max(on_join) * 1000:.1f} ms")
    yield monitor.stop()
    yield pool.closeCachedConnections()


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--participants", type=int, default=1000)
    parser.add_argument("--rooms", type=int, default=50)
    parser.add_argument("--interval", type=int, default=2)
    parser.add_argument("--bans", type=int, default=5)
    run_on_reactor(main, parser.parse_args())


def run_on_reactor(main, args) -> None:
    """Run ``main(args)`` (a Deferred) on the reactor, print its failure if any, then stop."""

    def done(result):
        if isinstance(result, Exception) or hasattr(result, "printTraceback"):
            result.printTraceback()
        reactor.stop()

    reactor.callWhenRunning(lambda: main(args).addBoth(done))
    reactor.run()


if __name__ == "__main__":
    run()
