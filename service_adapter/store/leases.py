"""Leases and their slots over a connection: creation, the compare-and-set transitions, job bookkeeping, reads.

Write functions run inside the store's write transaction (``conn`` is the
writer's); read functions take a reader connection. Lease states are
written only by :func:`transition`, a compare-and-set on the old state, so
two managers, or a manager and its restarted successor, never apply one
transition twice. The store knows no state names: a lease has ended when
``ended_at`` is set (``service_adapter.lease.LEASE_STATES`` has the states).
"""

from __future__ import annotations

import sqlite3
from typing import Callable

from workspace_common.protocol import format_epoch
from service_adapter.nodekeys import new_slot_secret
from service_adapter.store import commands, notifications, vms
from service_adapter.store.history import add_event
from service_adapter.store.rows import LEASE_COLUMNS, LeaseEvent, LeaseRow, UsageRow

# -- writes ---------------------------------------------------------------------------------------


def insert_lease(conn: sqlite3.Connection, lease_id, owner, nodes, memory_mb, duration_s, now, reason,
                 slot_id, start_at: float | None = None, release_when_idle_s: float | None = None,
                 exclude_nodes: tuple = ()) -> None:
    """A new lease with its history's first entry: ``pending``, or ``scheduled`` when it starts at ``start_at``."""
    state = "pending" if start_at is None else "scheduled"
    begins = now if start_at is None else start_at
    conn.execute(
        "INSERT INTO leases (id, owner, nodes, memory_mb, duration_s, state, reason, slot, job_id,"
        " created_at, updated_at, expires_at, start_at, release_when_idle_s)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, ?)",
        (lease_id, owner, nodes, memory_mb, float(duration_s), state, reason, slot_id, now, now,
         begins + duration_s, start_at, release_when_idle_s),
    )
    starts = "" if start_at is None else f", starting at {format_epoch(start_at)}"
    if release_when_idle_s is not None:
        starts += f", released after {release_when_idle_s:g} s without a VM"
    if exclude_nodes:
        starts += f", not on {', '.join(exclude_nodes)}"
    conn.execute(
        "INSERT INTO lease_events (lease_id, at, old_state, new_state, reason, kind)"
        " VALUES (?, ?, NULL, ?, ?, 'created')",
        (lease_id, now, state, f"created: {nodes} x {memory_mb} MB for {duration_s:g} s{starts}, owner {owner}"),
    )


def insert_slot(conn: sqlite3.Connection, slot_id: str, lease_id: str, nodes: int, memory_mb: int,
                now: float) -> str:
    """A slot (one pilot job) of a lease with a new random secret; returns the secret."""
    secret = new_slot_secret()
    conn.execute(
        "INSERT INTO slots (id, lease_id, nodes, memory_mb, job_id, created_at, secret) VALUES (?, ?, ?, ?, NULL, ?, ?)",
        (slot_id, lease_id, nodes, memory_mb, now, secret),
    )
    return secret


def set_job_id(conn: sqlite3.Connection, slot_id: str, job_id: str, reason: str | None,
               submitted: tuple[float, float] | None) -> None:
    """Record the LRM's job id for a slot and its lease (and, while pending, the lease's reason)."""
    started, returned = submitted or (None, None)
    conn.execute("UPDATE slots SET job_id = ?, submit_started_at = ?, submitted_at = ? WHERE id = ?",
                 (job_id, started, returned, slot_id))
    conn.execute("UPDATE leases SET job_id = ? WHERE slot = ?", (job_id, slot_id))
    if reason is not None:
        conn.execute("UPDATE leases SET reason = ? WHERE slot = ? AND state = 'pending'", (reason, slot_id))


