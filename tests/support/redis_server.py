"""A real redis-server child process on loopback, and a tiny independent RESP client.

The client is deliberately not txredisapi, so that tests assert the stored bytes through
a path that shares no code with the store under test. Without a redis-server binary the
tests that use :class:`RedisServer` FAIL (install it with ``apt-get install -y redis-server``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from typing import Any, Callable, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from rtcauthd.store.redis import JOBS_KEY

# --------------------------------------------------------------------------- raw RESP client


class RespError(Exception):
    pass


def _encode_command(args: tuple) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _read_reply(f: Any) -> Any:
    line = f.readline()
    if not line:
        raise ConnectionError("connection closed")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return RespError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(f) for _ in range(n)]
    raise ValueError(f"bad RESP line {line!r}")


def raw(port: int, *args: Any, password: Optional[str] = None, db: int = 0) -> Any:
    """One command on a fresh blocking connection (loopback only); RespError if refused."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        commands = []
        if password is not None:
            commands.append(("AUTH", password))
        if db:
            commands.append(("SELECT", db))
        commands.append(args)
        s.sendall(b"".join(_encode_command(c) for c in commands))
        with s.makefile("rb") as f:
            replies = [_read_reply(f) for _ in commands]
    for reply in replies:
        if isinstance(reply, RespError):
            raise reply
    return replies[-1]


def raw_hgetall(port: int, **kw: Any) -> dict[bytes, bytes]:
    flat = raw(port, "HGETALL", JOBS_KEY, **kw)
    return dict(zip(flat[::2], flat[1::2]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- server


class RedisServer:
    """A redis-server child process on 127.0.0.1."""

    def __init__(self, test: TestCase, *extra: str, port: Optional[int] = None, tls: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            test.fail(
                "redis-server is not installed; these tests need it "
                "(install with: apt-get install -y redis-server)"
            )
        self.binary = binary
        self.test = test
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="rtcauthd-redis-")
        test.addCleanup(shutil.rmtree, self.dir, True)
        self.extra = list(extra)
        self.tls = tls
        self.password: Optional[str] = None
        if "--requirepass" in extra:
            self.password = extra[extra.index("--requirepass") + 1]
        self.proc: Optional[subprocess.Popen] = None

    def args(self) -> list[str]:
        port_args = ["--port", str(self.port)]
        if self.tls:
            port_args = ["--port", "0", "--tls-port", str(self.port)]
        return [
            self.binary, *port_args, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", self.dir, "--dbfilename", "dump.rdb", "--daemonize", "no", *self.extra,
        ]

    @inlineCallbacks
    def start(self):
        log = open(os.path.join(self.dir, "redis.log"), "ab")
        self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        log.close()
        self.test.addCleanup(self.kill)
        yield wait_until(self.ready, what=f"redis-server on port {self.port}")

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            with open(os.path.join(self.dir, "redis.log"), "rb") as f:
                raise AssertionError("redis-server exited:\n" + f.read().decode(errors="replace"))
        if self.tls:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False
        try:
            return raw(self.port, "PING", password=self.password) == "PONG"
        except (OSError, RespError):
            return False

    def shutdown(self, save: bool = False) -> None:
        """Stop the server (optionally saving dump.rdb so that a restart keeps the data)."""
        try:
            raw(self.port, "SHUTDOWN", "SAVE" if save else "NOSAVE", password=self.password)
        except (OSError, ConnectionError):
            pass  # the server closes the connection instead of answering
        assert self.proc is not None
        self.proc.wait(timeout=10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def wait_until(check: Callable[[], bool], *, what: str, timeout: float = 15.0) -> Deferred:
    """Poll ``check`` on the real reactor until it is true (fails the test after ``timeout``)."""

    @inlineCallbacks
    def poll():
        deadline = reactor.seconds() + timeout
        while not check():
            if reactor.seconds() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            yield deferLater(reactor, 0.02, lambda: None)

    return poll()
