"""The VM half of the store: the VMs of each lease, placed and queued with their commands (:mod:`.commands`).

Functions here run inside the store's write transaction (``conn`` is the
writer's connection) or on a reader connection; :class:`Store` exposes
them as methods. A command is queued in the same transaction as the VM
state it implies (``starting`` with its ``start-vm``, ``stopping`` with its
``stop-vm``), and a pilot's report of a command's outcome moves the VM in
the same transaction that stores the notification (:mod:`.reports`), so
the two never disagree after a crash or a restart.

VM states: ``starting`` (start-vm queued), ``running`` (the pilot reported
vm-running), ``paused`` (the pilot reported vm-paused after a suspend-vm:
it keeps its memory and uses no CPU; a resume-vm makes it running again),
``stopping`` (stop-vm queued), and the ended ones ``stopped``,
``failed`` (the pilot refused or could not start it) and ``lost`` (its host
stopped polling, or its hold ended without a word about it).
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3

from service_adapter.placement import HostRoom, PlacementError, place
from service_adapter.store import addresses
from service_adapter.store.commands import queue_command, queue_start_vm
from service_adapter.store.rows import qualified
from workspace_common.protocol import MAX_PEERS, VmSpec

SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    lease_id    TEXT NOT NULL REFERENCES leases(id),
    name        TEXT NOT NULL,
    slot_id     TEXT NOT NULL,
    host        TEXT NOT NULL,
    memory_mb   INTEGER NOT NULL,
    vcpus       INTEGER NOT NULL,
    spec        TEXT NOT NULL,
    state       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    started_at  REAL,
    stopped_at  REAL,
    ip          TEXT,
    mac         TEXT,
    hostname    TEXT,
    forward_port INTEGER,
    holds_address INTEGER NOT NULL DEFAULT 0,
    busy        INTEGER,
    cpu         INTEGER,
    usage_at    REAL,
    busy_since  REAL,
    PRIMARY KEY (lease_id, name)
);
CREATE INDEX IF NOT EXISTS vms_by_host ON vms(slot_id, host);
"""

ACTIVE = ("starting", "running", "paused", "stopping")
ACTIVE_SQL = "(" + ", ".join(f"'{state}'" for state in ACTIVE) + ")"
ENDED = ("stopped", "failed", "lost")
_VM_COLUMNS = (
    "lease_id, name, slot_id, host, memory_mb, vcpus, spec, state, reason, created_at, updated_at,"
    " started_at, stopped_at, ip, mac, hostname, forward_port"
)
#: What a read of a VM selects: its row, its node's address and what its pilot last said of its use.
_VM_READ = (f"SELECT {qualified(_VM_COLUMNS, 'v')}, p.address,"
            " v.busy, v.cpu, v.usage_at, v.busy_since FROM vms v LEFT JOIN pilots p ON p.slot_id = v.slot_id AND p.host = v.host")


