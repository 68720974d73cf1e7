"""Flood benchmark (issue 12 item 7): the real daemon under 2 000 concurrent made-up names.
Prints figures; asserts nothing.

    .venv/bin/python bench/bench_abuse.py [--requests 2000] [--scenarios one,many]

Everything stays on loopback and no DNS query is ever made: the made-up server names are
IP literals (``127.1.a.b:P`` / ``127.2.a.b:Q``) that the daemon is allowed to reach with
``RTCAUTH_FEDERATION_IP_RANGE_ALLOWLIST=127.0.0.0/8``; half of them land on a sink that
accepts and never answers (the costly kind: held until the outbound timeout), half on a
port where nothing listens (refused at once).  All other settings are the defaults.

Three processes besides the daemon, so the load generator's own CPU use does not show up
as the daemon's latency:

- the *helper* (this script with ``--helper``) serves the fake homeserver (full access,
  TLS from a throw-away CA), the fake SFU and the sink, and runs the *probe*: ``GET
  /healthz`` every 50 ms and a full-access ``/get_token`` every 250 ms, each on a new
  connection from 127.0.0.1;
- this process sends the flood, (a) all from 127.0.0.2, (b) from 2 000 source addresses
  127.0.x.y (``bindAddress``), and samples the daemon every 100 ms: RSS, descriptors,
  and its outbound TCP sockets (``/proc/<pid>/fd`` inodes matched in ``/proc/<pid>/net/tcp``).

Each scenario gets a fresh daemon (empty rate-limit table and back-off cache).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from twisted.internet import defer, protocol, reactor, task  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool, readBody  # noqa: E402
from twisted.web.http_headers import Headers  # noqa: E402
from twisted.web.iweb import IAgentEndpointFactory  # noqa: E402
from zope.interface import implementer  # noqa: E402

from rtcauthd.outbound.client import BytesProducer  # noqa: E402

#: Bounds for every wait (seconds).
START_DEADLINE = 30.0
REQUEST_DEADLINE = 30.0
FLOOD_DEADLINE = 90.0
SAMPLE_INTERVAL = 0.1
HEALTHZ_INTERVAL = 0.05
TOKEN_INTERVAL = 0.25
FULL_ACCESS_TOKEN = "full-access-token"

ROOM_ID = "!bench:example.org"
PROFILE = False


def token_body(server_name: str, token: str) -> bytes:
    return json.dumps({
        "room_id": ROOM_ID,
        "slot_id": "m.call#ROOM",
        "openid_token": {"access_token": token, "token_type": "Bearer",
                         "matrix_server_name": server_name, "expires_in": 3600},
        "member": {"id": "member", "claimed_user_id": f"@alice:{server_name}", "claimed_device_id": "DEV"},
    }).encode()


def address(prefix: str, k: int) -> str:
    """The k-th address under a /16 (``127.1`` → 127.1.0.1 ...), never .0 nor .255."""
    return f"{prefix}.{k // 250}.{1 + k % 250}"


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


@implementer(IAgentEndpointFactory)
class FromSource:
    """Connect to the daemon from a chosen loopback source address."""

    def __init__(self, source: str, port: int) -> None:
        self.source, self.port = source, port

    def endpointForURI(self, uri):
        return TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=REQUEST_DEADLINE,
                                  bindAddress=(self.source, 0))


class Client:
    """New-connection-per-request HTTP to the daemon from one source address."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent.usingEndpointFactory(reactor, FromSource(source, port), pool=self.pool)
        self.base = f"http://127.0.0.1:{port}".encode()

    def request(self, method: bytes, path: bytes, body: "bytes | None" = None) -> defer.Deferred:
        """Fire with ``(status or error name, seconds)``; never fails."""
        started = time.monotonic()
        headers = Headers({b"Content-Type": [b"application/json"]}) if body is not None else Headers()
        d = self.agent.request(method, self.base + path, headers, BytesProducer(body) if body is not None else None)
        d.addCallback(lambda r: readBody(r).addCallback(lambda _: r.code))
        d.addTimeout(REQUEST_DEADLINE, reactor)
        d.addErrback(lambda f: f.type.__name__)
        d.addCallback(lambda status: (status, time.monotonic() - started))
        return d


# ---------------------------------------------------------------------------------------
# helper process: fakes, sink and probe


class Sink(protocol.Protocol):
    """Accepts and never answers (a homeserver that hangs after the TCP handshake)."""

    def dataReceived(self, data: bytes) -> None:
        pass


