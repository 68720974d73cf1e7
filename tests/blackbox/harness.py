"""Run the real rtcauthd (``twistd rtcauth``) and a real redis-server as child processes.

Black-box tests treat the daemon exactly like an operator does: environment and command
line in, HTTP and log output out.  Everything here waits on the running reactor (trial's
``TestCase``), so in-process fakes keep serving while a test waits for the daemon; every
wait has a deadline so a hung daemon fails a test instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
from typing import Callable, Mapping, Optional, Sequence

import attr
from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.trial.unittest import FailTest
from twisted.web import server
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers

log = Logger()

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Bounds for waits; generous because 2 CPUs are shared, never asserted as durations.
START_DEADLINE = 20.0
STOP_DEADLINE = 10.0
REQUEST_DEADLINE = 15.0
POLL_INTERVAL = 0.05

from rtcauthd.outbound.client import BytesProducer


def _reactor(reactor):
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        return global_reactor
    return reactor


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (bound then released; the daemon binds it later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def host_for_url(host: str) -> str:
    """``127.0.0.1`` stays, ``::1`` becomes ``[::1]`` (URL / server-name form)."""
    return f"[{host}]" if ":" in host else host


def twistd_path() -> str:
    """The venv's twistd: the one next to the interpreter running the tests."""
    return os.path.join(os.path.dirname(sys.executable), "twistd")


def timeout_after(reactor, d: defer.Deferred, seconds: float, what: str) -> defer.Deferred:
    """Fail ``d`` with a readable FailTest after ``seconds`` (cancelling the work)."""

    def translate(f):
        f.trap(defer.TimeoutError, defer.CancelledError)
        raise FailTest(f"gave up after {seconds:g}s waiting for {what}")

    d.addTimeout(seconds, reactor, onTimeoutCancel=None)
    d.addErrback(translate)
    return d


@defer.inlineCallbacks
def poll_until(reactor, check: Callable[[], object], *, timeout: float, what: str,
               describe: Optional[Callable[[], str]] = None, interval: float = POLL_INTERVAL):
    """Call ``check`` (may return a Deferred) until it is truthy; fire with that value.

    For effects that happen some time after a request (webhook routing, timers): the
    deadline bounds the wait, it is never asserted as a duration.  ``describe`` adds
    context (logs, recorded calls) to the failure.
    """
    deadline = _reactor(reactor).seconds() + timeout
    while True:
        value = yield defer.maybeDeferred(check)
        if value:
            return value
        if _reactor(reactor).seconds() > deadline:
            extra = ("\n" + describe()) if describe is not None else ""
            raise FailTest(f"gave up after {timeout:g}s waiting for {what}{extra}")
        yield deferLater(_reactor(reactor), interval, lambda: None)


# ---------------------------------------------------------------------------------------
# child processes


class _Capture(protocol.ProcessProtocol):
    """Feeds a ManagedProcess with what the child writes and when it ends."""

    def __init__(self, owner: "ManagedProcess") -> None:
        self._owner = owner

    def connectionMade(self) -> None:
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self._owner._received(data)

    def errReceived(self, data: bytes) -> None:
        self._owner._received(data)

    def processEnded(self, reason) -> None:
        self._owner._ended(reason)


