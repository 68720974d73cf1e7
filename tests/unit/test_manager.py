"""The job table: add/replace, webhook routing, persistence, restore, shutdown (docs/delegated-leave.md#job-state-machine, docs/redis-format.md#start-up-restore)."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.leave.machine import Signal, State
from rtcauthd.leave.record import JobParams
from rtcauthd.leave.manager import JobManager, ShuttingDown
from rtcauthd.matrix.delayed_events import Outcome
from rtcauthd.livekit.presence import Presence
from rtcauthd.store.interface import Claim
from rtcauthd.store.memory import MemoryStore
from rtcauthd.store.model import StoredJob

S = 1_000_000_000
T0 = 1_785_000_000.0  # the Clock starts here so that clock time is "wall" time
OK = Outcome.ok(200)
GONE = Outcome.not_found()


class StoreBroken(Exception):
    pass


class FakeStore:
    """Records operations in order; ``hold`` keeps put/delete Deferreds pending."""

    def __init__(self, records: Optional[List[StoredJob]] = None) -> None:
        self.ops: List[Tuple[Any, ...]] = []
        self.records = {r.key: r for r in (records or [])}
        self.hold = False
        self.held: List[Deferred] = []
        self.fail_writes = False
        self.load_result: Any = None  # None: answer the records
        self.on_late: Any = None
        self.claim_answer = Claim.GRANTED

    def _answer(self) -> Deferred:
        if self.fail_writes:
            return fail(StoreBroken("redis down"))
        if self.hold:
            d: Deferred = Deferred()
            self.held.append(d)
            return d
        return succeed(None)

    def put(self, job: StoredJob) -> Deferred:
        self.ops.append(("put", job))
        self.records[job.key] = job
        return self._answer()

    def delete(self, room: str, identity: str) -> Deferred:
        self.ops.append(("delete", room, identity))
        self.records.pop((room, identity), None)
        return self._answer()

    def register(self, job: StoredJob) -> Deferred:
        return self.put(job)

    def claim_send(self, room: str, identity: str) -> Deferred:
        self.ops.append(("claim", room, identity))
        self.records.pop((room, identity), None)
        return succeed(self.claim_answer)

    def forward(self, room: str, identity: str, signal: str) -> Deferred:
        self.ops.append(("forward", room, identity, signal))
        return succeed("none")

    def keep_signal(self, room: str, identity: str, signal: str) -> None:
        self.ops.append(("keep", room, identity, signal))

    def set_listener(self, listener) -> None:
        self.listener = listener

    def load_all(self, on_late=None) -> Deferred:
        self.on_late = on_late
        if self.load_result is None:
            return succeed(list(self.records.values()))
        return self.load_result


class Collaborators:
    """restart/send/lookup doubles recording (time, delay_id); answers per delay_id."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: List[Tuple[str, float, str]] = []
        self.restart_answer: dict = {}
        self.send_answer: dict = {}
        self.lookup_answer: Any = Presence.UNKNOWN
        self.pending: List[Deferred] = []

    def _reply(self, answer: Any) -> Deferred:
        if answer == "pending":
            d: Deferred = Deferred()
            self.pending.append(d)
            return d
        return succeed(answer)

    def restart(self, p: JobParams) -> Deferred:
        self.calls.append(("restart", self.clock.seconds(), p.delay_id))
        return self._reply(self.restart_answer.get(p.delay_id, OK))

    def send(self, p: JobParams) -> Deferred:
        self.calls.append(("send", self.clock.seconds(), p.delay_id))
        return self._reply(self.send_answer.get(p.delay_id, OK))

    def lookup(self, p: JobParams) -> Deferred:
        self.calls.append(("lookup", self.clock.seconds(), p.delay_id))
        return self._reply(self.lookup_answer)

    def of(self, kind: str, delay_id: str) -> List[float]:
        return [t - T0 for k, t, d in self.calls if k == kind and d == delay_id]


def params(
    delay_id: str = "d1", room: str = "room", identity: str = "alice", timeout_s: float = 10
) -> JobParams:
    return JobParams(delay_id, int(timeout_s * S), "example.com", room, identity)


