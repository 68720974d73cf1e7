"""The Redis store's record of job changes not yet written, and of who waits for them.

Kept apart from the connection and outage logic so that the rules are visible in one
place: the latest operation per hash field wins (older versions are never sent once a
newer one is recorded), at most one write per field is in flight, and a caller's
Deferred fires once a write at least as new as its own has settled. This class sends
nothing itself; :class:`rtcauthd.store.redis.RedisStore` drives it.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.defer import Deferred

__all__ = ["WriteQueue"]


class WriteQueue:
    """Pending writes per field (``value`` ``None`` means HDEL; with several instances an
    operation tuple, see RedisStore), versioned in call order."""

    def __init__(self) -> None:
        self._version = 0
        # field -> (version, value or None for HDEL); removed once that version settled
        self._pending: dict[bytes, tuple[int, Optional[bytes]]] = {}
        self._inflight: dict[bytes, int] = {}
        self._waiters: dict[bytes, list[tuple[int, Deferred]]] = {}
        self._drained: list[Deferred] = []

    def __len__(self) -> int:
        return len(self._pending)

    def fields(self) -> list[bytes]:
        """A snapshot of the fields with a pending write."""
        return list(self._pending)

    def record(self, field: bytes, value: Optional[bytes]) -> int:
        """Make ``value`` the newest pending operation for ``field``; returns its version."""
        self._version += 1
        self._pending[field] = (self._version, value)
        return self._version

    def newest(self, field: bytes) -> Optional[object]:
        """The newest value recorded for ``field`` that has not settled yet (it may be in
        flight), else None."""
        entry = self._pending.get(field)
        return None if entry is None else entry[1]

    def version_of(self, field: bytes) -> Optional[int]:
        """The version of the newest pending write for ``field``, None if nothing is pending."""
        entry = self._pending.get(field)
        return None if entry is None else entry[0]

    def wait_for(self, field: bytes, version: int) -> Deferred:
        """A Deferred that fires (with None) once ``version`` of ``field`` has settled."""
        d: Deferred = Deferred()
        self._waiters.setdefault(field, []).append((version, d))
        return d

    def take(self, field: bytes) -> Optional[tuple[int, Optional[bytes]]]:
        """The write to send for ``field`` now, marked in flight; None if there is nothing
        pending or a write for it is already in flight."""
        if field in self._inflight or field not in self._pending:
            return None
        version, value = self._pending[field]
        self._inflight[field] = version
        return version, value

    def settled(self, field: bytes, version: int) -> None:
        """The in-flight ``version`` landed or was refused for good: it is done with, and
        so are its waiters and older ones. A newer pending version stays pending."""
        del self._inflight[field]
        if self._pending.get(field, (None,))[0] == version:
            del self._pending[field]
        self._release(field, version)
        self._check_drained()

    def failed(self, field: bytes) -> None:
        """The in-flight write did not land but is worth retrying: it stays pending."""
        del self._inflight[field]

    def _release(self, field: bytes, upto: int) -> None:
        waiters = self._waiters.get(field)
        if not waiters:
            return
        done = [d for v, d in waiters if v <= upto]
        rest = [(v, d) for v, d in waiters if v > upto]
        if rest:
            self._waiters[field] = rest
        else:
            del self._waiters[field]
        for d in done:
            d.callback(None)

    def release_all(self) -> None:
        """Fire every waiter and drain watcher now, whatever is still pending."""
        waiters, self._waiters = self._waiters, {}
        for entries in waiters.values():
            for _v, d in entries:
                d.callback(None)
        self._check_drained(force=True)

    def when_drained(self) -> Deferred:
        """A Deferred that fires once nothing is pending (or on :meth:`release_all`)."""
        waiting: Deferred = Deferred()
        self._drained.append(waiting)
        self._check_drained()
        return waiting

    def _check_drained(self, force: bool = False) -> None:
        if self._drained and (force or not self._pending):
            drained, self._drained = self._drained, []
            for d in drained:
                if not d.called:
                    d.callback(None)
