"""RedisStore against a real redis-server on loopback (docs/redis-format.md).

A redis-server binary is required: without it these tests FAIL (install it with
``apt-get install -y redis-server``). The server is started per test on a free port
with persistence off except where a test saves explicitly, and checked through a tiny
independent RESP client (both in :mod:`tests.support.redis_server`), so the stored bytes
are asserted exactly.
"""

from __future__ import annotations

import calendar
import gc
import os
from typing import Any

import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.ssl import Certificate
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.protocols.portforward import ProxyFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import BrowserLikePolicyForHTTPS

import rtcauthd.store.redis as redis_module
from rtcauthd.leave.record import JobParams
from rtcauthd.outbound.errors import FailureKind, OutboundError
from rtcauthd.store.model import StoredJob, encode_field, encode_value
from rtcauthd.store.redis import JOBS_KEY, PING_STEP, RedisStore
from rtcauthd.store.redis_url import RedisURLError, parse_redis_url
from tests.support.certs import TestCA
from tests.support.redis_server import RedisServer, free_port, raw, raw_hgetall, wait_until

T_2026 = calendar.timegm((2026, 7, 23, 10, 15, 30, 0, 0, 0))
ROOM = "krj2dgxw2K6EOm9he4GfQJ6JsSVWfJ8a7BkyjZcSmxs"
IDENTITY = "J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU"

#: what the Go service writes for these jobs (docs/redis-format.md#key-field-value), incl. a Berlin-time host
GO_VALUES = {
    b'["room-a","ident-a"]': (
        b'{"Params":{"DelayId":"syd_a","DelayTimeout":8000000000,"ServerName":"example.com",'
        b'"LiveKitRoom":"room-a","LiveKitIdentity":"ident-a"},"RestartedAt":"2026-07-23T10:15:30.123456789Z"}'
    ),
    b'["room-b","ident-b"]': (
        b'{"Params":{"DelayId":"syd_b","DelayTimeout":30000000000,"ServerName":"matrix.org",'
        b'"LiveKitRoom":"room-b","LiveKitIdentity":"ident-b"},"RestartedAt":"2026-07-23T12:15:30.5+02:00"}'
    ),
    b'["room-c","ident-c"]': (
        b'{"params":{"delayid":"syd_c","DELAYTIMEOUT":1000000,"servername":"c.example",'
        b'"livekitroom":"room-c","livekitidentity":"ident-c","Future":1},"restartedat":"2026-07-23T05:15:30-05:00"}'
    ),
}
UNPARSABLE = {
    b'["room-x","ident-x"]': b'{"Params":{"DelayTimeout":"8000000000"}}',
    b'["room-y","ident-y"]': b"not json",
}


def job(room: str = ROOM, identity: str = IDENTITY, delay_id: str = "syd_integration_1", at: float = T_2026 + 0.123456) -> StoredJob:
    return StoredJob(JobParams(delay_id, 8_000_000_000, "example.com", room, identity), at)


class RedisTestBase(TestCase):
    def setUp(self) -> None:
        # Reconnect quickly so the outage tests take a second, not half a minute.
        self.patch(txredisapi.RedisFactory, "initialDelay", 0.05)
        self.patch(txredisapi.RedisFactory, "maxDelay", 0.2)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def store(self, url: str, **kw: Any) -> RedisStore:
        kw.setdefault("op_timeout", 0.5)
        kw.setdefault("restore_wait", 1.0)
        kw.setdefault("retry_interval", 0.1)
        store = RedisStore.from_url(url, **kw)
        self.addCleanup(store.close)
        return store

    def log_formats(self) -> list[str]:
        return [e["log_format"] for e in self.events if e.get("log_namespace") == "rtcauthd.store.redis"]

    def count_logs(self, fragment: str) -> int:
        return sum(fragment in fmt for fmt in self.log_formats())

    def assertNoPassword(self, secret: str) -> None:
        for e in self.events:
            text = repr({k: v for k, v in e.items() if k != "log_logger"})
            self.assertNotIn(secret, text)


# --------------------------------------------------------------------------- tests


