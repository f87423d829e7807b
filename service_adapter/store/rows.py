"""The store's rows as Python sees them, and the verdicts it gives a notification."""

from __future__ import annotations

import dataclasses
import enum
from typing import Iterable

from workspace_common.protocol import MAX_SEQ_STEP, parse_time

#: A pilot's notified states that end its hold on the node (a usage row is written with the first).
HOLD_ENDED = frozenset({"unreserved", "killed"})
#: A pilot's notified states on its way out (the first one is kept as ``ended_by``).
ENDING = frozenset({"earlyunreserving", "unreserving"}) | HOLD_ENDED
LEASE_COLUMNS = (
    "id, owner, nodes, memory_mb, duration_s, state, reason, slot, job_id, created_at, updated_at,"
    " ready_at, release_requested_at, ended_at, expires_at, job_finished_at, cancel_requested_at, cancelled_at,"
    " start_at, warned_at, compacted_at, release_when_idle_s"
)
PILOT_COLUMNS = (
    "slot_id, host, state, code, last_seq, memory_mb, expires_at, reserved_at, reserved_mb, ended_by, updated_at,"
    " lost_at"
)


def qualified(columns: str, alias: str) -> str:
    """A comma-separated column list with each name prefixed by ``alias.`` (for a query that joins)."""
    return ", ".join(f"{alias}.{column.strip()}" for column in columns.split(","))


class Verdict(enum.Enum):
    """What the store decided about a notification, with the HTTP status to answer."""

    # (name, status): plain statuses would make REPEAT an alias of ACCEPTED.
    ACCEPTED = ("accepted", 200)
    REPEAT = ("repeat", 200)
    UNKNOWN_SLOT = ("unknown-slot", 404)
    REPLAY = ("replay", 409)
    # The lease's account is closed: only what ends a hold (unreserved, kill-all's killed) is still taken.
    LEASE_ENDED = ("lease-ended", 410, "the lease has ended: only unreserved or killed is taken from its hosts now")
    # Claims beyond what the lease allows (a pilot's bug, or a node lying): refused, nothing stored.
    MEMORY_BEYOND_SLOT = ("out-of-bounds", 422, "memory_mb is above the slot's memory per node")
    SEQ_TOO_FAR = ("out-of-bounds", 422, f"seq jumps more than {MAX_SEQ_STEP} past the last one "
                   "(a killed may use up to its sent_at in microseconds since the epoch)")
    EXPIRES_TOO_LATE = ("out-of-bounds", 422, "expires_at lies beyond the hold's start plus the lease's duration "
                        "and the allowed clock skew")

    @property
    def result(self) -> str:
        """The word the receiver puts in its answer's ``result``."""
        return self.value[0]

    @property
    def status(self) -> int:
        """The HTTP status the receiver answers with."""
        return self.value[1]

    @property
    def detail(self) -> str:
        """What the answer's ``detail`` says (empty where the result says it all)."""
        return self.value[2] if len(self.value) > 2 else ""


def earliest_expiry(expires: Iterable[str | None]) -> float | None:
    """The earliest of pilots' ``expires_at`` (RFC 3339, as they reported them) in epoch seconds; None if none."""
    ends = []
    for text in expires:
        if text:
            try:
                ends.append(parse_time(text).timestamp())
            except ValueError:  # checked on receipt; an unreadable one only loses the better end
                continue
    return min(ends) if ends else None


@dataclasses.dataclass(frozen=True)
class PilotRow:
    """One pilot of a slot as the service knows it: its host and latest state."""

    slot_id: str
    host: str
    state: str
    code: int
    last_seq: int
    memory_mb: int
    expires_at: str | None
    reserved_at: float | None = None
    """When the service accepted this host's ``reserved`` (its clock, epoch seconds); None: never."""
    reserved_mb: int | None = None
    """The memory the host reported holding in its ``reserved``."""
    ended_by: str | None = None
    """The first of earlyunreserving, unreserving, unreserved, killed this host reported; None: none yet."""
    updated_at: float | None = None
    """When the service accepted this host's latest notification."""
    lost_at: float | None = None
    """When the service gave this host up for lost (it stopped polling for commands); None: it has not."""


@dataclasses.dataclass(frozen=True)
class SlotAccess:
    """A slot as the receiver checks requests against it."""

    secret: str = dataclasses.field(repr=False)
    """The slot's secret (with a node's key, it makes that (slot, host)'s signing key)."""
    job_id: str | None
    """The LRM's job id, once the submit returned."""
    host_known: bool
    """Whether this host has reported for the slot before (it was checked against the allocation then)."""


@dataclasses.dataclass(frozen=True)
class LeaseRow:
    """One lease as stored: what was asked, its state, and the times the lease manager needs.

    Times are epoch seconds on the service's clock; None where it has not
    happened. ``expires_at`` is ``created_at + duration_s`` (``start_at +
    duration_s`` for a lease that starts later) until the lease is ready,
    then the earliest deadline its pilots reported; an extension moves it.
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
    updated_at: float
    ready_at: float | None = None
    release_requested_at: float | None = None
    ended_at: float | None = None
    expires_at: float | None = None
    job_finished_at: float | None = None
    """When the manager first saw the LRM report the job finished."""
    cancel_requested_at: float | None = None
    """When a cancel of the job was decided (release, queue timeout, a pilot's error)."""
    cancelled_at: float | None = None
    """When that cancel went through, or the job was seen finished (nothing left to cancel)."""
    start_at: float | None = None
    """When a lease that starts later asked its job to start (the batch system's begin time); None: at once."""
    warned_at: float | None = None
    """When its before-end event was recorded; None: not yet."""
    compacted_at: float | None = None
    """When its notifications and commands were deleted, past the service's retention; None: not (yet)."""
    release_when_idle_s: float | None = None
    """Once held, released after this many seconds with no VM on it; None: held to its end."""


@dataclasses.dataclass(frozen=True)
class UsageRow:
    """One host's hold of one lease: from its ``reserved`` to its ``unreserved`` (or ``killed``)."""

    lease_id: str
    host: str
    slot_id: str
    owner: str
    memory_mb: int
    reserved_at: float
    released_at: float
    ended_by: str
    node_seconds: float
    mb_seconds: float


@dataclasses.dataclass(frozen=True)
class LeaseEvent:
    """One entry of a lease's history, numbered by ``seq`` (increasing across all leases).

    ``kind`` is ``created`` (``old_state`` None), ``state`` (a transition
    from ``old_state`` to ``new_state``), ``ending`` (the before-end event:
    the lease ends within the service's warn_before), or ``extended`` (a
    longer lease); the last two leave the state as it was (``old_state`` ==
    ``new_state``).
    """

    lease_id: str
    at: float
    old_state: str | None
    new_state: str
    reason: str
    kind: str = "state"
    seq: int = 0
