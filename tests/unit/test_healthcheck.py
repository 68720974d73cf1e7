"""`rtcauth healthcheck`: where it probes (URL derivation table), and real probes over loopback.

The derivation tests are pure. The probe tests use real sockets on 127.0.0.1, ::1 and a unix
socket, because the behaviour under test is the socket client: a stdlib HTTP server in a
thread answers 200 or 500, and a listening socket that never accepts answers nothing.
"""

from __future__ import annotations

import errno
import http.server
import io
import os
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.support.files import files
from rtcauthd import cli
from rtcauthd.healthcheck import (
    HealthcheckError,
    NothingListening,
    ProbeTimedOut,
    Target,
    check,
    main,
    targets_from_endpoints,
    targets_from_environment,
    targets_from_url,
)

V4, V6 = "127.0.0.1", "::1"


def tcp(*hosts_and_port, path="/healthz"):
    *hosts, port = hosts_and_port
    return [Target(host=h, port=port, path=path) for h in hosts]


class EnvironmentDerivationTests(SynchronousTestCase):
    """Default URL from the daemon's own settings; fixes lk-jwt-service#210's `localhost::8080`."""

    def derive(self, environ, **kwargs):
        return targets_from_environment(environ, **kwargs)

    def test_bind_table(self):
        table = [
            ({}, tcp(V4, V6, 8080)),  # default ":8080"
            ({"LIVEKIT_JWT_BIND": ":8080"}, tcp(V4, V6, 8080)),
            ({"LIVEKIT_JWT_BIND": ":9000"}, tcp(V4, V6, 9000)),
            ({"LIVEKIT_JWT_BIND": "0.0.0.0:8081"}, tcp(V4, 8081)),
            ({"LIVEKIT_JWT_BIND": "[::]:8082"}, tcp(V6, V4, 8082)),
            ({"LIVEKIT_JWT_BIND": "127.0.0.1:8083"}, tcp(V4, 8083)),
            ({"LIVEKIT_JWT_BIND": "[::1]:8084"}, tcp(V6, 8084)),
            ({"LIVEKIT_JWT_BIND": "localhost:8085"}, tcp(V4, V6, 8085)),
            ({"LIVEKIT_JWT_BIND": "192.0.2.7:8086"}, tcp("192.0.2.7", 8086)),
            ({"LIVEKIT_JWT_BIND": "[2001:db8::7]:8087"}, tcp("2001:db8::7", 8087)),
            ({"LIVEKIT_JWT_PORT": "8088"}, tcp(V4, V6, 8088)),
            ({"LIVEKIT_JWT_BIND": ""}, tcp(V4, V6, 8080)),
        ]
        for environ, expected in table:
            self.assertEqual(self.derive(environ), expected, environ)

    def test_urls_read_like_urls(self):
        self.assertEqual(
            [t.url for t in self.derive({"LIVEKIT_JWT_BIND": ":8080"})],
            ["http://127.0.0.1:8080/healthz", "http://[::1]:8080/healthz"],
        )
        self.assertEqual(
            [t.url for t in self.derive({"LIVEKIT_JWT_BIND": "[::1]:8080"})], ["http://[::1]:8080/healthz"]
        )

    def test_bad_binds_fail_with_the_daemons_words(self):
        for bind, message in [
            ("8080", 'LIVEKIT_JWT_BIND: "8080" is not host:port'),
            ("example.com:8080", 'LIVEKIT_JWT_BIND: "example.com:8080": the host must be an IP address'),
            (":http", 'LIVEKIT_JWT_BIND: ":http" is not host:port'),
        ]:
            error = self.assertRaises(HealthcheckError, self.derive, {"LIVEKIT_JWT_BIND": bind})
            self.assertIn(message, str(error))

    def test_port_zero_cannot_be_probed(self):
        error = self.assertRaises(HealthcheckError, self.derive, {"LIVEKIT_JWT_BIND": "127.0.0.1:0"})
        self.assertEqual(
            str(error), "LIVEKIT_JWT_BIND '127.0.0.1:0': port '0' cannot be probed; pass the URL instead"
        )

    def test_bind_and_port_together_is_the_daemons_error(self):
        error = self.assertRaises(
            HealthcheckError, self.derive, {"LIVEKIT_JWT_BIND": ":1", "LIVEKIT_JWT_PORT": "2"}
        )
        self.assertEqual(str(error), "LIVEKIT_JWT_BIND and LIVEKIT_JWT_PORT must not be set together")

    def test_rtcauth_listen_wins_over_bind(self):
        environ = {"RTCAUTH_LISTEN": "tcp:9001:interface=127.0.0.1", "LIVEKIT_JWT_BIND": ":8080"}
        self.assertEqual(self.derive(environ), tcp(V4, 9001))

    def test_endpoint_table(self):
        table = [
            ("tcp:9001", tcp(V4, 9001)),
            ("tcp:9002:interface=0.0.0.0", tcp(V4, 9002)),
            ("tcp:port=9003:interface=127.0.0.1", tcp(V4, 9003)),
            ("tcp:9004:127.0.0.1", tcp(V4, 9004)),
            ("tcp6:9005", tcp(V6, V4, 9005)),
            ("tcp6:9006:interface=\\:\\:", tcp(V6, V4, 9006)),
            ("tcp6:9007:interface=\\:\\:1", tcp(V6, 9007)),
            ("TCP6:port=9008:interface=\\:\\:1:backlog=5", tcp(V6, 9008)),
            ("unix:/run/rtcauthd/rtcauthd.sock", [Target(host="/run/rtcauthd/rtcauthd.sock", scheme="unix")]),
            ("unix:address=/run/r.sock:mode=660", [Target(host="/run/r.sock", scheme="unix")]),
        ]
        for description, expected in table:
            self.assertEqual(targets_from_endpoints([description]), expected, description)

    def test_endpoints_skip_what_gives_no_address_and_deduplicate(self):
        self.assertEqual(
            targets_from_endpoints(
                ["systemd:domain=INET6:index=0", "tcp6:9000:interface=\\:\\:1", "tcp:9000:interface=127.0.0.1"]
            ),
            tcp(V6, V4, 9000),
        )
        self.assertEqual(targets_from_endpoints(["tcp6:9000", "tcp:9000"]), tcp(V6, V4, 9000))

    def test_listen_without_any_usable_endpoint(self):
        error = self.assertRaises(
            HealthcheckError,
            self.derive,
            {"RTCAUTH_LISTEN": "systemd:domain=INET:index=0  ssl:8443:privateKey=k.pem"},
        )
        self.assertEqual(
            str(error),
            "cannot tell where to probe from RTCAUTH_LISTEN "
            "(systemd:domain=INET:index=0 ssl:8443:privateKey=k.pem); pass the URL",
        )

    def test_listen_with_bad_port(self):
        error = self.assertRaises(HealthcheckError, self.derive, {"RTCAUTH_LISTEN": "tcp:eighty"})
        self.assertIn("port 'eighty' cannot be probed", str(error))

    def test_config_file_under_the_environment(self):
        read = files({"/etc/rtcauthd/rtcauthd.env": "# comment\nLIVEKIT_JWT_BIND=[::1]:7000\n"})
        self.assertEqual(self.derive({}, config_file="/etc/rtcauthd/rtcauthd.env", read_file=read), tcp(V6, 7000))
        self.assertEqual(
            self.derive(
                {"LIVEKIT_JWT_BIND": "127.0.0.1:7001"}, config_file="/etc/rtcauthd/rtcauthd.env", read_file=read
            ),
            tcp(V4, 7001),
        )

    def test_config_file_that_cannot_be_read(self):
        error = self.assertRaises(
            HealthcheckError, self.derive, {}, config_file="/nope.env", read_file=files({})
        )
        self.assertEqual(str(error), "--config: cannot read /nope.env: No such file or directory")

    def test_config_file_that_is_not_an_env_file(self):
        error = self.assertRaises(
            HealthcheckError, self.derive, {}, config_file="/x.env", read_file=files({"/x.env": "oops\n"})
        )
        self.assertEqual(str(error), "--config: line 1 is not KEY=value")


