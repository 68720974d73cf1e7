"""A ``read_file`` stand-in for code that reads secrets and env files through one callable."""

from __future__ import annotations

import errno


def files(mapping):
    """``read_file`` over ``mapping`` (path → text); a missing path is ENOENT, like open()."""

    def read(path):
        if path not in mapping:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return mapping[path]

    return read