def stored(delay_id: str = "d1", room: str = "room", identity: str = "alice", timeout_s: float = 10,
           restarted_at: float = T0) -> StoredJob:
    return StoredJob(JobParams(delay_id, int(timeout_s * S), "example.com", room, identity), restarted_at)


class ManagerTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = FakeStore()
        self.hs = Collaborators(self.clock)
        self.manager = self.make_manager()

    def make_manager(self, sanity_interval: float = 0.0) -> JobManager:
        return JobManager(
            clock=self.clock,
            store=self.store,
            restart=self.hs.restart,
            send=self.hs.send,
            lookup_participant=self.hs.lookup,
            sanity_interval=sanity_interval,
            random=lambda: 0.5,
        )

    def tearDown(self) -> None:
        self.manager.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def at(self, t: float) -> None:
        """Advance to T0 + t, firing every due call at its own time."""
        target = T0 + t
        while True:
            due = [c.getTime() for c in self.clock.getDelayedCalls() if c.getTime() <= target]
            if not due:
                break
            self.clock.advance(max(min(due) - self.clock.seconds(), 0))
        self.clock.advance(max(target - self.clock.seconds(), 0))

    def puts(self) -> List[StoredJob]:
        return [op[1] for op in self.store.ops if op[0] == "put"]

    def deletes(self) -> List[Tuple[str, str]]:
        """Records removed: deleted when a job ended, or claimed just before its leave went out."""
        return [(op[1], op[2]) for op in self.store.ops if op[0] in ("delete", "claim")]


class AddTests(ManagerTestCase):
    def test_add_stores_before_firing_and_starts_the_job(self) -> None:
        self.store.hold = True
        d = self.manager.add(params())
        self.assertNoResult(d)  # the HTTP answer waits for the write
        self.assertEqual(self.puts(), [stored(restarted_at=T0)])
        self.assertEqual(self.hs.of("lookup", "d1"), [0.0])  # first lookup immediately
        job = self.manager.get("room", "alice")
        self.assertIs(job.state, State.WaitingForInitialConnect)
        self.store.held[0].callback(None)
        self.assertIsNone(self.successResultOf(d))

    def test_store_failure_is_logged_and_never_fails_add(self) -> None:
        self.store.fail_writes = True
        d = self.manager.add(params())
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(self.flushLoggedErrors(StoreBroken)), 1)
        self.assertEqual(len(self.manager), 1)

    def test_add_while_stopping_raises(self) -> None:
        self.manager.stop()
        with self.assertRaises(ShuttingDown):
            self.manager.add(params())
        self.assertEqual(self.store.ops, [])

    def test_non_positive_timeout_rejected_with_go_duration(self) -> None:
        with self.assertRaises(ValueError) as e:
            self.manager.add(JobParams("d", 0, "example.com", "r", "i"))
        self.assertEqual(str(e.exception), "0s")
        self.assertEqual(len(self.manager), 0)
        self.assertEqual(self.store.ops, [])


