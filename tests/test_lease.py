"""Leases: the state table, every rule of decide(), and the manager over real SQLite and real pilots.

The rule tests are pure (no store, no processes). The manager tests use a
real store on disk; the lease tests use real pilot processes through the
local provider, the real receiver and the real hugepage pool. One stand-in
is used, named as such: an LRM queue that never dispatches (or refuses),
for the queue timeout and the LRM's refusals; the real never-starting
Slurm job is tested in tests/test_slurm_leases.py.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest

from service_adapter.lease import (
    LEASE_STATES,
    TERMINAL_STATES,
    InvalidLease,
    LeaseError,
    LeaseManager,
    Timing,
    UnknownLease,
    decide,
)
from service_adapter.providers.base import JobState, Provider, ProviderError
from service_adapter.store import ENDING, LeaseRow, PilotRow, Store
from tests.support.channels import Channel
from tests.support.pilots import journal_files
from tests.support.pool import pool_pages
from tests.support.service import add_lease
from tests.support.localsites import local_site

# -- the state table -----------------------------------------------------------------------------


def test_every_state_is_reachable_from_the_two_first_states_through_the_table():
    seen, todo = {"pending", "scheduled"}, ["pending", "scheduled"]
    while todo:
        for nxt in LEASE_STATES[todo.pop()].next:
            assert nxt in LEASE_STATES, f"{nxt} is not a state"
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(LEASE_STATES)


def test_terminal_states_go_nowhere_and_the_others_go_somewhere():
    for state, row in LEASE_STATES.items():
        assert bool(row.next) != row.terminal, state
        assert row.meaning
    assert TERMINAL_STATES == {"released", "expired", "failed", "missing"}


# -- decide(): every rule --------------------------------------------------------------------------

NOW = 1_700_000_000.0
TIMING = Timing(queue_timeout_s=60, release_grace_s=10)


def lease(state="pending", *, nodes=2, age=5.0, duration=100.0, release=None, job_finished=None,
          start=None) -> LeaseRow:
    """A stored lease created ``age`` s before NOW; ``release``/``job_finished``: seconds before NOW;
    ``start``: its start_at, seconds after NOW (negative: before)."""
    created = NOW - age
    start_at = None if start is None else NOW + start
    return LeaseRow(
        id="lease-1", owner="alice", nodes=nodes, memory_mb=64, duration_s=duration, state=state, reason="before",
        slot="slot-1", job_id="job-1", created_at=created, updated_at=created,
        release_requested_at=None if release is None else NOW - release,
        expires_at=(start_at or created) + duration,
        job_finished_at=None if job_finished is None else NOW - job_finished, start_at=start_at,
    )


def pilot(host, state, *, reserved=True, ended_by=None, code=0, lost=False) -> PilotRow:
    """A host's latest state; ``ended_by`` defaults to the state itself when it is an ending one."""
    if ended_by is None and state in ENDING:
        ended_by = state
    return PilotRow("slot-1", host, state, code, 1, 64, None,
                    reserved_at=NOW - 3 if reserved else None, reserved_mb=64 if reserved else None,
                    ended_by=ended_by, lost_at=NOW - 1 if lost else None)


R = JobState.RUNNING
BOTH_RESERVED = [pilot("n1", "reserved"), pilot("n2", "reserved")]
ONE_RESERVED = [pilot("n1", "reserved")]


@dataclasses.dataclass
class Case:
    name: str
    lease: LeaseRow
    pilots: list
    job: JobState
    expect: str
    cancel: bool = False
    reason: str = ""
    now: float = NOW
    vms: int = 0