class RoundTripTests(RedisTestBase):
    @inlineCallbacks
    def test_put_load_delete_exact_bytes(self):
        server = RedisServer(self)
        yield server.start()
        raw(server.port, "CONFIG", "RESETSTAT")
        store = self.store(f"redis://127.0.0.1:{server.port}/0")

        result = yield store.put(job())
        self.assertIsNone(result)
        self.assertEqual(
            raw_hgetall(server.port),
            {
                b'["krj2dgxw2K6EOm9he4GfQJ6JsSVWfJ8a7BkyjZcSmxs","J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU"]': (
                    b'{"Params":{"DelayId":"syd_integration_1","DelayTimeout":8000000000,'
                    b'"ServerName":"example.com","LiveKitRoom":"krj2dgxw2K6EOm9he4GfQJ6JsSVWfJ8a7BkyjZcSmxs",'
                    b'"LiveKitIdentity":"J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU"},'
                    b'"RestartedAt":"2026-07-23T10:15:30.123456Z"}'
                )
            },
        )
        loaded = yield store.load_all()
        self.assertEqual(loaded, [job()])

        # the latest write for a key wins; other keys are separate fields
        yield store.put(job(delay_id="syd_2"))
        yield store.put(job(identity="@alice:example.com:DEVICE123"))
        stored = raw_hgetall(server.port)
        self.assertEqual(len(stored), 2)
        self.assertIn(b'"DelayId":"syd_2"', stored[encode_field(ROOM, IDENTITY).encode()])
        self.assertIn(b'["krj2dgxw2K6EOm9he4GfQJ6JsSVWfJ8a7BkyjZcSmxs","@alice:example.com:DEVICE123"]', stored)

        yield store.delete(ROOM, IDENTITY)
        yield store.delete("no-such-room", "nobody")
        self.assertEqual(list(raw_hgetall(server.port)), [encode_field(ROOM, "@alice:example.com:DEVICE123").encode()])

        yield store.ping()

        # Only the four commands upstream uses; in particular no SELECT for db 0.
        stats = raw(server.port, "INFO", "commandstats").decode()
        used = {line.split(":")[0][len("cmdstat_"):] for line in stats.splitlines() if line.startswith("cmdstat_")}
        ours = {name for name in used if not name.startswith(("info", "config"))}  # the raw client's
        self.assertEqual(ours, {"ping", "hset", "hdel", "hgetall"})

    @inlineCallbacks
    def test_unescaped_field_is_byte_exact(self):
        # v0.7 writes the field as it hashes: no HTML escaping (docs/redis-format.md#key-field-value)
        server = RedisServer(self)
        yield server.start()
        store = self.store(f"redis://127.0.0.1:{server.port}")
        yield store.put(job(room="<r&r>", identity="é\u2028"))
        self.assertEqual(list(raw_hgetall(server.port)), ['["<r&r>","é\u2028"]'.encode()])
        yield store.delete("<r&r>", "é\u2028")
        self.assertEqual(raw_hgetall(server.port), {})

    @inlineCallbacks
    def test_go_written_records_load_and_unparsable_stay(self):
        server = RedisServer(self)
        yield server.start()
        for field, value in {**GO_VALUES, **UNPARSABLE}.items():
            raw(server.port, "HSET", JOBS_KEY, field, value)
        store = self.store(f"redis://127.0.0.1:{server.port}/0")

        loaded = yield store.load_all()
        by_id = {j.params.delay_id: j for j in loaded}
        self.assertEqual(sorted(by_id), ["syd_a", "syd_b", "syd_c"])
        self.assertAlmostEqual(by_id["syd_a"].restarted_at, T_2026 + 0.123456789, places=6)
        self.assertEqual(by_id["syd_b"], StoredJob(JobParams("syd_b", 30_000_000_000, "matrix.org", "room-b", "ident-b"), T_2026 + 0.5))
        self.assertEqual(by_id["syd_c"], StoredJob(JobParams("syd_c", 1_000_000, "c.example", "room-c", "ident-c"), float(T_2026)))

        # unparsable entries are skipped with a warning and left in Redis
        stored = raw_hgetall(server.port)
        for field, value in UNPARSABLE.items():
            self.assertEqual(stored[field], value)
        self.assertEqual(self.count_logs("Skipping unparsable job record"), 2)

    @inlineCallbacks
    def test_a_restarted_service_loads_what_the_previous_one_wrote(self):
        server = RedisServer(self)
        yield server.start()
        url = f"redis://127.0.0.1:{server.port}/0"
        first = RedisStore.from_url(url, op_timeout=0.5)
        yield first.put(job())
        yield first.put(job(room="other"))
        yield first.close()
        second = self.store(url)
        loaded = yield second.load_all()
        self.assertEqual(sorted(loaded, key=lambda j: j.params.room), [job(), job(room="other")])


