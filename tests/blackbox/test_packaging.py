"""The twistd plugin is found both from a built wheel (``pip install .``) and editable."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile

from twisted.trial.unittest import TestCase

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class PluginPackagingTests(TestCase):
    def test_wheel_ships_the_plugin_and_no_tests(self):
        out = self.mktemp()
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, REPO],
            check=True,
            capture_output=True,
        )
        [wheel] = glob.glob(os.path.join(out, "rtcauthd-*.whl"))
        names = zipfile.ZipFile(wheel).namelist()
        self.assertIn("twisted/plugins/rtcauth.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)  # would shadow Twisted's own plugins
        self.assertFalse([n for n in names if n.endswith("dropin.cache")])
        self.assertFalse([n for n in names if n.startswith("tests/")])
        self.assertIn("rtcauthd/tap.py", names)

    def test_installed_twistd_lists_the_plugin(self):
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        # From "/" so that the plugin is found through the install, not the checkout.
        result = subprocess.run([twistd, "--help"], capture_output=True, text=True, cwd="/")
        self.assertIn("rtcauth", result.stdout)
        help_text = subprocess.run([twistd, "rtcauth", "--help"], capture_output=True, text=True, cwd="/").stdout
        for option in ("--listen", "--dev", "--config", "LIVEKIT_FULL_ACCESS_HOMESERVERS", "RTCAUTH_CA_FILE"):
            self.assertIn(option, help_text)


class PackageBootSkipTests(TestCase):
    """scripts/package-test-nspawn never skips the systemd boot silently: it says why and exits 77.

    scripts/test counts that "SKIPPED" line as a skipped test; the boot itself runs in
    scripts/package-test (root, network), not here.
    """

    SCRIPT = os.path.join(REPO, "scripts", "package-test-nspawn")

    def run_script(self, env, with_systemd=False):
        root = self.mktemp()
        os.makedirs(os.path.join(root, "usr", "lib", "systemd"))
        if with_systemd:  # only its presence is checked before the probe
            systemd = os.path.join(root, "usr", "lib", "systemd", "systemd")
            open(systemd, "w").close()
            os.chmod(systemd, 0o755)
        return subprocess.run(
            ["/bin/bash", self.SCRIPT, root, root, "trixie"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )

    def test_opt_out_is_reported_with_its_reason(self):
        result = self.run_script({"PATH": os.environ["PATH"], "PACKAGE_TEST_NSPAWN": "0"})
        self.assertEqual(result.returncode, 77, result.stderr)
        self.assertEqual(
            result.stdout.strip(), "package-test: trixie: SKIPPED the systemd-nspawn boot: PACKAGE_TEST_NSPAWN=0"
        )

    def test_a_machine_without_systemd_nspawn_is_named_as_the_reason(self):
        empty_path = self.mktemp()
        os.makedirs(empty_path)
        result = self.run_script({"PATH": empty_path})
        self.assertEqual(result.returncode, 77, result.stderr)
        self.assertIn("SKIPPED the systemd-nspawn boot: systemd-nspawn is not installed", result.stdout)
        self.assertIn("systemd-container", result.stdout)

    def test_a_machine_that_cannot_start_a_container_is_named_as_the_reason(self):
        if os.geteuid() != 0:
            self.skipTest("the probe runs as root only (scripts/package-test is root-only)")
        if not shutil.which("redis-server") or not shutil.which("redis-cli"):
            self.skipTest("redis-server is not installed")
        # A systemd-nspawn that fails as it does where namespaces are not allowed.
        tools = self.mktemp()
        os.makedirs(tools)
        fake = os.path.join(tools, "systemd-nspawn")
        with open(fake, "w") as f:
            f.write("#!/bin/sh\necho 'Failed to fork inner child: Operation not permitted' >&2\nexit 1\n")
        os.chmod(fake, 0o755)
        result = self.run_script({"PATH": tools + ":" + os.environ["PATH"]}, with_systemd=True)
        self.assertEqual(result.returncode, 77, result.stderr)
        self.assertIn(
            "SKIPPED the systemd-nspawn boot: systemd-nspawn cannot start a container on this machine: "
            "Failed to fork inner child: Operation not permitted",
            result.stdout,
        )
