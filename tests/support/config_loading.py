"""Loading a Config in tests: one base environment and the two helpers every config test uses."""

from __future__ import annotations

from rtcauthd.config import ConfigError, load_config
from tests.support.files import files

BASE = {
    "LIVEKIT_URL": "wss://sfu.example.com",
    "LIVEKIT_KEY": "devkey",
    "LIVEKIT_SECRET": "s3cr3t-value",
    "LIVEKIT_FULL_ACCESS_HOMESERVERS": "example.com",
}


class ConfigLoading:
    """Mixin for a TestCase: ``load`` from BASE with overrides, and exact one-line errors."""

    def load(self, overrides=None, remove=(), **kwargs):
        env = dict(BASE)
        env.update(overrides or {})
        for name in remove:
            env.pop(name, None)
        kwargs.setdefault("read_file", files({}))
        return load_config(env, **kwargs)

    def assertConfigError(self, message, overrides=None, remove=(), **kwargs):
        with self.assertRaises(ConfigError) as cm:
            self.load(overrides, remove, **kwargs)
        self.assertEqual(str(cm.exception), message)
        self.assertNotIn("\n", str(cm.exception))
        return str(cm.exception)
