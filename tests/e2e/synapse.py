"""Real Synapse homeservers for the end-to-end suite: install, configure, run, talk to.

Fakes prove rtcauthd matches our reading of the protocol; a real Synapse proves the calls
work.  Synapse runs from its own cached virtualenv (``scripts/synapse-venv``), on loopback
with SQLite, with a TLS federation listener whose port is part of its server name
(``127.0.0.1:PORT``) and whose certificate comes from a test CA, so rtcauthd verifies it
through ``RTCAUTH_CA_FILE`` instead of switching checks off.

Each also has rtcauthd registered as its application service (``AppService``: the
registration file, the MSC4502/MSC4512/MSC4143 flags and a ``matrix_rtc`` transport), and
the two federate with each other (docs/appservice-synapse.md#tests).

The homeservers are started once per test run and shared by every test (each test
registers its own users and creates its own rooms).  They are ``subprocess.Popen``
children, not reactor processes, precisely so they can outlive one trial test without
leaving selectables in the reactor; they are stopped at interpreter exit and, should the
test runner die, by ``PR_SET_PDEATHSIG``.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from typing import Mapping, Optional
from urllib.parse import quote, urlencode

import attr
from twisted.internet import defer, error
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.trial.unittest import FailTest, SkipTest
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers


from rtcauthd.outbound.client import BytesProducer
from tests.blackbox.harness import REPO_ROOT, HTTPResult, free_port, timeout_after
from tests.support.certs import TestCA

log = Logger()

#: The Synapse release these tests were written and measured against.
SYNAPSE_VERSION = "1.163.2"

#: Explicit opt-out; any other value (or none) runs the suite.
SKIP_FLAG = "RTCAUTH_SKIP_SYNAPSE"

#: Generous bounds for a shared 2-core machine; deadlines, never asserted durations.
INSTALL_DEADLINE = 900.0
READY_DEADLINE = 90.0
STOP_DEADLINE = 15.0
REQUEST_DEADLINE = 15.0

CALL_MEMBER = "org.matrix.msc3401.call.member"


def skip_reason() -> Optional[str]:
    """Why the suite is skipped, or None; only the explicit flag skips."""
    if os.environ.get(SKIP_FLAG) == "1":
        return f"{SKIP_FLAG}=1: end-to-end tests against a real Synapse switched off"
    return None


# ---------------------------------------------------------------------------------------
# installation

_venv: Optional[str] = None


def ensure_venv() -> str:
    """The Synapse virtualenv, created by ``scripts/synapse-venv`` if it is not cached.

    Blocking on purpose: it runs once, before anything listens.  A failed install fails
    the test with the script's output; it never turns into a skip.
    """
    global _venv
    if _venv is not None:
        return _venv
    script = os.path.join(REPO_ROOT, "scripts", "synapse-venv")
    env = dict(os.environ, RTCAUTH_SYNAPSE_VERSION=SYNAPSE_VERSION)
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [script], env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=INSTALL_DEADLINE,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FailTest(f"could not install Synapse with {script}: {e!r} (set {SKIP_FLAG}=1 to skip)")
    output = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    if proc.returncode != 0:
        raise FailTest(
            f"{script} failed (exit {proc.returncode}); Synapse {SYNAPSE_VERSION} is needed from PyPI "
            f"(set {SKIP_FLAG}=1 to skip these tests explicitly):\n{output}"
        )
    venv = proc.stdout.decode().strip().splitlines()[-1]
    python = os.path.join(venv, "bin", "python")
    if not os.access(python, os.X_OK):
        raise FailTest(f"{script} printed {venv!r}, which has no bin/python:\n{output}")
    if "installed in" in output:
        seconds = time.monotonic() - started
        log.info("Synapse virtualenv created in {seconds:.1f}s", seconds=seconds)
        sys.stderr.write(f"[e2e] Synapse {SYNAPSE_VERSION} virtualenv created in {seconds:.1f}s: {venv}\n")
    _venv = venv
    return venv


# ---------------------------------------------------------------------------------------
# rtcauthd as Synapse's application service


#: The only MSC4502 scope Synapse 1.163.2 knows (lets the AS call is_joined).
IS_JOINED_SCOPE = "urn:matrix:client:io.element.msc4502:rooms:is_joined"
PROXY_PREFIX = "rtc/livekit"


@attr.s(auto_attribs=True, frozen=True)
class AppService:
    """rtcauthd registered with one Synapse (docs/appservice-synapse.md#registration).

    ``service_url`` is the daemon's origin (``proxy_url``, and ``url`` when ``ping`` is
    set); ``sfu_url`` is the LiveKit URL the homeserver advertises and the daemon must be
    configured with byte for byte.  Ports are reserved before Synapse starts because
    Synapse reads them once, so each test runs its daemon and fake SFU on them.
    """

    id: str
    server_name: str
    service_port: int
    sfu_port: int
    ping: bool
    as_token: str = attr.ib(repr=False, factory=lambda: "as_" + secrets.token_hex(16))
    hs_token: str = attr.ib(repr=False, factory=lambda: "hs_" + secrets.token_hex(16))
    sender_localpart: str = "_rtcauthd"

    @property
    def service_url(self) -> str:
        return f"http://127.0.0.1:{self.service_port}"

    @property
    def sfu_url(self) -> str:
        return f"ws://127.0.0.1:{self.sfu_port}"

    @property
    def sender(self) -> str:
        return f"@{self.sender_localpart}:{self.server_name}"

    @property
    def transport(self) -> dict:
        """The ``matrix_rtc`` transport: ``url`` for the proxied flow, the service URL for
        clients that still use the OpenID flow (both modes side by side)."""
        return {"type": "livekit", "url": self.sfu_url, "livekit_service_url": self.service_url}

    def registration_yaml(self) -> str:
        """The registration file as an operator writes it: the namespaced keys that
        Synapse 1.163.2 reads, every local user in the (non-exclusive) namespace so the
        service may act as the user who delegated a leave."""
        users = "@.*:" + re.escape(self.server_name)
        url = json.dumps(self.service_url) if self.ping else "null"
        return "\n".join([
            f"id: {json.dumps(self.id)}",
            f"url: {url}",
            f"as_token: {json.dumps(self.as_token)}",
            f"hs_token: {json.dumps(self.hs_token)}",
            f"sender_localpart: {json.dumps(self.sender_localpart)}",
            "rate_limited: false",
            "namespaces:",
            "  users:",
            "    - exclusive: false",
            f"      regex: '{users}'",
            "io.element.msc4502.scopes:",
            f"  - {json.dumps(IS_JOINED_SCOPE)}",
            f"io.element.msc4512.proxy_prefix: {json.dumps(PROXY_PREFIX)}",
            f"io.element.msc4512.proxy_url: {json.dumps(self.service_url)}",
            "",
        ])


# ---------------------------------------------------------------------------------------
# one homeserver


#: Run the rest of argv with PR_SET_PDEATHSIG = SIGTERM (kept across exec): the homeserver
#: goes away if the test runner dies without cleaning up.  A wrapper instead of
#: ``preexec_fn``, which is unsafe once the runner has threads (Twisted's resolver pool).
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
    "except Exception:\n"
    "    pass\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


class SynapseServer:
    """One Synapse: ``server_name`` = ``127.0.0.1:<fed_port>`` served over TLS (federation
    and client resources, so ``https://<server_name>/.well-known/matrix/client`` works), plus
    a plain-HTTP client listener on ``client_url`` for the test's own calls and for
    ``LIVEKIT_CS_API_URL_OVERRIDES``.
    """

    def __init__(self, *, name: str, workdir: str, venv: str, ca: TestCA, rtc_foci_url: str,
                 appservice: Optional["AppService"] = None, federation_ca_file: Optional[str] = None,
                 fed_port: Optional[int] = None) -> None:
        self.name = name
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.venv = venv
        self.fed_port = fed_port if fed_port is not None else free_port("127.0.0.1")
        self.client_port = free_port("127.0.0.1")
        self.server_name = f"127.0.0.1:{self.fed_port}"
        self.client_url = f"http://127.0.0.1:{self.client_port}"
        self.federation_url = f"https://{self.server_name}"
        self.shared_secret = secrets.token_hex(16)
        self.db_path = os.path.join(self.workdir, "homeserver.db")
        self.log_path = os.path.join(self.workdir, "homeserver.log")
        self.stdio_path = os.path.join(self.workdir, "stdio.log")
        self.config_path = os.path.join(self.workdir, "homeserver.yaml")
        self.rtc_foci_url = rtc_foci_url
        self.appservice = appservice
        self.registration_path = os.path.join(self.workdir, "rtcauthd-registration.yaml")
        self.federation_ca_file = federation_ca_file
        self._popen: Optional[subprocess.Popen] = None
        self.spawned_at: Optional[float] = None
        self.ready_after: Optional[float] = None
        self._write_config(ca)

    def _write_config(self, ca: TestCA) -> None:
        cert_path, key_path = ca.issue(["127.0.0.1"]).write(self.workdir, "tls")
        signing_key_path = os.path.join(self.workdir, "signing.key")
        with open(signing_key_path, "w") as f:
            # any 32 bytes are an ed25519 seed; unpadded base64 as Synapse writes it
            f.write("ed25519 a_e2e " + base64.b64encode(os.urandom(32)).decode().rstrip("=") + "\n")
        log_config = {
            "version": 1,
            "formatters": {"plain": {"format": "%(asctime)s %(name)s %(levelname)s %(message)s"}},
            "handlers": {
                "file": {"class": "logging.FileHandler", "filename": self.log_path,
                         "formatter": "plain", "encoding": "utf8"},
            },
            # access lines show every call rtcauthd makes (userinfo, restart, send)
            "loggers": {"synapse.access": {"level": "INFO"}, "synapse.app": {"level": "INFO"}},
            "root": {"level": "WARNING", "handlers": ["file"]},
            "disable_existing_loggers": False,
        }
        log_config_path = os.path.join(self.workdir, "log.yaml")
        with open(log_config_path, "w") as f:
            json.dump(log_config, f, indent=1)  # JSON is YAML
        relaxed = {"per_second": 1000, "burst_count": 1000}
        config = {
            "server_name": self.server_name,
            "pid_file": os.path.join(self.workdir, "homeserver.pid"),
            "report_stats": False,
            "signing_key_path": signing_key_path,
            "media_store_path": os.path.join(self.workdir, "media"),
            "log_config": log_config_path,
            "database": {"name": "sqlite3", "args": {"database": self.db_path}},
            "tls_certificate_path": cert_path,
            "tls_private_key_path": key_path,
            "listeners": [
                {"port": self.fed_port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": True,
                 "x_forwarded": False, "resources": [{"names": ["federation", "client"], "compress": False}]},
                {"port": self.client_port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": False,
                 "x_forwarded": False, "resources": [{"names": ["client"], "compress": False}]},
            ],
            "public_baseurl": self.client_url + "/",
            "extra_well_known_client_content": {
                "org.matrix.msc4143.rtc_foci": [{"type": "livekit", "livekit_service_url": self.rtc_foci_url}],
            },
            "registration_shared_secret": self.shared_secret,
            "macaroon_secret_key": secrets.token_hex(16),
            "form_secret": secrets.token_hex(16),
            "max_event_delay_duration": "24h",
            "rc_delayed_event_mgmt": relaxed,
            "rc_message": relaxed,
            "rc_registration": relaxed,
            "rc_joins": {"local": relaxed, "remote": relaxed},
            "rc_login": {"address": relaxed, "account": relaxed, "failed_attempts": relaxed},
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "presence": {"enabled": False},
            "enable_metrics": False,
            "url_preview_enabled": False,
        }
        if self.federation_ca_file is not None:
            # federate with the other test homeservers: trust the test CA, and allow
            # loopback addresses, which Synapse blocks by default
            config["federation_custom_ca_list"] = [self.federation_ca_file]
            config["ip_range_blacklist"] = []
        if self.appservice is not None:
            with open(self.registration_path, "w") as f:
                f.write(self.appservice.registration_yaml())
            config["app_service_config_files"] = [self.registration_path]
            config["experimental_features"] = {
                "msc4502_enabled": True,  # is_joined
                "msc4512_enabled": True,  # the rtc/livekit proxy and fed_proxy
                "msc4143_enabled": True,  # /rtc/transports
            }
            config["matrix_rtc"] = {"transports": [self.appservice.transport]}
        with open(self.config_path, "w") as f:
            json.dump(config, f, indent=1)

    # -- life cycle -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def spawn(self) -> None:
        python = os.path.join(self.venv, "bin", "python")
        self.spawned_at = time.monotonic()
        with open(self.stdio_path, "ab") as out:
            self._popen = subprocess.Popen(
                [python, "-c", _DIE_WITH_PARENT,
                 python, "-m", "synapse.app.homeserver", "--config-path", self.config_path],
                cwd=self.workdir,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
                     "HOME": self.workdir, "PYTHONDONTWRITEBYTECODE": "1"},
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )

    def describe(self) -> str:
        """Exit status and logs, for failure messages."""
        status = "running" if self.running else f"exit status {self._popen.returncode if self._popen else None}"
        parts = [f"synapse {self.name} ({self.server_name}, {status})"]
        for path in (self.stdio_path, self.log_path):
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            parts.append(f"--- {path} (last 6000 chars)\n{text[-6000:]}")
        return "\n".join(parts)

    @defer.inlineCallbacks
    def wait_ready(self, reactor):
        """Poll ``/_matrix/client/versions`` until 200 with MSC4140 advertised."""
        client = _HTTP(reactor)
        deadline = reactor.seconds() + READY_DEADLINE
        last = "no attempt yet"
        try:
            while True:
                if not self.running:
                    raise FailTest("Synapse exited during start-up\n" + self.describe())
                if reactor.seconds() > deadline:
                    raise FailTest(f"Synapse not ready within {READY_DEADLINE:g}s ({last})\n" + self.describe())
                try:
                    code, body = yield client.request("GET", self.client_url + "/_matrix/client/versions", timeout=2)
                except (error.ConnectError, FailTest) as e:
                    last = repr(e)
                else:
                    if code == 200:
                        features = json.loads(body).get("unstable_features", {})
                        if not features.get("org.matrix.msc4140"):
                            raise FailTest(
                                "Synapse does not advertise org.matrix.msc4140 although "
                                f"max_event_delay_duration is set: {body!r}\n" + self.describe()
                            )
                        self.ready_after = time.monotonic() - self.spawned_at
                        return self
                    last = f"HTTP {code}"
                yield deferLater(reactor, 0.1, lambda: None)
        finally:
            yield client.close()

    def stop(self) -> None:
        if self._popen is None or self._popen.poll() is not None:
            return
        self._popen.send_signal(signal.SIGTERM)
        try:
            self._popen.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            self._popen.wait()

    # -- what Synapse saw -----------------------------------------------------------------

    def log_mark(self) -> int:
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def access_lines(self, since: int = 0, *, containing: str = "") -> list[str]:
        """Access-log lines (one per request Synapse answered) written after ``since``."""
        with open(self.log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode("utf-8", "replace")
        return [line for line in text.splitlines() if "synapse.access" in line and containing in line]

    def expire_openid_token(self, token: str) -> None:
        """Make a real OpenID token expired (Synapse's lifetime is a fixed hour).

        Synapse reads ``open_id_tokens`` on every userinfo call, so this is exactly what
        Synapse sees an hour later.
        """
        db = sqlite3.connect(self.db_path, timeout=10)
        try:
            with db:
                cur = db.execute(
                    "UPDATE open_id_tokens SET ts_valid_until_ms = ? WHERE token = ?",
                    (int(time.time() * 1000) - 60_000, token),
                )
            if cur.rowcount != 1:
                raise FailTest(f"OpenID token not found in {self.db_path}")
        finally:
            db.close()


# ---------------------------------------------------------------------------------------
# the shared pair of homeservers


@attr.s(auto_attribs=True)
class SynapseCluster:
    """A full-access and a restricted Synapse sharing one test CA."""

    full: SynapseServer
    restricted: SynapseServer
    ca: TestCA
    ca_file: str
    rtc_foci_port: int

    def stop(self) -> None:
        for hs in (self.full, self.restricted):
            hs.stop()

    def check_running(self) -> None:
        for hs in (self.full, self.restricted):
            if not hs.running:
                raise FailTest("a shared Synapse has died\n" + hs.describe())


_cluster: Optional[SynapseCluster] = None
_cluster_failure: Optional[str] = None


@defer.inlineCallbacks
def get_cluster(reactor):
    """The running shared homeservers, started on first use (install included)."""
    global _cluster, _cluster_failure
    reason = skip_reason()
    if reason:
        raise SkipTest(reason)
    if _cluster_failure is not None:
        raise FailTest("the shared Synapse homeservers failed to start earlier:\n" + _cluster_failure)
    if _cluster is not None:
        _cluster.check_running()
        return _cluster
    try:
        venv = ensure_venv()
        base = os.path.abspath("e2e-synapse")  # inside trial's temp directory
        os.makedirs(base, exist_ok=True)
        ca = TestCA("rtcauthd e2e CA")
        ca_file = ca.write_ca(base)
        foci_port = free_port("127.0.0.1")
        foci = f"http://127.0.0.1:{foci_port}"
        servers = {}
        # "full" registers rtcauthd with ``url`` set (AS ping, transactions), "restricted"
        # with ``url: null`` as in production; both proxy rtc/livekit to their own daemon.
        for name, ping in (("full", True), ("restricted", False)):
            fed_port = free_port("127.0.0.1")
            appservice = AppService(id="rtcauthd", server_name=f"127.0.0.1:{fed_port}",
                                    service_port=free_port("127.0.0.1"), sfu_port=free_port("127.0.0.1"), ping=ping)
            servers[name] = SynapseServer(name=name, workdir=os.path.join(base, name), venv=venv, ca=ca,
                                          rtc_foci_url=foci, appservice=appservice, federation_ca_file=ca_file,
                                          fed_port=fed_port)
        full, restricted = servers["full"], servers["restricted"]
        cluster = SynapseCluster(full, restricted, ca, ca_file, foci_port)
        atexit.register(cluster.stop)
        full.spawn()
        restricted.spawn()
        yield defer.gatherResults([full.wait_ready(reactor), restricted.wait_ready(reactor)], consumeErrors=True)
    except defer.FirstError as e:
        _cluster_failure = str(e.subFailure.value)
        cluster.stop()
        e.subFailure.raiseException()
    except FailTest as e:
        _cluster_failure = str(e)
        raise
    log.info("Synapse ready after {full:.1f}s / {restricted:.1f}s",
             full=full.ready_after, restricted=restricted.ready_after)
    sys.stderr.write(
        f"[e2e] Synapse {SYNAPSE_VERSION} ready after {full.ready_after:.1f}s (full) / "
        f"{restricted.ready_after:.1f}s (restricted), started in parallel\n"
    )
    _cluster = cluster
    return cluster


# ---------------------------------------------------------------------------------------
# client-server API calls the tests make as a Matrix client


class _HTTP:
    """Plain HTTP with no kept-alive connections (nothing left in the reactor after a test)."""

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self._pool = HTTPConnectionPool(reactor, persistent=False)
        self._agent = Agent(reactor, pool=self._pool)

    def request(self, method: str, url: str, body: Optional[bytes] = None,
                headers: Optional[Mapping[str, str]] = None, *, timeout: float = REQUEST_DEADLINE):
        h = Headers()
        for k, v in (headers or {}).items():
            h.addRawHeader(k, v)
        d = self._agent.request(method.encode(), url.encode(), h, BytesProducer(body) if body is not None else None)
        d.addCallback(lambda r: readBody(r).addCallback(lambda data: (r.code, data)))
        return timeout_after(self.reactor, d, timeout, f"{method} {url.split('?')[0]}")

    def fetch(self, method: str, url: str, body: Optional[bytes] = None,
              headers: Optional[Mapping[str, str]] = None, *, timeout: float = REQUEST_DEADLINE):
        """Like ``request`` but fires with an HTTPResult (status, headers, body)."""
        h = Headers()
        for k, v in (headers or {}).items():
            h.addRawHeader(k, v)
        d = self._agent.request(method.encode(), url.encode(), h, BytesProducer(body) if body is not None else None)
        d.addCallback(lambda r: readBody(r).addCallback(lambda data: HTTPResult(r.code, r.headers, data)))
        return timeout_after(self.reactor, d, timeout, f"{method} {url.split('?')[0]}")

    def close(self):
        return self._pool.closeCachedConnections()


@attr.s(auto_attribs=True, frozen=True)
class MatrixUser:
    user_id: str
    access_token: str = attr.ib(repr=False)
    device_id: str


class MatrixClient:
    """The calls a MatrixRTC client makes to its homeserver (over the plain client port)."""

    def __init__(self, reactor, hs: SynapseServer) -> None:
        self.hs = hs
        self._http = _HTTP(reactor)

    def close(self):
        return self._http.close()

    @defer.inlineCallbacks
    def call(self, method: str, path: str, body=None, *, user: Optional[MatrixUser] = None,
             query: Optional[Mapping[str, str]] = None, expect: Optional[int] = 200):
        url = self.hs.client_url + path + ("?" + urlencode(query) if query else "")
        headers = {"Content-Type": "application/json"}
        if user is not None:
            headers["Authorization"] = "Bearer " + user.access_token
        data = json.dumps(body).encode() if body is not None else None
        code, raw = yield self._http.request(method, url, data, headers)
        if expect is not None and code != expect:
            raise FailTest(f"Synapse {self.hs.name}: {method} {path} → {code} {raw[:500]!r}, expected {expect}")
        parsed = json.loads(raw) if raw.strip() else None
        return parsed if expect is not None else (code, parsed)

    @defer.inlineCallbacks
    def register(self, localpart: str) -> "defer.Deferred[MatrixUser]":
        """A new user through the shared-secret admin API."""
        nonce = (yield self.call("GET", "/_synapse/admin/v1/register"))["nonce"]
        password = secrets.token_hex(8)
        mac = hmac.new(self.hs.shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join([nonce.encode(), localpart.encode(), password.encode(), b"notadmin"]))
        got = yield self.call("POST", "/_synapse/admin/v1/register", {
            "nonce": nonce, "username": localpart, "password": password, "admin": False, "mac": mac.hexdigest(),
        })
        return MatrixUser(got["user_id"], got["access_token"], got["device_id"])

    def fetch(self, method: str, path: str, body: Optional[bytes] = None, *, token: Optional[str] = None,
              headers: Optional[Mapping[str, str]] = None, query: Optional[Mapping[str, str]] = None):
        """A raw exchange with this homeserver's client port (any answer, headers kept)."""
        url = self.hs.client_url + path + ("?" + urlencode(query) if query else "")
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = "Bearer " + token
        return self._http.fetch(method, url, body, h)

    def openid_token(self, user: MatrixUser):
        """``{"access_token","token_type","matrix_server_name","expires_in"}`` as clients get it."""
        return self.call("POST", f"/_matrix/client/v3/user/{quote(user.user_id, safe='')}/openid/request_token",
                         {}, user=user)

    @defer.inlineCallbacks
    def create_call_room(self, user: MatrixUser) -> "defer.Deferred[str]":
        """A public room where anyone may send call memberships (power level 0)."""
        got = yield self.call("POST", "/_matrix/client/v3/createRoom", {
            "preset": "public_chat",
            "power_level_content_override": {"events": {CALL_MEMBER: 0}},
        }, user=user)
        return got["room_id"]

    def join(self, user: MatrixUser, room_id: str):
        return self.call("POST", f"/_matrix/client/v3/join/{quote(room_id, safe='')}", {}, user=user)

    def _state_path(self, room_id: str, event_type: str, state_key: str) -> str:
        return (f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/state/"
                f"{quote(event_type, safe='')}/{quote(state_key, safe='')}")

    def put_state(self, user: MatrixUser, room_id: str, event_type: str, state_key: str, content,
                  *, delay_ms: Optional[int] = None):
        """Send a state event, or schedule it (MSC4140) → ``{"delay_id": ...}``."""
        query = {"org.matrix.msc4140.delay": str(delay_ms)} if delay_ms is not None else None
        return self.call("PUT", self._state_path(room_id, event_type, state_key), content, user=user, query=query)

    def get_state(self, user: MatrixUser, room_id: str, event_type: str, state_key: str):
        return self.call("GET", self._state_path(room_id, event_type, state_key), user=user)

    @defer.inlineCallbacks
    def state_events(self, user: MatrixUser, room_id: str, event_type: str, state_key: str):
        """Every event of that type and state key in the room's timeline, oldest first."""
        got = yield self.call("GET", f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/messages",
                              user=user, query={"dir": "b", "limit": "500"})
        events = [e for e in got["chunk"] if e.get("type") == event_type and e.get("state_key") == state_key]
        return list(reversed(events))