class URLTests(RedisTestBase):
    @inlineCallbacks
    def test_password_and_db_number(self):
        server = RedisServer(self, "--requirepass", "s3cr@t pass")
        yield server.start()
        store = self.store(f"redis://:s3cr%40t%20pass@127.0.0.1:{server.port}/3")
        yield store.put(job())
        self.assertEqual(list(raw_hgetall(server.port, password="s3cr@t pass", db=3)), [encode_field(ROOM, IDENTITY).encode()])
        self.assertEqual(raw_hgetall(server.port, password="s3cr@t pass"), {})
        loaded = yield store.load_all()
        self.assertEqual(loaded, [job()])
        self.assertNoPassword("s3cr@t")

    @inlineCallbacks
    def test_username_password_and_query_db(self):
        server = RedisServer(self, "--requirepass", "pw")
        yield server.start()
        store = self.store(f"redis://default:pw@127.0.0.1:{server.port}/1?db=2")
        yield store.put(job())
        self.assertEqual(len(raw_hgetall(server.port, password="pw", db=2)), 1)

    @inlineCallbacks
    def test_wrong_password_never_fails_the_caller(self):
        server = RedisServer(self, "--requirepass", "right")
        yield server.start()
        self.addCleanup(self._collect_auth_errors)  # runs after the store is closed
        store = self.store(f"redis://:hunter2-wrong@127.0.0.1:{server.port}/0")
        loaded = yield store.load_all()
        self.assertEqual(loaded, [])
        result = yield store.put(job())
        self.assertIsNone(result)
        self.assertFalse(store.available)
        self.assertEqual(store.pending_count, 1)
        self.assertEqual(raw_hgetall(server.port, password="right"), {})
        self.assertNoPassword("hunter2")

    @inlineCallbacks
    def _collect_auth_errors(self):
        """txredisapi's refused AUTH surfaces as unhandled Deferred errors when those
        Deferreds are garbage-collected; collect them here, or they are reported against
        whichever test runs next."""
        for _ in range(10):
            yield deferLater(reactor, 0.05, lambda: None)
            gc.collect()
            self.flushLoggedErrors(ValueError)

    @inlineCallbacks
    def test_unix_socket(self):
        server = RedisServer(self)
        sock = os.path.join(server.dir, "redis.sock")
        server.extra += ["--unixsocket", sock]
        yield server.start()
        store = self.store(f"unix://{sock}?db=4")
        yield store.put(job())
        self.assertEqual(len(raw_hgetall(server.port, db=4)), 1)

    @inlineCallbacks
    def test_tls_verified_with_the_given_trust_root(self):
        ca = TestCA()
        server = RedisServer(self, tls=True)
        cert, key = ca.issue(["localhost", "127.0.0.1"]).write(server.dir, "server")
        server.extra += ["--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file",
                         ca.write_ca(server.dir), "--tls-auth-clients", "no"]
        yield server.start()
        policy = BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(ca.cert_pem))
        store = self.store(f"rediss://localhost:{server.port}/0", tls_policy=policy)
        yield store.put(job())
        loaded = yield store.load_all()
        self.assertEqual(loaded, [job()])
        self.assertTrue(store.available)

    @inlineCallbacks
    def test_tls_untrusted_certificate_is_not_used(self):
        ca = TestCA()
        server = RedisServer(self, tls=True)
        cert, key = ca.issue(["localhost"]).write(server.dir, "server")
        server.extra += ["--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file",
                         ca.write_ca(server.dir), "--tls-auth-clients", "no"]
        yield server.start()
        store = self.store(f"rediss://localhost:{server.port}/0")  # platform trust only
        loaded = yield store.load_all()
        self.assertEqual(loaded, [])
        yield store.put(job())
        self.assertFalse(store.available)
        error = yield self.assertFailure(store.ping(), OutboundError)
        self.assertEqual(error.step, PING_STEP)