class URLTests(SynchronousTestCase):
    def test_url_table(self):
        table = [
            ("http://127.0.0.1:8080", Target(host=V4, port=8080)),
            ("http://127.0.0.1:8080/", Target(host=V4, port=8080)),
            ("http://[::1]:8080", Target(host=V6, port=8080)),
            ("http://localhost", Target(host="localhost", port=80)),
            ("https://rtc.example.com/livekit/jwt/", Target(host="rtc.example.com", port=443, path="/livekit/jwt/healthz", scheme="https")),
            ("http://127.0.0.1:8080/healthz", Target(host=V4, port=8080)),
            ("http://127.0.0.1:8080/jwt/healthz/", Target(host=V4, port=8080, path="/jwt/healthz")),
            ("unix:/run/rtcauthd/rtcauthd.sock", Target(host="/run/rtcauthd/rtcauthd.sock", scheme="unix")),
        ]
        for url, expected in table:
            self.assertEqual(targets_from_url(url), [expected], url)

    def test_bad_urls(self):
        for url, message in [
            ("127.0.0.1:8080", "'127.0.0.1:8080' is not an http:// or https:// URL"),
            ("ftp://127.0.0.1/", "'ftp://127.0.0.1/' is not an http:// or https:// URL"),
            ("http://", "'http://' is not an http:// or https:// URL"),
            ("http://127.0.0.1:99999", "'http://127.0.0.1:99999' has an invalid port"),
            ("http://127.0.0.1/?x=1", "user info, query and fragment are not supported"),
            ("http://u:p@127.0.0.1/", "user info, query and fragment are not supported"),
            ("unix:run/x.sock", "a unix socket needs an absolute path"),
        ]:
            error = self.assertRaises(HealthcheckError, targets_from_url, url)
            self.assertIn(message, str(error), url)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class CheckTests(SynchronousTestCase):
    """Fallback between candidates and the one overall time budget, without sockets."""

    def setUp(self):
        self.clock = FakeClock()
        self.calls = []

    def probe_with(self, answers):
        def probe(target, *, timeout):
            self.calls.append((target.host, timeout))
            answer, spent = answers[target.host]
            self.clock.now += spent
            if isinstance(answer, Exception):
                raise answer
            return answer

        return probe

    def test_next_candidate_only_when_nothing_listens(self):
        probe = self.probe_with({V4: (NothingListening("connection refused"), 0.5), V6: (None, 0.1)})
        self.assertIsNone(check(tcp(V4, V6, 8080), timeout=3, clock=self.clock, probe=probe))
        self.assertEqual(self.calls, [(V4, 3), (V6, 2.5)])

    def test_an_unhealthy_answer_is_final(self):
        probe = self.probe_with({V4: ("HTTP 500 Internal Server Error (want 200)", 0.1), V6: (None, 0)})
        self.assertEqual(
            check(tcp(V4, V6, 8080), timeout=3, clock=self.clock, probe=probe),
            "http://127.0.0.1:8080/healthz: HTTP 500 Internal Server Error (want 200)",
        )
        self.assertEqual([host for host, _ in self.calls], [V4])

    def test_every_candidate_failing_is_one_line(self):
        probe = self.probe_with(
            {V4: (NothingListening("connection refused"), 0), V6: (NothingListening("connection refused"), 0)}
        )
        self.assertEqual(
            check(tcp(V4, V6, 8080), timeout=3, clock=self.clock, probe=probe),
            "http://127.0.0.1:8080/healthz: connection refused; http://[::1]:8080/healthz: connection refused",
        )

    def test_the_budget_is_shared(self):
        probe = self.probe_with({V4: (NothingListening("unreachable"), 3.0), V6: (None, 0)})
        self.assertEqual(
            check(tcp(V4, V6, 8080), timeout=3, clock=self.clock, probe=probe),
            "http://127.0.0.1:8080/healthz: unreachable; http://[::1]:8080/healthz: not tried, 3 s used up",
        )
        self.assertEqual([host for host, _ in self.calls], [V4])

    def test_a_timeout_names_the_whole_budget_and_is_final(self):
        probe = self.probe_with({V4: (NothingListening("connection refused"), 1.0), V6: (ProbeTimedOut(), 2.0)})
        self.assertEqual(
            check(tcp(V4, V6, "192.0.2.1", 8080), timeout=3, clock=self.clock, probe=probe),
            "http://127.0.0.1:8080/healthz: connection refused; http://[::1]:8080/healthz: no answer within 3 s",
        )
        self.assertEqual(self.calls, [(V4, 3), (V6, 2.0)])