def transition(conn: sqlite3.Connection, lease_id: str, old: str, new: str, reason: str, *, now: float,
               ended: bool, ready_at: float | None, cancel: bool, expires_at: float | None = None) -> bool:
    """Move a lease from ``old`` to ``new`` only if it is still in ``old``; whether it moved (see Store)."""
    cursor = conn.execute(
        "UPDATE leases SET state = ?, reason = ?, updated_at = ?,"
        " ready_at = COALESCE(ready_at, ?), expires_at = COALESCE(?, expires_at),"
        " ended_at = CASE WHEN ? = 1 THEN COALESCE(ended_at, ?) ELSE ended_at END,"
        " cancel_requested_at = CASE WHEN ? = 1 THEN COALESCE(cancel_requested_at, ?)"
        "   ELSE cancel_requested_at END"
        " WHERE id = ? AND state = ?",
        (new, reason, now, ready_at, expires_at, ended, now, cancel, now, lease_id, old),
    )
    if cursor.rowcount != 1:
        return False
    if ended:
        vms.end_lease_vms(conn, lease_id, now, new)
        notifications.close_open_holds(conn, lease_id, now)
    conn.execute(
        "INSERT INTO lease_events (lease_id, at, old_state, new_state, reason) VALUES (?, ?, ?, ?, ?)",
        (lease_id, now, old, new, reason),
    )
    return True


def mark_warned(conn: sqlite3.Connection, lease_id: str, reason: str, now: float) -> bool:
    """Record the lease's before-end event once (its ``ending`` entry); False if it was recorded before or it ended."""
    cursor = conn.execute(
        "UPDATE leases SET warned_at = ? WHERE id = ? AND warned_at IS NULL AND ended_at IS NULL", (now, lease_id),
    )
    if cursor.rowcount != 1:
        return False
    add_event(conn, lease_id, "ending", reason, now)
    return True


def extend(conn: sqlite3.Connection, lease_id: str, old_duration_s: float, by_s: float, reason: str,
           now: float) -> bool:
    """Lengthen the lease by ``by_s`` (duration and expires_at) if its duration is still ``old_duration_s``
    and it has not ended; its before-end event may come again. Whether it was lengthened."""
    cursor = conn.execute(
        "UPDATE leases SET duration_s = duration_s + ?, expires_at = expires_at + ?, updated_at = ?,"
        " warned_at = NULL WHERE id = ? AND duration_s = ? AND ended_at IS NULL",
        (by_s, by_s, now, lease_id, old_duration_s),
    )
    if cursor.rowcount != 1:
        return False
    add_event(conn, lease_id, "extended", reason, now)
    return True


def request_release(conn: sqlite3.Connection, lease_id: str, now: float,
                    wake: Callable[[str, str], None], warn: bool = False, why: str | None = None) -> bool:
    """Record that a release (and a cancel of the job) was asked, queueing the pilots' release commands;
    with ``warn``, the lease's before-end event too (once), saying ``why`` (else: a release was requested)."""
    cursor = conn.execute(
        "UPDATE leases SET release_requested_at = COALESCE(release_requested_at, ?),"
        " cancel_requested_at = COALESCE(cancel_requested_at, ?), updated_at = ?"
        " WHERE id = ? AND ended_at IS NULL",
        (now, now, now, lease_id),
    )
    if cursor.rowcount == 1:
        commands.queue_release(conn, lease_id, now, wake)
        if warn:
            mark_warned(conn, lease_id, why or "ending: release requested; the pilots stop their VMs and give the "
                                               "nodes back now", now)
    return cursor.rowcount == 1


def mark_job_finished(conn: sqlite3.Connection, lease_id: str, now: float) -> None:
    """Record when the job was first seen finished; a cancel still wanted is then moot."""
    conn.execute(
        "UPDATE leases SET job_finished_at = COALESCE(job_finished_at, ?),"
        " cancelled_at = CASE WHEN cancel_requested_at IS NOT NULL THEN COALESCE(cancelled_at, ?)"
        "   ELSE cancelled_at END"
        " WHERE id = ?",
        (now, now, lease_id),
    )


