"""Leases: N nodes x M MB for D seconds, as one pilot job, watched through the store and the LRM.

One lease is one slot is one pilot job of N nodes; each host binds to the
slot with its first notification. A lease moves through
:data:`LEASE_STATES` (one table: each state, whether it is terminal, where
it may go, what it means). Every rule that moves it is in one pure
function, :func:`decide`, over the lease as stored, its pilots' latest
states, the job's state as the LRM reports it, and the time.

:class:`LeaseManager` is what a service embeds: ``reserve`` records the
lease and its slot, then submits the job; ``release`` cancels it; ``tick``
reads every lease still open from the STORE (so a restarted service simply
resumes), asks the provider about all their jobs in one call, applies
:func:`decide`, writes each transition as a compare-and-set on the old
state, and cancels jobs where told. ``start`` runs ``tick`` in a thread
woken by store commits (a pilot's notification) or every
``status_interval_s``. No HTTP here: the operator API (``api.py``) wraps it.

Times in :meth:`LeaseInfo.to_json` are RFC 3339 UTC strings with
microseconds (``pilot.protocol.format_epoch``, the wire protocol's form),
or null; durations and usage are numbers of seconds.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
import uuid
from typing import Callable, Iterable

from pilot.protocol import format_epoch
from service_adapter.providers.base import JobState, PilotJob, Provider, ProviderError
from service_adapter.commandboard import CommandBoard
from service_adapter.store import HOLD_ENDED, LeaseEvent, LeaseRow, PilotRow, Store, StoreClosed
from service_adapter.store.vms import VmRow

log = logging.getLogger(__name__)

__all__ = [
    "LEASE_STATES", "TERMINAL_STATES", "Decision", "InvalidLease", "LeaseError", "LeaseInfo", "LeaseManager",
    "LeaseState", "Timing", "UnknownLease", "Usage", "decide",
]


@dataclasses.dataclass(frozen=True)
class LeaseState:
    """One row of :data:`LEASE_STATES`."""

    terminal: bool
    next: frozenset
    meaning: str


def _row(terminal: bool, nxt: Iterable[str], meaning: str) -> LeaseState:
    return LeaseState(terminal, frozenset(nxt), meaning)


#: The whole lease lifecycle: state -> (terminal, the states it may go to, its meaning).
#: ``decide`` makes only these transitions (tests/test_lease.py checks it rule by rule).
LEASE_STATES: dict[str, LeaseState] = {
    "pending": _row(False, {"reserving", "ready", "releasing", "failed", "missing"},
                    "the pilot job is submitted (or being submitted); no pilot has reported"),
    "reserving": _row(False, {"ready", "releasing", "failed", "missing"},
                      "some pilots reported, not all N have reserved"),
    "ready": _row(False, {"running", "releasing", "failed", "expired"},
                  "all N pilots reported reserved: the memory is held for VMs"),
    "running": _row(False, {"ready", "releasing", "failed", "expired"},
                    "at least one of its VMs runs (back to ready when none does)"),
    "releasing": _row(False, {"released", "expired", "failed"},
                      "a release was asked (the job is cancelled), or the pilots started unreserving on "
                      "their own; waiting for every host's unreserved"),
    "released": _row(True, (), "ended after a release"),
    "expired": _row(True, (), "ended at its deadline: the pilots unreserved on their own, without a release"),
    "failed": _row(True, (), "a pilot reported error, or a pilot stopped polling (lost), or the job ended "
                              "before the lease was ready, or the lease ended early (while ready, before its "
                              "deadline) without a release"),
    "missing": _row(True, (), "the queue timeout passed before all N pilots reported reserved: the job is "
                              "cancelled"),
}
TERMINAL_STATES = frozenset(s for s, row in LEASE_STATES.items() if row.terminal)
_HOLDING = ("ready", "running")


class LeaseError(Exception):
    """A lease could not be made: the LRM refused its job (the message is the LRM's, in one line).

    ``lease_id`` names the lease recorded as failed (None if none was recorded).
    """

    def __init__(self, message: str, lease_id: str | None = None):
        super().__init__(message)
        self.lease_id = lease_id


class InvalidLease(LeaseError, ValueError):
    """A bad request (nodes, memory, duration, owner): nothing was recorded or submitted."""


class UnknownLease(KeyError):
    """No lease has this id; ``args[0]`` is the id."""

    def __str__(self) -> str:
        return f"no lease {self.args[0]!r}"


# -- the rules ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timing:
    """The lease manager's time limits (seconds)."""

    queue_timeout_s: float = 300.0
    """From the lease's creation until all N pilots must have reported reserved."""
    release_grace_s: float = 30.0
    """How long a finished job's pilots still get to report their end before the lease ends without them."""


@dataclasses.dataclass(frozen=True)
class Decision:
    """What :func:`decide` says: the lease's state (the same one: no change), why, and whether to cancel the job."""

    state: str
    reason: str
    cancel: bool = False


def decide(lease: LeaseRow, pilots: list[PilotRow], job_state: JobState, now: float, timing: Timing,
           vms_running: int = 0) -> Decision:
    """The lease's next state from what is known now. Pure: no store, no provider, no clock.

    ``lease`` needs ``state``, ``reason``, ``nodes``, ``created_at``,
    ``expires_at``, ``release_requested_at`` and ``job_finished_at``;
    ``pilots`` are the hosts bound to its slot with their latest state,
    ``reserved_at`` and ``ended_by``. ``job_state`` is the LRM's word:
    UNKNOWN never counts as finished, GONE does. ``vms_running`` is how
    many of the lease's VMs its pilots reported running. Rules in order,
    first match wins:

    - a terminal state stays;
    - a pilot in ``error`` -> failed, cancel;
    - pending/reserving: all N hosts reserved (now or earlier) -> ready; a
      release asked -> releasing, cancel; a host already on its way out ->
      failed, cancel; the job finished -> failed; older than the queue
      timeout -> missing, cancel; pending with a host reported -> reserving;
    - ready/running: a release asked -> releasing, cancel; a host
      unreserving, early-unreserving, unreserved or killed -> releasing;
      a host given up as lost (it stopped polling) -> failed, cancel;
      the job finished with no host on its way out, for release_grace_s ->
      expired at or past ``expires_at``, else failed; ready with a VM
      running -> running; running with none -> ready;
    - releasing: every one of the N hosts unreserved or killed -> the end
      (below); no host ever bound and a release asked -> released once the
      job finished or release_grace_s after the request; the job finished
      and every bound host ended -> the end; the job finished and
      release_grace_s passed since the release request (else since the job
      was first seen finished) -> the end, naming the hosts not heard from;
    - the end: released if a release was asked; else failed if a host
      left early (early-unreserving: the LRM stopped the job; or killed)
      before ``expires_at``; else expired (the pilots' own deadline).
    """
    state = lease.state
    stay = Decision(state, lease.reason)
    if LEASE_STATES[state].terminal:
        return stay
    n = lease.nodes
    errors = [p for p in pilots if p.state == "error"]
    if errors:
        return Decision("failed", "pilot error: " + _hosts(errors, with_code=True), cancel=True)
    released = lease.release_requested_at is not None
    finished = job_state.finished
    reserved = [p for p in pilots if p.reserved_at is not None]
    leaving = [p for p in pilots if p.ended_by is not None]

    if state in ("pending", "reserving"):
        if len(reserved) >= n:
            return Decision("ready", f"all {n} pilots reserved")
        if released:
            return Decision("releasing", "release requested before the lease was ready", cancel=True)
        if leaving:
            return Decision(
                "failed",
                f"{_hosts(leaving)} ended before the lease was ready: {len(reserved)} of {n} pilots reserved",
                cancel=True,
            )
        if finished:
            return Decision(
                "failed",
                f"job ended ({job_state.value}) before the lease was ready: {len(reserved)} of {n} pilots reserved",
            )
        if now - lease.created_at > timing.queue_timeout_s:
            return Decision(
                "missing",
                f"queue timeout ({timing.queue_timeout_s:g} s): {len(pilots)} of {n} pilots reported, "
                f"{len(reserved)} reserved; job cancelled",
                cancel=True,
            )
        if state == "pending" and pilots:
            return Decision("reserving", f"{len(reserved)} of {n} pilots reserved")
        return stay

    if state in _HOLDING:
        if released:
            return Decision("releasing", "release requested", cancel=True)
        if leaving:
            return Decision("releasing", _why_leaving(leaving))
        lost = [p for p in pilots if p.lost_at is not None]
        if lost:
            return Decision("failed", f"lost: {', '.join(p.host for p in lost)} stopped polling for commands; "
                            "job cancelled", cancel=True)
        if finished:
            since = lease.job_finished_at if lease.job_finished_at is not None else now
            if now - since >= timing.release_grace_s:
                why = (f"job ended ({job_state.value}) and no pilot reported unreserving within "
                       f"{timing.release_grace_s:g} s")
                if lease.expires_at is not None and now >= lease.expires_at:
                    return Decision("expired", why)
                return Decision("failed", why + ", before the lease's deadline")
        if state == "ready" and vms_running:
            return Decision("running", f"{vms_running} VM{'s' if vms_running != 1 else ''} running")
        if state == "running" and not vms_running:
            return Decision("ready", "no VM running")
        return stay

    # releasing
    done = [p for p in pilots if p.state in HOLD_ENDED]
    if len(done) >= n:
        return _the_end(lease, pilots, now, f"all {n} pilots reported {_states(done)}")
    if not pilots:
        if released and (finished or now - lease.release_requested_at >= timing.release_grace_s):
            return Decision("released", f"released before any pilot reported (job {job_state.value})")
        return stay
    if finished:
        silent = [p for p in pilots if p.state not in HOLD_ENDED]
        unbound = n - len(pilots)
        since = lease.release_requested_at if released else lease.job_finished_at
        since = now if since is None else since
        if silent and now - since < timing.release_grace_s:
            return stay
        missing = []
        if silent:
            missing.append(f"{_hosts(silent)} never reported unreserved")
        if unbound:
            missing.append(f"{unbound} of {n} hosts never reported at all")
        return _the_end(lease, pilots, now, f"job ended ({job_state.value}); " + "; ".join(missing))
    return stay


def _the_end(lease: LeaseRow, pilots: list[PilotRow], now: float, why: str) -> Decision:
    if lease.release_requested_at is not None:
        return Decision("released", why)
    early = [p for p in pilots if p.ended_by in ("earlyunreserving", "killed")]
    if early and (lease.expires_at is None or now < lease.expires_at):
        return Decision("failed", f"ended early, before its deadline, without a release ({_hosts(early, by=True)}); "
                        + why)
    return Decision("expired", why)


def _why_leaving(leaving: list[PilotRow]) -> str:
    parts = []
    deadline = [p for p in leaving if p.ended_by in ("unreserving", "unreserved")]
    lrm = [p for p in leaving if p.ended_by == "earlyunreserving"]
    killed = [p for p in leaving if p.ended_by == "killed"]
    if deadline:
        parts.append(f"the pilots' deadline came ({_hosts(deadline, by=True)})")
    if lrm:
        parts.append(f"the LRM is stopping the job ({_hosts(lrm, by=True)})")
    if killed:
        parts.append(f"killed on the node ({_hosts(killed, by=True)})")
    return "; ".join(parts)


def _hosts(pilots: list[PilotRow], *, with_code: bool = False, by: bool = False) -> str:
    def one(p: PilotRow) -> str:
        if with_code:
            return f"{p.host} (code {p.code})"
        return f"{p.host}: {p.ended_by if by else p.state}"

    return ", ".join(one(p) for p in pilots)


def _states(pilots: list[PilotRow]) -> str:
    return " or ".join(sorted({p.state for p in pilots}))


# -- what callers get ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Usage:
    """Node-seconds and MB-seconds of ended holds, and how many leases they came from."""

    node_seconds: float
    mb_seconds: float
    leases: int

    def to_json(self) -> dict:
        return {"node_seconds": self.node_seconds, "mb_seconds": self.mb_seconds, "leases": self.leases}


@dataclasses.dataclass(frozen=True)
class LeaseInfo:
    """A lease as callers see it: the stored row, its pilots (latest state per host) and its usage so far.

    Times are epoch seconds on the service's clock (None: not yet);
    :meth:`to_json` renders them as RFC 3339 UTC strings.
    """

    id: str
    owner: str
    nodes: int
    memory_mb: int
    duration_s: float
    state: str
    reason: str
    slot: str | None
    job_id: str | None
    created_at: float
    ready_at: float | None
    release_requested_at: float | None
    ended_at: float | None
    expires_at: float | None
    pilots: list[PilotRow]
    usage: Usage
    updated_at: float | None = None
    vms: list[VmRow] = dataclasses.field(default_factory=list)

    @property
    def terminal(self) -> bool:
        """Whether the lease has ended (released, expired, failed, missing)."""
        return LEASE_STATES[self.state].terminal

    def to_json(self) -> dict:
        """Plain JSON types only; times as RFC 3339 UTC strings (``...Z``) or null."""
        return {
            "id": self.id,
            "owner": self.owner,
            "nodes": self.nodes,
            "memory_mb": self.memory_mb,
            "duration_s": self.duration_s,
            "state": self.state,
            "terminal": self.terminal,
            "reason": self.reason,
            "slot": self.slot,
            "job_id": self.job_id,
            "created_at": _time(self.created_at),
            "updated_at": _time(self.updated_at),
            "ready_at": _time(self.ready_at),
            "release_requested_at": _time(self.release_requested_at),
            "ended_at": _time(self.ended_at),
            "expires_at": _time(self.expires_at),
            "pilots": [
                {
                    "host": p.host, "state": p.state, "code": p.code, "seq": p.last_seq,
                    "memory_mb": p.memory_mb, "expires_at": p.expires_at,
                    "reserved_at": _time(p.reserved_at), "updated_at": _time(p.updated_at),
                }
                for p in self.pilots
            ],
            "usage": self.usage.to_json(),
            "vms": [vm_json(vm) for vm in self.vms],
        }


def vm_json(vm: VmRow) -> dict:
    """A VM as the API shows it: its host, state and why, its size, times as RFC 3339 or null, its spec."""
    return {
        "name": vm.name, "host": vm.host, "state": vm.state, "reason": vm.reason,
        "memory_mb": vm.memory_mb, "vcpus": vm.vcpus, "created_at": _time(vm.created_at),
        "updated_at": _time(vm.updated_at), "started_at": _time(vm.started_at),
        "stopped_at": _time(vm.stopped_at), "spec": vm.spec,
    }


def _time(epoch: float | None) -> str | None:
    return None if epoch is None else format_epoch(epoch)


# -- the manager --------------------------------------------------------------------------------


class LeaseManager:
    """Makes, watches and ends leases through one provider; all state is in the store.

    ``grace_s`` is the pilots' grace (their time to restore and report once
    stopped); ``queue_timeout_s`` and ``release_grace_s`` are :class:`Timing`;
    ``status_interval_s`` bounds how often the provider is asked about jobs
    (and how long the background thread sleeps without a commit). With a
    ``board`` (the receiver's :class:`CommandBoard`) and ``lost_after_s``, a
    host that holds memory but has not polled for commands for that long
    is given up as lost (its VMs with it) and the lease fails. Several
    managers over one store file do not double-apply a transition
    (compare-and-set), though each would cancel on its own.
    """

    def __init__(
        self, store: Store, provider: Provider, *, contact: str, pilot_config: str, grace_s: float = 10.0,
        queue_timeout_s: float = 300.0, release_grace_s: float = 30.0, status_interval_s: float = 2.0,
        clock: Callable[[], float] = time.time, board: CommandBoard | None = None,
        lost_after_s: float | None = None,
    ):
        checked = [("grace_s", grace_s), ("queue_timeout_s", queue_timeout_s),
                   ("release_grace_s", release_grace_s), ("status_interval_s", status_interval_s)]
        if lost_after_s is not None:
            checked.append(("lost_after_s", lost_after_s))
        for name, value in checked:
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a number above 0, got {value!r}")
        self.store = store
        self.provider = provider
        self.contact = contact
        self.pilot_config = pilot_config
        self.grace_s = grace_s
        self.timing = Timing(queue_timeout_s, release_grace_s)
        self.status_interval_s = status_interval_s
        self.clock = clock
        self.board = board
        self.lost_after_s = lost_after_s if board is not None else None
        self._lock = threading.RLock()  # one tick at a time (release and wait tick too)
        self._status: dict[str, JobState] = {}
        self._status_at: float | None = None
        self._cancel_tried: dict[str, float] = {}
        self._forced: set[str] = set()  # leases whose job got the forced cancel (once per process)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- requests ------------------------------------------------------------------

    def reserve(self, nodes: int, memory_mb: int, duration_s: float, owner: str = "operator") -> LeaseInfo:
        """Record a lease of ``nodes`` x ``memory_mb`` MB for ``duration_s`` s, then submit its pilot job.

        The lease and its slot are committed before the job is submitted, so
        a pilot's first notification finds them. Raises
        :class:`InvalidLease` (also a ValueError) for bad values, nothing
        recorded; :class:`LeaseError` if the LRM refuses the job (the lease
        is then recorded as failed with the LRM's message).
        """
        _check_request(nodes, memory_mb, duration_s, owner)
        now = self.clock()
        lease_id, slot = str(uuid.uuid4()), str(uuid.uuid4())
        self.store.create_lease(
            lease_id, slot, owner=owner, nodes=nodes, memory_mb=memory_mb, duration_s=duration_s, now=now,
        )
        log.info("lease %s created for %s: %d x %d MB for %g s (slot %s)",
                 lease_id, owner, nodes, memory_mb, duration_s, slot)
        job = PilotJob(slot, nodes, memory_mb, duration_s, self.grace_s, self.contact, self.pilot_config,
                       lease=lease_id, slot_secret=self.store.slot_secret(slot))
        submit_started = self.clock()
        try:
            job_id = self.provider.submit(job)
        except Exception as exc:
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            reason = f"the LRM refused the pilot job: {message}"
            if self.store.transition_lease(lease_id, "pending", "failed", reason, now=self.clock(), ended=True):
                log.info("lease %s: pending -> failed: %s", lease_id, reason)
            if isinstance(exc, ProviderError):
                raise LeaseError(reason, lease_id) from exc
            raise
        self.store.set_job_id(slot, job_id, reason=f"job {job_id} submitted; waiting for {nodes} pilots",
                              submitted=(submit_started, self.clock()))
        log.info("lease %s: job %s submitted", lease_id, job_id)
        return self.get(lease_id)

    def release(self, lease_id: str) -> LeaseInfo:
        """End a lease early: cancel its job now (pilots take their early-unreserve path). Idempotent.

        An ended lease is returned as it is. A cancel the LRM refuses is
        logged and retried by the next ticks. Raises :class:`UnknownLease`.
        """
        row = self._row(lease_id)
        if LEASE_STATES[row.state].terminal:
            return self.get(lease_id)
        with self._lock:
            if self.store.request_release(lease_id, self.clock()):
                log.info("lease %s: release requested (state %s)", lease_id, row.state)
            self._tick([lease_id])
        return self.get(lease_id)

    def get(self, lease_id: str) -> LeaseInfo:
        """The lease now; raises :class:`UnknownLease`."""
        return self._info(self._row(lease_id))

    def list(self, states: Iterable[str] | None = None, owner: str | None = None) -> list[LeaseInfo]:
        """Leases, newest first; only those in ``states`` and of ``owner`` if given (ValueError: unknown state)."""
        if states is not None:
            states = [states] if isinstance(states, str) else list(states)
            unknown = sorted(set(states) - set(LEASE_STATES))
            if unknown:
                raise ValueError(f"unknown lease state(s) {', '.join(unknown)}: use {', '.join(LEASE_STATES)}")
        return [self._info(row) for row in self.store.list_leases(states, owner)]

    def usage(self, lease_id: str | None = None, owner: str | None = None) -> Usage:
        """Summed usage of ended holds: of one lease, of one owner, or of all; raises UnknownLease for an unknown id."""
        if lease_id is not None:
            self._row(lease_id)
        return Usage(*self.store.usage_totals(lease_id=lease_id, owner=owner))

    def history(self, lease_id: str) -> list[LeaseEvent]:
        """The lease's creation and each of its transitions, in order; raises UnknownLease."""
        self._row(lease_id)
        return self.store.lease_events(lease_id)

    def wait(self, lease_id: str, states: Iterable[str], timeout: float) -> LeaseInfo | None:
        """Block until the lease is in one of ``states`` (woken by commits); None on timeout.

        Without the background thread (:meth:`start`), the waiting caller
        ticks itself.
        """
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while True:
            seen = self.store.version
            if not self.running:
                self.tick()
            info = self.get(lease_id)
            if info.state in states:
                return info
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.store.wait_changed(seen, remaining if self.running else min(remaining, self.status_interval_s))

    # -- watching ------------------------------------------------------------------

    def tick(self) -> list[tuple[str, str, str, str]]:
        """Look at every open lease once; returns the transitions made as (lease id, old, new, reason)."""
        with self._lock:
            return self._tick(None)

    def _tick(self, only: list[str] | None) -> list[tuple[str, str, str, str]]:
        now = self.clock()
        rows = self.store.leases_to_watch()
        if only is not None:
            rows = [r for r in rows if r.id in only]
        jobs = self._job_states([r.job_id for r in rows if r.job_id], now)
        changes = []
        for row in rows:
            job_state = jobs.get(row.job_id, JobState.UNKNOWN) if row.job_id else JobState.UNKNOWN
            if job_state.finished and row.job_finished_at is None:
                self.store.mark_job_finished(row.id, now)
                row = dataclasses.replace(
                    row, job_finished_at=now,
                    cancelled_at=now if row.cancel_requested_at is not None and row.cancelled_at is None
                    else row.cancelled_at,
                )
            if not LEASE_STATES[row.state].terminal:
                row = self._advance(row, job_state, now, changes)
            if (row.cancel_requested_at is not None and row.cancelled_at is None and row.job_id
                    and not job_state.finished):
                self._cancel(row, now)
            elif (row.cancelled_at is not None and row.job_id and job_state is JobState.RUNNING
                  and now - row.cancelled_at > self.timing.release_grace_s and row.id not in self._forced):
                self._force_cancel(row)
        return changes

    def _force_cancel(self, row: LeaseRow) -> None:
        """The gentle cancel has not ended the job within the release grace: the LRM's outright cancel, once."""
        try:
            self.provider.cancel(row.job_id, force=True)
        except Exception as exc:  # retried on a later tick
            log.warning("lease %s: forced cancel of job %s failed: %s", row.id, row.job_id, exc)
            return
        self._forced.add(row.id)
        log.warning("lease %s: job %s still ran %g s after its cancel: cancelled outright",
                    row.id, row.job_id, self.timing.release_grace_s)

    def _advance(self, row: LeaseRow, job_state: JobState, now: float, changes: list) -> LeaseRow:
        """Apply decide() until the lease stays put (a restart may catch up several steps at once)."""
        pilots = self.store.pilots(row.slot) if row.slot else []
        # A transition is stamped no earlier than its inputs were read: the tick's start can precede the
        # commit of a notification it then sees (the LRM query runs in between).
        now = max(now, self.clock())
        if row.state in _HOLDING and self._give_up_silent(row, pilots, now):
            pilots = self.store.pilots(row.slot)
        vms = self.store.vms(row.id) if row.state in _HOLDING else []
        running = sum(1 for vm in vms if vm.state == "running")
        for _ in range(len(LEASE_STATES)):
            decision = decide(row, pilots, job_state, now, self.timing, vms_running=running)
            if decision.state == row.state:
                break
            if decision.state not in LEASE_STATES[row.state].next:  # a bug in decide: refuse, loudly
                log.error("lease %s: decide() asked for %s -> %s, which LEASE_STATES does not allow",
                          row.id, row.state, decision.state)
                break
            ended = LEASE_STATES[decision.state].terminal
            ready_at = None
            if decision.state == "ready":
                ready_at = max((p.reserved_at for p in pilots if p.reserved_at is not None), default=now)
            if not self.store.transition_lease(row.id, row.state, decision.state, decision.reason, now=now,
                                               ended=ended, ready_at=ready_at, cancel=decision.cancel):
                log.info("lease %s: no longer %s (changed elsewhere); looking again next tick", row.id, row.state)
                break
            log.info("lease %s: %s -> %s: %s", row.id, row.state, decision.state, decision.reason)
            changes.append((row.id, row.state, decision.state, decision.reason))
            row = dataclasses.replace(
                row, state=decision.state, reason=decision.reason, updated_at=now,
                ready_at=row.ready_at if row.ready_at is not None else ready_at,
                ended_at=(row.ended_at or now) if ended else row.ended_at,
                cancel_requested_at=(row.cancel_requested_at or now) if decision.cancel else row.cancel_requested_at,
            )
        return row

    def _give_up_silent(self, row: LeaseRow, pilots: list[PilotRow], now: float) -> bool:
        """Mark lost every holding host silent for longer than lost_after_s; whether any was marked."""
        if self.lost_after_s is None:
            return False
        marked = False
        for p in pilots:
            if p.reserved_at is None or p.ended_by is not None or p.lost_at is not None:
                continue
            silent = self.board.silent_for((row.slot, p.host), since=p.reserved_at)
            if silent > self.lost_after_s:
                why = f"{p.host} has not polled for commands for {silent:.0f} s (limit {self.lost_after_s:g} s)"
                if self.store.mark_lost(row.slot, p.host, now=now, why=why):
                    log.warning("lease %s: %s: lost", row.id, why)
                    marked = True
        return marked

    def _job_states(self, job_ids: list[str], now: float) -> dict[str, JobState]:
        """The LRM's states of ``job_ids``: one status call at most every status_interval_s, else the last answer."""
        if not job_ids:
            return {}
        fresh = self._status_at is not None and 0 <= now - self._status_at < self.status_interval_s
        if not fresh:
            try:
                self._status = dict(self.provider.status(sorted(set(job_ids))))
            except Exception:  # the contract says status never raises; a bug must not stop the watch
                log.exception("provider status failed; every job counts as unknown")
                self._status = {}
            self._status_at = now
        return self._status

    def _cancel(self, row: LeaseRow, now: float) -> None:
        last = self._cancel_tried.get(row.id)
        if last is not None and 0 <= now - last < self.status_interval_s:
            return
        self._cancel_tried[row.id] = now
        try:
            self.provider.cancel(row.job_id)
        except Exception as exc:  # ProviderError by contract; anything else is retried the same way
            log.warning("lease %s: cancel of job %s failed (retrying every %g s): %s",
                        row.id, row.job_id, self.status_interval_s, exc)
            return
        self.store.mark_cancelled(row.id, self.clock())
        self._cancel_tried.pop(row.id, None)
        log.info("lease %s: job %s cancelled", row.id, row.job_id)

    # -- the background thread --------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the background thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Run :meth:`tick` in a background thread, after every commit or every status_interval_s."""
        if self.running:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="lease-manager", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the background thread (the leases and their jobs go on); safe to call twice."""
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        self.store.wake()
        thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while not self._stopping.is_set():
            seen = self.store.version
            try:
                self.tick()
            except Exception as exc:
                if self.store.closed or isinstance(exc, StoreClosed):
                    log.warning("the store is closed: the lease manager stops")
                    return
                log.exception("lease manager tick failed; trying again")
            if self._stopping.is_set():
                return
            self.store.wait_changed(seen, self.status_interval_s)

    # -- helpers ------------------------------------------------------------------------

    def _row(self, lease_id: str) -> LeaseRow:
        row = self.store.get_lease(lease_id) if isinstance(lease_id, str) else None
        if row is None:
            raise UnknownLease(lease_id)
        return row

    def _info(self, row: LeaseRow) -> LeaseInfo:
        return LeaseInfo(
            id=row.id, owner=row.owner, nodes=row.nodes, memory_mb=row.memory_mb, duration_s=row.duration_s,
            state=row.state, reason=row.reason, slot=row.slot, job_id=row.job_id, created_at=row.created_at,
            ready_at=row.ready_at, release_requested_at=row.release_requested_at, ended_at=row.ended_at,
            expires_at=row.expires_at, pilots=self.store.pilots(row.slot) if row.slot else [],
            usage=Usage(*self.store.usage_totals(lease_id=row.id)), updated_at=row.updated_at,
            vms=self.store.vms(row.id),
        )


def _check_request(nodes, memory_mb, duration_s, owner) -> None:
    def whole(name, value, high):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
            raise InvalidLease(f"{name} must be a whole number from 1 to {high}, got {value!r}")

    whole("nodes", nodes, 100_000)
    whole("memory_mb", memory_mb, 2**31 - 1)
    if (not isinstance(duration_s, (int, float)) or isinstance(duration_s, bool)
            or not math.isfinite(duration_s) or duration_s <= 0):
        raise InvalidLease(f"duration_s must be a number of seconds above 0, got {duration_s!r}")
    if not isinstance(owner, str) or not 1 <= len(owner) <= 128 or not owner.isprintable() or owner != owner.strip():
        raise InvalidLease(f"owner must be 1 to 128 printable characters without surrounding blanks, got {owner!r}")