def helper_main(workdir: str, sink_addresses: int) -> None:
    from tests.blackbox.fake_homeserver import FakeHomeserver
    from tests.blackbox.fake_livekit import FakeLiveKit
    from tests.blackbox.harness import free_port
    from tests.support.certs import TestCA

    ca = TestCA()
    ca_file = ca.write_ca(workdir)
    hs = FakeHomeserver()
    hs.listen(host="127.0.0.1", ca=ca)
    hs.add_token(FULL_ACCESS_TOKEN, f"@alice:{hs.server_name}")
    lk = FakeLiveKit()
    lk.listen(host="127.0.0.1")
    factory = protocol.Factory.forProtocol(Sink)
    sink_port = free_port(address("127.1", 0))
    for k in range(sink_addresses):
        reactor.listenTCP(sink_port, factory, backlog=128, interface=address("127.1", k))
    refuse_port = free_port(address("127.2", 0))  # nothing listens there
    probe = Probe()

    class Commands(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            for line in data.decode().split():
                if line.startswith("start:"):
                    probe.start(int(line[6:]), hs.server_name)
                elif line == "stop":
                    probe.stop().addCallback(lambda stats: say(stats))
                elif line == "quit":
                    reactor.stop()

        def connectionLost(self, reason) -> None:
            if reactor.running:
                reactor.stop()

    def say(obj) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    from twisted.internet import stdio

    stdio.StandardIO(Commands())
    say({"ready": True, "hs": hs.server_name, "hs_port": hs.port, "lk_url": lk.url, "ca_file": ca_file,
         "sink_port": sink_port, "refuse_port": refuse_port})
    reactor.run()


class Probe:
    """GET /healthz and full-access tokens on fresh connections, sequentially, bounded in time."""

    def __init__(self) -> None:
        self._loops: list[defer.Deferred] = []
        self._running = False
        self.healthz: list[float] = []
        self.healthz_bad = Counter()
        self.tokens: list[float] = []
        self.tokens_bad = Counter()

    def start(self, port: int, hs_name: str) -> None:
        self.__init__()
        self._running = True
        self._lag_loop = task.LoopingCall(self._tick)
        self._last_tick = time.monotonic()
        self.lag_max = 0.0
        self._lag_loop.start(0.01)
        client = Client(port)
        self._loops = [
            self._loop(lambda: client.request(b"GET", b"/healthz"), HEALTHZ_INTERVAL, self.healthz, self.healthz_bad),
            self._loop(lambda: client.request(b"POST", b"/get_token", token_body(hs_name, FULL_ACCESS_TOKEN)),
                       TOKEN_INTERVAL, self.tokens, self.tokens_bad),
        ]

    def _tick(self) -> None:
        """How late this process's own reactor is: the probe's share of a measured delay."""
        now = time.monotonic()
        self.lag_max = max(self.lag_max, now - self._last_tick - 0.01)
        self._last_tick = now

    @defer.inlineCallbacks
    def _loop(self, call, interval: float, times: list, bad: Counter):
        deadline = time.monotonic() + 600  # bounded even if never stopped
        while self._running and time.monotonic() < deadline:
            status, seconds = yield call()
            times.append(seconds)
            if status != 200:
                bad[str(status)] += 1
            yield task.deferLater(reactor, interval, lambda: None)

    @defer.inlineCallbacks
    def stop(self):
        self._running = False
        yield defer.DeferredList(self._loops)
        self._lag_loop.stop()
        return {
            "probe_lag_max": self.lag_max,
            "healthz_n": len(self.healthz), "healthz_p50": percentile(self.healthz, 50),
            "healthz_p99": percentile(self.healthz, 99), "healthz_max": max(self.healthz, default=float("nan")),
            "healthz_bad": dict(self.healthz_bad),
            "tokens_n": len(self.tokens), "tokens_p50": percentile(self.tokens, 50),
            "tokens_max": max(self.tokens, default=float("nan")), "tokens_bad": dict(self.tokens_bad),
        }


class HelperProcess(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.waiting: list[defer.Deferred] = []
        self.errors = b""
        self.ended = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if self.waiting:
                self.waiting.pop(0).callback(json.loads(line))

    def errReceived(self, data: bytes) -> None:
        self.errors += data

    def processEnded(self, reason) -> None:
        for d in self.waiting:
            d.errback(RuntimeError("helper ended:\n" + self.errors.decode(errors="replace")))
        self.waiting = []
        self.ended.callback(None)

    def ask(self, command: "str | None") -> defer.Deferred:
        d = defer.Deferred()
        self.waiting.append(d)
        if command is not None:
            self.transport.write(command.encode() + b"\n")
        d.addTimeout(START_DEADLINE, reactor)
        return d


# ---------------------------------------------------------------------------------------
# sampling the daemon


def _inodes(pid: int) -> tuple[int, set[str]]:
    fds, sockets = 0, set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        fds += 1
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            sockets.add(target[8:-1])
    return fds, sockets


def _ip(hex_addr: str) -> str:
    b = bytes.fromhex(hex_addr)
    return ".".join(str(x) for x in reversed(b))


class Sampler:
    """Peak RSS, descriptors and outbound sockets of one process, every SAMPLE_INTERVAL."""

    def __init__(self, pid: int, listen_port: int, hs_port: int) -> None:
        self.pid, self.listen_port, self.hs_port = pid, listen_port, hs_port
        self.peak = Counter()
        self.loop = task.LoopingCall(self.sample)

    def start(self) -> None:
        self.loop.start(SAMPLE_INTERVAL)

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()

    def sample(self) -> None:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        self._peak("rss_kib", int(line.split()[1]))
            fds, sockets = _inodes(self.pid)
            counts = Counter()
            with open(f"/proc/{self.pid}/net/tcp") as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[9] not in sockets:
                        continue
                    lport = int(parts[1].split(":")[1], 16)
                    rhex, rport_hex = parts[2].split(":")
                    rport = int(rport_hex, 16)
                    if rport == 0 or lport == self.listen_port:
                        continue  # a listener or an inbound connection
                    rip = _ip(rhex)
                    if rip.startswith(("127.1.", "127.2.")):
                        counts["out_strangers"] += 1
                    elif rport == self.hs_port:
                        counts["out_full_access"] += 1
                    else:
                        counts["out_other"] += 1
                    counts["out_total"] += 1
                    if parts[3] == "02":  # SYN_SENT
                        counts["out_syn_sent"] += 1
        except (OSError, StopIteration):
            return  # the process is gone
        self._peak("fds", fds)
        for k, v in counts.items():
            self._peak(k, v)

    def _peak(self, key: str, value: int) -> None:
        self.peak[key] = max(self.peak[key], value)


# ---------------------------------------------------------------------------------------
# the run


@defer.inlineCallbacks
def flood(port: int, names: list[str], sources: list[str]) -> defer.Deferred:
    clients = {s: Client(port, s) for s in set(sources)}
    started = time.monotonic()
    calls = [clients[sources[i]].request(b"POST", b"/get_token", token_body(name, "made-up-token"))
             for i, name in enumerate(names)]
    done = defer.gatherResults(calls)
    done.addTimeout(FLOOD_DEADLINE, reactor)
    results = yield done
    elapsed = time.monotonic() - started
    for c in clients.values():
        yield c.pool.closeCachedConnections()
    return results, elapsed


def file_logged_daemon(workdir: str, env: dict):
    """The harness's DaemonProcess, but logging to ``<workdir>/daemon.log``: through a pipe, a
    busy reader (this process, during the flood) would block the daemon's log writes."""
    from tests.blackbox.harness import DaemonProcess, _Capture

    class FileLogged(DaemonProcess):
        def spawn(self) -> None:
            self.exit_code = self.exit_signal = None
            self._alive = True
            self.starts += 1
            with open(os.path.join(self.workdir, "daemon.log"), "ab") as log_file:
                self._transport = self.reactor.spawnProcess(
                    _Capture(self), self.argv[0], self.argv, env=self.env, path=self.cwd,
                    childFDs={0: "w", 1: log_file.fileno(), 2: log_file.fileno()},
                )

    daemon = FileLogged(workdir=workdir, env=env)
    if PROFILE:  # twistd's own cProfile of the whole run, for finding where the time goes
        daemon.argv[2:2] = ["--profile", os.path.join(workdir, "profile.stats"), "--profiler", "cprofile",
                            "--savestats"]
    return daemon


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@defer.inlineCallbacks
def scenario(label: str, helper: HelperProcess, fakes: dict, n: int, sources: list[str], workdir: str):
    env = {
        "LIVEKIT_URL": fakes["lk_url"],
        "LIVEKIT_KEY": "benchkey",
        "LIVEKIT_SECRET": "bench-secret-0123456789abcdef0123456789",
        "LIVEKIT_FULL_ACCESS_HOMESERVERS": fakes["hs"],
        "RTCAUTH_CA_FILE": fakes["ca_file"],
        "RTCAUTH_FEDERATION_IP_RANGE_ALLOWLIST": "127.0.0.0/8",
    }
    daemon = file_logged_daemon(os.path.join(workdir, label), env)
    yield daemon.start(timeout=START_DEADLINE)
    try:
        names = [f"{address('127.1', i // 2)}:{fakes['sink_port']}" if i % 2 == 0
                 else f"{address('127.2', i // 2)}:{fakes['refuse_port']}" for i in range(n)]
        sampler = Sampler(daemon.pid, daemon.port, fakes["hs_port"])
        sampler.start()
        helper.transport.write(f"start:{daemon.port}\n".encode())
        yield task.deferLater(reactor, 1.0, lambda: None)  # a quiet baseline first
        cpu_before = cpu_seconds(daemon.pid)
        results, elapsed = yield flood(daemon.port, names, sources)
        cpu = cpu_seconds(daemon.pid) - cpu_before
        yield task.deferLater(reactor, 1.0, lambda: None)
        probe = yield helper.ask("stop")
        sampler.stop()
        statuses = Counter(str(s) for s, _ in results)
        latencies = [t for _, t in results]
        peak = sampler.peak
        print(f"== {label}: {n} concurrent /get_token for distinct made-up names from "
              f"{len(set(sources))} source address(es)")
        print(f"flood answered in:          {elapsed:.2f} s  (answers: "
              + ", ".join(f"{k}×{v}" for k, v in sorted(statuses.items())) + ")")
        print(f"daemon CPU for the flood:   {cpu:.2f} s ({cpu / n * 1000:.2f} ms a request)")
        print(f"flood request latency:      p50 {percentile(latencies, 50) * 1000:.0f} ms, "
              f"p99 {percentile(latencies, 99) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")
        print(f"peak outbound connections:  {peak['out_total']} (to strangers {peak['out_strangers']}, "
              f"to the full-access homeserver {peak['out_full_access']}, other {peak['out_other']}; "
              f"SYN_SENT {peak['out_syn_sent']})  caps: 256 strangers / 8 per name, full access 256")
        print(f"peak descriptors:           {peak['fds']}")
        print(f"peak RSS:                   {peak['rss_kib'] / 1024:.1f} MiB")
        print(f"/healthz ({probe['healthz_n']} probes):       p50 {probe['healthz_p50'] * 1000:.1f} ms, "
              f"p99 {probe['healthz_p99'] * 1000:.1f} ms, max {probe['healthz_max'] * 1000:.1f} ms"
              + (f", not 200: {probe['healthz_bad']}" if probe["healthz_bad"] else ""))
        print(f"full-access token ({probe['tokens_n']}):     p50 {probe['tokens_p50'] * 1000:.1f} ms, "
              f"slowest {probe['tokens_max'] * 1000:.1f} ms"
              + (f", not 200: {probe['tokens_bad']}" if probe["tokens_bad"] else ""))
        print(f"probe's own reactor lag:    max {probe['probe_lag_max'] * 1000:.1f} ms (included in the two lines above)")
        misses = []
        if peak["out_strangers"] > 256:
            misses.append("outbound over the cap")
        if peak["rss_kib"] > 150 * 1024:
            misses.append("RSS > 150 MiB")
        if probe["healthz_max"] > 0.25:
            misses.append("/healthz max > 250 ms")
        if probe["tokens_max"] > 2.0 or probe["tokens_bad"]:
            misses.append("full-access token > 2 s or failed")
        print("targets:                    " + ("all met" if not misses else "MISSED: " + "; ".join(misses)))
        print(flush=True)
    finally:
        yield daemon.cleanup()


@defer.inlineCallbacks
def main(args) -> defer.Deferred:
    workdir = tempfile.mkdtemp(prefix="bench_abuse_")
    helper = HelperProcess()
    argv = [sys.executable, os.path.abspath(__file__), "--helper", workdir, "--sink-addresses",
            str((args.requests + 1) // 2)]
    ready = helper.ask(None)
    reactor.spawnProcess(helper, sys.executable, argv, env=dict(os.environ), path=os.getcwd())
    try:
        fakes = yield ready
        print(f"workdir {workdir}; fake homeserver {fakes['hs']} (full access), sink 127.1.x.y:{fakes['sink_port']} "
              f"(accepts, never answers), refused 127.2.x.y:{fakes['refuse_port']}; no DNS")
        print(f"descriptor limit {os.sysconf('SC_OPEN_MAX')}, {os.cpu_count()} CPUs", flush=True)
        n = args.requests
        for label in args.scenarios.split(","):
            if label == "one":
                sources = ["127.0.0.2"] * n
            elif label == "many":
                sources = [f"127.0.{8 + i // 250}.{1 + i % 250}" for i in range(n)]
            else:
                raise SystemExit(f"unknown scenario {label!r} (one, many)")
            yield scenario(label, helper, fakes, n, sources, workdir)
    finally:
        if helper.transport is not None:
            helper.transport.write(b"quit\n")
            d = helper.ended
            d.addTimeout(10, reactor)
            yield d


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--scenarios", default="one,many")
    parser.add_argument("--profile", action="store_true", help="run the daemon under cProfile (slower)")
    parser.add_argument("--helper", metavar="WORKDIR", help=argparse.SUPPRESS)
    parser.add_argument("--sink-addresses", type=int, default=1000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.helper:
        helper_main(args.helper, args.sink_addresses)
        return
    global PROFILE
    PROFILE = args.profile
    failures = []
    task.react(lambda _r: main(args).addErrback(lambda f: failures.append(f) or f))


if __name__ == "__main__":
    run()
