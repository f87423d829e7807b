"""What a pilot's report means for its lease's VMs and commands, applied in the notification's own transaction.

A command's outcome (``vm-running``, ``vm-failed``, ``extended``, ...)
moves its VM and closes the command; ``reserved`` queues the lease's image
prefetch (and an extension the pilot missed); ``earlyunreserving`` queues
the stops of the host's VMs; the end of a hold ends every VM still on that
host. :func:`service_adapter.store.notifications.record` calls it.
"""

from __future__ import annotations

import sqlite3

from service_adapter.store import images as image_ops
from service_adapter.store.commands import queue_command, queue_extend
from service_adapter.store.history import add_event
from service_adapter.store.rows import earliest_expiry
from service_adapter.store.vms import ACTIVE_SQL, record_usage, set_vm
from workspace_common.protocol import Notification


def apply_notification(conn: sqlite3.Connection, n: Notification, lease_id: str, now: float, woken) -> None:
    """What a pilot's report means for its VMs and commands (inside the notification's own transaction)."""
    command = None
    if n.command is not None:
        command = conn.execute(
            "SELECT op, vm, outcome FROM commands WHERE id = ? AND slot_id = ? AND host = ?",
            (n.command, n.slot, n.host),
        ).fetchone()
    if n.state == "vm-usage":
        record_usage(conn, lease_id, n.host, n.usage, now)
        return
    if n.state == "fetching":
        # Progress of a start-vm's image download: the VM still starts; its reason says how far along.
        if command is not None and command[0] == "start-vm" and command[2] is None and command[1]:
            set_vm(conn, lease_id, command[1], "starting", n.message or "fetching its image", now, host=n.host,
                    only=("starting",))
        return
    outcome = n.state.startswith("vm-") or n.state == "extended"
    if n.command is not None:
        if command is not None and command[2] is not None and outcome:
            return  # the command has its outcome: a second, later word on it changes nothing
        if command is not None and outcome:
            conn.execute(
                "UPDATE commands SET outcome = ?, code = ?, message = ?, done_at = ? WHERE id = ? AND outcome IS NULL",
                (n.state, n.code, n.message, now, n.command),
            )
    names = list(n.vms or ())
    if command is not None and command[1] and command[1] not in names:
        names.append(command[1])
    why = n.message or ""
    op = command[0] if command is not None else None
    if n.state == "extended":
        if op != "extend":
            return  # only the answer to an extend the service queued (once, above): a node cannot fill the history
        held = f"{n.host} holds until {n.expires_at or '?'}" + (f": {why}" if why else "")
        add_event(conn, lease_id, "extended", held, now)
        _lease_ends_with_its_pilots(conn, lease_id, n.slot)
    elif n.state == "vm-running":
        for name in names:
            # Only a starting VM (or a paused one its resume woke) becomes running: one already stopping keeps
            # its queued stop.
            set_vm(conn, lease_id, name, "running", why or f"running on {n.host}", now, host=n.host,
                    started=True, only=("starting", "paused") if op == "resume-vm" else ("starting",))
    elif n.state == "vm-paused":
        for name in names:
            set_vm(conn, lease_id, name, "paused", why or f"paused on {n.host}", now, host=n.host, only=("running",))
    elif n.state == "vm-failed" and op in ("suspend-vm", "resume-vm"):
        # The VM is as it was: only the reason tells what did not happen.
        for name in names:
            conn.execute("UPDATE vms SET reason = ?, updated_at = ? WHERE lease_id = ? AND name = ? AND host = ?",
                         (f"{op[:-3]} failed: {why or 'the pilot gave no reason'}"[:4000], now, lease_id, name,
                          n.host))
    elif n.state == "vm-stopped":
        for name in names:
            set_vm(conn, lease_id, name, "stopped", why or f"stopped on {n.host}", now, host=n.host, stopped=True)
    elif n.state == "vm-failed":
        for name in names:
            if op == "stop-vm":
                # The stop did not happen: the VM is still there as far as anyone knows.
                set_vm(conn, lease_id, name, "running", f"stop failed: {why or 'the pilot gave no reason'}", now,
                        host=n.host, only=("stopping",))
            else:
                set_vm(conn, lease_id, name, "failed", why or "the pilot could not start it", now, host=n.host,
                        stopped=True)
    elif n.state == "reserved":
        if n.address is not None:
            # Where the lease network's overlay and forwards meet this node. Every node of a lease has reserved
            # before its first VM starts (a lease is ready only then), so each start-vm lists them all.
            conn.execute("UPDATE pilots SET address = ? WHERE slot_id = ? AND host = ?", (n.address, n.slot, n.host))
        # The host holds the memory: have it fetch the lease's images now, before a VM start waits for them.
        images = image_ops.lease_images(conn, lease_id)
        if images:
            queue_command(conn, n.slot, n.host, {"op": "prefetch", "images": images}, now, woken)
        # Extended while its job waited or it reserved: its --duration is the old one, tell it the new.
        if conn.execute("SELECT 1 FROM lease_events WHERE lease_id = ? AND kind = 'extended' LIMIT 1",
                        (lease_id,)).fetchone():
            queue_extend(conn, lease_id, now, woken, host=n.host)
    elif n.state == "earlyunreserving":
        # The pilot waits grace x earlywaitratio for the service to stop its VMs: ask it to, gracefully.
        for (name,) in conn.execute(
            "SELECT name FROM vms WHERE lease_id = ? AND host = ? AND state IN ('starting', 'running', 'paused')",
            (lease_id, n.host),
        ).fetchall():
            queue_command(conn, n.slot, n.host, {"op": "stop-vm", "name": name, "force": False}, now, woken)
            set_vm(conn, lease_id, name, "stopping", f"{n.host} is unreserving early: stop-vm queued", now)
    elif n.state == "killed":
        for name in names:
            set_vm(conn, lease_id, name, "stopped", f"destroyed by workspace-killall on {n.host}", now,
                    host=n.host, stopped=True)
    if n.state in ("unreserved", "killed"):
        # The hold is over: nothing of this slot can still run on that host.
        conn.execute(
            "UPDATE vms SET state = 'stopped', reason = ?, updated_at = ?, stopped_at = COALESCE(stopped_at, ?)"
            f" WHERE lease_id = ? AND host = ? AND state IN {ACTIVE_SQL}",
            (f"{n.host} ended its hold ({n.state})", now, now, lease_id, n.host),
        )


def _lease_ends_with_its_pilots(conn: sqlite3.Connection, lease_id: str, slot: str) -> None:
    """The lease's end is its holding pilots' earliest deadline (a pilot the batch system's end held back
    from an extension's whole length ends the lease earlier than the service's sum said)."""
    ends = earliest_expiry(text for (text,) in conn.execute(
        "SELECT expires_at FROM pilots WHERE slot_id = ? AND reserved_at IS NOT NULL AND ended_by IS NULL"
        " AND lost_at IS NULL", (slot,)))
    if ends is not None:
        conn.execute("UPDATE leases SET expires_at = ? WHERE id = ? AND ended_at IS NULL", (ends, lease_id))
