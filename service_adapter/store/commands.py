"""The store's command queue: what each pilot is told to do, in order, and what came of it.

A command is queued in the same transaction as the state it implies
(:mod:`.vms`: ``starting`` with its ``start-vm``; :mod:`.leases`: a
``release`` with the lease's release), and the store wakes the target's
long-poll after that transaction commits. Pilots read theirs above the
last id they saw (:func:`commands_after`).
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from typing import Callable


SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    slot_id     TEXT NOT NULL REFERENCES slots(id),
    host        TEXT NOT NULL,
    op          TEXT NOT NULL,
    vm          TEXT,
    body        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    outcome     TEXT,
    code        INTEGER,
    message     TEXT,
    done_at     REAL
);
CREATE INDEX IF NOT EXISTS commands_by_target ON commands(slot_id, host, id);
"""


@dataclasses.dataclass(frozen=True)
class CommandRow:
    """One queued command and, once its pilot reported, the outcome."""

    id: int
    slot_id: str
    host: str
    op: str
    vm: str | None
    body: dict
    created_at: float
    outcome: str | None
    code: int | None
    message: str | None
    done_at: float | None


def queue_command(conn: sqlite3.Connection, slot: str, host: str, body: dict, now: float,
                  woken: Callable[[str, str], None]) -> int:
    """Insert one command (``body`` without its id) for (slot, host); returns its id and reports the target."""
    if "id" in body:
        raise ValueError("a command's body has no 'id': its pilot is given the command's id in its place")
    return _insert_command(conn, slot, host, body["op"], body.get("name") or (body.get("vm") or {}).get("name"),
                           json.dumps(body, separators=(",", ":")), now, woken)


def queue_start_vm(conn: sqlite3.Connection, slot: str, host: str, vm_name: str, vm_json: str, now: float,
                   woken: Callable[[str, str], None]) -> int:
    """:func:`queue_command` of ``{"op": "start-vm", "vm": ...}`` for a VM spec already encoded as compact JSON
    (``vm_json``, an object: what the VM's row keeps), so that a start of many VMs encodes each spec once."""
    return _insert_command(conn, slot, host, "start-vm", vm_name, '{"op":"start-vm","vm":' + vm_json + "}", now,
                           woken)


def _insert_command(conn, slot: str, host: str, op: str, vm_name: str | None, text: str, now: float, woken) -> int:
    cursor = conn.execute(
        "INSERT INTO commands (slot_id, host, op, vm, body, created_at) VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
        (slot, host, op, vm_name, text, now),
    )
    woken(slot, host)
    return cursor.fetchone()[0]


def queue_release(conn: sqlite3.Connection, lease_id: str, now: float, woken) -> None:
    """Queue a ``release`` for every host of the lease that holds memory and has not started leaving."""
    hosts = conn.execute(
        "SELECT p.slot_id, p.host FROM pilots p JOIN leases l ON l.slot = p.slot_id"
        " WHERE l.id = ? AND p.reserved_at IS NOT NULL AND p.ended_by IS NULL AND p.lost_at IS NULL"
        " AND NOT EXISTS (SELECT 1 FROM commands c WHERE c.slot_id = p.slot_id AND c.host = p.host"
        "   AND c.op = 'release')",
        (lease_id,),
    ).fetchall()
    for slot, host in hosts:
        queue_command(conn, slot, host, {"op": "release"}, now, woken)


def queue_extend(conn: sqlite3.Connection, lease_id: str, now: float, woken, host: str | None = None) -> int:
    """Queue an ``extend`` (the lease's duration now) for each host of the lease that holds it (or only ``host``);
    how many were queued."""
    rows = conn.execute(
        "SELECT p.slot_id, p.host, l.duration_s FROM pilots p JOIN leases l ON l.slot = p.slot_id"
        " WHERE l.id = ? AND p.reserved_at IS NOT NULL AND p.ended_by IS NULL AND p.lost_at IS NULL"
        + (" AND p.host = ?" if host is not None else ""),
        (lease_id, host) if host is not None else (lease_id,),
    ).fetchall()
    for slot, target, duration_s in rows:
        queue_command(conn, slot, target, {"op": "extend", "duration_s": duration_s}, now, woken)
    return len(rows)


def commands_after(conn: sqlite3.Connection, slot: str, host: str, after: int, limit: int) -> list[tuple[int, dict]]:
    """(id, body) of the commands for (slot, host) with an id above ``after``, oldest first."""
    rows = conn.execute(
        "SELECT id, body FROM commands WHERE slot_id = ? AND host = ? AND id > ? ORDER BY id LIMIT ?",
        (slot, host, after, limit),
    )
    return [(cid, json.loads(body)) for cid, body in rows]


def pending(conn: sqlite3.Connection, slot: str, host: str, after: int, limit: int) -> list[tuple[int, str, str, float]]:
    """(id, op, body as stored: compact JSON, when queued) of the commands for (slot, host) with an id above
    ``after``, oldest first: what a command poll answers with, without parsing each body to encode it again."""
    return conn.execute(
        "SELECT id, op, body, created_at FROM commands WHERE slot_id = ? AND host = ? AND id > ? ORDER BY id LIMIT ?",
        (slot, host, after, limit),
    ).fetchall()


#: :func:`poll_view`'s query: what says whether the pilot holds, and its commands above ``after`` (none: one row
#: of NULLs after the first four).
_POLL_VIEW = ("SELECT p.reserved_at, p.state, p.lost_at, l.ended_at IS NOT NULL, c.id, c.op, c.body, c.created_at"
              " FROM pilots p JOIN slots s ON s.id = p.slot_id JOIN leases l ON l.id = s.lease_id"
              " LEFT JOIN commands c ON c.slot_id = p.slot_id AND c.host = p.host AND c.id > ?"
              " WHERE p.slot_id = ? AND p.host = ? ORDER BY c.id LIMIT ?")


def poll_view(conn: sqlite3.Connection, slot: str, host: str, after: int,
              limit: int) -> tuple[tuple, list[tuple[int, str, str, float]]] | None:
    """What a command poll reads first, in one statement (on PostgreSQL one round trip, with the event loop
    waiting): of the pilot of (slot, host), (its reserved_at, state, lost_at, whether its lease has ended), and
    its :func:`pending` commands above ``after``; None if no such pilot has reported. Not the whole pilot row:
    making it was a fifth of the read."""
    rows = conn.execute(_POLL_VIEW, (after, slot, host, limit)).fetchall()
    if not rows:
        return None
    first = rows[0]
    return ((first[0], first[1], first[2], bool(first[3])),
            [tuple(row[4:]) for row in rows if row[4] is not None])


def commands_of(conn: sqlite3.Connection, slot: str) -> list[CommandRow]:
    """Every command of a slot, in id order."""
    rows = conn.execute(
        "SELECT id, slot_id, host, op, vm, body, created_at, outcome, code, message, done_at FROM commands"
        " WHERE slot_id = ? ORDER BY id",
        (slot,),
    )
    return [CommandRow(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), *r[6:]) for r in rows]
