"""The table of live delegated-leave jobs: one per (room, identity), persisted as it changes.

Jobs decide *what* happens (rtcauthd.leave.jobs); the manager owns *which* job is current
for a key. That distinction is what keeps replacement safe: a replaced job's late
"done" or "restarted" report must never touch its successor's stored record, so every
store write goes through a "is this still the current job?" check here (docs/delegated-leave.md#transitions, docs/redis-format.md#when-records-change).
Store failures are logged and never change a job's behaviour or an HTTP answer.
"""

from __future__ import annotations

import random as _random
import weakref
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from rtcauthd.leave.jobs import DelayedLeaveJob, JobEnvironment
from rtcauthd.leave.machine import Signal, State

#: Routed between instances like a webhook signal, but not one: "the participant was removed
#: from the call (membership enforcement), stop the job without sending its leave".
DISCARD = "rtcauth.discard"
from rtcauthd.leave.record import JobParams
from rtcauthd.matrix.delayed_events import Outcome
from rtcauthd.livekit.presence import Presence
from rtcauthd.store.interface import Claim
from rtcauthd.store.model import StoredJob

log = Logger()

Key = Tuple[str, str]


#: a webhook for a job run elsewhere is retried this often while Redis cannot be asked
FORWARD_ATTEMPTS = 30
FORWARD_RETRY_SECONDS = 1.0


class ShuttingDown(Exception):
    """No new jobs are accepted once the manager is stopping (answer 503 ``M_UNKNOWN``)."""


