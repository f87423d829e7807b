"""The lease's rules, pure: its states (one table) and :func:`decide`, every rule that moves a lease.

One lease is one slot is one pilot job of N nodes; each host binds to the
slot with its first notification. A lease moves through
:data:`LEASE_STATES` (each state, whether it is terminal, where it may go,
what it means). :func:`decide` looks at the lease as stored, its pilots'
latest states, the job's state as the LRM reports it, and the time; it
reads and writes nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from service_adapter.providers.base import JobState
from service_adapter.store import HOLD_ENDED, LeaseRow, PilotRow


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
    "scheduled": _row(False, {"pending", "reserving", "ready", "releasing", "failed", "missing"},
                      "the pilot job is submitted with a begin time (start_at) the batch system holds it until"),
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
#: The states in which the pilots hold their nodes.
HOLDING = ("ready", "running")


class LeaseError(Exception):
    """A lease could not be made: the LRM refused its job (the message is the LRM's, in one line).

    ``lease_id`` names the lease recorded as failed (None if none was recorded).
    """

    def __init__(self, message: str, lease_id: str | None = None):
        super().__init__(message)
        self.lease_id = lease_id


class InvalidLease(LeaseError, ValueError):
    """A bad request (nodes, memory, duration, owner): nothing was recorded or submitted."""


class ExtensionRefused(LeaseError):
    """An extension that was not made: the lease cannot be extended as it stands, or the batch system refused
    (its policy, the partition's time limit). Nothing changed; the message says why, in one line."""


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
    ``start_at``, ``expires_at``, ``release_requested_at`` and ``job_finished_at``;
    ``pilots`` are the hosts bound to its slot with their latest state,
    ``reserved_at`` and ``ended_by``. ``job_state`` is the LRM's word:
    UNKNOWN never counts as finished, GONE does. ``vms_running`` is how
    many of the lease's VMs its pilots reported running. Rules in order,
    first match wins:

    - a terminal state stays;
    - a pilot in ``error`` -> failed, cancel;
    - scheduled: like pending (below), except that until ``start_at`` with
      no host reported it stays, and the queue timeout counts from
      ``start_at``; at ``start_at`` -> pending;
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

    if state in ("scheduled", "pending", "reserving"):
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
        waiting_since = max(lease.created_at, lease.start_at or lease.created_at)
        if state == "scheduled" and not pilots:
            if now < waiting_since:
                return stay
            return Decision("pending", "its start time came: the batch system may start the pilot job now")
        if now - waiting_since > timing.queue_timeout_s:
            return Decision(
                "missing",
                f"queue timeout ({timing.queue_timeout_s:g} s): {len(pilots)} of {n} pilots reported, "
                f"{len(reserved)} reserved; job cancelled",
                cancel=True,
            )
        if state in ("scheduled", "pending") and pilots:
            return Decision("reserving", f"{len(reserved)} of {n} pilots reserved")
        return stay

    if state in HOLDING:
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