# --- real sockets ------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("User-Agent"), self.headers.get("Host")))
        if self.server.status is None:  # close without answering
            self.close_connection = True
            return
        self.send_response(self.server.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class _TCPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self):
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS query that would leave
        # loopback (to the system resolver); tests must not send traffic anywhere else.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "localhost", self.server_address[1]


class _TCP6Server(_TCPServer):
    address_family = socket.AF_INET6


class _UnixServer(_TCPServer):
    address_family = socket.AF_UNIX

    def server_bind(self):
        self.socket.bind(self.server_address)
        self.server_name, self.server_port = "localhost", 0

    def get_request(self):
        request, _ = self.socket.accept()
        return request, ("local", 0)


class RealSocketTests(SynchronousTestCase):
    """The probe against real listeners: 200, 500, a silent listener and nothing at all."""

    def serve(self, status, host=V4):
        if host == "unix":
            directory = tempfile.mkdtemp()
            address = os.path.join(directory, "rtcauthd.sock")
            server = _UnixServer(address, _Handler)
            self.addCleanup(os.rmdir, directory)
            self.addCleanup(os.unlink, address)
        else:
            server_class = _TCP6Server if ":" in host else _TCPServer
            try:
                server = server_class((host, 0), _Handler)
            except OSError as e:
                if ":" in host and e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    raise SkipTest(f"no IPv6 loopback on this host: {e}")
                raise
        server.status = status
        server.requests = []
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()

        def stop():
            server.shutdown()
            server.server_close()
            thread.join()

        self.addCleanup(stop)
        return server

    def silent_listener(self, host=V4):
        """Accepts connections in the kernel's backlog and never reads or answers."""
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.addCleanup(sock.close)
        sock.bind((host, 0))
        sock.listen(8)
        return sock.getsockname()[1]

    def closed_port(self, host=V4):
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.bind((host, 0))
        port = sock.getsockname()[1]
        sock.close()
        return port

    def healthcheck(self, *argv, environ=None):
        """Run `rtcauth healthcheck ARGV` through the dispatcher; (status, stderr)."""
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        if environ is not None:
            self.patch(os, "environ", environ)
        status = cli.main(["healthcheck", *argv])
        return status, stderr.getvalue()

    @staticmethod
    def url(host, port, path=""):
        return f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"

    def test_200_is_healthy_and_quiet(self):
        for host in (V4, V6):
            server = self.serve(200, host)
            port = server.server_address[1]
            self.assertEqual(self.healthcheck(self.url(host, port)), (0, ""), host)
            expected_host = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            self.assertEqual(server.requests, [("/healthz", "rtcauth-healthcheck", expected_host)])

    def test_500_is_unhealthy_with_the_status(self):
        for host in (V4, V6):
            port = self.serve(500, host).server_address[1]
            url = self.url(host, port)
            self.assertEqual(
                self.healthcheck(url),
                (1, f"rtcauth healthcheck: unhealthy: {url}/healthz: HTTP 500 Internal Server Error (want 200)\n"),
            )

    def test_silent_listener_times_out(self):
        for host in (V4, V6):
            try:
                port = self.silent_listener(host)
            except OSError as e:
                raise SkipTest(f"no IPv6 loopback on this host: {e}")
            url = self.url(host, port)
            self.assertEqual(
                self.healthcheck(url, "--timeout", "0.2"),
                (1, f"rtcauth healthcheck: unhealthy: {url}/healthz: no answer within 0.2 s\n"),
            )

    def test_nothing_listening(self):
        port = self.closed_port()
        self.assertEqual(
            self.healthcheck(self.url(V4, port)),
            (1, f"rtcauth healthcheck: unhealthy: http://127.0.0.1:{port}/healthz: connection refused (nothing listens there)\n"),
        )

    def test_closed_without_answer(self):
        port = self.serve(None).server_address[1]
        self.assertEqual(
            self.healthcheck(self.url(V4, port)),
            (1, f"rtcauth healthcheck: unhealthy: http://127.0.0.1:{port}/healthz: connection closed without an answer\n"),
        )

    def test_prefix_is_kept(self):
        server = self.serve(200)
        self.assertEqual(self.healthcheck(self.url(V4, server.server_address[1], "/livekit/jwt/")), (0, ""))
        self.assertEqual(server.requests[0][0], "/livekit/jwt/healthz")

    def test_unix_socket(self):
        server = self.serve(200, "unix")
        self.assertEqual(self.healthcheck(f"unix:{server.server_address}"), (0, ""))
        self.assertEqual(server.requests, [("/healthz", "rtcauth-healthcheck", "localhost")])
        os.unlink(server.server_address)
        os.symlink("/nonexistent", server.server_address)  # cleanup unlinks it
        self.assertEqual(
            self.healthcheck(f"unix:{server.server_address}"),
            (1, f"rtcauth healthcheck: unhealthy: unix:{server.server_address} GET /healthz: "
                "no such socket (nothing listens there)\n"),
        )

    def test_derived_from_the_environment_ipv6_bind(self):
        server = self.serve(200, V6)
        port = server.server_address[1]
        self.assertEqual(self.healthcheck(environ={"LIVEKIT_JWT_BIND": f"[::1]:{port}"}), (0, ""))
        self.assertEqual(len(server.requests), 1)

    def test_derived_from_the_environment_ipv4_bind(self):
        server = self.serve(200, V4)
        port = server.server_address[1]
        self.assertEqual(self.healthcheck(environ={"LIVEKIT_JWT_BIND": f"0.0.0.0:{port}"}), (0, ""))
        self.assertEqual(len(server.requests), 1)

    def test_falls_back_to_ipv6_when_nothing_listens_on_ipv4(self):
        # localhost:P binds both families; here only ::1 answers (as for an IPv6-only ::).
        server = self.serve(200, V6)
        port = server.server_address[1]
        try:
            self.closed_port_check(port)
        except OSError:
            raise SkipTest(f"127.0.0.1:{port} is taken by something else")
        self.assertEqual(self.healthcheck(environ={"LIVEKIT_JWT_BIND": f"localhost:{port}"}), (0, ""))
        self.assertEqual(len(server.requests), 1)

    def closed_port_check(self, port):
        """Raises OSError unless 127.0.0.1:port is free (so connecting there is refused)."""
        sock = socket.socket(socket.AF_INET)
        try:
            sock.bind((V4, port))
        finally:
            sock.close()

    def test_config_file(self):
        port = self.serve(500).server_address[1]
        with tempfile.NamedTemporaryFile("w", suffix=".env", delete=False) as f:
            f.write(f"LIVEKIT_JWT_BIND=127.0.0.1:{port}\n")
        self.addCleanup(os.unlink, f.name)
        status, stderr = self.healthcheck("--config", f.name, environ={})
        self.assertEqual(status, 1)
        self.assertIn(f"http://127.0.0.1:{port}/healthz: HTTP 500", stderr)

    def test_configuration_error_is_one_line_and_status_1(self):
        self.assertEqual(
            self.healthcheck(environ={"LIVEKIT_JWT_BIND": "nope"}),
            (1, 'rtcauth healthcheck: LIVEKIT_JWT_BIND: "nope" is not host:port\n'),
        )