def mark_cancelled(conn: sqlite3.Connection, lease_id: str, now: float) -> None:
    """Record that the LRM took the cancel of the lease's job."""
    conn.execute(
        "UPDATE leases SET cancelled_at = COALESCE(cancelled_at, ?),"
        " cancel_requested_at = COALESCE(cancel_requested_at, ?) WHERE id = ?",
        (now, now, lease_id),
    )


# -- reads ----------------------------------------------------------------------------------------


def get(conn: sqlite3.Connection, lease_id: str) -> LeaseRow | None:
    """One lease, or None."""
    row = conn.execute(f"SELECT {LEASE_COLUMNS} FROM leases WHERE id = ?", (lease_id,)).fetchone()
    return LeaseRow(*row) if row else None


def listed(conn: sqlite3.Connection, states=None, owner: str | None = None) -> list[LeaseRow]:
    """Leases, newest first; only those in ``states`` and of ``owner`` if given."""
    where, params = [], []
    if states is not None:
        states = list(states)
        where.append(f"state IN ({', '.join('?' * len(states))})" if states else "0")
        params += states
    if owner is not None:
        where.append("owner = ?")
        params.append(owner)
    sql = f"SELECT {LEASE_COLUMNS} FROM leases"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY created_at DESC, rowid DESC"
    return [LeaseRow(*row) for row in conn.execute(sql, params)]


def to_watch(conn: sqlite3.Connection) -> list[LeaseRow]:
    """Every lease not ended, and ended ones whose job still needs a cancel."""
    rows = conn.execute(
        f"SELECT {LEASE_COLUMNS} FROM leases WHERE ended_at IS NULL"
        " OR (cancel_requested_at IS NOT NULL AND cancelled_at IS NULL AND job_id IS NOT NULL)"
        " ORDER BY created_at, rowid"
    )
    return [LeaseRow(*row) for row in rows]


def events(conn: sqlite3.Connection, lease_id: str, after: int = 0) -> list[LeaseEvent]:
    """A lease's history in order (only the entries numbered above ``after``)."""
    rows = conn.execute(
        "SELECT lease_id, at, old_state, new_state, reason, kind, seq FROM lease_events"
        " WHERE lease_id = ? AND seq > ? ORDER BY seq",
        (lease_id, after),
    )
    return [LeaseEvent(*row) for row in rows]


def usage_rows(conn: sqlite3.Connection, lease_id: str | None, owner: str | None) -> list[UsageRow]:
    """The ended holds that match, oldest first."""
    where, params = _usage_filter(lease_id, owner)
    rows = conn.execute(
        "SELECT lease_id, host, slot_id, owner, memory_mb, reserved_at, released_at, ended_by,"
        f" node_seconds, mb_seconds FROM usage{where} ORDER BY reserved_at, host",
        params,
    )
    return [UsageRow(*row) for row in rows]


def usage_totals(conn: sqlite3.Connection, lease_id: str | None, owner: str | None) -> tuple[float, float, int]:
    """(node-seconds, MB-seconds, leases counted) over the ended holds that match."""
    where, params = _usage_filter(lease_id, owner)
    node_s, mb_s, leases = conn.execute(
        f"SELECT COALESCE(SUM(node_seconds), 0.0), COALESCE(SUM(mb_seconds), 0.0), COUNT(DISTINCT lease_id)"
        f" FROM usage{where}", params
    ).fetchone()
    return node_s, mb_s, leases


def submit_times(conn: sqlite3.Connection, slot_id: str) -> tuple[float | None, float | None]:
    """When the slot's job submit started and returned."""
    row = conn.execute("SELECT submit_started_at, submitted_at FROM slots WHERE id = ?", (slot_id,)).fetchone()
    return (row[0], row[1]) if row else (None, None)


def _usage_filter(lease_id: str | None, owner: str | None) -> tuple[str, list]:
    where, params = [], []
    if lease_id is not None:
        where.append("lease_id = ?")
        params.append(lease_id)
    if owner is not None:
        where.append("owner = ?")
        params.append(owner)
    return (" WHERE " + " AND ".join(where) if where else ""), params
