"""A lease's history entries that are no transition (``ending``, ``extended``), over a connection.

Its own module because both :mod:`.leases` and :mod:`.vms` write them (and :mod:`.leases` imports :mod:`.vms`).
"""

from __future__ import annotations

import sqlite3


def add_event(conn: sqlite3.Connection, lease_id: str, kind: str, reason: str, now: float) -> None:
    """A history entry that is no transition: the state before and after is the lease's state now."""
    conn.execute(
        "INSERT INTO lease_events (lease_id, at, old_state, new_state, reason, kind)"
        " SELECT id, ?, state, state, ?, ? FROM leases WHERE id = ?",
        (now, reason, kind, lease_id),
    )