class CommandLineTests(SynchronousTestCase):
    def test_usage_errors_exit_1_not_2(self):
        """Docker reserves HEALTHCHECK exit status 2."""
        self.patch(sys, "stderr", io.StringIO())
        for argv in (["healthcheck", "--timeout", "0"], ["healthcheck", "--nope"], ["nope"], []):
            error = self.assertRaises(SystemExit, cli.main, argv)
            self.assertEqual(error.code, 1, argv)
        self.assertIn("--timeout: must be a positive number of seconds, got '0'", sys.stderr.getvalue())

    def test_module_main_has_its_own_name(self):
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        error = self.assertRaises(SystemExit, main, ["--timeout", "-1"])
        self.assertEqual(error.code, 1)
        self.assertIn("python -m rtcauthd.healthcheck: error: argument --timeout", stderr.getvalue())

    def test_python_dash_m(self):
        """`python -m rtcauthd.healthcheck` runs the probe (a real process, as Docker runs it)."""
        sock = socket.socket()
        sock.bind((V4, 0))
        port = sock.getsockname()[1]
        sock.close()
        result = subprocess.run(
            [sys.executable, "-m", "rtcauthd.healthcheck", f"http://127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        self.assertEqual(
            (result.returncode, result.stdout, result.stderr),
            (1, "", f"rtcauth healthcheck: unhealthy: http://127.0.0.1:{port}/healthz: "
                "connection refused (nothing listens there)\n"),
        )
