"""matrix-js-sdk 43 as a real client for the end-to-end suite (tests/e2e/js/client.mjs).

The SDK is installed with ``npm ci`` from the committed lockfile by ``scripts/js-client``
(cached like the Synapse virtualenv) on first use; a failed install fails the test, as
Synapse's does.  The node child runs as a reactor process: the fake SFU it indirectly
talks to lives in this process's reactor, so blocking on it would deadlock.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Optional

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import FailTest

from tests.blackbox.harness import REPO_ROOT, timeout_after

INSTALL_DEADLINE = 600.0
RUN_DEADLINE = 60.0
CLIENT = os.path.join(REPO_ROOT, "tests", "e2e", "js", "client.mjs")

_modules: Optional[str] = None


def ensure_client() -> str:
    """The directory holding the SDK's node_modules (blocking; runs once per test run)."""
    global _modules
    if _modules is not None:
        return _modules
    script = os.path.join(REPO_ROOT, "scripts", "js-client")
    started = time.monotonic()
    try:
        proc = subprocess.run([script], stdin=subprocess.DEVNULL, capture_output=True, timeout=INSTALL_DEADLINE)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FailTest(f"could not install matrix-js-sdk with {script}: {e!r}")
    output = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    if proc.returncode != 0:
        raise FailTest(f"{script} failed (exit {proc.returncode}); matrix-js-sdk is needed from npm:\n{output}")
    modules = proc.stdout.decode().strip().splitlines()[-1]
    if "installed in" in output:
        sys.stderr.write(f"[e2e] matrix-js-sdk installed in {time.monotonic() - started:.1f}s: {modules}\n")
    _modules = modules
    return modules


@defer.inlineCallbacks
def run_client(reactor, **options):
    """Run one flow of client.mjs → ``(ok, result or error object, output for messages)``."""
    modules = ensure_client()
    node = shutil.which("node")
    if node is None:
        raise FailTest("node is not installed (Node 20 or later is needed for the matrix-js-sdk tests)")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/"),
           "RTCAUTH_JS_CLIENT_DIR": modules, "NODE_NO_WARNINGS": "1"}
    d = getProcessOutputAndValue(node, [CLIENT, json.dumps(options)], env=env, path=REPO_ROOT, reactor=reactor)
    out, err, code = yield timeout_after(reactor, d, RUN_DEADLINE, f"node client.mjs ({options.get('flow')})")
    text = out.decode("utf-8", "replace")
    lines = [line for line in text.splitlines() if line.startswith(("RESULT ", "ERROR "))]
    if code != 0 or not lines or not lines[-1].startswith("RESULT "):
        return (False, json.loads(lines[-1][6:]) if lines and lines[-1].startswith("ERROR ") else None,
                f"node exit {code}\nstdout:\n{text[-4000:]}\nstderr:\n{err.decode('utf-8', 'replace')[-4000:]}")
    return (True, json.loads(lines[-1][len("RESULT "):]), text)
