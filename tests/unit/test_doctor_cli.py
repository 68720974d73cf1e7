"""``rtcauth doctor`` command line: options, config sources, usage errors (no network)."""

from __future__ import annotations

import io
import os
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from rtcauthd import cli
from rtcauthd.doctor import DoctorUsageError, options_from_args, run


def parse(*argv: str):
    return cli.build_parser().parse_args(["doctor", *argv])


class ParserTests(SynchronousTestCase):
    def test_listed_in_the_dispatcher(self):
        self.assertIn(("doctor", "rtcauthd.doctor"), cli.COMMANDS)
        args = parse("example.com")
        self.assertEqual(
            (args.server_name, args.https_port, args.timeout, args.json, args.access_token, args.config, args.dns_server),
            ("example.com", 443, 5.0, False, None, None, None),
        )

    def test_options(self):
        args = parse("example.com", "--dns-server", "127.0.0.1:5353", "--https-port", "8443", "--timeout", "2.5",
                     "--json", "--ca-file", "/ca.pem")
        self.assertEqual((args.dns_server, args.https_port, args.timeout, args.json, args.ca_file),
                         ("127.0.0.1:5353", 8443, 2.5, True, "/ca.pem"))

    def test_bad_values_exit_1(self):
        for argv in (("x", "--https-port", "0"), ("x", "--https-port", "65536"), ("x", "--timeout", "0"),
                     ("x", "--timeout", "inf"), ()):
            with self.assertRaises(SystemExit) as caught:
                stderr = io.StringIO()
                self.patch(cli.sys, "stderr", stderr)
                parse(*argv)
            self.assertEqual(caught.exception.code, cli.USAGE_ERROR, argv)


class OptionsTests(SynchronousTestCase):
    def tmp(self, name: str, content: str) -> str:
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(content)
        self.addCleanup(os.remove, path)
        return path

    def test_dns_server(self):
        options, servers, custom, ca_file = options_from_args(parse("example.com", "--dns-server", "[::1]:5353"), {})
        self.assertEqual((servers, custom, ca_file), ([("::1", 5353)], True, None))
        self.assertIsNone(options.config)
        self.assertIsNone(options.config_source)

    def test_bad_dns_server(self):
        with self.assertRaises(DoctorUsageError) as caught:
            options_from_args(parse("example.com", "--dns-server", "ns.example.com"), {})
        self.assertEqual(str(caught.exception),
                         "--dns-server: 'ns.example.com': the DNS server must be an IP address (HOST:PORT)")

    def test_config_file(self):
        path = self.tmp("rtcauthd.env", "LIVEKIT_URL=wss://sfu.example.com\nLIVEKIT_KEY=k\nLIVEKIT_SECRET=s\n"
                                        "LIVEKIT_FULL_ACCESS_HOMESERVERS=example.com\nRTCAUTH_CA_FILE=/etc/ca.pem\n")
        options, _servers, _custom, ca_file = options_from_args(parse("example.com", "--config", path), {})
        self.assertEqual(options.config.livekit_url, "wss://sfu.example.com")
        self.assertEqual(options.config_source, f"--config {path}")
        self.assertEqual(ca_file, "/etc/ca.pem")  # the service's CA file, unless --ca-file says otherwise
        _o, _s, _c, ca_file = options_from_args(parse("example.com", "--config", path, "--ca-file", "/mine.pem"), {})
        self.assertEqual(ca_file, "/mine.pem")

    def test_service_environment(self):
        environ = {"LIVEKIT_URL": "ws://localhost:7880", "LIVEKIT_KEY": "k", "LIVEKIT_SECRET": "s",
                   "LIVEKIT_FULL_ACCESS_HOMESERVERS": "example.com"}
        options, *_ = options_from_args(parse("example.com"), environ)
        self.assertEqual(options.config_source, "the environment")
        self.assertEqual(options.config.api_key, "k")

    def test_config_error_is_reported_not_raised(self):
        path = self.tmp("bad.env", "LIVEKIT_KEY=k\n")
        options, *_ = options_from_args(parse("example.com", "--config", path), {})
        self.assertIsNone(options.config)
        self.assertEqual(options.config_error, "LIVEKIT_KEY* / LIVEKIT_SECRET* and LIVEKIT_URL must be set")

    def test_access_token_from_file(self):
        path = self.tmp("token", "syt_secret_token\n")
        options, *_ = options_from_args(parse("example.com", "--access-token", "@" + path), {})
        self.assertEqual(options.access_token, "syt_secret_token")
        self.assertNotIn("syt_secret_token", repr(options))
        options, *_ = options_from_args(parse("example.com", "--access-token", "syt_inline"), {})
        self.assertEqual(options.access_token, "syt_inline")

    def test_access_token_file_problems(self):
        empty = self.tmp("empty", "\n")
        for value, message in (
            ("@" + empty, f"--access-token: {empty} is empty"),
            ("@/nonexistent/token", "--access-token: cannot read /nonexistent/token: No such file or directory"),
        ):
            with self.assertRaises(DoctorUsageError) as caught:
                options_from_args(parse("example.com", "--access-token", value), {})
            self.assertEqual(str(caught.exception), message)

    def test_run_reports_usage_errors_without_starting(self):
        stderr, stdout = io.StringIO(), io.StringIO()
        status = run(parse("example.com", "--dns-server", "nonsense"), environ={}, stdout=stdout, stderr=stderr)
        self.assertEqual(status, 1)
        self.assertEqual(stdout.getvalue(), "")
        self.assertEqual(stderr.getvalue(),
                         "rtcauth doctor: --dns-server: 'nonsense': the DNS server must be an IP address (HOST:PORT)\n")

    def test_appservice_config_keeps_the_registration_path(self):
        """The AS checks read the registration the service was given; its tokens stay hidden."""
        registration = self.tmp("registration.yaml", 'id: rtcauthd\nas_token: "as_x"\nhs_token: "hs_y"\n')
        path = self.tmp("rtcauthd.env", "LIVEKIT_URL=wss://sfu.example.com\nLIVEKIT_KEY=k\nLIVEKIT_SECRET=s\n"
                                        "LIVEKIT_FULL_ACCESS_HOMESERVERS=example.com\nLIVEKIT_HS_SERVER_NAME=example.com\n"
                                        f"LIVEKIT_AS_REGISTRATION_FILE={registration}\n")
        options, *_ = options_from_args(parse("example.com", "--config", path), {})
        self.assertTrue(options.config.appservice)
        self.assertEqual((options.config.registration_file, options.config.as_token), (registration, "as_x"))
        self.assertNotIn("hs_y", repr(options.config))
        standalone, *_ = options_from_args(parse("example.com", "--config", path), {"LIVEKIT_AS_REGISTRATION_FILE": "",
                                                                                   "LIVEKIT_HS_SERVER_NAME": ""})
        self.assertIsNone(standalone.config.registration_file)
