"""This instance's liveness lease: the one key whose life decides whether it may drive jobs.

``rtcauth:instance:<id>`` is set with ``SET NX PX`` and renewed or released only by
compare-and-set, so nobody extends or removes another instance's lease. Besides the
lease in Redis the instance keeps its own, more cautious view: the lease counts as
held until ``lease`` seconds after the *sending* of the last successful acquire or
renewal, minus a margin. Redis's copy cannot expire before that moment, so while Redis
is unreachable the instance still knows for how long nobody else can have taken its
jobs over (docs/several-instances.md#leases).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from rtcauthd.cluster.scripts import INSTANCES, RELEASE, RENEW, ACQUIRE, ClusterKeys

__all__ = ["InstanceLease", "default_instance_name", "instance_id"]

log = Logger()

#: share of the lease kept back locally for clock rate differences and reply latency
SAFETY_MARGIN = 0.1


def default_instance_name() -> str:
    """Host name + pid: readable in logs and metrics, unique enough per host."""
    return f"{socket.gethostname()}-{os.getpid()}"


def instance_id(name: str) -> bytes:
    """``name`` made safe for CLIENT SETNAME (no spaces) plus a random suffix, so that two
    instances given the same name, or one restarted within its lease, never share an id."""
    safe = re.sub(r"[^A-Za-z0-9._:-]", "_", name)[:64] or "rtcauthd"
    return f"{safe}#{secrets.token_hex(4)}".encode("ascii")


class InstanceLease:
    """Acquire / renew / release of one instance's liveness key on a txredisapi connection."""

    def __init__(
        self,
        *,
        connection: Callable[[], Any],
        keys: ClusterKeys,
        iid: bytes,
        clock: IReactorTime,
        lease_seconds: float,
        op_timeout: float,
    ) -> None:
        self._connection = connection
        self._keys = keys
        self.iid = iid
        self._clock = clock
        self.lease_seconds = lease_seconds
        self._op_timeout = op_timeout
        self._valid_until = 0.0
        self.acquired = False

    @property
    def lease_ms(self) -> int:
        return max(int(self.lease_seconds * 1000), 1)

    @property
    def client_name(self) -> bytes:
        """The name this instance gives its Redis connection; peers look for it in CLIENT LIST."""
        return b"rtcauthd-" + self.iid

    def holds(self) -> bool:
        """True while no other instance can have taken this lease over, by our own clock."""
        return self.acquired and self._clock.seconds() < self._valid_until

    def _extend_from(self, sent_at: float) -> None:
        self._valid_until = sent_at + self.lease_seconds * (1 - SAFETY_MARGIN)

    def _eval(self, script: str, keys: list, args: list) -> Deferred:
        d = self._connection().eval(script, keys, args)
        return d.addTimeout(self._op_timeout, self._clock)

    def acquire(self) -> "Deferred[bool]":
        sent_at = self._clock.seconds()
        d = self._eval(ACQUIRE, [self._keys.instance(self.iid), INSTANCES], [self.iid, self.lease_ms])

        def done(result: Any) -> bool:
            ok = int(result) == 1
            if ok:
                self.acquired = True
                self._extend_from(sent_at)
            return ok

        return d.addCallback(done)

    def renew(self) -> "Deferred[bool]":
        """True: still ours, extended. False: gone (expired while we were away): every job
        this instance drove may now be someone else's. Fails if Redis did not answer."""
        sent_at = self._clock.seconds()
        d = self._eval(RENEW, [self._keys.instance(self.iid)], [self.iid, self.lease_ms])

        def done(result: Any) -> bool:
            if int(result) == 1:
                self._extend_from(sent_at)
                return True
            self.acquired = False
            self._valid_until = 0.0
            return False

        return d.addCallback(done)

    def name_connection(self) -> Deferred:
        """CLIENT SETNAME on the (possibly reconnected) connection: how peers tell a dead
        holder (connection gone) from a slow one (connection still open)."""
        return self._connection().execute_command("CLIENT", "SETNAME", self.client_name).addTimeout(
            self._op_timeout, self._clock
        )

    def release(self) -> Deferred:
        """Give the lease up (SIGTERM): peers take the jobs over at once instead of waiting."""
        self.acquired = False
        self._valid_until = 0.0
        return self._eval(RELEASE, [self._keys.instance(self.iid)], [self.iid, self._keys.broadcast])
