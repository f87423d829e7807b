"""Keeping the store's size bounded: old leases compacted, one host's live notifications capped, space given back.

Without this every accepted notification stays for ever: one node sending
maximum-size heartbeats at its rate limit grows the file by gigabytes a
day. Three bounds:

- **Retention.** The notifications and commands of a lease that ended
  more than ``retention_s`` ago are deleted (:func:`compact_ended`); what
  says what happened stays: the lease row, its history (``lease_events``),
  each host's pilot row (state, last seq, when it reserved and how it
  ended), its VMs and its usage. The lease is marked ``compacted_at``.
- **A live host's share.** Each (slot, host) may keep
  ``host_store_bytes`` of stored notifications (bodies plus
  :data:`ROW_BYTES` each); past it, its oldest notifications that are not
  lifecycle states (heartbeats, VM reports: their effect is in the pilot
  and VM rows already) are deleted down to three quarters of it
  (:func:`trim_host`). Lifecycle notifications (a handful per host) are
  always kept.
- **Space given back.** The file uses SQLite's incremental auto-vacuum; each
  compaction pass hands up to :data:`VACUUM_PAGES` free pages back to the
  file system (:func:`give_back`), so the file shrinks as well as stops
  growing.

Each function runs inside the store's write transaction (its writer thread).
"""

from __future__ import annotations

import sqlite3

from workspace_common.protocol import LIFECYCLE_STATES

#: What one stored notification costs beyond its body (its row, its key in the index), counted against its host.
ROW_BYTES = 128
#: Leases compacted per pass: a pass is one write transaction, and pilots' notifications wait behind it.
LEASES_PER_PASS = 50
#: Free pages returned to the file system per pass (4 KiB each: 32 MiB).
VACUUM_PAGES = 8192
_LIFECYCLE_SQL = "(" + ", ".join(f"'{state}'" for state in sorted(LIFECYCLE_STATES)) + ")"


def trim_host(conn: sqlite3.Connection, slot: str, host: str, cap_bytes: int, stored_bytes: int) -> int:
    """Delete (slot, host)'s oldest non-lifecycle notifications until its ``stored_bytes`` are at most three
    quarters of ``cap_bytes``; how many were deleted (0 when it holds only lifecycle ones)."""
    goal = stored_bytes - cap_bytes * 3 // 4
    doomed, freed = [], 0
    for seq, size in conn.execute(
        "SELECT seq, length(body) FROM notifications WHERE slot_id = ? AND host = ?"
        f" AND state NOT IN {_LIFECYCLE_SQL} ORDER BY seq",
        (slot, host),
    ):
        if freed >= goal:
            break
        doomed.append(seq)
        freed += size + ROW_BYTES
    for start in range(0, len(doomed), 500):
        chunk = doomed[start:start + 500]
        conn.execute(f"DELETE FROM notifications WHERE slot_id = ? AND host = ? AND seq IN ({', '.join('?' * len(chunk))})",
                     (slot, host, *chunk))
    conn.execute("UPDATE pilots SET stored_bytes = stored_bytes - ? WHERE slot_id = ? AND host = ?", (freed, slot, host))
    return len(doomed)


def compact_ended(conn: sqlite3.Connection, ended_before: float, now: float,
                  limit: int = LEASES_PER_PASS) -> tuple[int, int, int]:
    """Delete the notifications and commands of up to ``limit`` leases that ended before ``ended_before`` and
    were not compacted yet; mark them ``compacted_at = now``. (leases, notifications, commands) deleted."""
    leases = [lease_id for (lease_id,) in conn.execute(
        "SELECT id FROM leases WHERE ended_at < ? AND compacted_at IS NULL ORDER BY ended_at LIMIT ?",
        (ended_before, limit),
    )]
    notifications = commands = 0
    for lease_id in leases:
        slots = [slot for (slot,) in conn.execute("SELECT id FROM slots WHERE lease_id = ?", (lease_id,))]
        for slot in slots:
            notifications += conn.execute("DELETE FROM notifications WHERE slot_id = ?", (slot,)).rowcount
            commands += conn.execute("DELETE FROM commands WHERE slot_id = ?", (slot,)).rowcount
            conn.execute("UPDATE pilots SET stored_bytes = 0 WHERE slot_id = ?", (slot,))
        conn.execute("UPDATE leases SET compacted_at = ? WHERE id = ?", (now, lease_id))
    return len(leases), notifications, commands


def give_back(conn: sqlite3.Connection, pages: int = VACUUM_PAGES) -> int:
    """Return up to ``pages`` free pages to the file system (incremental vacuum); how many were free before."""
    (free,) = conn.execute("PRAGMA freelist_count").fetchone()
    # Each step of the pragma frees one page, and Python's sqlite3 steps a statement that returns no rows once
    # (executescript would step it through, but commits the writer's transaction first): one call per page.
    for _ in range(min(free, pages)):
        conn.execute("PRAGMA incremental_vacuum(1)")
    return free