class OutageTests(RedisTestBase):
    @inlineCallbacks
    def test_redis_stopped_mid_run_then_restarted(self):
        server = RedisServer(self)
        yield server.start()
        store = self.store(f"redis://127.0.0.1:{server.port}/0")
        yield store.load_all()
        yield store.put(job(room="a"))
        yield store.put(job(room="b"))
        server.shutdown(save=True)  # keeps a and b for the restart

        # Writes while Redis is gone return (bounded) and never fail.
        yield store.put(job(room="c"))
        yield store.delete("a", IDENTITY)
        yield store.put(job(room="b", delay_id="newer"))
        yield store.put(job(room="d"))
        yield store.delete("d", IDENTITY)
        self.assertFalse(store.available)
        self.assertEqual(store.pending_count, 4)
        ping = store.ping()
        error = yield self.assertFailure(ping, OutboundError)
        self.assertEqual((error.kind, error.step), (FailureKind.TIMEOUT, PING_STEP))

        yield server.start()
        yield wait_until(lambda: store.available and store.pending_count == 0, what="pending writes to land")
        stored = raw_hgetall(server.port)
        self.assertEqual(
            {field: encode_value(job_) for field, job_ in [
                (encode_field("b", IDENTITY).encode(), job(room="b", delay_id="newer")),
                (encode_field("c", IDENTITY).encode(), job(room="c")),
            ]},
            {k: v.decode() for k, v in stored.items()},
        )
        self.assertEqual(self.count_logs("is unavailable"), 1)
        self.assertEqual(self.count_logs("is available again"), 1)

        yield store.put(job(room="e"))
        self.assertIn(encode_field("e", IDENTITY).encode(), raw_hgetall(server.port))

    @inlineCallbacks
    def test_redis_down_at_start_restores_late(self):
        server = RedisServer(self)
        yield server.start()
        for field, value in GO_VALUES.items():
            raw(server.port, "HSET", JOBS_KEY, field, value)
        proxy_port = free_port()  # nothing listens here until the "outage" ends
        store = self.store(f"redis://127.0.0.1:{proxy_port}/0")

        late: list[list[StoredJob]] = []
        loaded = yield store.load_all(on_late=late.append)
        self.assertEqual(loaded, [])
        self.assertFalse(store.available)

        # the daemon goes on: a job is replaced and another one finished meanwhile
        yield store.put(StoredJob(JobParams("syd_a2", 8_000_000_000, "example.com", "room-a", "ident-a"), T_2026 + 100))
        yield store.delete("room-b", "ident-b")

        port = reactor.listenTCP(proxy_port, ProxyFactory("127.0.0.1", server.port), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        yield wait_until(lambda: late and store.pending_count == 0, what="late restore")

        self.assertEqual([[j.params.delay_id for j in batch] for batch in late], [["syd_c"]])
        stored = raw_hgetall(server.port)
        self.assertEqual(sorted(stored), [b'["room-a","ident-a"]', b'["room-c","ident-c"]'])
        self.assertIn(b'"DelayId":"syd_a2"', stored[b'["room-a","ident-a"]'])
        self.assertEqual(self.count_logs("is unavailable"), 1)
        self.assertEqual(self.count_logs("is available again"), 1)

    @inlineCallbacks
    def test_close_writes_what_is_pending_when_redis_came_back_unnoticed(self):
        server = RedisServer(self)
        yield server.start()
        store = self.store(f"redis://127.0.0.1:{server.port}/0", retry_interval=5.0)
        yield store.load_all()
        yield store.put(job(room="a"))
        server.kill()
        yield store.put(job(room="b"))  # queued: Redis is gone
        self.assertFalse(store.available)
        yield server.start()  # back, but our probe has not looked yet
        yield store.close()  # the SIGTERM path
        self.assertIn(encode_field("b", IDENTITY).encode(), raw_hgetall(server.port))
        self.assertEqual(self.count_logs("could not be written to Redis before shutdown"), 0)

    @inlineCallbacks
    def test_password_behind_a_proxy_that_drops_recovers(self):
        """A refused or dropped AUTH makes txredisapi stop reconnecting for good; the store
        must start over by itself once Redis is reachable again."""
        server = RedisServer(self, "--requirepass", "pw")
        yield server.start()
        proxy_port = free_port()
        listener = reactor.listenTCP(proxy_port, ProxyFactory("127.0.0.1", server.port), interface="127.0.0.1")
        self.addCleanup(lambda: listener.stopListening() if listener.connected else None)
        store = self.store(f"redis://:pw@127.0.0.1:{proxy_port}/0", retry_interval=0.2)
        self.patch(redis_module, "REBUILD_INTERVAL", 0.5)
        yield store.load_all()
        server.kill()  # the proxy still accepts, then drops every connection (and its AUTH)
        yield store.put(job(room="b"))
        self.assertFalse(store.available)
        yield deferLater(reactor, 1.0, lambda: None)
        yield server.start()
        yield wait_until(lambda: store.available and store.pending_count == 0, what="writes to land", timeout=20)
        self.assertIn(encode_field("b", IDENTITY).encode(), raw_hgetall(server.port, password="pw"))
        for _ in range(5):  # the dropped AUTH attempts surface as GC-time errors
            gc.collect()
            self.flushLoggedErrors()
            yield deferLater(reactor, 0.05, lambda: None)

    @inlineCallbacks
    def test_close_while_down_does_not_hang(self):
        store = self.store(f"redis://127.0.0.1:{free_port()}/0")
        loaded = yield store.load_all()
        self.assertEqual(loaded, [])
        yield store.put(job())
        yield store.close()
        self.assertEqual(self.count_logs("could not be written to Redis before shutdown"), 1)


class ParseURLTests(SynchronousTestCase):
    """go-redis URL forms and upstream's exact error text (docs/redis-format.md#connection)."""

    def test_forms(self) -> None:
        t = parse_redis_url("redis://127.0.0.1:6380/0")
        self.assertEqual((t.transport, t.host, t.port, t.db, t.password), ("tcp", "127.0.0.1", 6380, 0, ""))
        t = parse_redis_url("redis://localhost")
        self.assertEqual((t.host, t.port, t.db), ("localhost", 6379, 0))
        t = parse_redis_url("redis://user:p%40ss@[::1]:7000/5")
        self.assertEqual((t.host, t.port, t.db, t.username, t.password), ("::1", 7000, 5, "user", "p@ss"))
        t = parse_redis_url("rediss://:pw@redis.example/2?db=3&dial_timeout=5s")
        self.assertEqual((t.transport, t.host, t.db, t.password), ("tls", "redis.example", 3, "pw"))
        t = parse_redis_url("unix:///run/redis/redis.sock?db=7")
        self.assertEqual((t.transport, t.path, t.db), ("unix", "/run/redis/redis.sock", 7))
        self.assertNotIn("pw", repr(parse_redis_url("redis://:pw@h")))

    def test_errors_have_upstream_text_without_password(self) -> None:
        cases = {
            "localhost:6379": 'store: invalid Redis URL "localhost:6379": redis: invalid URL scheme: localhost',
            "http://h": 'store: invalid Redis URL "http://h": redis: invalid URL scheme: http',
            "redis://:hunter2@h/x": 'store: invalid Redis URL "redis://:xxxxx@h/x": redis: invalid database number: "x"',
            "redis://h/1/2": 'store: invalid Redis URL "redis://h/1/2": redis: invalid URL path: /1/2',
            "redis://h?nope=1": 'store: invalid Redis URL "redis://h?nope=1": redis: unexpected option: nope',
            "unix://": 'store: invalid Redis URL "unix://": redis: empty unix socket path',
            "redis://u:hunter2@h:port": 'store: invalid Redis URL "redis://u:xxxxx@h:port": invalid port after host',
        }
        for url, message in cases.items():
            with self.subTest(url=url):
                with self.assertRaises(RedisURLError) as ctx:
                    parse_redis_url(url)
                self.assertEqual(str(ctx.exception), message)
                self.assertNotIn("hunter2", str(ctx.exception))