class ManagedProcess:
    """A child process whose combined stdout+stderr is captured and whose end is awaitable.

    Output accumulates across restarts, so a test can look at everything a daemon ever
    said; ``mark()`` / ``output_since(mark)`` select what came after a point.
    """

    kind = "process"

    def __init__(self, *, argv: Sequence[str], env: Mapping[str, str], cwd: str, reactor=None) -> None:
        self.reactor = _reactor(reactor)
        self.argv = list(argv)
        self.env = dict(env)
        self.cwd = cwd
        self._output = bytearray()
        self._transport = None
        self._alive = False
        self._waiters: list[tuple[Callable[[], bool], defer.Deferred]] = []
        self.exit_code: Optional[int] = None
        self.exit_signal: Optional[int] = None
        self.starts = 0

    # -- output ---------------------------------------------------------------------------

    @property
    def output(self) -> str:
        return self._output.decode("utf-8", "replace")

    def mark(self) -> int:
        return len(self._output)

    def output_since(self, mark: int) -> str:
        return bytes(self._output[mark:]).decode("utf-8", "replace")

    def lines_since(self, mark: int = 0) -> list[str]:
        return self.output_since(mark).splitlines()

    def describe(self) -> str:
        """Command line, exit status and captured output, for failure messages."""
        status = "running" if self.running else f"exit code {self.exit_code}, signal {self.exit_signal}"
        return (
            f"{self.kind} {' '.join(self.argv)!r} ({status}); captured output:\n"
            + "-" * 60 + "\n" + self.output + "\n" + "-" * 60
        )

    def _received(self, data: bytes) -> None:
        self._output += data
        self._check_waiters()

    def _check_waiters(self) -> None:
        for check, d in list(self._waiters):
            if d.called:  # timed out already
                self._waiters.remove((check, d))
            elif check():
                self._waiters.remove((check, d))
                d.callback(None)

    def wait_for_output(
        self,
        match: "str | re.Pattern[str] | Callable[[str], bool]",
        *,
        since: int = 0,
        timeout: float = 10.0,
    ) -> defer.Deferred:
        """Fire with the matching line once some output line after ``since`` matches.

        ``match`` is a substring, a compiled regex (``search``) or a predicate on a line.
        Fails (with the whole captured output) when the deadline passes or the process
        ends without having printed it.
        """
        if isinstance(match, str):
            needle = match
            pred: Callable[[str], bool] = lambda line: needle in line  # noqa: E731
        elif isinstance(match, re.Pattern):
            pred = lambda line: match.search(line) is not None  # noqa: E731
        else:
            pred = match

        def find() -> Optional[str]:
            for line in self.lines_since(since):
                if pred(line):
                    return line
            return None

        found = find()
        if found is not None:
            return defer.succeed(found)

        d: defer.Deferred = defer.Deferred()

        def check() -> bool:
            return find() is not None or not self.running

        self._waiters.append((check, d))

        def result(_):
            line = find()
            if line is None:
                raise FailTest(f"{self.kind} ended without printing a line matching {match!r}\n" + self.describe())
            return line

        def translate(f):
            f.trap(defer.TimeoutError, defer.CancelledError)
            if (check, d) in self._waiters:
                self._waiters.remove((check, d))
            raise FailTest(
                f"no output line matching {match!r} within {timeout:g}s\n" + self.describe()
            )

        d.addCallback(result)
        d.addTimeout(timeout, self.reactor)
        d.addErrback(translate)
        return d

    def wait_for_line(self, *patterns: str, since: int = 0, timeout: float = 10.0) -> defer.Deferred:
        """A line (after ``since``) matching every regex in ``patterns``, case-insensitively."""
        compiled = [re.compile(p, re.I) for p in patterns]
        return self.wait_for_output(lambda line: all(c.search(line) for c in compiled), since=since, timeout=timeout)

    # -- life cycle -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._alive

    @property
    def pid(self) -> Optional[int]:
        return self._transport.pid if self.running else None

    def spawn(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.kind} already running")
        self.exit_code = None
        self.exit_signal = None
        self._alive = True
        self.starts += 1
        argv = list(self.argv)
        setpriv = shutil.which("setpriv")
        if setpriv:
            # Die with the test runner even if it is SIGKILLed (setpriv execs: same pid).
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        self._transport = self.reactor.spawnProcess(
            _Capture(self), argv[0], argv, env=self.env, path=self.cwd
        )

    def _ended(self, reason) -> None:
        value = reason.value
        self.exit_code = getattr(value, "exitCode", None)
        self.exit_signal = getattr(value, "signal", None)
        self._alive = False
        self._check_waiters()

    def wait_ended(self, timeout: float = STOP_DEADLINE) -> defer.Deferred:
        """Fire with ``(exit_code, signal)`` when the process has ended (reaped, pipes closed)."""
        if not self.running:
            return defer.succeed((self.exit_code, self.exit_signal))
        d: defer.Deferred = defer.Deferred()
        self._waiters.append((lambda: not self.running, d))
        d.addCallback(lambda _: (self.exit_code, self.exit_signal))
        return timeout_after(self.reactor, d, timeout, f"{self.kind} (pid {self.pid}) to exit")

    def send_signal(self, signum: int) -> None:
        if self.running:
            self._transport.signalProcess(signum)

    @defer.inlineCallbacks
    def terminate(self, *, expect_code: Optional[int] = 0, timeout: float = STOP_DEADLINE):
        """SIGTERM and wait; with ``expect_code`` set, fail unless it exits with that code.

        A process that ignores SIGTERM past the deadline is SIGKILLed and the test fails.
        """
        if not self.running:
            if expect_code is not None and self.exit_code != expect_code:
                raise FailTest(f"{self.kind} had already ended before SIGTERM\n" + self.describe())
            return (self.exit_code, self.exit_signal)
        self.send_signal(signal.SIGTERM)
        try:
            status = yield self.wait_ended(timeout)
        except FailTest:
            yield self.kill()
            raise FailTest(f"{self.kind} ignored SIGTERM for {timeout:g}s\n" + self.describe())
        if expect_code is not None and self.exit_code != expect_code:
            raise FailTest(
                f"{self.kind} exited with code {self.exit_code} (signal {self.exit_signal}) "
                f"after SIGTERM, expected {expect_code}\n" + self.describe()
            )
        return status

    @defer.inlineCallbacks
    def kill(self):
        """SIGKILL (no clean shutdown) and wait until it is gone."""
        if self.running:
            self.send_signal(signal.SIGKILL)
            yield self.wait_ended(STOP_DEADLINE)
        return (self.exit_code, self.exit_signal)

    @defer.inlineCallbacks
    def run_to_exit(self, timeout: float = START_DEADLINE):
        """Spawn and wait for the process to end by itself; fire with ``(exit_code, output)``."""
        mark = self.mark()
        self.spawn()
        try:
            yield self.wait_ended(timeout)
        except FailTest:
            yield self.kill()
            raise FailTest(f"{self.kind} did not exit by itself within {timeout:g}s\n" + self.describe())
        return (self.exit_code, self.output_since(mark))


