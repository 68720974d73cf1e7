"""Several instances on one Redis (issue 13 item 7). Prints figures; asserts nothing.

    .venv/bin/python bench/bench_failover.py [--runs 20] [--jobs 10000] [--lease 10]

1. takeover latency after ``kill -9``: two real daemons (``twistd rtcauth``) share a real
   redis-server holding ``--takeover-jobs`` jobs; the owner is killed and the time until
   every job's owner entry names the survivor is measured (p50 / max over ``--runs``);
   the killed one is started again and becomes the next run's survivor;
2. Redis operations per job per minute in steady state: three in-process instances
   (RedisStore + JobManager each) with connected jobs that restart every 80 % of a 60 s
   timeout, counted with ``INFO stats`` over ``--window`` seconds;
3. webhook routing latency to a remote owner with ``--jobs`` live jobs spread over the
   three instances: a signal handed to a non-owner until the owner's job has it.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import txredisapi  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402

from rtcauthd.cluster.coordinator import ClusterSettings  # noqa: E402
from rtcauthd.leave.manager import JobManager  # noqa: E402
from rtcauthd.leave.record import JobParams  # noqa: E402
from rtcauthd.livekit import naming  # noqa: E402
from rtcauthd.matrix.delayed_events import Outcome  # noqa: E402
from rtcauthd.store.model import StoredJob, encode_field, encode_value  # noqa: E402
from rtcauthd.store.redis import JOBS_KEY, RedisStore  # noqa: E402
from tests.support.redis_server import free_port, raw  # noqa: E402


def params_for(i: int, timeout_s: int = 60) -> JobParams:
    return JobParams(
        delay_id=f"syd_fo_{i:08d}",
        delay_timeout_ns=timeout_s * 10**9,
        server_name="example.com",
        room=naming.room_alias(f"!room{i // 4}:example.com", "m.call#ROOM"),
        identity=naming.identity(f"@user{i}:example.com", "DEVICE", f"member-{i}"),
    )


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def start_redis(workdir: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    for _ in range(500):
        try:
            if raw(port, "PING") == "PONG":
                return proc, port
        except OSError:
            time.sleep(0.01)
    raise SystemExit("redis-server did not start")


def owners_by_name(port: int) -> dict[bytes, bytes]:
    flat = raw(port, "HGETALL", "rtcauth:owners") or []
    return {f: t.split(b"|", 1)[1].split(b"#", 1)[0] for f, t in zip(flat[0::2], flat[1::2])}


# --------------------------------------------------------------------------- 1. takeover after kill -9


class Daemon:
    def __init__(self, name: str, redis_port: int, lease: float, workdir: str) -> None:
        self.name, self.port = name, free_port()
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.argv = [twistd, "--nodaemon", "--pidfile=", "rtcauth", "--listen", f"tcp:{self.port}:interface=127.0.0.1"]
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "PYTHONPATH": os.path.dirname(
                os.path.dirname(os.path.abspath(__file__))),
            "LIVEKIT_URL": f"ws://127.0.0.1:{free_port()}", "LIVEKIT_KEY": "benchkey",
            "LIVEKIT_SECRET": "bench-secret-0123456789abcdef0123456789", "LIVEKIT_FULL_ACCESS_HOMESERVERS": "example.com",
            "LIVEKIT_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "RTCAUTH_INSTANCE_NAME": name,
            "RTCAUTH_JOB_LEASE_SECONDS": str(lease), "LIVEKIT_LOG_LEVEL": "warn",
        }
        self.workdir = workdir
        self.proc = None

    def start(self) -> None:
        log = open(os.path.join(self.workdir, f"{self.name}.log"), "ab")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                # rtcauthd listens only once its stored jobs are resumed
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise SystemExit(f"{self.name} did not start")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)


def bench_takeover(runs: int, jobs: int, lease: float) -> None:
    workdir = tempfile.mkdtemp(prefix="rtcauthd-bench-fo-")
    redis, port = start_redis(workdir)
    daemons = []
    try:
        for i in range(jobs):
            p = params_for(i, timeout_s=3600)
            raw(port, "HSET", JOBS_KEY, encode_field(p.room, p.identity), encode_value(StoredJob(p, time.time())))
        daemons = [Daemon("a", port, lease, workdir), Daemon("b", port, lease, workdir)]
        daemons[0].start()  # adopts every stored job before its first 200
        daemons[1].start()
        latencies = []
        for run in range(runs):
            owner = {d.name.encode(): d for d in daemons}
            names = set(owners_by_name(port).values())
            victim = owner[next(iter(names))]
            survivor = [d for d in daemons if d is not victim][0]
            time.sleep(random.uniform(0, lease / 3))  # at any moment of the survivor's lease round
            killed_at = time.monotonic()
            victim.kill()
            while set(owners_by_name(port).values()) != {survivor.name.encode()}:
                time.sleep(0.005)
            latencies.append(time.monotonic() - killed_at)
            victim.start()
        print(f"1. takeover after kill -9 ({jobs} jobs, lease {lease:g} s, renewal every {lease / 3:g} s, "
              f"{runs} runs): p50 {percentile(latencies, 50):.2f} s, max {max(latencies):.2f} s "
              f"(bound: lease + one renewal = {lease * 4 / 3:.2f} s)")
    finally:
        for d in daemons:
            d.stop()
        redis.kill()
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- 2 and 3: in-process instances


def ok(_params):
    return defer.succeed(Outcome.ok(200))


def never(_params):
    return defer.Deferred()


@defer.inlineCallbacks
def instances(port: int, count: int, *, restart):
    made = []
    for i in range(count):
        store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", op_timeout=5.0, restore_wait=60.0,
                                    cluster=ClusterSettings(name=f"i{i}", lease_seconds=10))
        manager = JobManager(clock=reactor, store=store, restart=restart, send=never, lookup_participant=never)
        yield manager.restore(reactor.seconds())
        made.append((store, manager))
    for _ in range(200):  # every subscription in place
        if all(raw(port, "PUBSUB", "NUMSUB", s.cluster.keys.channel(s.cluster.iid))[1] for s, _m in made):
            break
        yield task.deferLater(reactor, 0.01, lambda: None)
    return made


@defer.inlineCallbacks
def close(made):
    for store, manager in made:  # all at once, so none takes over what another hands over
        manager.stop()
        store.cluster.stop_renewing()
    yield defer.gatherResults([store.close() for store, _manager in made])


def commands(port: int) -> int:
    for line in raw(port, "INFO", "stats").decode().splitlines():
        if line.startswith("total_commands_processed:"):
            return int(line.split(":")[1])
    return 0


class RoundTrips:
    """Counts the commands the instances send (each script call is one), beside what Redis
    executes (which includes the commands inside scripts)."""

    def __init__(self) -> None:
        self.count = 0
        original = txredisapi.RedisProtocol.execute_command

        def counting(protocol, *args, **kwargs):
            self.count += 1
            return original(protocol, *args, **kwargs)

        txredisapi.RedisProtocol.execute_command = counting


@defer.inlineCallbacks
def bench_steady_ops(port: int, jobs: int, window: float):
    sent = RoundTrips()
    made = yield instances(port, 3, restart=ok)
    for i in range(jobs):
        _store, manager = made[i % 3]
        yield manager.add(params_for(i, timeout_s=60))
        manager.route(params_for(i).room, params_for(i).identity, "ParticipantConnected")
    yield task.deferLater(reactor, 2.0, lambda: None)  # the first restarts have landed
    before, sent_before = commands(port), sent.count
    yield task.deferLater(reactor, window, lambda: None)
    executed = (commands(port) - before - 1) / window * 60  # less our own INFO
    calls = (sent.count - sent_before) / window * 60
    print(f"2. steady state, {jobs} connected jobs (60 s timeout: a restart every 48 s) over 3 instances: "
          f"{calls / jobs:.2f} Redis calls per job per minute ({calls:.0f}/min in all, of which lease rounds "
          f"{3 * 5 * 60 / (10 / 3):.0f}/min); Redis executes {executed / jobs:.2f} commands per job per minute "
          f"counting those inside the scripts")
    yield close(made)


@defer.inlineCallbacks
def bench_routing(port: int, jobs: int, samples: int):
    made = yield instances(port, 3, restart=never)
    for i in range(jobs):
        _store, manager = made[i % 3]
        yield manager.add(params_for(jobs + i, timeout_s=3600))
    arrived: dict[tuple, float] = {}
    for _store, manager in made:
        deliver = manager.deliver

        def recording(room, identity, name, _deliver=deliver):
            arrived[(room, identity)] = time.perf_counter()
            _deliver(room, identity, name)

        manager.deliver = recording
    latencies = []
    for n in range(samples):
        i = (n * 7919) % jobs
        p = params_for(jobs + i)
        _owner_store, _owner = made[i % 3]
        _other_store, other = made[(i + 1) % 3]
        sent = time.perf_counter()
        other.route(p.room, p.identity, "ParticipantConnected")
        while (p.room, p.identity) not in arrived:
            yield task.deferLater(reactor, 0, lambda: None)
        latencies.append((arrived[(p.room, p.identity)] - sent) * 1000)
    print(f"3. webhook routing to a remote owner, {jobs} live jobs over 3 instances, {samples} webhooks: "
          f"p50 {percentile(latencies, 50):.2f} ms, p99 {percentile(latencies, 99):.2f} ms, max {max(latencies):.2f} ms")
    yield close(made)


@defer.inlineCallbacks
def in_process(args):
    workdir = tempfile.mkdtemp(prefix="rtcauthd-bench-fo-")
    redis, port = start_redis(workdir)
    try:
        yield bench_steady_ops(port, args.steady_jobs, args.window)
        raw(port, "FLUSHALL")
        yield bench_routing(port, args.jobs, args.samples)
    finally:
        redis.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--takeover-jobs", type=int, default=200)
    parser.add_argument("--lease", type=float, default=10.0)
    parser.add_argument("--steady-jobs", type=int, default=3000)
    parser.add_argument("--window", type=float, default=60.0)  # covers one restart round (48 s)
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--skip-takeover", action="store_true")
    args = parser.parse_args()
    if not args.skip_takeover:
        bench_takeover(args.runs, args.takeover_jobs, args.lease)
    failures = []
    d = in_process(args)
    d.addErrback(failures.append)
    d.addBoth(lambda _: reactor.stop())
    reactor.run()
    if failures:
        failures[0].raiseException()


if __name__ == "__main__":
    main()
