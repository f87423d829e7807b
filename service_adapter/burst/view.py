"""What a pool of leases holds and how it is used, from one listing of its leases; and which leases to give back.

Pure: the listing is the service's JSON (``GET /api/v1/leases``, each lease
with its pilots and VMs, each VM with what its pilot last said of its use).

A node of a lease is *coming* while the lease is not yet held (its pilots
have not all reserved), *busy* while a VM on it is busy, *unknown* while a VM
on it has not said yet (presumed in use: a booting VM is never taken for
idle), *idle* otherwise. The pool's numbers for COBalD (``docs/bursting.md``):

(A held node with no VM yet counts as unknown while the pool is to start one
there, so a lease is not taken for idle before its VM could start.)

- supply: the nodes of its held leases;
- utilisation: (busy + unknown + coming nodes) / all its nodes;
- allocation: (busy nodes + waiting work) / all its nodes: above 1 exactly
  when work waits for more nodes than it has or has coming, so a standard
  ``LinearController`` with ``high_allocation: 1`` grows the pool while work
  waits, and shrinks it (``low_utilisation``) when its VMs go idle.

With no nodes at all, allocation is 1 plus the waiting work, utilisation 1 if
work waits, else both 0.
"""

from __future__ import annotations

import dataclasses

from workspace_common.protocol import parse_time

#: Lease states in which the lease is on its way (its job waits, or its pilots are reserving).
COMING = ("scheduled", "pending", "reserving")
#: Lease states in which its nodes are held.
HELD = ("ready", "running")
#: VM states in which a VM is on its node (or on its way there).
ON_NODE = ("starting", "running", "paused", "stopping")


@dataclasses.dataclass(frozen=True)
class LeaseLook:
    """One of the pool's leases as the listing shows it: its id, state, nodes, when it was made, its held hosts,
    when it was ready and ends (epoch seconds), and its VMs (their states and use)."""

    id: str
    state: str
    nodes: int
    created_at: float
    hosts: tuple[str, ...]
    ready_at: float | None
    expires_at: float | None
    vms: tuple[dict, ...]

    @property
    def coming(self) -> bool:
        """Not yet held."""
        return self.state in COMING

    @property
    def held(self) -> bool:
        """Its nodes are held (ready or running)."""
        return self.state in HELD

    def node_states(self, expect_vm: bool = False, no_vm_for: frozenset = frozenset()) -> dict[str, str]:
        """Each held host: busy, unknown or idle (see the module's docstring); with ``expect_vm`` a host with no VM
        on it is unknown (one is to start there) unless it is in ``no_vm_for``."""
        states = {}
        for host in self.hosts:
            on_node = [vm for vm in self.vms if vm.get("host") == host and vm.get("state") in ON_NODE]
            uses = [vm.get("usage") for vm in on_node]
            if any(isinstance(use, dict) and use.get("busy") is True for use in uses):
                states[host] = "busy"
            elif any(not isinstance(use, dict) for use in uses):
                states[host] = "unknown"
            elif not on_node and expect_vm and host not in no_vm_for:
                states[host] = "unknown"
            else:
                states[host] = "idle"
        return states

    def busy(self, expect_vm: bool = False, no_vm_for: frozenset = frozenset()) -> bool:
        """Whether any node of it is busy or not yet known (such a lease is never given back for demand)."""
        return any(state != "idle" for state in self.node_states(expect_vm, no_vm_for).values())

    def idle_since(self) -> float:
        """Since when (epoch seconds) none of its VMs has been busy: the latest turn to idle, its last VM's end, or
        when it was ready."""
        moments = [self.ready_at or 0.0]
        for vm in self.vms:
            use = vm.get("usage")
            if isinstance(use, dict) and use.get("since"):
                moments.append(parse_time(use["since"]).timestamp())
            if vm.get("stopped_at"):
                moments.append(parse_time(vm["stopped_at"]).timestamp())
        return max(moments)


def look_at(lease: dict) -> LeaseLook:
    """A :class:`LeaseLook` from one lease of the service's listing."""
    hosts = tuple(sorted(p["host"] for p in lease.get("pilots", ()) if p.get("state") == "reserved"))
    return LeaseLook(
        id=lease["id"], state=lease["state"], nodes=int(lease["nodes"]),
        created_at=_epoch(lease.get("created_at")) or 0.0, hosts=hosts,
        ready_at=_epoch(lease.get("ready_at")), expires_at=_epoch(lease.get("expires_at")),
        vms=tuple(lease.get("vms") or ()),
    )


def _epoch(text: str | None) -> float | None:
    return parse_time(text).timestamp() if text else None


@dataclasses.dataclass(frozen=True)
class PoolNumbers:
    """What the pool tells COBalD, and what it is made of."""

    supply: float
    utilisation: float
    allocation: float
    nodes: int
    busy: int
    waiting: float


def numbers(leases: list[LeaseLook], waiting: float, expect_vm: bool = False,
            no_vm_for: frozenset = frozenset()) -> PoolNumbers:
    """The pool's supply, utilisation and allocation (see the module's docstring) over its open leases; with
    ``expect_vm`` a node without a VM yet is in use unless it is in ``no_vm_for`` (black-holed)."""
    nodes = busy = used = supply = 0
    for lease in leases:
        if lease.coming:
            nodes += lease.nodes
            used += lease.nodes
        elif lease.held:
            states = lease.node_states(expect_vm, no_vm_for)
            nodes += lease.nodes
            supply += lease.nodes
            busy += sum(state == "busy" for state in states.values())
            used += sum(state != "idle" for state in states.values()) + lease.nodes - len(states)
    if nodes == 0:
        return PoolNumbers(0.0, 1.0 if waiting > 0 else 0.0, 1.0 + waiting if waiting > 0 else 0.0, 0, 0, waiting)
    return PoolNumbers(float(supply), min(used / nodes, 1.0), (busy + waiting) / nodes, nodes, busy, waiting)


def to_release(leases: list[LeaseLook], count: int, expect_vm: bool = False,
               no_vm_for: frozenset = frozenset()) -> list[LeaseLook]:
    """The ``count`` leases to give back for less demand, at most: those not yet held first (newest first: they
    cost nothing yet), then held ones with no busy VM, the longest idle first; never one with a busy VM (nor, with
    ``expect_vm``, one whose VM is yet to start)."""
    coming = sorted((lease for lease in leases if lease.coming), key=lambda lease: lease.created_at, reverse=True)
    idle = sorted((lease for lease in leases if lease.held and not lease.busy(expect_vm, no_vm_for)),
                  key=lambda lease: lease.idle_since())
    return (coming + idle)[:max(count, 0)]