class ReplacementTests(ManagerTestCase):
    def test_replacement_cancels_old_job_and_stores_new(self) -> None:
        self.manager.add(params("d1"))
        old = self.manager.get("room", "alice")
        self.manager.route("room", "alice", Signal.ParticipantConnected)
        self.clock.advance(1)
        self.manager.add(params("d2"))
        new = self.manager.get("room", "alice")
        self.assertIsNot(old, new)
        self.assertIs(old.state, State.Replaced)
        self.assertTrue(old.cancelled)
        self.assertEqual([p.params.delay_id for p in self.puts()], ["d1", "d1", "d2"])
        self.assertEqual(self.deletes(), [])  # replacement deletes nothing
        self.at(100)
        self.assertEqual(self.hs.of("restart", "d1"), [0.0])  # old never restarted again
        self.assertEqual(self.hs.of("send", "d1"), [])

    def test_old_job_never_acts_on_late_in_flight_success(self) -> None:
        self.hs.restart_answer["d1"] = "pending"
        self.manager.add(params("d1"))
        self.manager.route("room", "alice", "ParticipantConnected")
        self.manager.add(params("d2"))
        ops_before = list(self.store.ops)
        self.hs.pending[0].callback(OK)  # d1's restart answers after replacement
        self.assertEqual(self.store.ops, ops_before)  # no RestartedAt write for the old job
        self.at(100)
        self.assertEqual(self.hs.of("restart", "d1"), [0.0])
        self.assertEqual(self.hs.of("send", "d1"), [])

    def test_old_job_mid_send_never_deletes_successors_record(self) -> None:
        self.hs.send_answer["d1"] = "pending"
        self.manager.add(params("d1"))
        self.manager.route("room", "alice", Signal.ParticipantConnected)
        self.manager.route("room", "alice", Signal.ParticipantDisconnectedIntentionally)
        self.manager.add(params("d2"))
        self.hs.pending[0].callback(OK)  # the old send completes
        # d1's record was claimed before its send, d2's written after; nothing is deleted later
        kinds = [op[0] for op in self.store.ops]
        self.assertNotIn("delete", kinds)
        self.assertLess(kinds.index("claim"), len(kinds) - 1)
        self.assertEqual(self.puts()[-1].params.delay_id, "d2")
        self.assertEqual(self.store.records[("room", "alice")].params.delay_id, "d2")
        self.assertEqual(self.manager.get("room", "alice").params.delay_id, "d2")

    def test_done_report_from_a_replaced_job_is_ignored(self) -> None:
        self.manager.add(params("d1"))
        old = self.manager.get("room", "alice")
        self.manager.add(params("d2"))
        self.manager._job_done(old)  # even if a report slipped through
        self.assertEqual(self.deletes(), [])
        self.assertEqual(self.manager.get("room", "alice").params.delay_id, "d2")

    def test_restarted_report_from_a_replaced_job_is_ignored(self) -> None:
        self.manager.add(params("d1"))
        old = self.manager.get("room", "alice")
        self.manager.add(params("d2"))
        self.manager._job_restarted(old, T0 + 5)
        self.assertEqual([p.params.delay_id for p in self.puts()], ["d1", "d2"])


