"""The pilot's lifecycle as data: its states, where each may go, and what the job asked for.

:data:`STATE_TABLE` is the whole lifecycle; :class:`pilot.lifecycle.Pilot`
moves through it and refuses any transition the table does not have.
"""

from __future__ import annotations

import dataclasses
import enum


class State(enum.Enum):
    """The pilot's states; an ``_ERROR`` twin is where a failed step of that state goes."""

    BEGIN = "begin"
    BEGIN_ERROR = "begin-error"
    RESERVING = "reserving"
    RESERVING_ERROR = "reserving-error"
    RESERVED = "reserved"
    RESERVED_ERROR = "reserved-error"
    EARLY_UNRESERVING = "earlyunreserving"
    EARLY_UNRESERVING_ERROR = "earlyunreserving-error"
    UNRESERVING = "unreserving"
    UNRESERVING_ERROR = "unreserving-error"
    UNRESERVED = "unreserved"


@dataclasses.dataclass(frozen=True)
class Row:
    """One state: where it may go, and its error twin (where a failed step of it goes)."""

    next: frozenset
    error: State | None = None


_S = State
#: The whole lifecycle. A stop request (SIGTERM, SIGINT, the service's release) only sets an
#: event; what the main loop does with it depends on the state it finds:
#:
#: ==================== ==================================================================
#: begin                exit 0 before reserving: nothing on the node has changed
#: reserving            finish the step under way (or skip the balloon if it has not
#:                      started), then undo what was taken (earlyunreserving)
#: reserved             early unreserve: tell the service, leave it grace x earlywaitratio
#:                      for this slot's VMs, destroy what is left of them, restore, tell it
#: (early)unreserving   nothing more: the restore is under way
#: any error twin       nothing more: the pilot is giving back what it took, or exiting
#:                      with the journal keeping what is left
#: unreserved           nothing: done
#: ==================== ==================================================================
STATE_TABLE: dict[State, Row] = {
    _S.BEGIN: Row(frozenset({_S.RESERVING, _S.BEGIN_ERROR}), _S.BEGIN_ERROR),
    _S.BEGIN_ERROR: Row(frozenset()),
    _S.RESERVING: Row(
        frozenset({_S.RESERVED, _S.RESERVING_ERROR, _S.EARLY_UNRESERVING, _S.UNRESERVING}), _S.RESERVING_ERROR,
    ),
    _S.RESERVING_ERROR: Row(frozenset({_S.UNRESERVING})),
    _S.RESERVED: Row(frozenset({_S.EARLY_UNRESERVING, _S.UNRESERVING, _S.RESERVED_ERROR}), _S.RESERVED_ERROR),
    _S.RESERVED_ERROR: Row(frozenset({_S.UNRESERVING})),
    _S.EARLY_UNRESERVING: Row(frozenset({_S.UNRESERVED, _S.EARLY_UNRESERVING_ERROR}), _S.EARLY_UNRESERVING_ERROR),
    _S.EARLY_UNRESERVING_ERROR: Row(frozenset()),
    _S.UNRESERVING: Row(frozenset({_S.UNRESERVED, _S.UNRESERVING_ERROR}), _S.UNRESERVING_ERROR),
    _S.UNRESERVING_ERROR: Row(frozenset()),
    _S.UNRESERVED: Row(frozenset()),
}


@dataclasses.dataclass(frozen=True)
class LeaseRequest:
    """What the job asked this pilot for."""

    slot: str
    host: str
    memory_mb: int
    duration_s: float
    grace_s: float
