"""What a slot's VMs are told of their end: the lease channel's warning line, and the time their Machine/Job
Features give (docs/leases.md, docs/hosting-vms.md).

The pilot's lifecycle owns one :class:`VmEnd`; the VM hosting reads it from
its own threads (``line()`` for a VM started after the warning, ``end()``
for the features), so every read takes one consistent snapshot.
"""

from __future__ import annotations

import time

from workspace_common.protocol.wire import format_epoch


class VmEnd:
    """When the VMs end and why, once known: a warning (the line, when the site wants the VMs warned) or only an
    earlier end (a release or stop with no warning wanted: the features still say it)."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s  # how long a VM asked to shut down has before it is destroyed
        self._state: tuple[float, str, bool] | None = None  # (ends at, why, the line is given)

    def set(self, ends_at: float, why: str, *, line: bool) -> None:
        """The VMs end at ``ends_at`` (epoch seconds) because of ``why``; ``line``: they are warned on their
        lease channel (else only their features change)."""
        self._state = (ends_at, why, line)

    def clear(self) -> None:
        """The end moved later (an extension): no warning given, the features follow the deadline again."""
        self._state = None

    @property
    def warned(self) -> bool:
        """Whether the VMs have been given the warning line."""
        state = self._state
        return state is not None and state[2]

    def line(self) -> str | None:
        """The lease channel's line for the warning given, with the seconds left now; None if none was given."""
        state = self._state
        if state is None or not state[2]:
            return None
        ends_at, why, _ = state
        return f"ending {format_epoch(ends_at)} {max(ends_at - time.time(), 0.0):.0f} {why}"

    def end(self, deadline_at: float | None):
        """When the VMs will be stopped (a :class:`pilot.vm.features.LeaseEnd`): the known end if sooner, else the
        pilot's deadline; None before the deadline is known."""
        from pilot.vm.features import LeaseEnd

        if deadline_at is None:
            return None
        state = self._state
        return LeaseEnd(min(state[0], deadline_at) if state else deadline_at, self.grace_s)
