"""The service's durable state: leases, slots, pilots and every accepted notification, in SQLite.

All writes go through one writer thread that commits in groups: whatever
requests are queued when it wakes share one transaction (one fsync), each
in its own savepoint so that one failing write does not undo its
neighbours. A write's future resolves only after its transaction has
committed, so the receiver answers 200 only for what is on disk.

Readers use their own connections (WAL lets them run beside the writer).
:meth:`Store.wait_for` lets callers block until a predicate over the store
holds, woken by commits rather than by polling.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import hashlib
import logging
import queue
import sqlite3
import threading
import time
from typing import Callable

from pilot.protocol import LIFECYCLE_STATES, Notification

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    id          TEXT PRIMARY KEY,
    nodes       INTEGER NOT NULL,
    memory_mb   INTEGER NOT NULL,
    duration_s  INTEGER NOT NULL,
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS slots (
    id          TEXT PRIMARY KEY,
    lease_id    TEXT NOT NULL REFERENCES leases(id),
    nodes       INTEGER NOT NULL,
    memory_mb   INTEGER NOT NULL,
    job_id      TEXT,
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pilots (
    slot_id     TEXT NOT NULL REFERENCES slots(id),
    host        TEXT NOT NULL,
    state       TEXT NOT NULL,
    code        INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,
    memory_mb   INTEGER NOT NULL,
    expires_at  TEXT,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (slot_id, host)
);
CREATE TABLE IF NOT EXISTS notifications (
    slot_id     TEXT NOT NULL,
    host        TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    state       TEXT NOT NULL,
    code        INTEGER NOT NULL,
    account     TEXT NOT NULL,
    body        BLOB NOT NULL,
    body_sha256 TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (slot_id, host, seq)
);
"""

_TABLES = ("leases", "slots", "pilots", "notifications")
_GROUP_MAX = 256


class Verdict(enum.Enum):
    """What the store decided about a notification, with the HTTP status to answer."""

    # (name, status): plain statuses would make REPEAT an alias of ACCEPTED.
    ACCEPTED = ("accepted", 200)
    REPEAT = ("repeat", 200)
    UNKNOWN_SLOT = ("unknown-slot", 404)
    REPLAY = ("replay", 409)

    @property
    def result(self) -> str:
        """The word the receiver puts in its answer's ``result``."""
        return self.value[0]

    @property
    def status(self) -> int:
        """The HTTP status the receiver answers with."""
        return self.value[1]


@dataclasses.dataclass(frozen=True)
class PilotRow:
    """One pilot of a slot as the service knows it: its host and latest state."""

    slot_id: str
    host: str
    state: str
    code: int
    last_seq: int
    memory_mb: int
    expires_at: str | None


class StoreClosed(RuntimeError):
    """Raised for writes submitted after :meth:`Store.close`."""


