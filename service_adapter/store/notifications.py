"""Notifications over a connection: the decision on each one (replay, unknown slot, claims, usage), and reads.

:func:`record` runs inside the store's write transaction; the read
functions take a reader connection.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Callable

from workspace_common.protocol import LIFECYCLE_STATES, MAX_SEQ_STEP, Notification, epoch_micros, parse_time
from service_adapter.store import compaction, reports
from service_adapter.store.rows import ENDING, HOLD_ENDED, PILOT_COLUMNS, PilotRow, SlotAccess, Verdict, qualified


def record(conn: sqlite3.Connection, n: Notification, body: bytes, body_hash: str, account: str,
           slack_s: float, wake: Callable[[str, str], None], host_cap_bytes: int | None = None) -> Verdict:
    """Decide on one authenticated notification and, if accepted, record it; returns the :class:`Verdict`.

    ACCEPTED (stored, and the pilot's state updated, in one transaction),
    REPEAT (the exact same body was accepted before; nothing written),
    UNKNOWN_SLOT (no such slot, a host beyond the slot's node count, or a
    first ``reserved`` for a lease that has ended or is being released: that
    pilot gives its memory back), REPLAY (the seq was used with another
    body, or is not newer than the last one), or one of the claim bounds
    (:func:`claim_bound`). A (slot, host) whose stored notifications pass
    ``host_cap_bytes`` loses its oldest non-lifecycle ones
    (:func:`service_adapter.store.compaction.trim_host`).

    The notification that ends a host's hold (``unreserved`` or ``killed``
    after its ``reserved``) writes that hold's usage row in the same
    transaction: from the service's receipt of ``reserved`` to its receipt
    of this one (or the lease's end, if that came first), at most the
    lease's duration, at the memory ``reserved`` reported.

    Once the lease has ended its account is closed: LEASE_ENDED (410) for
    anything but ``unreserved`` and ``killed`` (clean-up: they still record
    that the node gave the memory back); a hold the service closed at the
    lease's end (:func:`close_open_holds`) keeps that usage row.
    """
    now = time.time()
    verdict, slot, pilot = _decide(conn, n, body_hash, slack_s, now)
    if verdict is not None:
        return verdict
    _, lease_id, owner, _, _, duration_s, ended_at = slot
    cost = len(body) + compaction.ROW_BYTES  # counted against the host in the pilot row's own write
    if pilot is None:
        stored = _insert_pilot(conn, n, now, cost)
    elif n.state in LIFECYCLE_STATES:
        stored = _update_pilot(conn, n, pilot, lease_id, owner, now, cost, window=(ended_at, duration_s))
    else:
        # A report may carry a moved deadline (``extended``): the pilot's expires_at follows it.
        (stored,) = conn.execute(
            "UPDATE pilots SET last_seq = ?, updated_at = ?, expires_at = COALESCE(?, expires_at),"
            " stored_bytes = stored_bytes + ? WHERE slot_id = ? AND host = ? RETURNING stored_bytes",
            (n.seq, now, n.expires_at, cost, n.slot, n.host)).fetchone()
    reports.apply_notification(conn, n, lease_id, now, wake)
    conn.execute(
        "INSERT INTO notifications (slot_id, host, seq, state, code, account, body, body_sha256, received_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (n.slot, n.host, n.seq, n.state, n.code, account, body, body_hash, now),
    )
    if host_cap_bytes and stored > host_cap_bytes:
        compaction.trim_host(conn, n.slot, n.host, host_cap_bytes, stored)
    return Verdict.ACCEPTED


def _decide(conn: sqlite3.Connection, n: Notification, body_hash: str, slack_s: float, now: float):
    """(a refusing or REPEAT verdict, or None to accept; the slot's row; the pilot's row or None)."""
    # One statement for the slot and its lease, an earlier notification of this seq and the host's pilot (on
    # PostgreSQL each statement is a round trip with the write lock held).
    found = conn.execute(
        "SELECT s.nodes, s.lease_id, l.owner, l.ended_at IS NOT NULL OR l.release_requested_at IS NOT NULL,"
        " s.memory_mb, l.duration_s, l.ended_at,"
        " (SELECT body_sha256 FROM notifications WHERE slot_id = s.id AND host = ? AND seq = ?),"
        " p.last_seq, p.reserved_at, p.reserved_mb, p.ended_by"
        " FROM slots s JOIN leases l ON l.id = s.lease_id LEFT JOIN pilots p ON p.slot_id = s.id AND p.host = ?"
        " WHERE s.id = ?",
        (n.host, n.seq, n.host, n.slot),
    ).fetchone()
    if found is None:
        return Verdict.UNKNOWN_SLOT, None, None
    slot, prior, pilot = found[:7], found[7], (found[8:] if found[8] is not None else None)
    nodes, _lease_id, _owner, closing, slot_mb, duration_s, ended_at = slot
    if prior is not None:
        return (Verdict.REPEAT if prior == body_hash else Verdict.REPLAY), slot, None
    if pilot is not None and n.seq <= pilot[0]:
        return Verdict.REPLAY, slot, pilot
    bound = claim_bound(n, slot_mb, duration_s, pilot, now, slack_s)
    if bound is not None:
        return bound, slot, pilot
    if n.state == "reserved" and closing and (pilot is None or pilot[1] is None):
        return Verdict.UNKNOWN_SLOT, slot, pilot  # too late: the lease is over or being released
    if ended_at is not None and n.state not in HOLD_ENDED:
        return Verdict.LEASE_ENDED, slot, pilot
    if pilot is None:
        (hosts,) = conn.execute("SELECT COUNT(*) FROM pilots WHERE slot_id = ?", (n.slot,)).fetchone()
        if hosts >= nodes:
            return Verdict.UNKNOWN_SLOT, slot, pilot
    return None, slot, pilot


def _insert_pilot(conn: sqlite3.Connection, n: Notification, now: float, stored: int) -> int:
    """A host's first notification: its pilot row, with ``stored`` bytes counted; returns them."""
    reserving = n.state == "reserved"
    state = n.state if n.state in LIFECYCLE_STATES else "reserving"
    reserved_at, reserved_mb = (now, n.memory_mb) if reserving else (None, None)
    conn.execute(
        f"INSERT INTO pilots ({PILOT_COLUMNS}, stored_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
        (n.slot, n.host, state, n.code, n.seq, n.memory_mb, n.expires_at, reserved_at, reserved_mb,
         n.state if n.state in ENDING else None, now, stored),
    )
    return stored


def _update_pilot(conn: sqlite3.Connection, n: Notification, pilot, lease_id: str, owner: str, now: float,
                  cost: int, window: tuple[float | None, float]) -> int:
    """A lifecycle state of a known pilot, ``cost`` more stored bytes counted; the usage row when it ends a hold
    (``window``: the lease's end, if it has ended, and its duration: what the row is held to). Returns the
    host's stored bytes now."""
    _, reserved_at, reserved_mb, ended_by = pilot
    if reserved_at is None and n.state == "reserved":
        reserved_at, reserved_mb = now, n.memory_mb
    (stored,) = conn.execute(
        "UPDATE pilots SET state = ?, code = ?, last_seq = ?, memory_mb = ?,"
        " expires_at = COALESCE(?, expires_at), updated_at = ?,"
        " reserved_at = ?, reserved_mb = ?, ended_by = ?, stored_bytes = stored_bytes + ?"
        " WHERE slot_id = ? AND host = ? RETURNING stored_bytes",
        (n.state, n.code, n.seq, n.memory_mb, n.expires_at, now, reserved_at, reserved_mb,
         ended_by or (n.state if n.state in ENDING else None), cost, n.slot, n.host),
    ).fetchone()
    if n.state in HOLD_ENDED and reserved_at is not None:
        ended_at, duration_s = window
        _add_usage(conn, lease_id, n.host, n.slot, owner, reserved_mb, reserved_at,
                   now if ended_at is None else min(now, ended_at), n.state, duration_s)
    return stored


def _add_usage(conn: sqlite3.Connection, lease_id: str, host: str, slot: str, owner: str, memory_mb: int,
               reserved_at: float, released_at: float, ended_by: str, duration_s: float) -> None:
    """The usage row of one hold, held to the lease's duration; a row already there (the service closed the hold
    at the lease's end, or a repeat) is kept."""
    released_at = min(max(released_at, reserved_at), reserved_at + duration_s)
    held_s = released_at - reserved_at
    conn.execute(
        "INSERT INTO usage (lease_id, host, slot_id, owner, memory_mb, reserved_at,"
        " released_at, ended_by, node_seconds, mb_seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT DO NOTHING",
        (lease_id, host, slot, owner, memory_mb, reserved_at, released_at, ended_by, held_s, memory_mb * held_s),
    )


#: ``ended_by`` of a usage row the service wrote at the lease's end for a host that never reported its own.
CLOSED_BY_SERVICE = "closed-by-service"


def close_open_holds(conn: sqlite3.Connection, lease_id: str, now: float) -> int:
    """At the lease's end: a usage row, up to ``now`` (at most the lease's duration), marked
    :data:`CLOSED_BY_SERVICE`, for each of its hosts that reserved and never reported its hold's end; how many."""
    rows = conn.execute(
        "SELECT p.host, p.slot_id, l.owner, p.reserved_mb, p.reserved_at, l.duration_s"
        " FROM pilots p JOIN slots s ON s.id = p.slot_id JOIN leases l ON l.id = s.lease_id"
        " WHERE l.id = ? AND p.reserved_at IS NOT NULL"
        " AND NOT EXISTS (SELECT 1 FROM usage u WHERE u.lease_id = l.id AND u.host = p.host)",
        (lease_id,),
    ).fetchall()
    for host, slot, owner, memory_mb, reserved_at, duration_s in rows:
        _add_usage(conn, lease_id, host, slot, owner, memory_mb, reserved_at, now, CLOSED_BY_SERVICE, duration_s)
    return len(rows)


def claim_bound(n: Notification, slot_mb: int, duration_s: float, pilot, now: float,
                slack_s: float) -> Verdict | None:
    """The bound a notification's claims break, if any (``pilot``: its row's last_seq, reserved_at, ...).

    MEMORY_BEYOND_SLOT: ``memory_mb`` above the slot's memory per node;
    SEQ_TOO_FAR: more than :data:`MAX_SEQ_STEP` past the last seq (a
    ``killed`` may go up to its ``sent_at`` in microseconds since the epoch,
    which is how kill-all counts); EXPIRES_TOO_LATE: ``expires_at`` after
    the hold's start (or now) plus the lease's duration and ``slack_s``.
    """
    if n.memory_mb > slot_mb:
        return Verdict.MEMORY_BEYOND_SLOT
    last_seq = pilot[0] if pilot is not None else 0
    if n.seq > last_seq + MAX_SEQ_STEP and not (n.state == "killed" and n.seq <= epoch_micros(n.sent_at)):
        return Verdict.SEQ_TOO_FAR
    if n.expires_at is not None:
        start = pilot[1] if pilot is not None and pilot[1] is not None else now
        if parse_time(n.expires_at).timestamp() > start + duration_s + slack_s:
            return Verdict.EXPIRES_TOO_LATE
    return None


# -- reads ----------------------------------------------------------------------------------------


def slot_access(conn: sqlite3.Connection, slot_id: str, host: str) -> SlotAccess | None:
    """What the receiver needs to judge a request for (slot, host); None for an unknown slot
    or one from before per-slot secrets."""
    row = conn.execute(
        "SELECT s.secret, s.job_id, EXISTS(SELECT 1 FROM pilots p WHERE p.slot_id = s.id AND p.host = ?)"
        " FROM slots s WHERE s.id = ?",
        (host, slot_id),
    ).fetchone()
    if row is None or row[0] is None:
        return None
    return SlotAccess(row[0], row[1], bool(row[2]))


def pilots(conn: sqlite3.Connection, slot_id: str) -> list[PilotRow]:
    """Every pilot that has reported for ``slot_id``, ordered by host."""
    rows = conn.execute(f"SELECT {PILOT_COLUMNS} FROM pilots WHERE slot_id = ? ORDER BY host", (slot_id,))
    return [PilotRow(*row) for row in rows]


def pilots_by_slot(conn: sqlite3.Connection, slot_ids: list[str]) -> dict[str, list[PilotRow]]:
    """The pilots of each of ``slot_ids`` (ordered by host), in a few queries rather than one per slot."""
    found: dict[str, list[PilotRow]] = {slot: [] for slot in slot_ids}
    for start in range(0, len(slot_ids), _IN_CHUNK):
        chunk = slot_ids[start:start + _IN_CHUNK]
        rows = conn.execute(
            f"SELECT {PILOT_COLUMNS} FROM pilots WHERE slot_id IN ({', '.join('?' * len(chunk))})"
            " ORDER BY slot_id, host", chunk,
        )
        for row in rows:
            found[row[0]].append(PilotRow(*row))
    return found


#: Ids per ``IN (...)`` list: well under SQLite's bound-parameter limit.
_IN_CHUNK = 500


#: :func:`pilot_of`'s query, made once (every command poll runs it).
_PILOT_OF = (f"SELECT {qualified(PILOT_COLUMNS, 'p')}, l.ended_at IS NOT NULL"
             " FROM pilots p JOIN slots s ON s.id = p.slot_id JOIN leases l ON l.id = s.lease_id"
             " WHERE p.slot_id = ? AND p.host = ?")


def pilot_of(conn: sqlite3.Connection, slot: str, host: str) -> tuple[PilotRow, bool] | None:
    """The pilot of (slot, host) and whether its lease has ended; None if no such pilot has reported."""
    row = conn.execute(_PILOT_OF, (slot, host)).fetchone()
    return None if row is None else (PilotRow(*row[:-1]), bool(row[-1]))


def bodies(conn: sqlite3.Connection, slot_id: str) -> list[tuple[str, str, float, dict]]:
    """(host, state, received_at, body as a dict) of every accepted notification of a slot, in arrival order."""
    rows = conn.execute(
        "SELECT host, state, received_at, body FROM notifications WHERE slot_id = ? ORDER BY rowid", (slot_id,)
    )
    return [(host, state, at, json.loads(body)) for host, state, at, body in rows]


def listed(conn: sqlite3.Connection, slot_id: str) -> list[tuple[str, int, str, int]]:
    """(host, seq, state, code) of every accepted notification of a slot, in arrival order."""
    return list(conn.execute(
        "SELECT host, seq, state, code FROM notifications WHERE slot_id = ? ORDER BY rowid", (slot_id,)
    ))
