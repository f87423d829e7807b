"""Where a lease's VMs go: each to a host of the lease with room for it. Pure: no store, no I/O.

The service's check is a forecast; the pilot on the host checks again
against what it really holds and refuses what does not fit.
"""

from __future__ import annotations

import dataclasses
import heapq


class PlacementError(ValueError):
    """The VMs do not fit the lease's hosts as asked; the message says which VM and what room there is."""


@dataclasses.dataclass(frozen=True)
class HostRoom:
    """A host of the lease that takes VMs: what it reserved and what its active VMs leave free (MB)."""

    host: str
    reserved_mb: int
    free_mb: int


def place(wanted: list[tuple[str, int, str | None]], rooms: list[HostRoom]) -> list[str]:
    """The host for each (VM name, MB it needs with overhead, host asked for or None), in order; all or nothing.

    A VM that names a host goes there if it fits. The others go, largest
    first, to the host with the most room left (ties: the host name), so
    a lease's VMs spread over its nodes. Raises :class:`PlacementError`.
    """
    if not rooms:
        raise PlacementError("no host of the lease can take VMs (none has reported reserved, or all are leaving)")
    free = {room.host: room.free_mb for room in rooms}
    chosen: dict[int, str] = {}
    for index, (name, need, host) in enumerate(wanted):
        if host is None:
            continue
        if host not in free:
            raise PlacementError(f"VM {name}: host {host!r} is not a host of the lease that takes VMs "
                                 f"(those are {', '.join(sorted(free))})")
        if need > free[host]:
            raise PlacementError(f"VM {name} needs {need} MB with overhead; {host} has {free[host]} MB free")
        free[host] -= need
        chosen[index] = host
    unplaced = sorted((i for i, w in enumerate(wanted) if w[2] is None), key=lambda i: (-wanted[i][1], i))
    # The host with the most room left (ties: the name) on top: one step per VM, not a look at every host.
    roomiest = [(-mb, host) for host, mb in free.items()]
    heapq.heapify(roomiest)
    for index in unplaced:
        name, need, _ = wanted[index]
        host = roomiest[0][1]
        if need > free[host]:
            rooms_left = ", ".join(f"{h} {mb} MB" for h, mb in sorted(free.items()))
            raise PlacementError(f"VM {name} needs {need} MB with overhead; no host has that free ({rooms_left})")
        free[host] -= need
        heapq.heapreplace(roomiest, (-free[host], host))
        chosen[index] = host
    return [chosen[i] for i in range(len(wanted))]
