"""Membership enforcement over several instances on one Redis (issue 15 item 4). Prints
figures; asserts nothing.

    .venv/bin/python bench/bench_membership_instances.py [--instances 3] [--participants 1000] [--rooms 50]

``--instances`` monitors share a real redis-server, the loopback homeserver and SFU of
bench_membership.py. Tokens are registered round robin over the instances and every join
webhook goes to the next instance, as a load balancer would spread them. Then
``--rounds`` intervals are played: every instance sweeps once per interval.

1. homeserver ``joined_members`` requests per interval (all instances together) and the
   most any room got in one interval, against R rooms (one each is the goal; instances
   that did not cooperate would make N x R);
2. Redis commands per interval for the whole deployment (``INFO stats``; the commands
   run inside the claim scripts count one by one), and per instance sweep the time it took;
3. ``RemoveParticipant`` calls for ``--bans`` users banned between two intervals
   (each should be removed once, by the instance sweeping the room).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from twisted.internet import defer, reactor  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool  # noqa: E402

from bench.bench_failover import start_redis  # noqa: E402
from bench.bench_membership import KEY, SECRET, SERVER, SFU, Homeserver, listen, populate, run_on_reactor  # noqa: E402
from rtcauthd.cluster.scripts import ClusterKeys  # noqa: E402
from rtcauthd.livekit.tokens import TokenMinter  # noqa: E402
from rtcauthd.livekit.twirp import RoomServiceClient  # noqa: E402
from rtcauthd.livekit.webhooks import WebhookEvent  # noqa: E402
from rtcauthd.matrix.appservice import HomeserverAppservice  # noqa: E402
from rtcauthd.membership.monitor import build_monitor  # noqa: E402
from rtcauthd.outbound.client import HTTPClient  # noqa: E402
from rtcauthd.store.redis_url import parse_redis_url  # noqa: E402
from tests.support.redis_server import raw  # noqa: E402


class CountingSFU(SFU):
    """bench_membership's SFU, counting every RemoveParticipant (repeats included)."""

    def __init__(self) -> None:
        super().__init__()
        self.remove_calls: Counter = Counter()

    def render_POST(self, request):
        if request.path.decode().endswith("/RemoveParticipant"):
            from livekit.protocol import room as lk_room

            body = request.content.read()
            self.remove_calls[lk_room.RoomParticipantIdentity.FromString(body).identity] += 1
            request.content.seek(0)
        return super().render_POST(request)


def commands_processed(port: int) -> int:
    info = raw(port, "INFO", "stats").decode()
    return int(info.split("total_commands_processed:", 1)[1].split("\r\n", 1)[0])


@defer.inlineCallbacks
def main(args) -> None:
    workdir = tempfile.mkdtemp(prefix="bench-membership-")
    redis, port = start_redis(workdir)
    try:
        yield run_bench(args, port)
    finally:
        redis.kill()
        redis.wait()


@defer.inlineCallbacks
def run_bench(args, port: int):
    hs, sfu = Homeserver(), CountingSFU()
    hs_url, sfu_url = listen(hs), listen(sfu)
    pool = HTTPConnectionPool(reactor)
    pool.maxPersistentPerHost = 16
    http = HTTPClient(clock=reactor, agent=Agent(reactor, pool=pool))
    rooms = RoomServiceClient(livekit_url="ws" + sfu_url[4:],
                              http=http, tokens=TokenMinter(api_key=KEY, api_secret=SECRET, clock=reactor))
    url = f"redis://127.0.0.1:{port}/0"
    config = SimpleNamespace(redis_url=url, token_ttl=3600, hs_server_name=SERVER, membership_check_interval=30)
    monitors = []
    for i in range(args.instances):
        iid = f"bench{i}#{i:08x}".encode()
        raw(port, "SET", b"rtcauth:instance:" + iid, iid, "PX", 3_600_000)
        raw(port, "SADD", "rtcauth:instances", iid)
        cluster = SimpleNamespace(iid=iid, keys=ClusterKeys(0))
        monitor = build_monitor(
            config=config, clock=reactor, homeserver=HomeserverAppservice(clock=reactor, http=http, as_token="as"),
            resolve_cs_api=lambda name: defer.succeed(hs_url), rooms=rooms, stop_job=lambda room, identity: False,
            redis_target=parse_redis_url(url), cluster=lambda cluster=cluster: cluster,
        )
        yield monitor._store.load_all()  # connected
        monitors.append(monitor)

    def register(n: int, room_id: str, user: str, livekit_room: str, identity: str) -> None:
        monitors[n % len(monitors)].register(matrix_room_id=room_id, matrix_user_id=user,
                                             livekit_room=livekit_room, livekit_identity=identity)

    users = populate(hs, args.rooms, args.participants // args.rooms, register)
    while raw(port, "HLEN", "lk-jwt:participants") < len(users):
        yield deferLater(0.01)
    for n, (_room_id, _user, lk_room_name, identity) in enumerate(users):
        monitors[(n + 1) % len(monitors)].on_webhook(
            WebhookEvent(event="participant_joined", room_name=lk_room_name, participant_identity=identity))
    while sum(1 for p in hs.requests if p.endswith("/is_joined")) < len(users):
        yield deferLater(0.01)

    per_interval, worst_room, commands, sweep_ms = [], [], [], []
    banned = []
    for round_no in range(args.rounds):
        if round_no == args.rounds - 1:  # bans just before the last interval
            for room_id, user, _lk, identity in users[:: max(1, len(users) // args.bans)][: args.bans]:
                hs.joined[room_id].discard(user)
                banned.append(identity)
        hs.requests.clear()
        before = commands_processed(port)
        for monitor in monitors:
            started = time.monotonic()
            yield monitor.sweep.tick()
            sweep_ms.append((time.monotonic() - started) * 1000)
        yield deferLater(0.2)  # removals and record writes land
        commands.append(commands_processed(port) - before - 1)  # minus our own INFO
        checks = [p for p in hs.requests if p.endswith("/joined_members")]
        per_interval.append(len(checks))
        worst_room.append(max(Counter(checks).values()) if checks else 0)

    print(f"1. {args.instances} instances, {len(users)} connected participants in {args.rooms} Matrix rooms, "
          f"{args.rounds} intervals: joined_members per interval {per_interval} "
          f"(most for one room in one interval: {max(worst_room)})")
    print(f"2. Redis commands per interval, all instances: median {statistics.median(commands):.0f} "
          f"({statistics.median(commands) / len(users):.2f} per participant); "
          f"one instance's sweep: median {statistics.median(sweep_ms):.0f} ms, max {max(sweep_ms):.0f} ms")
    print(f"3. {len(banned)} users banned before the last interval: RemoveParticipant calls per user "
          f"{sorted(sfu.remove_calls[i] for i in banned)}, for anybody else {sum(sfu.remove_calls.values()) - sum(sfu.remove_calls[i] for i in banned)}")
    for monitor in monitors:
        yield monitor.stop()
    yield pool.closeCachedConnections()


def deferLater(seconds: float):
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--participants", type=int, default=1000)
    parser.add_argument("--rooms", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bans", type=int, default=5)
    run_on_reactor(main, parser.parse_args())


if __name__ == "__main__":
    run()
