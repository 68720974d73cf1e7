"""Scale benchmark for delegated-leave jobs (issue 3 item 8). Prints figures; asserts nothing.

    .venv/bin/python bench/bench_jobs.py [--jobs 100000] [--redis-server redis-server]

1. memory per live job: N jobs waiting for their participant (waiting timer armed, the
   phase-1 SFU lookup in flight), measured with tracemalloc and as RSS growth;
2. webhook routing cost with N jobs live: verify a signed webhook and route it to its job;
3. restore time: N records in a real redis-server (upstream's format), then a fresh store
   and manager read and resume them all (as at start-up, before listening).
"""

from __future__ import annotations

import argparse
import base64
import gc
import hashlib
import hmac
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from twisted.internet import defer, reactor, task  # noqa: E402

from rtcauthd.leave.delegation import DelegatedLeave  # noqa: E402
from rtcauthd.leave.record import JobParams  # noqa: E402
from rtcauthd.leave.manager import JobManager  # noqa: E402
from rtcauthd.livekit import naming  # noqa: E402
from rtcauthd.livekit.webhooks import WebhookVerifier  # noqa: E402
from rtcauthd.store.memory import MemoryStore  # noqa: E402
from rtcauthd.store.model import StoredJob, encode_field, encode_value  # noqa: E402

KEY, SECRET = "benchkey", "bench-secret-0123456789abcdef0123456789"


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def params_for(i: int) -> JobParams:
    return JobParams(
        delay_id=f"syd_bench_{i:08d}",
        delay_timeout_ns=30 * 60 * 10**9,
        server_name="example.com",
        room=naming.room_alias(f"!room{i // 4}:example.com", "m.call#ROOM"),
        identity=naming.identity(f"@user{i}:example.com", "DEVICE", f"member-{i}"),
    )


def never(_params):
    """An HTTP attempt that never answers: jobs stay in their waiting state."""
    return defer.Deferred()


def make_manager(store) -> JobManager:
    return JobManager(
        clock=reactor, store=store, restart=never, send=never, lookup_participant=never, sanity_interval=0
    )


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed_webhook(room: str, identity: str) -> tuple[str, bytes]:
    body = json.dumps(
        {"event": "participant_joined", "room": {"name": room}, "participant": {"identity": identity}}
    ).encode()
    now = int(time.time())
    claims = {"iss": KEY, "exp": now + 300, "nbf": now, "iat": now,
              "sha256": base64.b64encode(hashlib.sha256(body).digest()).decode()}
    signing_input = b64url(b'{"alg":"HS256","typ":"JWT"}') + "." + b64url(json.dumps(claims).encode())
    sig = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(sig), body


def fill(params) -> tuple[JobManager, float]:
    manager = make_manager(MemoryStore())
    t0 = time.perf_counter()
    for p in params:
        manager.add(p)
    return manager, time.perf_counter() - t0


def bench_memory_and_routing(n: int) -> None:
    params = [params_for(i) for i in range(n)]  # inputs exist before measuring
    # Process RSS growth first, in a fresh heap (allocator overhead included)...
    gc.collect()
    rss_before = rss_kib()
    manager, added = fill(params)
    gc.collect()
    rss_after = rss_kib()
    manager.stop()
    del manager
    gc.collect()
    # ...then Python-level allocations with tracemalloc (its own bookkeeping not counted).
    tracemalloc.start()
    manager, _ = fill(params)
    gc.collect()
    traced, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"jobs live:                 {len(manager)}")
    print(f"add rate:                  {n / added:,.0f} jobs/s ({added:.2f} s for {n})")
    print(f"memory per job (traced):   {traced / n:,.0f} B  (job, timers, pending lookup, stored record)")
    print(f"memory per job (RSS):      {(rss_after - rss_before) * 1024 / n:,.0f} B")

    verifier = WebhookVerifier(api_key=KEY, api_secret=SECRET, clock=reactor)
    delegation = DelegatedLeave(manager=manager, resolver=None, webhooks=verifier)
    samples = [signed_webhook(p.room, p.identity) for p in params[: min(n, 20000)]]
    t0 = time.perf_counter()
    for auth, body in samples:
        delegation.handle(auth, body)
    elapsed = time.perf_counter() - t0
    print(f"webhook verify+route:      {elapsed / len(samples) * 1e6:,.1f} µs each "
          f"({len(samples)} webhooks, {len(manager)} jobs live)")
    t0 = time.perf_counter()
    for p in params[:20000]:
        manager.route(p.room, p.identity, "ParticipantConnected")
    elapsed = time.perf_counter() - t0
    print(f"route only (repeat event): {elapsed / 20000 * 1e6:,.2f} µs each")
    manager.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def bench_restore(n: int, redis_server: str) -> None:
    from rtcauthd.store.redis import RedisStore

    binary = shutil.which(redis_server)
    if binary is None:
        print("restore: SKIPPED (no redis-server; apt-get install redis-server)")
        return
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="rtcauthd-bench-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        now = time.time()
        lines = []
        for i in range(n):
            p = params_for(i)
            record = StoredJob(p, now)
            lines.append((encode_field(p.room, p.identity), encode_value(record)))
        loader = subprocess.Popen(
            [shutil.which("redis-cli") or "redis-cli", "-p", str(port), "--pipe"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        )
        payload = bytearray()
        for field, value in lines:
            parts = [b"HSET", b"lk-jwt:jobs", field.encode(), value.encode()]
            payload += b"*%d\r\n" % len(parts)
            for part in parts:
                payload += b"$%d\r\n%s\r\n" % (len(part), part)
        loader.communicate(bytes(payload))
        store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", clock=reactor, restore_wait=30)
        manager = make_manager(store)
        t0 = time.perf_counter()
        resumed = await manager.restore(time.time())
        elapsed = time.perf_counter() - t0
        print(f"restore from Redis:        {resumed} jobs resumed in {elapsed:.2f} s")
        manager.stop()
        await store.close()
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    from twisted.logger import globalLogBeginner

    # Measure the jobs, not the log: drop events instead of buffering them in memory.
    globalLogBeginner.beginLoggingTo([lambda event: None], redirectStandardIO=False)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--redis-server", default="redis-server")
    args = parser.parse_args()

    async def run() -> None:
        bench_memory_and_routing(args.jobs)
        await bench_restore(args.jobs, args.redis_server)

    def go(_reactor):
        return defer.Deferred.fromCoroutine(run())

    task.react(go)


if __name__ == "__main__":
    main()