# ---------------------------------------------------------------------------------------
# HTTP to the daemon


@attr.s(auto_attribs=True, frozen=True)
class HTTPResult:
    """One complete response from the daemon."""

    code: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> Optional[str]:
        values = self.headers.getRawHeaders(name)
        if not values:
            return None
        if len(values) != 1:
            raise AssertionError(f"header {name!r} sent {len(values)} times: {values!r}")
        return values[0]

    def json(self):
        return json.loads(self.body)


# ---------------------------------------------------------------------------------------
# the daemon


def daemon_base_env(home: str) -> dict[str, str]:
    """The environment every daemon gets: nothing from the test runner's LIVEKIT_*/RTCAUTH_*."""
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": home,
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        # Run the tree under test even if the venv's editable install points elsewhere.
        "PYTHONPATH": REPO_ROOT,
    }


class DaemonProcess(ManagedProcess):
    """``twistd --nodaemon --pidfile= rtcauth --listen ... [args]`` with a given environment.

    ``listen_host`` picks the listener (``127.0.0.1`` → ``tcp:``, ``::1`` → ``tcp6:``); the
    port is chosen once and kept across restarts.  Pass ``listen_host=None`` to give the
    listen arguments yourself in ``args`` (``base_url`` is then unknown).
    """

    kind = "rtcauthd"

    def __init__(
        self,
        *,
        workdir: str,
        env: Optional[Mapping[str, str]] = None,
        args: Sequence[str] = (),
        listen_host: Optional[str] = "127.0.0.1",
        port: Optional[int] = None,
        reactor=None,
    ) -> None:
        os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self.listen_host = listen_host
        self.port = port if port is not None or listen_host is None else free_port(listen_host)
        argv = [twistd_path(), "--nodaemon", "--pidfile=", "rtcauth"]
        if listen_host is not None:
            if ":" in listen_host:
                argv += ["--listen", "tcp6:%d:interface=%s" % (self.port, listen_host.replace(":", "\\:"))]
            else:
                argv += ["--listen", f"tcp:{self.port}:interface={listen_host}"]
        argv += list(args)
        full_env = daemon_base_env(workdir)
        full_env.update(env or {})
        super().__init__(argv=argv, env=full_env, cwd=workdir, reactor=reactor)
        self._pool = HTTPConnectionPool(self.reactor, persistent=False)
        self._agent = Agent(self.reactor, pool=self._pool)

    @property
    def base_url(self) -> str:
        if self.listen_host is None:
            raise RuntimeError("listen arguments were given by hand; base_url unknown")
        return f"http://{host_for_url(self.listen_host)}:{self.port}"

    # -- life cycle -----------------------------------------------------------------------

    @defer.inlineCallbacks
    def start(self, *, timeout: float = START_DEADLINE):
        """Spawn and wait for the first 200 from GET /healthz (the readiness signal)."""
        self.spawn()
        yield self.wait_ready(timeout=timeout)
        return self

    @defer.inlineCallbacks
    def wait_ready(self, *, timeout: float = START_DEADLINE):
        deadline = self.reactor.seconds() + timeout
        last = "no attempt yet"
        while True:
            if not self.running:
                raise FailTest("rtcauthd exited before becoming ready\n" + self.describe())
            if self.reactor.seconds() > deadline:
                yield self.kill()
                raise FailTest(
                    f"rtcauthd not ready within {timeout:g}s (last /healthz attempt: {last})\n"
                    + self.describe()
                )
            try:
                result = yield self.request("GET", "/healthz", timeout=2.0)
            except (error.ConnectError, error.ConnectionRefusedError) as e:
                last = repr(e)
            except FailTest as e:  # this attempt timed out; try again until the deadline
                last = str(e)
            else:
                if result.code == 200:
                    return
                last = f"HTTP {result.code}"
            yield deferLater(self.reactor, POLL_INTERVAL, lambda: None)

    def stop(self, *, expect_code: Optional[int] = 0, timeout: float = STOP_DEADLINE) -> defer.Deferred:
        """SIGTERM; fail unless it exits with ``expect_code`` (0) promptly."""
        return self.terminate(expect_code=expect_code, timeout=timeout)

    @defer.inlineCallbacks
    def restart(self, *, timeout: float = START_DEADLINE):
        """Start again with the same argv, environment and port (after stop() or kill())."""
        if self.running:
            raise RuntimeError("stop() or kill() the daemon before restart()")
        yield self.start(timeout=timeout)
        return self

    @defer.inlineCallbacks
    def cleanup(self):
        """For addCleanup: SIGTERM (SIGKILL if it hangs) without judging the exit code;
        the captured output is left in ``<workdir>/output.log`` for post-mortems."""
        if self.running:
            self.send_signal(signal.SIGTERM)
            try:
                yield self.wait_ended(STOP_DEADLINE)
            except FailTest:
                yield self.kill()
        yield self._pool.closeCachedConnections()
        with open(os.path.join(self.workdir, "output.log"), "wb") as f:
            f.write(bytes(self._output))

    # -- HTTP -----------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Optional[bytes] = None,
        headers: Optional[Mapping[str, str]] = None,
        *,
        timeout: float = REQUEST_DEADLINE,
    ) -> defer.Deferred:
        """One HTTP request through a plain Agent (never hyperlink: IPv6 literals must work)."""
        h = Headers()
        for k, v in (headers or {}).items():
            h.addRawHeader(k, v)
        url = (self.base_url + path).encode("ascii")
        d = self._agent.request(method.encode("ascii"), url, h, BytesProducer(body) if body is not None else None)

        def got(response):
            return readBody(response).addCallback(
                lambda data: HTTPResult(response.code, response.headers, data)
            )

        d.addCallback(got)
        return timeout_after(self.reactor, d, timeout, f"{method} {path} on rtcauthd")

    def post_json(self, path: str, obj, *, timeout: float = REQUEST_DEADLINE) -> defer.Deferred:
        body = json.dumps(obj).encode("utf-8")
        return self.request("POST", path, body, {"Content-Type": "application/json"}, timeout=timeout)


