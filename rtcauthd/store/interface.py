"""What the leave manager needs from job persistence (docs/redis-format.md#when-records-change).

Every method returns a Deferred, also in the in-memory store, so callers never care
which backend they have. Store trouble never reaches the caller: ``put``/``delete`` do
not fail because the backend is unavailable (docs/redis-format.md#when-records-change: store errors are logged and never
change an HTTP response or a job's behaviour).
"""

from __future__ import annotations

import enum

from zope.interface import Attribute, Interface


class Claim(enum.Enum):
    """The answer to "may this instance send the leave now?" (docs/several-instances.md#exactly-once)."""

    GRANTED = "granted"  # the record is gone (or its removal queued): send, once
    LOST = "lost"  # another instance owns the job now: drop it here, send nothing
    UNAVAILABLE = "unavailable"  # ownership cannot be proven now (Redis away, lease run out): retry later


class IJobStore(Interface):
    """Persistence of delayed-leave jobs, keyed by (LiveKit room alias, identity)."""

    persistent = Attribute("True if jobs survive a restart of the process.")

    def put(job):
        """Store ``job`` (a :class:`rtcauthd.store.model.StoredJob`), replacing the record
        for the same (room, identity).

        @return: Deferred[None] that fires once the write has landed or has been queued
            because the backend is unavailable; it never fails because of the backend.
        """

    def delete(room, identity):
        """Remove the record for (room, identity), if any. Same guarantees as ``put``.

        @return: Deferred[None]
        """

    def register(job):
        """Store a newly delegated job: like ``put``, and with several instances it also
        makes this instance the job's owner, superseding the job wherever it ran.

        @return: Deferred[None]
        """

    def claim_send(room, identity):
        """Before the leave is sent: remove the record durably while this instance still
        owns the job, so that no restart or other instance sends it again.

        @return: Deferred[Claim]; never fails.
        """

    def forward(room, identity, signal):
        """A webhook signal for a job this process does not run: to the instance that
        does, or kept for the next owner.

        @return: Deferred[str]: ``sent``, ``kept``, ``mine``, ``none`` or ``unavailable``.
        """

    def keep_signal(room, identity, signal):
        """Keep a signal for a job this instance is about to adopt (forward said ``mine``)."""

    def set_listener(listener):
        """Who hears of jobs lost to, or taken over from, other instances and of signals
        routed here: an object with ``job_lost(room, identity)``, ``taken_over(taken_jobs)`` and
        ``deliver(room, identity, signal_name)`` (False if no such job runs here)."""

    def load_all(on_late=None):
        """All parsable stored jobs, for restore on start (docs/redis-format.md#start-up-restore).

        Unparsable records are skipped with a warning and LEFT in the store. If the
        backend cannot be read within the store's start-up bound, this fires with ``[]``
        and, if ``on_late`` is given, later calls ``on_late(jobs)`` once with the records
        read after the backend came back, leaving out any (room, identity) that this
        process has written or deleted in the meantime (its own state is newer).

        ``on_late`` belongs to this call, not to a store-wide listener, because the late
        records are what *this* load missed: the store can only tell which keys are newer
        in this process by tracking writes from the moment the load began. A backend that
        is never late (memory) takes the argument and never calls it.

        @return: Deferred[list[StoredJob]]; never fails.
        """

    def close():
        """Stop background work and release connections; pending writes get a last,
        bounded chance to land.

        @return: Deferred[None]
        """