CASES = [
    # terminal stays, whatever happens
    *[Case(f"{s} stays", lease(s), [pilot("n1", "error", code=5)], JobState.COMPLETED, s)
      for s in sorted(TERMINAL_STATES)],
    # a pilot's error fails the lease wherever it is, and the job is cancelled
    Case("error while pending", lease("pending"), [pilot("n1", "error", reserved=False, code=5)], R, "failed",
         True, "n1 (code 5)"),
    Case("error while ready", lease("ready"), [pilot("n1", "error", code=8), pilot("n2", "reserved")], R,
         "failed", True, "pilot error"),
    Case("error while running", lease("running"), [pilot("n1", "error", code=8), pilot("n2", "reserved")], R,
         "failed", True),
    Case("error while releasing", lease("releasing", release=1), [pilot("n1", "error", code=8)], R, "failed", True),
    # pending / reserving
    Case("all reserved from pending", lease("pending"), BOTH_RESERVED, R, "ready", reason="all 2 pilots reserved"),
    Case("all reserved from reserving", lease("reserving"), BOTH_RESERVED, R, "ready"),
    Case("reserved, then already leaving, still counts", lease("reserving"),
         [pilot("n1", "unreserved", ended_by="unreserving"), pilot("n2", "reserved")], R, "ready"),
    Case("first pilot reported", lease("pending"), ONE_RESERVED, R, "reserving", reason="1 of 2 pilots reserved"),
    Case("a pilot reported, not reserved yet", lease("pending"), [pilot("n1", "reserving", reserved=False)], R,
         "reserving", reason="0 of 2"),
    Case("still reserving", lease("reserving"), ONE_RESERVED, R, "reserving"),
    Case("queued job", lease("pending"), [], JobState.PENDING, "pending"),
    Case("held job", lease("pending"), [], JobState.HELD, "pending"),
    Case("job ended before any pilot", lease("pending"), [], JobState.COMPLETED, "failed",
         reason="job ended (completed) before the lease was ready: 0 of 2 pilots reserved"),
    Case("job gone while reserving", lease("reserving"), ONE_RESERVED, JobState.GONE, "failed",
         reason="job ended (gone) before the lease was ready: 1 of 2 pilots reserved"),
    Case("unknown job is not finished", lease("pending"), [], JobState.UNKNOWN, "pending"),
    Case("unknown job while reserving", lease("reserving"), ONE_RESERVED, JobState.UNKNOWN, "reserving"),
    Case("queue timeout, nobody reported", lease("pending", age=61), [], JobState.PENDING, "missing", True,
         "queue timeout (60 s): 0 of 2 pilots reported"),
    Case("queue timeout, one reported", lease("reserving", age=61), ONE_RESERVED, R, "missing", True,
         "1 of 2 pilots reported"),
    Case("queue timeout with the job unknown", lease("pending", age=61), [], JobState.UNKNOWN, "missing", True),
    Case("just inside the queue timeout", lease("pending", age=60), [], JobState.PENDING, "pending"),
    Case("release while pending", lease("pending", release=0), [], JobState.PENDING, "releasing", True),
    Case("release while reserving", lease("reserving", release=0), ONE_RESERVED, R, "releasing", True),
    Case("release beats the job's end", lease("pending", release=0), [], JobState.CANCELLED, "releasing", True),
    Case("a host leaves before the lease was ready", lease("reserving"),
         [pilot("n1", "unreserving")], R, "failed", True, "n1: unreserving ended before the lease was ready"),
    # scheduled: a begin time
    Case("scheduled waits for its start, however old", lease("scheduled", age=1000, start=30), [],
         JobState.PENDING, "scheduled"),
    Case("scheduled: its start came", lease("scheduled", start=0), [], JobState.PENDING, "pending",
         reason="its start time came"),
    Case("scheduled: released before its start", lease("scheduled", start=30, release=0), [], JobState.PENDING,
         "releasing", True, "release requested before the lease was ready"),
    Case("scheduled: the job ended before its start", lease("scheduled", start=30), [], JobState.CANCELLED,
         "failed", reason="job ended (cancelled) before the lease was ready"),
    Case("scheduled: the batch system started it early and all reserved", lease("scheduled", start=30),
         BOTH_RESERVED, R, "ready"),
    Case("scheduled: a pilot reported", lease("scheduled", start=30), ONE_RESERVED, R, "reserving"),
    Case("scheduled: one pilot, the queue timeout past its start", lease("scheduled", age=100, start=-61), ONE_RESERVED, R,
         "missing", True),
    Case("the queue timeout counts from the start", lease("pending", age=1000, start=-60), [], JobState.PENDING,
         "pending"),
    Case("the queue timeout after the start", lease("pending", age=1000, start=-61), [], JobState.PENDING,
         "missing", True),
    # ready / running
    Case("release while ready", lease("ready", release=0), BOTH_RESERVED, R, "releasing", True, "release requested"),
    Case("release while running", lease("running", release=0), BOTH_RESERVED, R, "releasing", True),
    Case("the pilots' deadline", lease("ready"), [pilot("n1", "unreserving"), pilot("n2", "reserved")], R,
         "releasing", False, "the pilots' deadline came (n1: unreserving)"),
    Case("the LRM stops the job", lease("ready"), [pilot("n1", "earlyunreserving"), pilot("n2", "reserved")], R,
         "releasing", False, "the LRM is stopping the job (n1: earlyunreserving)"),
    Case("killed on a node", lease("ready"), [pilot("n1", "killed"), pilot("n2", "reserved")], R,
         "releasing", False, "killed on the node (n1: killed)"),
    Case("running, a pilot unreserved", lease("running"), [pilot("n1", "unreserved"), pilot("n2", "reserved")], R,
         "releasing"),
    Case("ready, job ended, within the grace", lease("ready", job_finished=9), BOTH_RESERVED, JobState.COMPLETED,
         "ready"),
    Case("ready, job ended without a word, before the deadline", lease("ready", job_finished=10), BOTH_RESERVED,
         JobState.FAILED, "failed", False, "job ended (failed) and no pilot reported unreserving within 10 s"),
    Case("ready, job ended without a word, past the deadline", lease("ready", age=200, job_finished=10),
         BOTH_RESERVED, JobState.COMPLETED, "expired"),
    Case("running, job gone past the deadline", lease("running", age=200, job_finished=50), BOTH_RESERVED,
         JobState.GONE, "expired"),
    Case("running, job ended early", lease("running", job_finished=50), BOTH_RESERVED, JobState.TIMEOUT, "failed"),
    Case("ready, job unknown for ever", lease("ready", age=10_000), BOTH_RESERVED, JobState.UNKNOWN, "ready"),
    Case("a VM runs on a ready lease", lease("ready"), BOTH_RESERVED, R, "running", reason="1 VM running", vms=1),
    Case("VMs keep a lease running", lease("running"), BOTH_RESERVED, R, "running", vms=2),
    Case("the last VM stopped", lease("running"), BOTH_RESERVED, R, "ready", reason="no VM running"),
    Case("a host stopped polling", lease("running"), [pilot("n1", "reserved", lost=True), pilot("n2", "reserved")],
         R, "failed", True, "lost: n1 stopped polling", vms=1),
    Case("lost while ready", lease("ready"), [pilot("n1", "reserved"), pilot("n2", "reserved", lost=True)], R,
         "failed", True, "lost: n2"),
    Case("a release beats a lost host", lease("ready", release=0), [pilot("n1", "reserved", lost=True)], R,
         "releasing", True),
    # releasing
    Case("released: every host unreserved", lease("releasing", release=1),
         [pilot("n1", "unreserved", ended_by="earlyunreserving"),
          pilot("n2", "unreserved", ended_by="earlyunreserving")],
         R, "released", reason="all 2 pilots reported unreserved"),
    Case("released: one unreserved, one killed", lease("releasing", release=1),
         [pilot("n1", "unreserved", ended_by="earlyunreserving"), pilot("n2", "killed")], R, "released",
         reason="killed or unreserved"),
    Case("expired: the pilots' own deadline", lease("releasing"),
         [pilot("n1", "unreserved", ended_by="unreserving"), pilot("n2", "unreserved", ended_by="unreserving")],
         R, "expired", reason="all 2 pilots reported unreserved"),
    Case("failed: the LRM ended it early", lease("releasing"),
         [pilot("n1", "unreserved", ended_by="earlyunreserving"), pilot("n2", "unreserved", ended_by="unreserving")],
         JobState.CANCELLED, "failed",
         reason="ended early, before its deadline, without a release (n1: earlyunreserving)"),
    Case("LRM's stop after the deadline is an expiry", lease("releasing", age=200),
         [pilot("n1", "unreserved", ended_by="earlyunreserving"),
          pilot("n2", "unreserved", ended_by="earlyunreserving")],
         JobState.TIMEOUT, "expired"),
    Case("still waiting for a host", lease("releasing", release=1),
         [pilot("n1", "unreserved"), pilot("n2", "earlyunreserving")], R, "releasing"),
    Case("job ended, grace not over", lease("releasing", release=9),
         [pilot("n1", "unreserved"), pilot("n2", "earlyunreserving")], JobState.CANCELLED, "releasing"),
    Case("job ended, grace over: released without n2", lease("releasing", release=10),
         [pilot("n1", "unreserved"), pilot("n2", "earlyunreserving")], JobState.CANCELLED, "released",
         reason="n2: earlyunreserving never reported unreserved"),
    Case("unknown job never ends a release", lease("releasing", release=1000),
         [pilot("n1", "unreserved"), pilot("n2", "earlyunreserving")], JobState.UNKNOWN, "releasing"),
    Case("deadline, job gone, grace over since it was seen gone", lease("releasing", age=200, job_finished=10),
         [pilot("n1", "unreserved", ended_by="unreserving"), pilot("n2", "unreserving")], JobState.GONE, "expired",
         reason="job ended (gone); n2: unreserving never reported unreserved"),
    Case("deadline, job gone, within the grace", lease("releasing", age=200, job_finished=3),
         [pilot("n1", "unreserved", ended_by="unreserving"), pilot("n2", "unreserving")], JobState.GONE, "releasing"),
    Case("every bound host ended, one never bound, job over", lease("releasing", release=1),
         [pilot("n1", "unreserved", ended_by="earlyunreserving")], JobState.CANCELLED, "released",
         reason="1 of 2 hosts never reported at all"),
    Case("never bound, released, job over", lease("releasing", release=1), [], JobState.CANCELLED, "released",
         reason="released before any pilot reported (job cancelled)"),
    Case("never bound, released, grace over, job unknown", lease("releasing", release=10), [], JobState.UNKNOWN,
         "released"),
    Case("never bound, released, job still queued", lease("releasing", release=1), [], JobState.PENDING, "releasing"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decide(case):
    decision = decide(case.lease, case.pilots, case.job, case.now, TIMING, vms_running=case.vms)
    assert decision.state == case.expect, decision.reason
    assert decision.cancel == case.cancel, decision.reason
    assert case.reason in decision.reason
    if decision.state == case.lease.state:
        assert decision.reason == case.lease.reason  # staying put changes nothing


def test_decide_makes_only_the_tables_transitions_and_all_of_them():
    made = set()
    for case in CASES:
        decision = decide(case.lease, case.pilots, case.job, case.now, TIMING, vms_running=case.vms)
        old = case.lease.state
        if decision.state != old:
            assert decision.state in LEASE_STATES[old].next, f"{case.name}: {old} -> {decision.state}"
            made.add((old, decision.state))
    allowed = {(old, new) for old, row in LEASE_STATES.items() for new in row.next}
    assert allowed - made == set()


def test_unknown_never_finishes_a_lease_in_any_state():
    for state in LEASE_STATES:
        for pilots in ([], ONE_RESERVED, [pilot("n1", "unreserved"), pilot("n2", "unreserving")]):
            long_ago = lease(state, age=30, release=None if state != "releasing" else 20)
            decision = decide(long_ago, pilots, JobState.UNKNOWN, NOW, Timing(queue_timeout_s=60, release_grace_s=10))
            assert "job ended" not in decision.reason, (state, decision)


# -- the manager over a real store, with an LRM stand-in ----------------------------------------------


class QueueThatNeverDispatches(Provider):
    """A stand-in for an LRM queue whose jobs never start: submit records, status PENDING, cancel records.

    ``refuse`` makes submit fail as a refusing LRM does; ``failing_cancels``
    makes that many cancels fail first.
    """

    name = "never-dispatches"

    def __init__(self, refuse: str | None = None, failing_cancels: int = 0):
        self.refuse = refuse
        self.failing_cancels = failing_cancels
        self.submitted, self.cancels, self.status_calls = [], [], []
        self.cancelled: set[str] = set()

    def submit(self, job):
        if self.refuse:
            raise ProviderError(self.refuse)
        self.submitted.append(job)
        return f"queued-{len(self.submitted)}"

    def cancel(self, job_id, force=False):
        self.cancels.append(job_id)
        if self.failing_cancels:
            self.failing_cancels -= 1
            raise ProviderError("qdel: cannot connect to server (stand-in)")
        self.cancelled.add(job_id)

    def status(self, job_ids):
        self.status_calls.append(list(job_ids))
        return {j: JobState.CANCELLED if j in self.cancelled else JobState.PENDING for j in job_ids}

    def allocated_hosts(self, job_id):
        return None  # never dispatched: no hosts


@pytest.fixture
def store(store_location):
    """The lease manager's store, on each backend (SQLite, PostgreSQL)."""
    opened = Store(store_location)
    yield opened
    opened.close()


def manager(store, provider, **options) -> LeaseManager:
    options.setdefault("status_interval_s", 0.1)
    return LeaseManager(store, provider, contact="http://127.0.0.1:9", pilot_config="/nonexistent/pilot.conf",
                        **options)


def test_queue_timeout_cancels_the_job_and_the_lease_is_missing(store):
    queue = QueueThatNeverDispatches()
    leases = manager(store, queue, queue_timeout_s=0.5)
    leases.start()
    try:
        made = leases.reserve(2, 64, 60, owner="alice")
        assert made.state == "pending" and made.job_id == "queued-1" and made.slot == queue.submitted[0].slot
        assert queue.submitted[0].lease == made.id
        done = leases.wait(made.id, TERMINAL_STATES, timeout=10)
    finally:
        leases.stop()
    assert done.state == "missing", done.reason
    assert "queue timeout (0.5 s): 0 of 2 pilots reported" in done.reason
    assert queue.cancels == ["queued-1"]
    assert done.ended_at is not None and done.pilots == []
    leases.tick()
    assert queue.cancels == ["queued-1"]  # the cancel went through once; it is not repeated


def test_wait_without_the_thread_ticks_itself(store):
    queue = QueueThatNeverDispatches()
    leases = manager(store, queue, queue_timeout_s=0.3)
    made = leases.reserve(1, 64, 60)
    assert leases.wait(made.id, {"missing"}, timeout=10).state == "missing"
    assert queue.cancels == [made.job_id]


def test_one_status_call_for_all_leases_at_most_every_interval(store):
    queue = QueueThatNeverDispatches()
    now = [NOW]
    leases = manager(store, queue, status_interval_s=5, clock=lambda: now[0])
    first, second = leases.reserve(1, 64, 60), leases.reserve(2, 64, 60)
    leases.tick()
    leases.tick()
    assert queue.status_calls == [sorted([first.job_id, second.job_id])]
    now[0] += 5
    leases.tick()
    assert len(queue.status_calls) == 2


def test_the_thread_ticks_on_commits_and_does_not_poll(store):
    queue = QueueThatNeverDispatches()
    leases = manager(store, queue, status_interval_s=30)
    ticked = threading.Event()
    count = []
    real_tick = leases.tick

    def counted():
        count.append(1)
        ticked.set()
        return real_tick()

    leases.tick = counted
    leases.start()
    try:
        assert ticked.wait(5)
        ticked.clear()
        add_lease(store, "someone-elses", 1, 64, 60)  # any commit wakes the manager
        assert ticked.wait(5)
        settled = len(count)
        time.sleep(0.5)  # idle: no commit, the interval is 30 s
        assert len(count) == settled
    finally:
        leases.stop()
    assert not leases.running


def test_the_thread_is_not_woken_by_vm_starts(tmp_path):
    """A fan-out of VM starts (a commit each) changes nothing the manager decides on until the pilots report:
    it wakes no tick (they were 15 % of the service's CPU in bench_scale's fan-out); a notification does."""
    channel = Channel(tmp_path)
    leases = manager(channel.store, QueueThatNeverDispatches(), status_interval_s=30)
    ticked = threading.Event()
    real_tick = leases.tick

    def counted():
        ticked.set()
        return real_tick()

    leases.tick = counted
    try:
        lease_id, slot = channel.lease()
        leases.start()
        assert ticked.wait(5)  # the first tick, at start: the lease's commits came before it
        ticked.clear()
        for name in ("vm1", "vm2", "vm3"):
            channel.start(lease_id, name)
        assert not ticked.wait(0.5)
        channel.notify(slot, "node1", "heartbeat")
        assert ticked.wait(5)
    finally:
        leases.stop()
        channel.close()


def test_refused_submit_fails_the_lease_with_the_lrms_words(store):
    refusal = "sbatch: error: Batch job submission failed: Requested node configuration is not available"
    leases = manager(store, QueueThatNeverDispatches(refuse=refusal))
    with pytest.raises(LeaseError, match="Requested node configuration is not available") as caught:
        leases.reserve(5, 64, 60)
    (failed,) = leases.list()
    assert failed.id == caught.value.lease_id and failed.state == "failed" and refusal in failed.reason
    assert failed.job_id is None and failed.ended_at is not None


def test_a_failed_cancel_is_retried_by_the_next_tick(store):
    queue = QueueThatNeverDispatches(failing_cancels=1)
    now = [NOW]
    leases = manager(store, queue, status_interval_s=1, clock=lambda: now[0])
    made = leases.reserve(1, 64, 60)
    assert leases.release(made.id).state == "releasing"
    assert queue.cancels == [made.job_id]  # tried at once, refused
    leases.tick()
    assert queue.cancels == [made.job_id]  # not again before the interval
    now[0] += 1
    leases.tick()
    now[0] += 1
    leases.tick()  # the job now reports cancelled, and no pilot ever reported
    assert queue.cancels == [made.job_id, made.job_id]
    done = leases.get(made.id)
    assert done.state == "released", done.reason
    assert [(e.old_state, e.new_state) for e in leases.history(made.id)] == [
        (None, "pending"), ("pending", "releasing"), ("releasing", "released"),
    ]


class JobThatOutlivesItsCancel(QueueThatNeverDispatches):
    """Stand-in for a running job whose pilots ignore the gentle cancel (a hung pilot)."""

    def cancel(self, job_id, force=False):
        self.cancels.append((job_id, force))
        if force:
            self.cancelled.add(job_id)

    def status(self, job_ids):
        self.status_calls.append(list(job_ids))
        return {j: JobState.CANCELLED if j in self.cancelled else JobState.RUNNING for j in job_ids}

    def allocated_hosts(self, job_id):
        return None  # no receiver asks this stand-in


def test_a_job_still_running_after_the_release_grace_is_cancelled_outright_once(store):
    job = JobThatOutlivesItsCancel()
    now = [NOW]
    leases = manager(store, job, status_interval_s=1, release_grace_s=30, clock=lambda: now[0])
    made = leases.reserve(1, 64, 600)
    leases.release(made.id)
    assert job.cancels == [(made.job_id, False)]  # the gentle way first
    now[0] += 29
    leases.tick()
    assert job.cancels == [(made.job_id, False)]  # within the grace: the pilots may still be restoring
    now[0] += 2
    leases.tick()
    assert job.cancels == [(made.job_id, False), (made.job_id, True)]
    now[0] += 2
    leases.tick()
    now[0] += 31
    leases.tick()
    assert job.cancels == [(made.job_id, False), (made.job_id, True)]  # once
    assert leases.get(made.id).state == "released"


def test_bad_requests_and_unknown_leases(store):
    queue = QueueThatNeverDispatches()
    leases = manager(store, queue)
    for args in ((0, 64, 60), (1, 0, 60), (1, 64, 0), (1, 64, float("nan")), (True, 64, 60), (1.5, 64, 60)):
        with pytest.raises(InvalidLease):
            leases.reserve(*args)
    with pytest.raises(ValueError, match="owner"):
        leases.reserve(1, 64, 60, owner=" ")
    assert leases.list() == [] and queue.submitted == []
    for call in (leases.get, leases.release, leases.history, lambda i: leases.usage(lease_id=i)):
        with pytest.raises(UnknownLease) as caught:
            call("no-such-lease")
        assert caught.value.args[0] == "no-such-lease"
    with pytest.raises(ValueError, match="unknown lease state"):
        leases.list(states=["done"])


def test_two_managers_never_apply_one_transition_twice(store):
    queue = QueueThatNeverDispatches()
    now = [NOW]
    one = manager(store, queue, queue_timeout_s=10, clock=lambda: now[0])
    two = manager(store, queue, queue_timeout_s=10, clock=lambda: now[0])
    made = one.reserve(1, 64, 60)
    now[0] += 11
    assert [c[1:3] for c in one.tick()] == [("pending", "missing")]
    assert two.tick() == []
    assert [e.new_state for e in one.history(made.id)] == ["pending", "missing"]


# -- whole leases: real pilots through the local provider --------------------------------------------


def test_two_node_lease_ready_then_released_with_usage_per_host_and_owner(tmp_path, hugepages):
    site = local_site(tmp_path)
    try:
        alice = site.leases.reserve(2, 32, 300, owner="alice")
        assert alice.state == "pending" and alice.owner == "alice" and alice.nodes == 2
        bob = site.leases.reserve(1, 16, 300, owner="bob")
        ready = site.leases.wait(alice.id, {"ready"} | TERMINAL_STATES, timeout=30)
        assert ready.state == "ready", ready.reason
        assert site.leases.wait(bob.id, {"ready"} | TERMINAL_STATES, timeout=30).state == "ready"
        assert pool_pages() == hugepages + 2 * 16 + 8
        hosts = sorted(p.host for p in ready.pilots)
        assert hosts == sorted(site.provider.hosts(alice.job_id))
        assert all(p.state == "reserved" and p.reserved_at for p in ready.pilots)
        assert ready.ready_at == max(p.reserved_at for p in ready.pilots)
        assert ready.usage.node_seconds == 0  # nothing has ended yet

        releasing = site.leases.release(alice.id)
        assert releasing.state == "releasing" and releasing.release_requested_at is not None
        done = site.leases.wait(alice.id, TERMINAL_STATES, timeout=30)
        assert done.state == "released", done.reason
        assert done.reason == "all 2 pilots reported unreserved"
        states = [e.new_state for e in site.leases.history(alice.id)]
        assert states in (["pending", "reserving", "ready", "releasing", "released"],
                          ["pending", "ready", "releasing", "released"])
        assert site.leases.release(alice.id) == done  # idempotent: an ended lease stays as it is

        rows = site.store.usage_rows(lease_id=alice.id)
        assert sorted(r.host for r in rows) == hosts
        for row in rows:
            assert row.owner == "alice" and row.memory_mb == 32 and row.ended_by == "unreserved"
            assert row.node_seconds > 0 and row.mb_seconds == pytest.approx(32 * row.node_seconds)
        used = site.leases.usage(lease_id=alice.id)
        assert used.leases == 1 and used.node_seconds == pytest.approx(sum(r.node_seconds for r in rows))
        assert used.mb_seconds == pytest.approx(32 * used.node_seconds) and done.usage == used

        site.leases.release(bob.id)
        assert site.leases.wait(bob.id, TERMINAL_STATES, timeout=30).state == "released"
        assert site.leases.usage(owner="alice") == used
        bobs = site.leases.usage(owner="bob")
        assert bobs.leases == 1 and bobs.node_seconds > 0 and bobs.mb_seconds == pytest.approx(16 * bobs.node_seconds)
        everyone = site.leases.usage()
        assert everyone.leases == 2
        assert everyone.mb_seconds == pytest.approx(used.mb_seconds + bobs.mb_seconds)
        assert [i.id for i in site.leases.list(owner="bob")] == [bob.id]
        assert [i.id for i in site.leases.list(states=["released"])] == [bob.id, alice.id]  # newest first
        assert site.leases.list(states=["ready", "releasing"]) == []

        body = json.loads(json.dumps(done.to_json()))
        assert body["state"] == "released" and body["terminal"] is True and body["owner"] == "alice"
        assert body["created_at"].endswith("Z") and body["ended_at"].endswith("Z") and body["ready_at"]
        assert sorted(p["host"] for p in body["pilots"]) == hosts
        assert body["usage"]["mb_seconds"] == pytest.approx(used.mb_seconds)
        assert site.provider.wait(alice.job_id, timeout=10) == [0, 0]
    finally:
        site.close()
    assert pool_pages() == hugepages


def test_a_lease_left_to_its_deadline_expires(tmp_path, hugepages):
    site = local_site(tmp_path)
    try:
        made = site.leases.reserve(2, 16, 3, owner="carol")
        assert site.leases.wait(made.id, {"ready"} | TERMINAL_STATES, timeout=30).state == "ready"
        done = site.leases.wait(made.id, TERMINAL_STATES, timeout=30)
        assert done.state == "expired", done.reason
        assert done.release_requested_at is None
        (releasing,) = [e for e in site.leases.history(made.id) if e.new_state == "releasing"]
        assert "the pilots' deadline came" in releasing.reason
        assert done.usage.leases == 1 and done.usage.mb_seconds == pytest.approx(16 * done.usage.node_seconds)
        assert pool_pages() == hugepages
    finally:
        site.close()


def test_a_restarted_service_resumes_the_lease_and_releases_it(tmp_path, hugepages):
    first = local_site(tmp_path, name="service")
    second = None
    try:
        made = first.leases.reserve(2, 16, 300, owner="dave")
        assert first.leases.wait(made.id, {"ready"} | TERMINAL_STATES, timeout=30).state == "ready"
        first.close(stop_pilots=False)  # the service goes away; the job and its pilots go on
        assert pool_pages() == hugepages + 2 * 8

        second = local_site(tmp_path, name="service")  # same store file, account, port and provider state
        again = second.leases.get(made.id)
        assert again.state == "ready" and again.job_id == made.job_id and len(again.pilots) == 2
        assert second.leases.release(made.id).state == "releasing"
        done = second.leases.wait(made.id, TERMINAL_STATES, timeout=30)
        assert done.state == "released", done.reason
        assert len(second.store.usage_rows(lease_id=made.id)) == 2
        for host in {p.host for p in done.pilots}:
            states = [s for h, _q, s, _c in second.store.notifications(made.slot) if h == host]
            assert states == ["reserved", "earlyunreserving", "unreserved"]
    finally:
        if second is not None:
            second.close()
        first.provider.close()  # by pid, should the test have failed with the pilots still holding
    assert pool_pages() == hugepages
    assert journal_files(tmp_path) == []