# ---------------------------------------------------------------------------------------
# redis-server


class RedisError(Exception):
    """An ``-ERR ...`` reply."""


class _Incomplete(Exception):
    pass


def _parse_resp(buf: bytes, pos: int = 0):
    """Parse one RESP2 reply from ``buf[pos:]``; return ``(value, new_pos)``."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete()
    kind, line = buf[pos:pos + 1], buf[pos + 1:end]
    pos = end + 2
    if kind == b"+":
        return line.decode(), pos
    if kind == b"-":
        return RedisError(line.decode()), pos
    if kind == b":":
        return int(line), pos
    if kind == b"$":
        n = int(line)
        if n < 0:
            return None, pos
        if len(buf) < pos + n + 2:
            raise _Incomplete()
        return bytes(buf[pos:pos + n]), pos + n + 2
    if kind == b"*":
        n = int(line)
        if n < 0:
            return None, pos
        items = []
        for _ in range(n):
            item, pos = _parse_resp(buf, pos)
            items.append(item)
        return items, pos
    raise ValueError(f"not RESP: {bytes(buf[pos - 2 - len(line) - 1:end])!r}")


class _OneCommand(protocol.Protocol):
    """Send one command, read one reply, hang up (no client library in the test's way)."""

    def __init__(self, args: Sequence[bytes]) -> None:
        self._args = args
        self._buf = b""
        self.reply: defer.Deferred = defer.Deferred()
        self.closed: defer.Deferred = defer.Deferred()
        self._value = None

    def connectionMade(self) -> None:
        out = [b"*%d\r\n" % len(self._args)]
        for a in self._args:
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.transport.write(b"".join(out))

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        try:
            value, _ = _parse_resp(self._buf)
        except _Incomplete:
            return
        self._value = value
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if not self.closed.called:  # not already given up on by a timeout
            self.closed.callback(None)


class RedisServer(ManagedProcess):
    """A throw-away ``redis-server`` on 127.0.0.1 with persistence off.

    A missing binary is a test *failure*: the black-box suite needs a real Redis and CI
    installs it (``apt-get install -y redis-server``).
    """

    kind = "redis-server"

    def __init__(self, *, workdir: str, port: Optional[int] = None, reactor=None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FailTest(
                "redis-server not found on PATH: the black-box tests need a real Redis "
                "(install it with `apt-get install -y redis-server`)"
            )
        os.makedirs(workdir, exist_ok=True)
        self.port = port if port is not None else free_port("127.0.0.1")
        argv = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", workdir,
        ]
        super().__init__(
            argv=argv, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, cwd=workdir, reactor=reactor
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @defer.inlineCallbacks
    def start(self, *, timeout: float = START_DEADLINE):
        """Spawn and wait until it answers PING."""
        self.spawn()
        deadline = self.reactor.seconds() + timeout
        while True:
            if not self.running:
                raise FailTest("redis-server exited during start-up\n" + self.describe())
            try:
                reply = yield self.command("PING", timeout=2.0)
            except (error.ConnectError, FailTest):
                reply = None
            if reply == "PONG":
                return self
            if self.reactor.seconds() > deadline:
                yield self.kill()
                raise FailTest(f"redis-server did not answer PING within {timeout:g}s\n" + self.describe())
            yield deferLater(self.reactor, POLL_INTERVAL, lambda: None)

    @defer.inlineCallbacks
    def restart(self, *, timeout: float = START_DEADLINE):
        if self.running:
            raise RuntimeError("stop() or kill() redis-server before restart()")
        yield self.start(timeout=timeout)
        return self

    @defer.inlineCallbacks
    def stop(self, *, save: bool = False):
        """Stop with exit code 0.  ``save=True`` writes the data set to ``--dir`` first
        (``SHUTDOWN SAVE``), so that a restart on the same directory finds it again."""
        if not save:
            yield self.terminate(expect_code=0)
            return
        try:
            yield self.command("SHUTDOWN", "SAVE")  # no reply: the server just goes away
        except (error.ConnectionLost, error.ConnectionDone):
            pass
        yield self.wait_ended(STOP_DEADLINE)
        if self.exit_code != 0:
            raise FailTest("redis-server SHUTDOWN SAVE did not exit 0\n" + self.describe())

    @defer.inlineCallbacks
    def cleanup(self):
        if self.running:
            yield self.kill()

    @defer.inlineCallbacks
    def command(self, *args: "str | bytes | int", timeout: float = 5.0):
        """Run one command; bulk strings come back as bytes, ``-ERR`` raises RedisError."""
        raw = [a if isinstance(a, bytes) else str(a).encode("utf-8") for a in args]
        proto = _OneCommand(raw)
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port, timeout=timeout)
        yield connectProtocol(endpoint, proto)
        try:
            yield timeout_after(self.reactor, proto.closed, timeout, f"redis reply to {args[0]!r}")
        except FailTest:
            proto.transport.abortConnection()
            raise
        value = proto._value
        if isinstance(value, RedisError):
            raise value
        return value

    @defer.inlineCallbacks
    def hgetall(self, key: str):
        """HGETALL as a dict of bytes → bytes."""
        flat = yield self.command("HGETALL", key)
        return dict(zip(flat[0::2], flat[1::2]))


# ---------------------------------------------------------------------------------------
# plumbing shared by the in-process fakes


class _TrackedChannel(HTTPChannel):
    """An HTTPChannel that tells its FakeServer when it opens and closes."""

    fake: "FakeServer"

    def connectionMade(self) -> None:
        super().connectionMade()
        self.lost: defer.Deferred = defer.Deferred()
        self.fake._opened(self)

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        self.fake._closed(self)
        self.lost.callback(None)


@attr.s(auto_attribs=True, frozen=True)
class Connection:
    """A TCP connection accepted by a fake (before any TLS handshake or HTTP request)."""

    peer_host: str
    peer_port: int


class FakeServer:
    """Base for in-process fakes: a Site on loopback that records connections and can be
    stopped completely (listener closed, open connections aborted, timers cancelled).
    """

    def __init__(self, resource, *, reactor=None) -> None:
        self.reactor = _reactor(reactor)
        self.site = server.Site(resource)
        self.site.displayTracebacks = True
        fake = self

        class Channel(_TrackedChannel):
            pass

        Channel.fake = fake
        self.site.protocol = Channel
        self.connections: list[Connection] = []
        self._open: set[_TrackedChannel] = set()
        self._port = None
        self.host: Optional[str] = None
        self._delayed: list = []

    def _opened(self, channel) -> None:
        peer = channel.transport.getPeer()
        self.connections.append(Connection(peer.host, peer.port))
        self._open.add(channel)

    def _closed(self, channel) -> None:
        self._open.discard(channel)

    def call_later(self, seconds: float, fn, *a, **kw):
        """callLater that stop() cancels (no pending DelayedCalls after a test)."""
        dc = self.reactor.callLater(seconds, fn, *a, **kw)
        self._delayed.append(dc)
        return dc

    @property
    def port(self) -> int:
        return self._port.getHost().port

    @property
    def hostport(self) -> str:
        """``127.0.0.1:PORT`` or ``[::1]:PORT``."""
        return f"{host_for_url(self.host)}:{self.port}"

    def listen_tcp(self, host: str, port: int = 0) -> None:
        self.host = host
        self._port = self.reactor.listenTCP(port, self.site, interface=host)

    def listen_ssl(self, host: str, context_factory, port: int = 0) -> None:
        self.host = host
        self._port = self.reactor.listenSSL(port, self.site, context_factory, interface=host)

    @defer.inlineCallbacks
    def stop(self):
        for dc in self._delayed:
            if dc.active():
                dc.cancel()
        self._delayed.clear()
        if self._port is not None:
            yield self._port.stopListening()
            self._port = None
        waits = []
        for channel in list(self._open):
            waits.append(channel.lost)
            channel.transport.abortConnection()
        yield defer.gatherResults(waits)


# ---------------------------------------------------------------------------------------
# expectations computed independently of rtcauthd (docs/endpoints.md#cors, docs/authorization.md#hash-function, docs/authorization.md#livekit-tokens)

CORS_HEADERS = {
    "Content-Type": "application/json",
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST",
    "Access-Control-Allow-Headers": "Accept, Content-Type, Content-Length, Accept-Encoding, X-CSRF-Token",
}

#: Base64url of the exact JOSE header ``{"alg":"HS256","typ":"JWT"}``.
JOSE_HEADER_B64 = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"


def go_json_string_array(items: Sequence[str]) -> bytes:
    """What Go's json.Marshal writes for a []string (HTML escaping on)."""
    text = json.dumps(list(items), ensure_ascii=False, separators=(",", ":"))
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text.encode("utf-8")


def string_array_json(items: Sequence[str]) -> bytes:
    """A []string as lk-jwt-service v0.7 hashes and keys it: JSON without HTML escaping."""
    return json.dumps(list(items), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def lk_hash(*items: str) -> str:
    """H(...) of docs/authorization.md#hash-function: unpadded standard base64 of SHA-256 of the JSON array."""
    import base64
    import hashlib

    digest = hashlib.sha256(string_array_json(items)).digest()
    return base64.b64encode(digest).decode("ascii").rstrip("=")


def matrix_error_body(errcode: str, message: str) -> bytes:
    """``{"errcode":…,"error":…}`` + LF, as Go's streaming encoder writes it."""
    return json.dumps({"errcode": errcode, "error": message}, separators=(",", ":")).encode("utf-8") + b"\n"


# ---------------------------------------------------------------------------------------
# the base test case


class BlackBoxCase:
    """Mixin for ``twisted.trial.unittest.TestCase``: fakes and daemons that clean up after
    themselves (LIFO: daemons stop before the fakes they talk to)."""

    def setUp(self):
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        from tests.support.certs import TestCA

        self.ca = TestCA()
        self.ca_file = self.ca.write_ca(self.workdir)
        import secrets

        self.key = "testkey-" + secrets.token_hex(4)
        self.secret = "testsecret-" + secrets.token_hex(16)

    def make_daemon(self, env: Mapping[str, str], *, args: Sequence[str] = (),
                    listen_host: Optional[str] = "127.0.0.1", name: str = "daemon") -> DaemonProcess:
        d = DaemonProcess(workdir=os.path.join(self.workdir, name), env=env, args=args, listen_host=listen_host)
        self.addCleanup(d.cleanup)
        self.__dict__.setdefault("_daemons", []).append(d)
        return d

    def write(self, name: str, content: bytes) -> str:
        """A file in this test's working directory (secrets, env files, registrations)."""
        path = os.path.join(self.workdir, name)
        with open(path, "wb") as f:
            f.write(content)
        return path

    def daemon_logs(self) -> str:
        """Everything this test's daemons printed (for failure messages)."""
        return "\n".join(d.describe() for d in self.__dict__.get("_daemons", []))

    def start_daemon(self, env: Mapping[str, str], **kw) -> defer.Deferred:
        """A started (ready) daemon."""
        return self.make_daemon(env, **kw).start()

    def service_env(self, *, livekit_url: str, full_access: str, **extra: str) -> dict[str, str]:
        """The usual environment: this test's key/secret, CA file and SFU."""
        env = {
            "LIVEKIT_URL": livekit_url,
            "LIVEKIT_KEY": self.key,
            "LIVEKIT_SECRET": self.secret,
            "LIVEKIT_FULL_ACCESS_HOMESERVERS": full_access,
            "RTCAUTH_CA_FILE": self.ca_file,
        }
        env.update(extra)
        return env

    def make_homeserver(self, *, host: str = "127.0.0.1", self_signed: bool = False):
        """A listening FakeHomeserver whose certificate is from ``self.ca`` (or untrusted)."""
        from tests.blackbox.fake_homeserver import FakeHomeserver
        from tests.support.certs import self_signed as untrusted

        hs = FakeHomeserver()
        if self_signed:
            hs.listen(host=host, cert=untrusted([host]))
        else:
            hs.listen(host=host, ca=self.ca)
        self.addCleanup(hs.stop)
        return hs

    def make_livekit(self, *, host: str = "127.0.0.1"):
        from tests.blackbox.fake_livekit import FakeLiveKit

        lk = FakeLiveKit()
        lk.listen(host=host)
        self.addCleanup(lk.stop)
        return lk

    def make_redis(self) -> RedisServer:
        """A redis-server (not started yet; its port is fixed, so it can be started later)."""
        r = RedisServer(workdir=os.path.join(self.workdir, "redis"))
        self.addCleanup(r.cleanup)
        return r

    def start_redis(self) -> defer.Deferred:
        return self.make_redis().start()