class Store:
    """SQLite-backed state of the service (WAL; ``synchronous=FULL`` by default).

    Thread-safe: writes are serialised through the writer thread, reads use
    one connection per calling thread.
    """

    def __init__(self, path: str, *, synchronous: str = "FULL"):
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be FULL or NORMAL")
        self.path = path
        self._synchronous = synchronous
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._changed = threading.Condition()
        self._version = 0
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._writer = threading.Thread(
            target=self._write_loop, args=(ready,), name="store-writer", daemon=True
        )
        self._writer.start()
        ready.result()

    # -- writer ---------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def _write_loop(self, ready: concurrent.futures.Future) -> None:
        try:
            conn = self._connect()
            conn.executescript(SCHEMA)
        except Exception as exc:  # surfaced to the constructor
            ready.set_exception(exc)
            return
        ready.set_result(None)
        while True:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < _GROUP_MAX:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                batch.append(nxt)
            self._run_batch(conn, batch)
        conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch) -> None:
        results = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, future in batch:
                conn.execute("SAVEPOINT item")
                try:
                    results.append((future, fn(conn), None))
                    conn.execute("RELEASE item")
                except Exception as exc:  # this write only; its neighbours go on
                    conn.execute("ROLLBACK TO item")
                    conn.execute("RELEASE item")
                    results.append((future, None, exc))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.error("store commit failed: %s", exc)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for _, future in batch:
                future.set_exception(exc)
            return
        with self._changed:
            self._version += 1
            self._changed.notify_all()
        for future, value, exc in results:
            if exc is None:
                future.set_result(value)
            else:
                future.set_exception(exc)

    def submit(self, fn: Callable[[sqlite3.Connection], object]) -> concurrent.futures.Future:
        """Queue ``fn(conn)`` to run inside a write transaction; the future resolves after commit."""
        if self._closed:
            raise StoreClosed("the store is closed")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((fn, future))
        return future

    def close(self) -> None:
        """Finish queued writes, stop the writer and close every connection."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._writer.join()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()

    # -- writes -------------------------------------------------------------------

    def add_lease(self, lease_id: str, nodes: int, memory_mb: int, duration_s: int) -> None:
        """Record a new lease (blocks until committed)."""

        def write(conn):
            conn.execute(
                "INSERT INTO leases VALUES (?, ?, ?, ?, ?)",
                (lease_id, nodes, memory_mb, duration_s, time.time()),
            )

        self.submit(write).result()

    def add_slot(self, slot_id: str, lease_id: str, nodes: int, memory_mb: int) -> None:
        """Record a slot (one pilot job) of a lease, before its job is submitted."""

        def write(conn):
            conn.execute(
                "INSERT INTO slots VALUES (?, ?, ?, ?, NULL, ?)",
                (slot_id, lease_id, nodes, memory_mb, time.time()),
            )

        self.submit(write).result()

    def set_job_id(self, slot_id: str, job_id: str) -> None:
        """Record the LRM's job id for a slot."""
        self.submit(
            lambda conn: conn.execute("UPDATE slots SET job_id = ? WHERE id = ?", (job_id, slot_id))
        ).result()

    def record_notification(
        self, notification: Notification, body: bytes, account: str
    ) -> concurrent.futures.Future:
        """Decide on and durably record one authenticated notification.

        The future gives a :class:`Verdict`: ACCEPTED (stored, and the
        pilot's state updated, in one transaction), REPEAT (the exact same
        body was accepted before; nothing written), UNKNOWN_SLOT (no such
        slot, or a host beyond the slot's node count), REPLAY (the seq was
        used with another body, or is not newer than the last one).
        """
        body_hash = hashlib.sha256(body).hexdigest()
        n = notification

        def write(conn: sqlite3.Connection) -> Verdict:
            slot = conn.execute("SELECT nodes FROM slots WHERE id = ?", (n.slot,)).fetchone()
            if slot is None:
                return Verdict.UNKNOWN_SLOT
            prior = conn.execute(
                "SELECT body_sha256 FROM notifications WHERE slot_id = ? AND host = ? AND seq = ?",
                (n.slot, n.host, n.seq),
            ).fetchone()
            if prior is not None:
                return Verdict.REPEAT if prior[0] == body_hash else Verdict.REPLAY
            pilot = conn.execute(
                "SELECT last_seq FROM pilots WHERE slot_id = ? AND host = ?", (n.slot, n.host)
            ).fetchone()
            now = time.time()
            if pilot is None:
                (hosts,) = conn.execute(
                    "SELECT COUNT(*) FROM pilots WHERE slot_id = ?", (n.slot,)
                ).fetchone()
                if hosts >= slot[0]:
                    return Verdict.UNKNOWN_SLOT
                state = n.state if n.state in LIFECYCLE_STATES else "reserving"
                conn.execute(
                    "INSERT INTO pilots VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (n.slot, n.host, state, n.code, n.seq, n.memory_mb, n.expires_at, now),
                )
            elif n.seq <= pilot[0]:
                return Verdict.REPLAY
            elif n.state in LIFECYCLE_STATES:
                conn.execute(
                    "UPDATE pilots SET state = ?, code = ?, last_seq = ?, memory_mb = ?,"
                    " expires_at = COALESCE(?, expires_at), updated_at = ?"
                    " WHERE slot_id = ? AND host = ?",
                    (n.state, n.code, n.seq, n.memory_mb, n.expires_at, now, n.slot, n.host),
                )
            else:
                conn.execute(
                    "UPDATE pilots SET last_seq = ?, updated_at = ? WHERE slot_id = ? AND host = ?",
                    (n.seq, now, n.slot, n.host),
                )
            conn.execute(
                "INSERT INTO notifications VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (n.slot, n.host, n.seq, n.state, n.code, account, body, body_hash, now),
            )
            return Verdict.ACCEPTED

        return self.submit(write)

    # -- reads --------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def pilots(self, slot_id: str) -> list[PilotRow]:
        """Every pilot that has reported for ``slot_id``, ordered by host."""
        rows = self._reader().execute(
            "SELECT slot_id, host, state, code, last_seq, memory_mb, expires_at"
            " FROM pilots WHERE slot_id = ? ORDER BY host",
            (slot_id,),
        )
        return [PilotRow(*row) for row in rows]

    def notifications(self, slot_id: str) -> list[tuple[str, int, str, int]]:
        """(host, seq, state, code) of every accepted notification of a slot, in arrival order."""
        return list(
            self._reader().execute(
                "SELECT host, seq, state, code FROM notifications WHERE slot_id = ? ORDER BY rowid",
                (slot_id,),
            )
        )

    def snapshot(self) -> dict[str, list[tuple]]:
        """Every row of every table: for comparing the whole store before and after."""
        conn = self._reader()
        return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall()) for t in _TABLES}

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate()`` holds, re-checking after every commit; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                seen = self._version
                if predicate():
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if self._version == seen:
                    self._changed.wait(remaining)
