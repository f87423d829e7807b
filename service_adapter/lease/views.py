"""What callers of the lease manager get: a lease with its pilots, usage and VMs, and its JSON.

Times in :meth:`LeaseInfo.to_json` are RFC 3339 UTC strings with
microseconds (``workspace_common.protocol.format_epoch``, the wire protocol's form),
or null; durations and usage are numbers of seconds.
"""

from __future__ import annotations

import dataclasses

from workspace_common.protocol import format_epoch
from service_adapter.lease.rules import LEASE_STATES
from service_adapter.store import LeaseEvent, LeaseRow, PilotRow
from service_adapter.store.vms import VmRow


@dataclasses.dataclass(frozen=True)
class Usage:
    """Node-seconds and MB-seconds of ended holds, and how many leases they came from."""

    node_seconds: float
    mb_seconds: float
    leases: int

    def to_json(self) -> dict:
        """The usage as the API shows it."""
        return {"node_seconds": self.node_seconds, "mb_seconds": self.mb_seconds, "leases": self.leases}


@dataclasses.dataclass(frozen=True)
class LeaseInfo:
    """A lease as callers see it: the stored row, its pilots (latest state per host), its usage so far, its VMs.

    The row's fields read through (``info.state`` is ``info.row.state``).
    Times are epoch seconds on the service's clock (None: not yet);
    :meth:`to_json` renders them as RFC 3339 UTC strings.
    """

    row: LeaseRow
    pilots: list[PilotRow]
    usage: Usage
    vms: list[VmRow] = dataclasses.field(default_factory=list)

    def __getattr__(self, name: str):
        # Only called for names the info itself lacks: the stored row's fields.
        if name == "row":
            raise AttributeError(name)
        return getattr(self.row, name)

    @property
    def terminal(self) -> bool:
        """Whether the lease has ended (released, expired, failed, missing)."""
        return LEASE_STATES[self.row.state].terminal

    def to_json(self, *, asker: str | None = None) -> dict:
        """Plain JSON types only; times as RFC 3339 UTC strings (``...Z``) or null.

        ``asker``: who asks; unless it is the owner (or None: the service
        itself), the VMs are shown without how to reach them (:func:`vm_json`).
        """
        row = self.row
        return {
            "id": row.id,
            "owner": row.owner,
            "nodes": row.nodes,
            "memory_mb": row.memory_mb,
            "duration_s": row.duration_s,
            "state": row.state,
            "terminal": self.terminal,
            "reason": row.reason,
            "slot": row.slot,
            "job_id": row.job_id,
            "created_at": _time(row.created_at),
            "updated_at": _time(row.updated_at),
            "ready_at": _time(row.ready_at),
            "release_requested_at": _time(row.release_requested_at),
            "ended_at": _time(row.ended_at),
            "expires_at": _time(row.expires_at),
            "start_at": _time(row.start_at),
            "compacted_at": _time(row.compacted_at),
            "release_when_idle_s": row.release_when_idle_s,
            "pilots": [
                {
                    "host": p.host, "state": p.state, "code": p.code, "seq": p.last_seq,
                    "memory_mb": p.memory_mb, "expires_at": p.expires_at,
                    "reserved_at": _time(p.reserved_at), "updated_at": _time(p.updated_at),
                }
                for p in self.pilots
            ],
            "usage": self.usage.to_json(),
            "vms": [vm_json(vm, owner=asker is None or asker == row.owner) for vm in self.vms],
        }


def event_json(event: LeaseEvent) -> dict:
    """One entry of a lease's history as the API shows it: its number, time, kind, states and why."""
    return {"seq": event.seq, "at": _time(event.at), "kind": event.kind, "old_state": event.old_state,
            "new_state": event.new_state, "reason": event.reason}


def vm_json(vm: VmRow, *, owner: bool = True) -> dict:
    """A VM as the API shows it: its host, state and why, its size, times as RFC 3339 or null, its spec, and
    its address (``ip``, ``mac``, ``hostname``; null when the site gives none).

    ``owner``: whether the asker owns the lease; only the owner is told how to
    reach the VM (``login``: the host and port to use, from outside its node)
    and sees its network's state in the spec.
    """
    spec = vm.spec if owner else {key: value for key, value in vm.spec.items() if key != "nic"}
    out = {
        "name": vm.name, "host": vm.host, "state": vm.state, "reason": vm.reason,
        "memory_mb": vm.memory_mb, "vcpus": vm.vcpus, "created_at": _time(vm.created_at),
        "updated_at": _time(vm.updated_at), "started_at": _time(vm.started_at),
        "stopped_at": _time(vm.stopped_at), "spec": spec, "ip": vm.ip, "mac": vm.mac, "hostname": vm.hostname,
        "usage": vm_usage_json(vm),
    }
    if owner:
        out["login"] = vm_login(vm)
    return out


def vm_usage_json(vm: VmRow) -> dict | None:
    """What the VM's pilot last said of its use (``busy``, ``cpu`` in percent of its vCPUs or null, ``at``, and
    ``since``: when it turned busy or idle); null before the first word, or once the VM has ended."""
    if vm.busy is None or not vm.active:
        return None
    return {"busy": bool(vm.busy), "cpu": vm.cpu, "at": _time(vm.usage_at), "since": _time(vm.busy_since)}


def vm_login(vm: VmRow) -> dict | None:
    """Where the owner reaches the VM's SSH from outside its node: its node's forward (a lease network), its own
    address (a site network), or None (no address, not active, or its node never said its address)."""
    if vm.ip is None or not vm.active:
        return None
    if vm.forward_port is not None:
        return {"host": vm.node_address, "port": vm.forward_port} if vm.node_address else None
    if (vm.spec.get("nic") or {}).get("net", {}).get("kind") == "site":
        return {"host": vm.ip, "port": 22}
    return None


def _time(epoch: float | None) -> str | None:
    return None if epoch is None else format_epoch(epoch)