class JobManager:
    """Owns every running :class:`DelayedLeaveJob`, routes webhook signals, persists changes.

    ``store`` is an :class:`rtcauthd.store.interface.IJobStore` (``put``, ``delete``,
    ``load_all(on_late=...)``, each returning a Deferred). ``restart``/``send``/``lookup_participant`` are the
    per-attempt collaborators described on :class:`JobEnvironment`.
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        store,
        restart: Callable[[JobParams], "Deferred[Outcome]"],
        send: Callable[[JobParams], "Deferred[Outcome]"],
        lookup_participant: Callable[[JobParams], "Deferred[Presence]"],
        sanity_interval: float = 0.0,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self._clock = clock
        self._store = store
        self._jobs: Dict[Key, DelayedLeaveJob] = {}
        self._stopping = False
        self._send = send
        # jobs whose record is already gone because their leave may be sent (claim_send)
        self._claimed: "weakref.WeakSet[DelayedLeaveJob]" = weakref.WeakSet()
        self._env = JobEnvironment(
            clock=clock,
            restart=restart,
            send=self._claim_and_send,
            lookup_participant=lookup_participant,
            restarted=self._job_restarted,
            done=self._job_done,
            random=random,
            sanity_interval=sanity_interval,
        )
        store.set_listener(self)

    # -- queries -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[DelayedLeaveJob]:
        return iter(list(self._jobs.values()))

    def get(self, room: str, identity: str) -> Optional[DelayedLeaveJob]:
        return self._jobs.get((room, identity))

    @property
    def stopping(self) -> bool:
        return self._stopping

    # -- adding, routing -----------------------------------------------------------------

    def add(self, params: JobParams) -> "Deferred[None]":
        """Register (or replace) the job for ``params.key``; fires once it is stored.

        Raises :class:`ShuttingDown` after :meth:`stop`, and ValueError for a
        non-positive delay timeout.
        """
        if self._stopping:
            raise ShuttingDown()
        job = DelayedLeaveJob(params, self._env)
        self._retire_predecessor(params.key, job)
        self._jobs[params.key] = job
        log.info(
            "Job {job_id}: delegated leave registered for {room}/{identity}",
            job_id=job.job_id,
            room=params.room,
            identity=params.identity,
        )
        # The client has just scheduled (or restarted) the event: our best guess for RestartedAt.
        stored = self._store_op("register", self._store.register, StoredJob(params, self._clock.seconds()))
        job.start()
        return stored

    def route(self, room: str, identity: str, signal: Union[Signal, str]) -> bool:
        """Deliver a webhook-derived signal; False when no job for the key runs here (it is
        then handed to the instance that runs it, if any)."""
        sig = signal if isinstance(signal, Signal) else Signal(signal)
        job = self._jobs.get((room, identity))
        if job is None:
            self._forward(room, identity, sig, FORWARD_ATTEMPTS)
            return False
        job.signal(sig)
        return True

    def discard(self, room: str, identity: str) -> bool:
        """Stop the job for the key without sending its leave, and delete its record (the
        participant was removed from the room: docs/membership.md#removal).

        False when the job does not run here: with several instances the request is then
        routed to the instance that runs it, or kept for whoever takes it over, like a
        webhook (docs/several-instances.md#routing).
        """
        if self._discard_here(room, identity):
            return True
        maybeDeferred(self._store.forward, room, identity, DISCARD).addCallbacks(
            self._discard_forwarded,
            lambda f: log.failure("Forwarding a job's removal failed", f),
            callbackArgs=(room, identity),
        )
        return False

    def _discard_here(self, room: str, identity: str) -> bool:
        job = self._jobs.pop((room, identity), None)
        if job is None:
            return False
        job.cancel()
        self._delete(room, identity)
        log.info("Job {job_id} stopped: its participant was removed from the call", job_id=job.job_id)
        return True

    def _discard_forwarded(self, result: str, room: str, identity: str) -> None:
        if result == "mine" and not self._discard_here(room, identity):
            self._store.keep_signal(room, identity, DISCARD)  # being adopted here right now
        log.debug("Removal of the job for {room}/{identity}: {result}", room=room, identity=identity, result=result)

    def _forward(self, room: str, identity: str, sig: Signal, attempts_left: int) -> None:
        maybeDeferred(self._store.forward, room, identity, sig.value).addCallbacks(
            self._forwarded, lambda f: log.failure("Forwarding a webhook failed", f),
            callbackArgs=(room, identity, sig, attempts_left),
        )

    def _forwarded(self, result: str, room: str, identity: str, sig: Signal, attempts_left: int = 1) -> None:
        if result == "unavailable" and attempts_left > 1 and not self._stopping:
            # Redis is away (a failover, a restart): the owner can only be found through it.
            self._clock.callLater(FORWARD_RETRY_SECONDS, self._retry_forward, room, identity, sig, attempts_left - 1)
            return
        if result == "mine":
            # Redis says ours: a takeover that is still being started here.
            if not self.deliver(room, identity, sig.value):
                self._store.keep_signal(room, identity, sig.value)
            return
        log.debug(
            "{signal} for {room}/{identity}: {what}",
            signal=sig.value,
            room=room,
            identity=identity,
            what={
                "sent": "handed to the instance that runs the job",
                "queued": "queued for the instance that runs the job (it is reconnecting)",
                "kept": "kept for the instance that takes the job over",
                "unavailable": "dropped, Redis is unavailable",
            }.get(result, "dropped, no such job"),
        )

    # -- what the store hears from other instances (docs/several-instances.md) -----------------

    def _retry_forward(self, room: str, identity: str, sig: Signal, attempts_left: int) -> None:
        if self._stopping:
            return
        job = self._jobs.get((room, identity))
        if job is not None:  # taken over here meanwhile
            job.signal(sig)
            return
        self._forward(room, identity, sig, attempts_left)

    def redeliver(self, room: str, identity: str, signal_name: str) -> None:
        """A signal left in a dead instance's inbox: to the job here, or routed on."""
        if signal_name == DISCARD:
            if not self._stopping:
                self.discard(room, identity)
            return
        try:
            sig = Signal(signal_name)
        except ValueError:
            return
        if not self._stopping:
            self.route(room, identity, sig)

    def deliver(self, room: str, identity: str, signal_name: str) -> bool:
        """A webhook signal that another instance routed here; False if no job for it runs
        here (the store then keeps it for the job's adoption)."""
        if signal_name == DISCARD:
            return self._discard_here(room, identity) or self._stopping
        job = self._jobs.get((room, identity))
        try:
            sig = Signal(signal_name)
        except ValueError:
            return True  # nothing anybody could do with it
        if job is None:
            log.debug("Routed {signal} for {room}/{identity}: no such job here (yet)", signal=signal_name,
                      room=room, identity=identity)
            return self._stopping  # nothing to keep for when stopping

        job.signal(sig)
        return True

    def job_lost(self, room: str, identity: str) -> None:
        """Another instance owns this job now (it was superseded or taken over): stop it
        here without touching its record."""
        job = self._jobs.pop((room, identity), None)
        if job is not None:
            job.cancel()
            log.info("Job {job_id} is driven by another instance now", job_id=job.job_id)

    def taken_over(self, taken) -> None:
        """Jobs adopted from a dead instance: resumed from their records, in Connected if
        their participant had connected, then fed the webhooks kept for them."""
        if self._stopping:
            return
        now = self._clock.seconds()
        for t in taken:
            old = self._jobs.get(t.job.key)
            if old is not None:
                del self._jobs[t.job.key]
                old.cancel()
            # A connected job's record may look expired because its last restarts were
            # still queued in the dead owner; restarting it tells (404 if really gone).
            job = self._resume(t.job, now, purge_expired=not t.connected)
            if job is None:
                continue
            if t.connected:
                job.signal(Signal.ParticipantConnected)
                self._check_still_there(job)
            for name in t.pending:
                self.deliver(*t.job.key, name)

    def _check_still_there(self, job: DelayedLeaveJob) -> None:
        """One SFU look-up for a job taken over in Connected: its previous owner may have
        handled (or been about to send) the leave when it died, and a webhook that reached
        it is gone with it."""

        def answer(presence: Presence) -> None:
            if presence is Presence.ABSENT and self._is_current(job) and job.state is State.Connected:
                log.info("Job {job_id}: the participant left while the job changed hands", job_id=job.job_id)
                job.signal(Signal.SFUParticipantGone)

        maybeDeferred(self._env.lookup_participant, job.params).addCallbacks(
            answer, lambda f: log.debug("Look-up after takeover failed: {error}", error=f.getErrorMessage())
        )

    def _claim_and_send(self, params: JobParams) -> "Deferred[Outcome]":
        """The leave goes out only after its record is durably gone while the job is still
        ours (docs/several-instances.md#exactly-once)."""
        job = self._jobs.get(params.key)
        if job is None or job in self._claimed:
            return self._send(params)

        def claimed(claim: Claim) -> "Deferred[Outcome] | Outcome":
            if job.cancelled:
                return Outcome.retry(detail="job stopped")
            if claim is Claim.GRANTED:
                self._claimed.add(job)
                return self._send(params)
            if claim is Claim.LOST:
                self.job_lost(*params.key)
                return Outcome.retry(detail="owned by another instance")
            return Outcome.retry(detail="cannot prove this instance owns the job")

        return maybeDeferred(self._store.claim_send, params.room, params.identity).addCallback(claimed)

    def _retire_predecessor(self, key: Key, successor: DelayedLeaveJob) -> None:
        old = self._jobs.pop(key, None)
        if old is None:
            return
        log.info(
            "Job {old_id} replaced by {new_id}", old_id=old.job_id, new_id=successor.job_id
        )
        old.signal(Signal.JobReplaced)
        old.cancel()

    # -- reports from jobs -----------------------------------------------------------------

    def _is_current(self, job: DelayedLeaveJob) -> bool:
        return self._jobs.get(job.key) is job

    def _job_restarted(self, job: DelayedLeaveJob, at: float) -> None:
        if self._is_current(job) and job not in self._claimed:
            self._store_op("write", self._store.put, StoredJob(job.params, at))

    def _job_done(self, job: DelayedLeaveJob) -> None:
        if not self._is_current(job):
            # Replaced meanwhile: the record now belongs to the successor.
            job.cancel()
            return
        del self._jobs[job.key]
        job.cancel()
        if job not in self._claimed:  # a claimed job's record is gone already
            self._delete(job.params.room, job.params.identity)
        log.info("Job {job_id} finished in {state}", job_id=job.job_id, state=job.state.value)

    # -- store -----------------------------------------------------------------------------

    def _store_op(self, operation: str, method, stored: StoredJob) -> "Deferred[None]":
        d = maybeDeferred(method, stored)
        d.addCallbacks(lambda _: None, self._store_failed, errbackArgs=(operation,))
        return d

    def _delete(self, room: str, identity: str) -> "Deferred[None]":
        d = maybeDeferred(self._store.delete, room, identity)
        d.addCallbacks(lambda _: None, self._store_failed, errbackArgs=("delete",))
        return d

    @staticmethod
    def _store_failed(failure: Failure, operation: str) -> None:
        log.failure("Job store {operation} failed", failure, operation=operation)

    # -- start-up and shutdown -------------------------------------------------------------

    def restore(self, now_wall: float) -> "Deferred[int]":
        """Resume stored jobs (docs/redis-format.md#start-up-restore); fires with how many were resumed, never fails.

        Expired records are deleted; the others get a fresh job waiting for the initial
        connect with the full waiting window. Their records are left as they are. If the
        store can only deliver its records later (backend down at start), they are
        restored then, against the clock's time at that moment.
        """
        d = maybeDeferred(self._store.load_all, on_late=self._restore_late)

        def failed(failure: Failure) -> list:
            log.failure("Could not load stored jobs; starting without them", failure)
            return []

        d.addErrback(failed)
        d.addCallback(self._restore_all, now_wall)
        return d

    def _restore_late(self, stored_jobs) -> None:
        self._restore_all(stored_jobs, self._clock.seconds())

    def _restore_all(self, stored_jobs, now_wall: float) -> int:
        resumed = 0
        for stored in stored_jobs:
            try:
                if self._restore_one(stored, now_wall):
                    resumed += 1
            except Exception:
                log.failure("Could not restore the stored job for {room}", room=stored.params.room)
        log.info("Restored {count} delegated-leave job(s)", count=resumed)
        return resumed

    def _restore_one(self, stored: StoredJob, now_wall: float) -> bool:
        if self._stopping:
            return False
        if stored.key in self._jobs:
            # A job registered by this process is newer than any stored record.
            return False
        return self._resume(stored, now_wall) is not None

    def _resume(self, stored: StoredJob, now_wall: float, *, purge_expired: bool = True) -> Optional[DelayedLeaveJob]:
        params = stored.params
        if params.delay_timeout_ns <= 0 or (purge_expired and stored.expires_at <= now_wall):
            # The homeserver has fired (or will fire) the event itself.
            log.info(
                "Purging expired stored job for {room}/{identity}",
                room=params.room,
                identity=params.identity,
            )
            self._delete(params.room, params.identity)
            return None
        job = DelayedLeaveJob(params, self._env)
        self._jobs[params.key] = job
        log.info(
            "Job {job_id}: resumed stored delegated leave for {room}/{identity}",
            job_id=job.job_id,
            room=params.room,
            identity=params.identity,
        )
        job.start()
        return job

    def stop(self) -> None:
        """Refuse new jobs and cancel every running one; stored records stay for the next process."""
        self._stopping = True
        jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            job.cancel()
        if jobs:
            log.info("Stopped {count} delegated-leave job(s); records kept", count=len(jobs))