class VmRequestError(ValueError):
    """A VM request that cannot be carried out as asked; nothing was queued. ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class VmRow:
    """One VM of a lease as the service knows it."""

    lease_id: str
    name: str
    slot_id: str
    host: str
    memory_mb: int
    vcpus: int
    spec: dict
    state: str
    reason: str
    created_at: float
    updated_at: float
    started_at: float | None
    stopped_at: float | None
    ip: str | None = None
    mac: str | None = None
    hostname: str | None = None
    forward_port: int | None = None
    node_address: str | None = None
    """The address its node reported (where the node's forward to this VM listens)."""
    busy: int | None = None
    """What its pilot last said (``vm-usage``): 1 busy, 0 idle; None before its first word."""
    cpu: int | None = None
    """Its CPU use then, in percent of its vCPUs (None: not measured yet)."""
    usage_at: float | None = None
    busy_since: float | None = None
    """Since when it has been as busy (or idle) as it is: when its pilot said so first."""

    @property
    def active(self) -> bool:
        """Whether it is (or is about to be, or still is) on its host."""
        return self.state in ACTIVE


def record_usage(conn: sqlite3.Connection, lease_id: str, host: str, usage: dict[str, dict], now: float) -> None:
    """A pilot's ``vm-usage`` report: each named VM of the lease on that host that is still there takes it; the
    time it turned busy or idle is kept until it turns again."""
    for name, look in usage.items():
        busy = int(look["busy"])
        conn.execute(
            "UPDATE vms SET busy_since = CASE WHEN busy IS NOT DISTINCT FROM ? THEN busy_since ELSE ? END, busy = ?, cpu = ?,"
            f" usage_at = ? WHERE lease_id = ? AND name = ? AND host = ? AND state IN {ACTIVE_SQL}",
            (busy, now, busy, look["cpu"], now, lease_id, name, host),
        )


def _vm_row(row: tuple) -> VmRow:
    values = list(row)
    values[6] = json.loads(values[6])
    return VmRow(*values)


def host_rooms(conn: sqlite3.Connection, lease_id: str, slot: str, overhead_mb: int) -> list[HostRoom]:
    """Every host of the slot that can take VMs now, with the memory its active VMs leave free."""
    rows = conn.execute(
        "SELECT p.host, COALESCE(p.reserved_mb, p.memory_mb),"
        # The (slot_id, host) index answers each host's sum without scanning the lease's other VMs.
        " (SELECT CAST(COALESCE(SUM(v.memory_mb), 0) + COUNT(v.name) * ? AS BIGINT) FROM vms v"
        "   WHERE v.slot_id = p.slot_id AND v.host = p.host AND v.lease_id = ?"
        f"   AND v.state IN {ACTIVE_SQL})"
        " FROM pilots p WHERE p.slot_id = ? AND p.reserved_at IS NOT NULL AND p.ended_by IS NULL"
        " AND p.lost_at IS NULL AND p.state = 'reserved' ORDER BY p.host",
        (overhead_mb, lease_id, slot),
    ).fetchall()
    return [HostRoom(host, reserved, reserved - int(used)) for host, reserved, used in rows]


def start_vms(conn: sqlite3.Connection, lease_id: str, requests: list[tuple[VmSpec, str | None]],
              overhead_mb: int, now: float, woken, resolve=None, plan=None) -> list[tuple[VmSpec, str]]:
    """Place each (spec, wanted host or None) on a host of the lease and queue its start-vm; all or nothing.

    Returns (spec as queued, host chosen), in order; ``resolve(conn, spec)``
    gives the spec to queue (see :meth:`Store.start_vms`); ``plan`` (a
    :class:`~service_adapter.networks.NetworkPlan`) gives each VM its
    address (:mod:`.addresses`). Raises :class:`VmRequestError`: the lease
    is not ready or running, a name is taken by an active VM (or twice in
    the request), an image may not run, the VMs do not fit, or the network
    pool has no address left (409, the pool named).
    """
    lease = conn.execute("SELECT state, slot FROM leases WHERE id = ?", (lease_id,)).fetchone()
    if lease is None:
        raise VmRequestError(f"no lease {lease_id!r}", 404)
    state, slot = lease
    if state not in ("ready", "running"):
        raise VmRequestError(f"lease {lease_id} is {state}: VMs start only on a ready or running lease")
    names = [spec.name for spec, _ in requests]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise VmRequestError(f"VM name(s) {', '.join(twice)} given twice in one request", 400)
    taken = conn.execute(
        f"SELECT name, state FROM vms WHERE lease_id = ? AND name IN ({', '.join('?' * len(names))})",
        [lease_id, *names],
    ).fetchall()
    busy = sorted(name for name, vm_state in taken if vm_state in ACTIVE)
    if busy:
        raise VmRequestError(f"lease {lease_id} already has an active VM named {', '.join(busy)}")
    if resolve is not None:
        requests = [(resolve(conn, spec), want) for spec, want in requests]
    rooms = host_rooms(conn, lease_id, slot, overhead_mb)
    try:
        hosts = place([(spec.name, spec.memory_mb + overhead_mb, want) for spec, want in requests], rooms)
    except PlacementError as exc:
        raise VmRequestError(f"lease {lease_id}: {exc}") from None
    if any(spec.context is not None for spec, _ in requests):
        requests = _with_peers(conn, lease_id, requests, hosts)
    specs = [spec for spec, _ in requests]
    if plan is not None and plan.enabled:
        # Hosts that run the lease's VMs already learn of the new ones by a network command.
        before = {host for (host,) in conn.execute(
            "SELECT DISTINCT host FROM vms WHERE lease_id = ? AND holds_address = 1", (lease_id,))}
        try:
            specs = addresses.assign(conn, plan, lease_id, slot, list(zip(specs, hosts)), now)
        except addresses.PoolExhausted as exc:
            raise VmRequestError(f"lease {lease_id}: {exc}") from None
        except ValueError as exc:
            raise VmRequestError(str(exc), 400) from None
    ended = {name for name, _ in taken}  # ended VMs of these names: their rows give way to the new ones
    for spec, host in zip(specs, hosts):
        spec_json = json.dumps(spec.to_dict(), separators=(",", ":"))  # the row's and the command's
        if spec.name in ended:
            conn.execute("DELETE FROM vms WHERE lease_id = ? AND name = ?", (lease_id, spec.name))
        conn.execute(
            f"INSERT INTO vms ({_VM_COLUMNS}, holds_address)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 'starting', ?, ?, ?, NULL, NULL, ?, ?, ?, ?, ?)",
            (lease_id, spec.name, slot, host, spec.memory_mb, spec.vcpus, spec_json, f"start-vm queued for {host}",
             now, now, *addresses.hold_columns(spec)),
        )
        queue_start_vm(conn, slot, host, spec.name, spec_json, now, woken)
    if plan is not None and plan.enabled:
        queue_network(conn, lease_id, slot, before - set(hosts), now, woken)
    return list(zip(specs, hosts))


def queue_network(conn: sqlite3.Connection, lease_id: str, slot: str, hosts, now: float, woken) -> None:
    """Queue the lease network's current state (a ``network`` command) to each of ``hosts`` that still holds."""
    state = addresses.net_state(conn, lease_id)
    if state is None:
        return
    holding = {host for (host,) in conn.execute(
        "SELECT host FROM pilots WHERE slot_id = ? AND reserved_at IS NOT NULL AND ended_by IS NULL"
        " AND lost_at IS NULL", (slot,))}
    for host in sorted(set(hosts) & holding):
        queue_command(conn, slot, host, {"op": "network", "net": state.to_dict()}, now, woken)


def _with_peers(conn, lease_id: str, requests, hosts):
    """The requests with each context's ``peers``: the lease's active VMs and this request's, with their nodes."""
    names = {spec.name for spec, _ in requests}
    peers = [(name, host) for name, host in conn.execute(
        f"SELECT name, host FROM vms WHERE lease_id = ? AND state IN ({', '.join('?' * len(ACTIVE))}) ORDER BY name",
        [lease_id, *ACTIVE]) if name not in names]
    peers += [(spec.name, host) for (spec, _), host in zip(requests, hosts)]
    peers = tuple(peers[:MAX_PEERS])
    return [(dataclasses.replace(spec, context=dataclasses.replace(spec.context, peers=peers))
             if spec.context is not None else spec, want) for spec, want in requests]


def _named_vm(conn: sqlite3.Connection, lease_id: str, name: str) -> VmRow:
    """The lease's VM ``name``; VmRequestError 404 for no such lease or VM."""
    row = conn.execute(f"{_VM_READ} WHERE v.lease_id = ? AND v.name = ?", (lease_id, name)).fetchone()
    if row is None:
        if conn.execute("SELECT 1 FROM leases WHERE id = ?", (lease_id,)).fetchone() is None:
            raise VmRequestError(f"no lease {lease_id!r}", 404)
        raise VmRequestError(f"lease {lease_id} has no VM named {name!r}", 404)
    return _vm_row(row)


def stop_vm(conn: sqlite3.Connection, lease_id: str, name: str, force: bool, now: float, woken) -> VmRow:
    """Queue a stop-vm for an active VM of the lease (state -> stopping); raises :class:`VmRequestError`."""
    vm = _named_vm(conn, lease_id, name)
    if not vm.active:
        raise VmRequestError(f"VM {name} of lease {lease_id} is {vm.state} already")
    queue_command(conn, vm.slot_id, vm.host, {"op": "stop-vm", "name": name, "force": force}, now, woken)
    set_vm(conn, vm.lease_id, name, "stopping", f"stop-vm{' (forced)' if force else ''} queued for {vm.host}", now)
    return vm


def pause_vm(conn: sqlite3.Connection, lease_id: str, name: str, op: str, now: float, woken) -> VmRow:
    """Queue a ``suspend-vm`` (the VM must be running) or ``resume-vm`` (it must be paused); VmRequestError else.

    The VM's state moves when its pilot reports (``vm-paused``, ``vm-running``).
    """
    vm = _named_vm(conn, lease_id, name)
    wanted = "running" if op == "suspend-vm" else "paused"
    if vm.state != wanted:
        raise VmRequestError(f"VM {name} of lease {lease_id} is {vm.state}: only a {wanted} VM can be "
                             f"{'suspended' if op == 'suspend-vm' else 'resumed'}")
    queue_command(conn, vm.slot_id, vm.host, {"op": op, "name": name}, now, woken)
    set_vm(conn, lease_id, name, vm.state, f"{op} queued for {vm.host}", now)
    return vm


def mark_lost(conn: sqlite3.Connection, slot: str, host: str, now: float, why: str) -> bool:
    """Record that (slot, host) stopped polling; its active VMs become ``lost``. False if already marked."""
    cursor = conn.execute(
        "UPDATE pilots SET lost_at = ? WHERE slot_id = ? AND host = ? AND lost_at IS NULL", (now, slot, host)
    )
    if cursor.rowcount != 1:
        return False
    conn.execute(
        "UPDATE vms SET state = 'lost', reason = ?, updated_at = ? WHERE slot_id = ? AND host = ?"
        f" AND state IN {ACTIVE_SQL}",
        (why, now, slot, host),
    )
    return True


def end_lease_vms(conn: sqlite3.Connection, lease_id: str, now: float, state: str) -> None:
    """A lease ended: VMs no pilot reported on are ``lost`` (nobody can say they stopped); its network and every
    address in it are free."""
    conn.execute(
        "UPDATE vms SET state = 'lost', reason = ?, updated_at = ? WHERE lease_id = ?"
        f" AND state IN {ACTIVE_SQL}",
        (f"the lease ended ({state}) without a report on this VM", now, lease_id),
    )
    addresses.free_lease(conn, lease_id, now)


def set_vm(conn, lease_id: str, name: str, state: str, reason: str, now: float, *, host: str | None = None,
           started: bool = False, stopped: bool = False, only: tuple = ACTIVE) -> None:
    """Move VM ``name`` to ``state`` with ``reason`` if it is in one of ``only`` (and on ``host``, when given);
    ``started`` / ``stopped`` stamp the first start or the end."""
    sql = ("UPDATE vms SET state = ?, reason = ?, updated_at = ?"
           + (", started_at = COALESCE(started_at, ?)" if started else "")
           + (", stopped_at = COALESCE(stopped_at, ?)" if stopped else "")
           + f" WHERE lease_id = ? AND name = ? AND state IN ({', '.join('?' * len(only))})")
    params: list = [state, reason[:4000], now]
    if started:
        params.append(now)
    if stopped:
        params.append(now)
    params += [lease_id, name, *only]
    if host is not None:
        sql += " AND host = ?"
        params.append(host)
    conn.execute(sql, params)


# -- reads ---------------------------------------------------------------------------------------


def vms_of(conn: sqlite3.Connection, lease_id: str) -> list[VmRow]:
    """The lease's VMs, oldest first."""
    rows = conn.execute(f"{_VM_READ} WHERE v.lease_id = ? ORDER BY v.created_at, v.name", (lease_id,))
    return [_vm_row(row) for row in rows]


def vm_activity(conn: sqlite3.Connection, lease_id: str) -> tuple[int, float | None]:
    """(how many of the lease's VMs are on their hosts or on their way, when the last of the others ended: None
    if none ever ran)."""
    return conn.execute(
        f"SELECT COUNT(*) FILTER (WHERE state IN {ACTIVE_SQL}), MAX(COALESCE(stopped_at, updated_at)) FROM vms"
        " WHERE lease_id = ?", (lease_id,)).fetchone()


def running_counts(conn: sqlite3.Connection, lease_ids: list[str]) -> dict[str, int]:
    """How many VMs of each of ``lease_ids`` are running or paused (0 for a lease with none), in a few queries."""
    found = dict.fromkeys(lease_ids, 0)
    for start in range(0, len(lease_ids), 500):
        chunk = lease_ids[start:start + 500]
        found.update(conn.execute(
            f"SELECT lease_id, COUNT(*) FROM vms WHERE state IN ('running', 'paused') AND lease_id IN ({', '.join('?' * len(chunk))})"
            " GROUP BY lease_id", chunk,
        ).fetchall())
    return found