class LifecycleTests(ManagerTestCase):
    def test_normal_call_timeline(self) -> None:
        self.manager.add(params(timeout_s=10))
        self.at(2)
        self.assertTrue(self.manager.route("room", "alice", "ParticipantConnected"))
        self.at(20)
        self.assertEqual(self.hs.of("restart", "d1"), [2.0, 10.0, 18.0])
        self.assertEqual([p.restarted_at - T0 for p in self.puts()], [0.0, 2.0, 10.0, 18.0])
        self.manager.route("room", "alice", "ParticipantDisconnectedIntentionally")
        self.assertEqual(self.hs.of("send", "d1"), [20.0])
        self.assertEqual(self.deletes(), [("room", "alice")])
        self.assertIsNone(self.manager.get("room", "alice"))
        self.assertEqual(self.clock.getDelayedCalls(), [])  # nothing left after done

    def test_never_connects_sends_and_deletes(self) -> None:
        self.hs.lookup_answer = Presence.ABSENT
        self.manager.add(params(timeout_s=1))
        self.at(1)
        self.assertEqual(self.hs.of("send", "d1"), [1.0])
        self.assertEqual(self.deletes(), [("room", "alice")])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_delayed_event_gone_aborts_deletes_and_never_sends(self) -> None:
        self.hs.lookup_answer = Presence.PRESENT
        self.hs.restart_answer["d1"] = GONE
        self.manager.add(params())
        self.assertEqual(self.hs.of("restart", "d1"), [0.0])
        self.assertEqual(self.hs.of("send", "d1"), [])
        self.assertEqual(self.deletes(), [("room", "alice")])
        self.assertEqual(len(self.manager), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_already_sent_counts_as_success(self) -> None:
        self.hs.send_answer["d1"] = GONE
        self.manager.add(params())
        self.manager.route("room", "alice", "ParticipantConnected")
        self.manager.route("room", "alice", "ParticipantConnectionAborted")
        self.assertEqual(self.hs.of("send", "d1"), [0.0])
        self.assertEqual(self.deletes(), [("room", "alice")])

    def test_sanity_check_detects_missing_participant(self) -> None:
        self.manager = self.make_manager(sanity_interval=1.0)
        self.hs.lookup_answer = Presence.PRESENT
        self.manager.add(params())
        self.hs.lookup_answer = Presence.ABSENT
        self.at(1)
        self.assertEqual(self.hs.of("send", "d1"), [1.0])
        self.assertEqual(self.deletes(), [("room", "alice")])

    def test_route_unknown_key_is_dropped(self) -> None:
        self.manager.add(params())
        self.assertFalse(self.manager.route("room", "bob", "ParticipantConnected"))
        self.assertFalse(self.manager.route("other", "alice", Signal.ParticipantConnected))
        self.assertIs(self.manager.get("room", "alice").state, State.WaitingForInitialConnect)

    def test_independent_jobs_do_not_cross_talk(self) -> None:
        self.manager.add(params("d1", identity="alice"))
        self.manager.add(params("d2", identity="bob"))
        self.manager.add(params("d3", room="other", identity="alice"))
        for room, identity in (("room", "alice"), ("room", "bob"), ("other", "alice")):
            self.manager.route(room, identity, "ParticipantConnected")
        self.manager.route("room", "bob", "ParticipantDisconnectedIntentionally")
        self.at(9)
        self.assertEqual(self.hs.of("send", "d2"), [0.0])
        self.assertEqual(self.hs.of("send", "d1"), [])
        self.assertEqual(self.hs.of("send", "d3"), [])
        self.assertEqual(self.hs.of("restart", "d1"), [0.0, 8.0])
        self.assertEqual(self.hs.of("restart", "d3"), [0.0, 8.0])
        self.assertEqual(self.deletes(), [("room", "bob")])
        self.assertIs(self.manager.get("room", "alice").state, State.Connected)
        self.assertIs(self.manager.get("other", "alice").state, State.Connected)
        self.assertEqual(len(self.manager), 2)

    def test_stop_cancels_everything_and_keeps_records(self) -> None:
        self.manager = self.make_manager(sanity_interval=5)
        self.hs.lookup_answer = Presence.PRESENT
        self.manager.add(params("d1", identity="alice"))
        self.hs.lookup_answer = Presence.ABSENT
        self.manager.add(params("d2", identity="bob"))
        self.assertTrue(self.clock.getDelayedCalls())
        jobs = list(self.manager)
        self.manager.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(all(job.cancelled for job in jobs))
        self.assertEqual(self.deletes(), [])
        self.assertEqual(len(self.store.records), 2)
        self.assertFalse(self.manager.route("room", "alice", "ParticipantDisconnectedIntentionally"))
        self.assertTrue(self.manager.stopping)


class RestoreTests(ManagerTestCase):
    def test_restore_purges_expired_and_resumes_others(self) -> None:
        now = T0 + 100
        self.clock.advance(100)
        fresh = stored("fresh", identity="a", timeout_s=60, restarted_at=now - 30)
        boundary = stored("edge", identity="b", timeout_s=10, restarted_at=now - 10)  # expires == now
        old = stored("old", identity="c", timeout_s=10, restarted_at=now - 50)
        self.store = FakeStore([fresh, boundary, old])
        self.manager = self.make_manager()
        count = self.successResultOf(self.manager.restore(now))
        self.assertEqual(count, 1)
        self.assertEqual(sorted(self.deletes()), [("room", "b"), ("room", "c")])
        self.assertEqual(self.puts(), [])  # the surviving record is not rewritten
        job = self.manager.get("room", "a")
        self.assertIs(job.state, State.WaitingForInitialConnect)
        self.assertEqual(job.params.delay_id, "fresh")
        self.assertEqual(self.hs.of("lookup", "fresh"), [100.0])
        self.assertIsNone(self.manager.get("room", "b"))
        # Full waiting window again (60 s), not the 30 s remaining.
        self.at(100 + 59.999)
        self.assertEqual(self.hs.of("send", "fresh"), [])
        self.at(100 + 60)
        self.assertEqual(self.hs.of("send", "fresh"), [160.0])
        self.assertEqual(self.deletes()[-1], ("room", "a"))

    def test_restored_job_reconnects_via_webhook(self) -> None:
        self.store = FakeStore([stored(timeout_s=10, restarted_at=T0 - 5)])
        self.manager = self.make_manager()
        self.successResultOf(self.manager.restore(T0))
        self.manager.route("room", "alice", "ParticipantConnected")
        self.assertEqual(self.hs.of("restart", "d1"), [0.0])
        self.assertEqual([p.restarted_at for p in self.puts()], [T0])

    def test_owner_survives_add_restart_and_restore(self) -> None:
        owned = JobParams("d1", 10 * S, "example.com", "room", "alice", "@alice:example.com")
        seen: List[JobParams] = []
        restart = self.hs.restart
        self.hs.restart = lambda p: (seen.append(p), restart(p))[1]
        self.manager = self.make_manager()
        self.successResultOf(self.manager.add(owned))
        self.manager.route("room", "alice", "ParticipantConnected")
        self.assertEqual([p.owner_user_id for p in seen], ["@alice:example.com"])
        self.assertEqual([p.params.owner_user_id for p in self.puts()], ["@alice:example.com"] * 2)
        # a new process: the stored owner drives the restored job's calls
        self.manager.stop()
        self.store = FakeStore([self.puts()[-1]])
        self.manager = self.make_manager()
        self.successResultOf(self.manager.restore(T0))
        self.manager.route("room", "alice", "ParticipantConnected")
        self.assertEqual([p.owner_user_id for p in seen], ["@alice:example.com"] * 2)

    def test_restore_load_failure_starts_empty(self) -> None:
        self.store.load_result = fail(StoreBroken("HGETALL failed"))
        self.assertEqual(self.successResultOf(self.manager.restore(T0)), 0)
        self.assertEqual(len(self.flushLoggedErrors(StoreBroken)), 1)
        self.assertEqual(len(self.manager), 0)

    def test_late_records_are_restored_when_the_store_delivers_them(self) -> None:
        self.store.load_result = succeed([])
        self.assertEqual(self.successResultOf(self.manager.restore(T0)), 0)
        self.manager.add(params("new", identity="alice", timeout_s=600))
        self.clock.advance(50)
        self.store.on_late([
            stored("stale", identity="alice", timeout_s=600, restarted_at=T0 - 10),
            stored("late", identity="bob", timeout_s=600, restarted_at=T0 - 10),
            stored("expired", identity="carol", timeout_s=30, restarted_at=T0 - 10),
        ])
        self.assertEqual(self.manager.get("room", "alice").params.delay_id, "new")
        self.assertEqual(self.manager.get("room", "bob").params.delay_id, "late")
        self.assertIsNone(self.manager.get("room", "carol"))
        self.assertEqual(self.deletes(), [("room", "carol")])

    def test_restore_after_stop_resumes_nothing(self) -> None:
        self.store = FakeStore([stored()])
        self.manager = self.make_manager()
        self.manager.stop()
        self.assertEqual(self.successResultOf(self.manager.restore(T0)), 0)
        self.assertEqual(self.deletes(), [])


class MemoryStoreIntegrationTests(ManagerTestCase):
    def test_with_memory_store(self) -> None:
        self.store = MemoryStore()
        self.manager = self.make_manager()
        self.successResultOf(self.manager.add(params("d1", identity="alice")))
        self.successResultOf(self.manager.add(params("d2", identity="bob")))
        self.manager.route("room", "alice", "ParticipantConnected")
        self.at(3)
        self.manager.route("room", "bob", "ParticipantConnectionAborted")  # not connected: abort
        records = {r.params.identity: r for r in self.successResultOf(self.store.load_all())}
        self.assertEqual(set(records), {"alice"})
        self.assertEqual(records["alice"].restarted_at, T0)
        self.assertEqual(self.hs.of("send", "d2"), [])


class SeveralInstancesTests(ManagerTestCase):
    """The job table's side of sharing Redis (docs/several-instances.md)."""

    def connected(self, delay_id: str = "d1") -> None:
        self.manager.add(params(delay_id))
        self.manager.route("room", "alice", Signal.ParticipantConnected)

    def test_the_record_is_claimed_before_the_leave_is_sent(self) -> None:
        self.connected()
        self.manager.route("room", "alice", Signal.ParticipantDisconnectedIntentionally)
        kinds = [op[0] for op in self.store.ops]
        self.assertEqual(kinds[-1], "claim")  # and no delete after the send: the record is gone
        self.assertEqual(self.hs.of("send", "d1"), [0.0])

    def test_a_job_owned_elsewhere_is_dropped_without_sending(self) -> None:
        self.store.claim_answer = Claim.LOST
        self.connected()
        self.manager.route("room", "alice", Signal.ParticipantDisconnectedIntentionally)
        self.assertEqual(self.hs.of("send", "d1"), [])
        self.assertIsNone(self.manager.get("room", "alice"))
        self.assertNotIn("delete", [op[0] for op in self.store.ops])

    def test_unprovable_ownership_is_retried_and_sends_once_granted(self) -> None:
        self.store.claim_answer = Claim.UNAVAILABLE
        self.connected()
        self.manager.route("room", "alice", Signal.ParticipantDisconnectedIntentionally)
        self.assertEqual(self.hs.of("send", "d1"), [])
        self.store.claim_answer = Claim.GRANTED
        self.at(5)
        self.assertEqual(len(self.hs.of("send", "d1")), 1)
        self.assertEqual([op[0] for op in self.store.ops].count("claim"), 2)

    def test_a_send_retry_after_the_claim_does_not_claim_again(self) -> None:
        self.hs.send_answer["d1"] = Outcome.retry(detail="503")
        self.connected()
        self.manager.route("room", "alice", Signal.ParticipantDisconnectedIntentionally)
        self.at(3)
        self.assertGreater(len(self.hs.of("send", "d1")), 1)
        self.assertEqual([op[0] for op in self.store.ops].count("claim"), 1)

    def test_taken_over_jobs_resume_connected_with_their_kept_webhooks(self) -> None:
        from rtcauthd.cluster.coordinator import TakenJob

        self.manager.taken_over([
            TakenJob(stored("d1", identity="alice"), True, ()),
            TakenJob(stored("d2", identity="bob"), False, ("ParticipantConnected", "ParticipantDisconnectedIntentionally")),
        ])
        self.assertEqual(self.manager.get("room", "alice").state, State.Connected)
        self.assertEqual(self.hs.of("restart", "d1"), [0.0])  # restarted at once by its new owner
        self.assertEqual(self.hs.of("send", "d2"), [0.0])  # the kept leave webhook took effect
        self.assertIsNone(self.manager.get("room", "bob"))

    def test_lost_jobs_stop_here_and_keep_their_records(self) -> None:
        self.connected("d1")
        self.manager.add(params("d2", identity="bob"))
        self.manager.job_lost("room", "alice")
        self.assertIsNone(self.manager.get("room", "alice"))
        self.manager.job_lost("room", "bob")
        self.assertEqual(len(self.manager), 0)
        self.assertEqual(self.deletes(), [])
        self.at(100)
        self.assertEqual(self.hs.of("send", "d1") + self.hs.of("send", "d2"), [])

    def test_a_removal_for_a_job_elsewhere_is_routed_to_its_owner(self) -> None:
        from rtcauthd.leave.manager import DISCARD

        self.assertFalse(self.manager.discard("room", "carol"))
        self.assertEqual(self.store.ops[-1], ("forward", "room", "carol", DISCARD))

    def test_a_routed_removal_stops_the_job_here_without_its_leave(self) -> None:
        from rtcauthd.leave.manager import DISCARD

        self.connected("d1")
        self.assertTrue(self.manager.deliver("room", "alice", DISCARD))
        self.assertIsNone(self.manager.get("room", "alice"))
        self.assertEqual(self.deletes(), [("room", "alice")])
        self.manager.deliver("room", "alice", "ParticipantDisconnectedIntentionally")  # the webhook that follows
        self.at(100)
        self.assertEqual(self.hs.of("send", "d1"), [])
        self.assertFalse(self.manager.deliver("room", "nobody", DISCARD))  # kept for an adoption

    def test_a_removal_for_a_job_being_adopted_here_is_kept_for_it(self) -> None:
        from rtcauthd.cluster.coordinator import TakenJob
        from rtcauthd.leave.manager import DISCARD

        self.store.forward = lambda room, identity, signal: succeed("mine")
        self.manager.discard("room", "alice")
        self.assertEqual(self.store.ops[-1], ("keep", "room", "alice", DISCARD))
        self.manager.taken_over([TakenJob(stored("d1", identity="alice"), True, (DISCARD,))])
        self.assertIsNone(self.manager.get("room", "alice"))
        self.at(100)
        self.assertEqual(self.hs.of("send", "d1"), [])

    def test_a_webhook_for_a_job_not_here_is_forwarded(self) -> None:
        self.assertFalse(self.manager.route("room", "carol", Signal.ParticipantConnected))
        self.assertEqual(self.store.ops[-1], ("forward", "room", "carol", "ParticipantConnected"))

    def test_a_routed_signal_reaches_the_local_job(self) -> None:
        self.manager.add(params("d1"))
        self.manager.deliver("room", "alice", "ParticipantConnected")
        self.assertEqual(self.manager.get("room", "alice").state, State.Connected)
        self.manager.deliver("room", "nobody", "ParticipantConnected")  # ignored
        self.manager.deliver("room", "alice", "NoSuchSignal")  # ignored

    def test_a_signal_for_a_job_being_re_adopted_here_is_kept(self) -> None:
        self.store.forward = lambda room, identity, signal: succeed("mine")
        self.manager.route("room", "carol", Signal.ParticipantDisconnectedIntentionally)
        self.assertEqual(self.store.ops[-1], ("keep", "room", "carol", "ParticipantDisconnectedIntentionally"))
        self.assertFalse(self.manager.deliver("room", "carol", "ParticipantConnected"))

    def test_a_taken_over_connected_job_is_resumed_even_if_its_record_looks_expired(self) -> None:
        from rtcauthd.cluster.coordinator import TakenJob

        # its last restarts were still queued in the dead owner: the stored time is old
        self.manager.taken_over([TakenJob(stored("d1", timeout_s=4, restarted_at=T0 - 10), True, ())])
        self.assertEqual(self.hs.of("restart", "d1"), [0.0])
        self.assertEqual(self.manager.get("room", "alice").state, State.Connected)

    def test_a_webhook_for_a_job_elsewhere_is_retried_while_redis_is_away(self) -> None:
        answers = ["unavailable", "unavailable", "sent"]
        tried = []

        def forward(room, identity, signal):
            tried.append(self.clock.seconds() - T0)
            return succeed(answers.pop(0))

        self.store.forward = forward
        self.manager.route("room", "carol", Signal.ParticipantConnected)
        self.at(5)
        self.assertEqual(tried, [0.0, 1.0, 2.0])

    def test_a_taken_over_connected_job_whose_participant_is_gone_sends_the_leave(self) -> None:
        from rtcauthd.cluster.coordinator import TakenJob

        self.hs.lookup_answer = Presence.ABSENT  # it left while its old owner was dying
        self.manager.taken_over([TakenJob(stored("d1"), True, ())])
        self.assertEqual(self.hs.of("send", "d1"), [0.0])
        self.assertIsNone(self.manager.get("room", "alice"))

    def test_a_signal_from_a_dead_instances_inbox_goes_to_the_job_or_on(self) -> None:
        self.manager.add(params("d1"))
        self.manager.redeliver("room", "alice", "ParticipantConnected")
        self.assertEqual(self.manager.get("room", "alice").state, State.Connected)
        self.manager.redeliver("room", "carol", "ParticipantConnected")
        self.assertEqual(self.store.ops[-1], ("forward", "room", "carol", "ParticipantConnected"))
