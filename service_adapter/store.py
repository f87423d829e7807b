"""The service's durable state: leases, slots, pilots, every accepted notification and usage, in SQLite.

All writes go through one writer thread that commits in groups: whatever
requests are queued when it wakes share one transaction (one fsync), each
in its own savepoint so that one failing write does not undo its
neighbours. A write's future resolves only after its transaction has
committed, so the receiver answers 200 only for what is on disk.

Readers use their own connections (WAL lets them run beside the writer).
:meth:`Store.wait_for` lets callers block until a predicate over the store
holds, woken by commits rather than by polling; :attr:`Store.version` and
:meth:`Store.wait_changed` let a watcher (the lease manager) sleep until the
next commit.

Lease states are written only by :meth:`Store.transition_lease`, a
compare-and-set on the old state, so two managers, or a manager and its
restarted successor, never apply one transition twice. The store knows no
state names: a lease has ended when ``ended_at`` is set (see
``service_adapter.lease.LEASE_STATES`` for the states themselves).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import enum
import hashlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from typing import Callable

from pilot.protocol import LIFECYCLE_STATES, MAX_SEQ_STEP, Notification, VmSpec, epoch_micros, parse_time
from service_adapter import vmstore
from service_adapter.nodekeys import new_slot_secret
from service_adapter.vmstore import CommandRow, VmRow

log = logging.getLogger(__name__)

#: Bumped whenever a table changes; a file of another version is refused with one clear line.
SCHEMA_VERSION = 5
#: Older versions this one upgrades in place (each step only adds), and how.
_UPGRADES = {
    2: "ALTER TABLE pilots ADD COLUMN lost_at REAL;",
    3: "ALTER TABLE slots ADD COLUMN submit_started_at REAL; ALTER TABLE slots ADD COLUMN submitted_at REAL;",
    4: "ALTER TABLE slots ADD COLUMN secret TEXT;",
}
#: The first version with per-slot secrets: a lease in flight in an older file cannot go on (its pilots
#: hold the old shared secret), so such a file is upgraded only once every lease in it has ended.
_FIRST_WITH_SLOT_SECRETS = 5

SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    id                   TEXT PRIMARY KEY,
    owner                TEXT NOT NULL,
    nodes                INTEGER NOT NULL,
    memory_mb            INTEGER NOT NULL,
    duration_s           REAL NOT NULL,
    state                TEXT NOT NULL,
    reason               TEXT NOT NULL,
    slot                 TEXT,
    job_id               TEXT,
    created_at           REAL NOT NULL,
    updated_at           REAL NOT NULL,
    ready_at             REAL,
    release_requested_at REAL,
    ended_at             REAL,
    expires_at           REAL NOT NULL,
    job_finished_at      REAL,
    cancel_requested_at  REAL,
    cancelled_at         REAL
);
CREATE INDEX IF NOT EXISTS leases_by_state ON leases(state);
CREATE INDEX IF NOT EXISTS leases_by_owner ON leases(owner);
CREATE TABLE IF NOT EXISTS slots (
    id          TEXT PRIMARY KEY,
    lease_id    TEXT NOT NULL REFERENCES leases(id),
    nodes       INTEGER NOT NULL,
    memory_mb   INTEGER NOT NULL,
    job_id      TEXT,
    created_at  REAL NOT NULL,
    submit_started_at REAL,
    submitted_at      REAL,
    secret      TEXT
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
    reserved_at REAL,
    reserved_mb INTEGER,
    ended_by    TEXT,
    lost_at     REAL,
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
CREATE TABLE IF NOT EXISTS usage (
    lease_id     TEXT NOT NULL REFERENCES leases(id),
    host         TEXT NOT NULL,
    slot_id      TEXT NOT NULL,
    owner        TEXT NOT NULL,
    memory_mb    INTEGER NOT NULL,
    reserved_at  REAL NOT NULL,
    released_at  REAL NOT NULL,
    ended_by     TEXT NOT NULL,
    node_seconds REAL NOT NULL,
    mb_seconds   REAL NOT NULL,
    PRIMARY KEY (lease_id, host)
);
CREATE INDEX IF NOT EXISTS usage_by_owner ON usage(owner);
CREATE TABLE IF NOT EXISTS lease_events (
    seq         INTEGER PRIMARY KEY,
    lease_id    TEXT NOT NULL REFERENCES leases(id),
    at          REAL NOT NULL,
    old_state   TEXT,
    new_state   TEXT NOT NULL,
    reason      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS lease_events_by_lease ON lease_events(lease_id);
"""

_TABLES = ("leases", "slots", "pilots", "notifications", "usage", "lease_events", "vms", "commands")
_GROUP_MAX = 256
#: How many (slot, host) answers :meth:`Store.slot_access` keeps in memory.
ACCESS_CACHE_SIZE = 16384
#: A pilot's notified states that end its hold on the node (a usage row is written with the first).
HOLD_ENDED = frozenset({"unreserved", "killed"})
#: A pilot's notified states on its way out (the first one is kept as ``ended_by``).
ENDING = frozenset({"earlyunreserving", "unreserving"}) | HOLD_ENDED
_LEASE_COLUMNS = (
    "id, owner, nodes, memory_mb, duration_s, state, reason, slot, job_id, created_at, updated_at,"
    " ready_at, release_requested_at, ended_at, expires_at, job_finished_at, cancel_requested_at, cancelled_at"
)
_PILOT_COLUMNS = (
    "slot_id, host, state, code, last_seq, memory_mb, expires_at, reserved_at, reserved_mb, ended_by, updated_at,"
    " lost_at"
)


class StoreError(Exception):
    """The store file cannot be used (e.g. written by another schema version); the message says what to do."""


class Verdict(enum.Enum):
    """What the store decided about a notification, with the HTTP status to answer."""

    # (name, status): plain statuses would make REPEAT an alias of ACCEPTED.
    ACCEPTED = ("accepted", 200)
    REPEAT = ("repeat", 200)
    UNKNOWN_SLOT = ("unknown-slot", 404)
    REPLAY = ("replay", 409)
    # Claims beyond what the lease allows (a pilot's bug, or a node lying): refused, nothing stored.
    MEMORY_BEYOND_SLOT = ("out-of-bounds", 422, "memory_mb is above the slot's memory per node")
    SEQ_TOO_FAR = ("out-of-bounds", 422, f"seq jumps more than {MAX_SEQ_STEP} past the last one "
                   "(a killed may use up to its sent_at in microseconds since the epoch)")
    EXPIRES_TOO_LATE = ("out-of-bounds", 422, "expires_at lies beyond the hold's start plus the lease's duration "
                        "and the allowed clock skew")

    @property
    def result(self) -> str:
        """The word the receiver puts in its answer's ``result``."""
        return self.value[0]

    @property
    def status(self) -> int:
        """The HTTP status the receiver answers with."""
        return self.value[1]

    @property
    def detail(self) -> str:
        """What the answer's ``detail`` says (empty where the result says it all)."""
        return self.value[2] if len(self.value) > 2 else ""


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
    reserved_at: float | None = None
    """When the service accepted this host's ``reserved`` (its clock, epoch seconds); None: never."""
    reserved_mb: int | None = None
    """The memory the host reported holding in its ``reserved``."""
    ended_by: str | None = None
    """The first of earlyunreserving, unreserving, unreserved, killed this host reported; None: none yet."""
    updated_at: float | None = None
    """When the service accepted this host's latest notification."""
    lost_at: float | None = None
    """When the service gave this host up for lost (it stopped polling for commands); None: it has not."""


@dataclasses.dataclass(frozen=True)
class SlotAccess:
    """A slot as the receiver checks requests against it."""

    secret: str = dataclasses.field(repr=False)
    """The slot's secret (with a node's key, it makes that (slot, host)'s signing key)."""
    job_id: str | None
    """The LRM's job id, once the submit returned."""
    host_known: bool
    """Whether this host has reported for the slot before (it was checked against the allocation then)."""


@dataclasses.dataclass(frozen=True)
class LeaseRow:
    """One lease as stored: what was asked, its state, and the times the lease manager needs.

    Times are epoch seconds on the service's clock; None where it has not
    happened. ``expires_at`` is ``created_at + duration_s`` (informative:
    each pilot's own deadline counts from its own start).
    """

    id: str
    owner: str
    nodes: int
    memory_mb: int
    duration_s: float
    state: str
    reason: str
    slot: str | None
    job_id: str | None
    created_at: float
    updated_at: float
    ready_at: float | None = None
    release_requested_at: float | None = None
    ended_at: float | None = None
    expires_at: float | None = None
    job_finished_at: float | None = None
    """When the manager first saw the LRM report the job finished."""
    cancel_requested_at: float | None = None
    """When a cancel of the job was decided (release, queue timeout, a pilot's error)."""
    cancelled_at: float | None = None
    """When that cancel went through, or the job was seen finished (nothing left to cancel)."""


@dataclasses.dataclass(frozen=True)
class UsageRow:
    """One host's hold of one lease: from its ``reserved`` to its ``unreserved`` (or ``killed``)."""

    lease_id: str
    host: str
    slot_id: str
    owner: str
    memory_mb: int
    reserved_at: float
    released_at: float
    ended_by: str
    node_seconds: float
    mb_seconds: float


@dataclasses.dataclass(frozen=True)
class LeaseEvent:
    """One entry of a lease's history: created (``old_state`` None) or a state transition."""

    lease_id: str
    at: float
    old_state: str | None
    new_state: str
    reason: str


class StoreClosed(RuntimeError):
    """Raised for writes submitted after :meth:`Store.close`."""


STORE_FILE_MODE = 0o600


def _make_private(path: str) -> None:
    """Create the database file 0600 whatever the umask (SQLite gives its -wal and -shm files the same mode).

    An existing file that others may read is narrowed to 0600: the store
    holds every lease's owner and every pilot's notification.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, STORE_FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o777 != STORE_FILE_MODE:
            os.fchmod(fd, STORE_FILE_MODE)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):  # left by an earlier run with a wider mode
        try:
            os.chmod(path + suffix, STORE_FILE_MODE)
        except FileNotFoundError:
            pass


class Store:
    """SQLite-backed state of the service (WAL; ``synchronous=FULL`` by default).

    The database file and its -wal and -shm files are mode 0600.

    Thread-safe: writes are serialised through the writer thread, reads use
    one connection per calling thread.
    """

    def __init__(self, path: str, *, synchronous: str = "FULL"):
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be FULL or NORMAL")
        self.path = path
        self._synchronous = synchronous
        _make_private(path)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._changed = threading.Condition()
        self._version = 0
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._woken: set[tuple[str, str]] = set()  # touched by the writer thread only
        # What the receiver asks of every request and what never changes once true: a slot's secret and job
        # id (once it has one), and that a host has reported for a slot. Bounded; misses read the file.
        self._access_cache: collections.OrderedDict[tuple[str, str], SlotAccess] = collections.OrderedDict()
        self._access_lock = threading.Lock()
        self._command_listener: Callable[[set[tuple[str, str]]], None] | None = None
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
            self._create_schema(conn)
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

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        (tables,) = conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'").fetchone()
        if tables and version in _UPGRADES and version < _FIRST_WITH_SLOT_SECRETS:
            (in_flight,) = conn.execute("SELECT COUNT(*) FROM leases WHERE ended_at IS NULL").fetchone()
            if in_flight:
                conn.close()
                raise StoreError(
                    f"store {self.path} has {in_flight} lease(s) in flight from before per-node credentials "
                    f"(schema version {version}); their pilots hold the old shared secret and would be refused: "
                    "release them (or let them end) with the previous workspace-pilot, then start this one"
                )
        if tables and version in _UPGRADES:
            # Additive upgrades only: new columns and tables, in one transaction with the new version.
            steps = "".join(_UPGRADES[v] for v in sorted(_UPGRADES) if v >= version)
            conn.executescript(
                f"BEGIN IMMEDIATE;\n{steps}\n{SCHEMA}\n{vmstore.SCHEMA}\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;"
            )
            log.warning("store %s upgraded from schema version %d to %d", self.path, version, SCHEMA_VERSION)
            return
        if tables and version != SCHEMA_VERSION:
            conn.close()
            raise StoreError(
                f"store {self.path} has schema version {version}, this workspace-pilot reads version "
                f"{SCHEMA_VERSION}: move the file away to start with an empty store"
            )
        # One transaction: a file never has the tables without the version, or the other way round.
        conn.executescript(
            f"BEGIN IMMEDIATE;\n{SCHEMA}\n{vmstore.SCHEMA}\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;"
        )

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
        woken, self._woken = self._woken, set()
        if woken and self._command_listener is not None:
            try:
                self._command_listener(woken)
            except Exception:  # a listener's bug must not stop the writer
                log.exception("command listener failed")
        for future, value, exc in results:
            if exc is None:
                future.set_result(value)
            else:
                future.set_exception(exc)

    def _wake_target(self, slot: str, host: str) -> None:
        # Called inside a write: the (slot, host) is announced once the batch has committed.
        self._woken.add((slot, host))

    def set_command_listener(self, listener: Callable[[set[tuple[str, str]]], None] | None) -> None:
        """Call ``listener({(slot, host), ...})`` after each commit that queued commands for those pilots.

        It runs on the writer thread: it must be quick and must not write
        to the store (the receiver uses it to wake the long-polls).
        """
        self._command_listener = listener

    def submit(self, fn: Callable[[sqlite3.Connection], object]) -> concurrent.futures.Future:
        """Queue ``fn(conn)`` to run inside a write transaction; the future resolves after commit."""
        if self._closed:
            raise StoreClosed("the store is closed")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((fn, future))
        return future

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

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

    # -- writes: leases -------------------------------------------------------------

    def create_lease(
        self, lease_id: str, slot_id: str, *, owner: str, nodes: int, memory_mb: int, duration_s: float,
        now: float, reason: str = "submitting the pilot job",
    ) -> LeaseRow:
        """Record a new lease (state ``pending``) and its one slot in one transaction; blocks until committed.

        Called before the pilot job is submitted, so a pilot's first
        notification always finds its slot.
        """

        def write(conn: sqlite3.Connection) -> None:
            _insert_lease(conn, lease_id, owner, nodes, memory_mb, duration_s, now, reason, slot_id)
            conn.execute(
                "INSERT INTO slots (id, lease_id, nodes, memory_mb, job_id, created_at, secret)"
                " VALUES (?, ?, ?, ?, NULL, ?, ?)",
                (slot_id, lease_id, nodes, memory_mb, now, new_slot_secret()),
            )

        self.submit(write).result()
        return self.get_lease(lease_id)

    def add_lease(
        self, lease_id: str, nodes: int, memory_mb: int, duration_s: float, *, owner: str = "operator",
        now: float | None = None,
    ) -> None:
        """Record a lease without a slot (state ``pending``); slots come with :meth:`add_slot`."""
        at = time.time() if now is None else now
        self.submit(
            lambda conn: _insert_lease(conn, lease_id, owner, nodes, memory_mb, duration_s, at, "", None)
        ).result()

    def add_slot(self, slot_id: str, lease_id: str, nodes: int, memory_mb: int) -> str:
        """Record a slot (one pilot job) of a lease, before its job is submitted; returns the slot's new secret."""
        secret = new_slot_secret()

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO slots (id, lease_id, nodes, memory_mb, job_id, created_at, secret)"
                " VALUES (?, ?, ?, ?, NULL, ?, ?)",
                (slot_id, lease_id, nodes, memory_mb, time.time(), secret),
            )
            conn.execute("UPDATE leases SET slot = COALESCE(slot, ?) WHERE id = ?", (slot_id, lease_id))

        self.submit(write).result()
        return secret

    def set_job_id(self, slot_id: str, job_id: str, reason: str | None = None,
                   submitted: tuple[float, float] | None = None) -> None:
        """Record the LRM's job id for a slot and its lease (and, while pending, the lease's reason).

        ``submitted`` is (when the submit started, when it returned), kept on the slot for ``lease-bench``.
        """
        started, returned = submitted or (None, None)

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE slots SET job_id = ?, submit_started_at = ?, submitted_at = ? WHERE id = ?",
                         (job_id, started, returned, slot_id))
            conn.execute("UPDATE leases SET job_id = ? WHERE slot = ?", (job_id, slot_id))
            if reason is not None:
                conn.execute(
                    "UPDATE leases SET reason = ? WHERE slot = ? AND state = 'pending'", (reason, slot_id)
                )

        self.submit(write).result()

    def transition_lease(
        self, lease_id: str, old: str, new: str, reason: str, *, now: float, ended: bool = False,
        ready_at: float | None = None, cancel: bool = False,
    ) -> bool:
        """Move a lease from ``old`` to ``new`` only if it is still in ``old`` (compare-and-set).

        Returns whether it moved; a lease in another state (another manager,
        or an earlier process, got there first) is left as it is. The
        transition and its history entry commit together. ``ended`` sets
        ``ended_at`` (a terminal state), ``ready_at`` sets when it became
        ready, ``cancel`` records that the job must be cancelled.
        """

        def write(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE leases SET state = ?, reason = ?, updated_at = ?,"
                " ready_at = COALESCE(ready_at, ?),"
                " ended_at = CASE WHEN ? THEN COALESCE(ended_at, ?) ELSE ended_at END,"
                " cancel_requested_at = CASE WHEN ? THEN COALESCE(cancel_requested_at, ?)"
                "   ELSE cancel_requested_at END"
                " WHERE id = ? AND state = ?",
                (new, reason, now, ready_at, ended, now, cancel, now, lease_id, old),
            )
            if cursor.rowcount != 1:
                return False
            if ended:
                vmstore.end_lease_vms(conn, lease_id, now, new)
            conn.execute(
                "INSERT INTO lease_events (lease_id, at, old_state, new_state, reason) VALUES (?, ?, ?, ?, ?)",
                (lease_id, now, old, new, reason),
            )
            return True

        return self.submit(write).result()

    def request_release(self, lease_id: str, now: float) -> bool:
        """Record that a release (and so a cancel of the job) was asked; False if the lease has ended or is unknown.

        Repeating it keeps the first request's time.
        """

        def write(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE leases SET release_requested_at = COALESCE(release_requested_at, ?),"
                " cancel_requested_at = COALESCE(cancel_requested_at, ?), updated_at = ?"
                " WHERE id = ? AND ended_at IS NULL",
                (now, now, now, lease_id),
            )
            if cursor.rowcount == 1:
                vmstore.queue_release(conn, lease_id, now, self._wake_target)
            return cursor.rowcount == 1

        return self.submit(write).result()

    def mark_job_finished(self, lease_id: str, now: float) -> None:
        """Record when the job was first seen finished; a cancel still wanted is then moot."""
        self.submit(
            lambda conn: conn.execute(
                "UPDATE leases SET job_finished_at = COALESCE(job_finished_at, ?),"
                " cancelled_at = CASE WHEN cancel_requested_at IS NOT NULL THEN COALESCE(cancelled_at, ?)"
                "   ELSE cancelled_at END"
                " WHERE id = ?",
                (now, now, lease_id),
            )
        ).result()

    def mark_cancelled(self, lease_id: str, now: float) -> None:
        """Record that the LRM took the cancel of the lease's job."""
        self.submit(
            lambda conn: conn.execute(
                "UPDATE leases SET cancelled_at = COALESCE(cancelled_at, ?),"
                " cancel_requested_at = COALESCE(cancel_requested_at, ?) WHERE id = ?",
                (now, now, lease_id),
            )
        ).result()

    # -- writes: notifications ----------------------------------------------------------

    def record_notification(
        self, notification: Notification, body: bytes, account: str, *, slack_s: float = 300.0
    ) -> concurrent.futures.Future:
        """Decide on and durably record one authenticated notification.

        The future gives a :class:`Verdict`: ACCEPTED (stored, and the
        pilot's state updated, in one transaction), REPEAT (the exact same
        body was accepted before; nothing written), UNKNOWN_SLOT (no such
        slot, a host beyond the slot's node count, or a first ``reserved``
        for a lease that has ended or is being released: that pilot gives
        its memory back), REPLAY (the seq was used with another body, or is
        not newer than the last one), or one of the claim bounds: MEMORY_BEYOND_SLOT
        (``memory_mb`` above the slot's memory per node), SEQ_TOO_FAR (more than
        :data:`MAX_SEQ_STEP` past the last seq; a ``killed`` may go up to its
        ``sent_at`` in microseconds since the epoch, which is how kill-all
        counts), EXPIRES_TOO_LATE (``expires_at`` after the hold's start, or
        now, plus the lease's duration and ``slack_s``, the allowed clock skew).

        The notification that ends a host's hold (``unreserved`` or
        ``killed`` after its ``reserved``) writes that hold's usage row in
        the same transaction: from the service's receipt of ``reserved`` to
        its receipt of this one, at the memory ``reserved`` reported.
        """
        body_hash = hashlib.sha256(body).hexdigest()
        n = notification

        def write(conn: sqlite3.Connection) -> Verdict:
            slot = conn.execute(
                "SELECT s.nodes, s.lease_id, l.owner, l.ended_at IS NOT NULL OR l.release_requested_at IS NOT NULL,"
                " s.memory_mb, l.duration_s FROM slots s JOIN leases l ON l.id = s.lease_id WHERE s.id = ?",
                (n.slot,),
            ).fetchone()
            if slot is None:
                return Verdict.UNKNOWN_SLOT
            nodes, lease_id, owner, closing, slot_mb, duration_s = slot
            prior = conn.execute(
                "SELECT body_sha256 FROM notifications WHERE slot_id = ? AND host = ? AND seq = ?",
                (n.slot, n.host, n.seq),
            ).fetchone()
            if prior is not None:
                return Verdict.REPEAT if prior[0] == body_hash else Verdict.REPLAY
            pilot = conn.execute(
                "SELECT last_seq, reserved_at, reserved_mb, ended_by FROM pilots WHERE slot_id = ? AND host = ?",
                (n.slot, n.host),
            ).fetchone()
            if pilot is not None and n.seq <= pilot[0]:
                return Verdict.REPLAY
            now = time.time()
            bound = _claim_bound(n, slot_mb, duration_s, pilot, now, slack_s)
            if bound is not None:
                return bound
            if n.state == "reserved" and closing and (pilot is None or pilot[1] is None):
                return Verdict.UNKNOWN_SLOT  # too late: the lease is over or being released
            reserving = n.state == "reserved"
            ending = n.state if n.state in ENDING else None
            if pilot is None:
                (hosts,) = conn.execute(
                    "SELECT COUNT(*) FROM pilots WHERE slot_id = ?", (n.slot,)
                ).fetchone()
                if hosts >= nodes:
                    return Verdict.UNKNOWN_SLOT
                state = n.state if n.state in LIFECYCLE_STATES else "reserving"
                reserved_at, reserved_mb = (now, n.memory_mb) if reserving else (None, None)
                conn.execute(
                    f"INSERT INTO pilots ({_PILOT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                    (n.slot, n.host, state, n.code, n.seq, n.memory_mb, n.expires_at,
                     reserved_at, reserved_mb, ending, now),
                )
            elif n.state in LIFECYCLE_STATES:
                _, reserved_at, reserved_mb, ended_by = pilot
                if reserved_at is None and reserving:
                    reserved_at, reserved_mb = now, n.memory_mb
                conn.execute(
                    "UPDATE pilots SET state = ?, code = ?, last_seq = ?, memory_mb = ?,"
                    " expires_at = COALESCE(?, expires_at), updated_at = ?,"
                    " reserved_at = ?, reserved_mb = ?, ended_by = ?"
                    " WHERE slot_id = ? AND host = ?",
                    (n.state, n.code, n.seq, n.memory_mb, n.expires_at, now,
                     reserved_at, reserved_mb, ended_by or ending, n.slot, n.host),
                )
                if n.state in HOLD_ENDED and reserved_at is not None:
                    held_s = max(now - reserved_at, 0.0)
                    conn.execute(
                        "INSERT OR IGNORE INTO usage (lease_id, host, slot_id, owner, memory_mb, reserved_at,"
                        " released_at, ended_by, node_seconds, mb_seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (lease_id, n.host, n.slot, owner, reserved_mb, reserved_at, now, n.state,
                         held_s, reserved_mb * held_s),
                    )
            else:
                conn.execute(
                    "UPDATE pilots SET last_seq = ?, updated_at = ? WHERE slot_id = ? AND host = ?",
                    (n.seq, now, n.slot, n.host),
                )
            vmstore.apply_notification(conn, n, lease_id, now, self._wake_target)
            conn.execute(
                "INSERT INTO notifications VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (n.slot, n.host, n.seq, n.state, n.code, account, body, body_hash, now),
            )
            return Verdict.ACCEPTED

        return self.submit(write)

    # -- writes: VMs and commands (service_adapter.vmstore) ---------------------------------

    def start_vms(self, lease_id: str, requests: list[tuple[VmSpec, str | None]], *, overhead_mb: int,
                  now: float) -> list[str]:
        """Place and queue the VMs' start-vm commands in one transaction; the hosts chosen, in order.

        Raises :class:`service_adapter.vmstore.VmRequestError` (nothing queued).
        """
        return self.submit(
            lambda conn: vmstore.start_vms(conn, lease_id, requests, overhead_mb, now, self._wake_target)
        ).result()

    def stop_vm(self, lease_id: str, name: str, *, force: bool, now: float) -> VmRow:
        """Queue a stop-vm for an active VM (it becomes ``stopping``); raises VmRequestError."""
        return self.submit(lambda conn: vmstore.stop_vm(conn, lease_id, name, force, now, self._wake_target)).result()

    def mark_lost(self, slot: str, host: str, *, now: float, why: str) -> bool:
        """Give (slot, host) up for lost, its active VMs with it; False if it already was."""
        return self.submit(lambda conn: vmstore.mark_lost(conn, slot, host, now, why)).result()

    # -- reads --------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise StoreClosed("the store is closed")
            conn = self._connect()
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def get_lease(self, lease_id: str) -> LeaseRow | None:
        """One lease, or None if there is no such lease."""
        row = self._reader().execute(f"SELECT {_LEASE_COLUMNS} FROM leases WHERE id = ?", (lease_id,)).fetchone()
        return LeaseRow(*row) if row else None

    def list_leases(self, states=None, owner: str | None = None) -> list[LeaseRow]:
        """Leases, newest first; only those in ``states`` (an iterable of names) and of ``owner`` if given."""
        where, params = [], []
        if states is not None:
            states = list(states)
            where.append(f"state IN ({', '.join('?' * len(states))})" if states else "0")
            params += states
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        sql = f"SELECT {_LEASE_COLUMNS} FROM leases"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, rowid DESC"
        return [LeaseRow(*row) for row in self._reader().execute(sql, params)]

    def leases_to_watch(self) -> list[LeaseRow]:
        """Leases the manager must look at: every one not ended, and ended ones whose job still needs a cancel."""
        rows = self._reader().execute(
            f"SELECT {_LEASE_COLUMNS} FROM leases WHERE ended_at IS NULL"
            " OR (cancel_requested_at IS NOT NULL AND cancelled_at IS NULL AND job_id IS NOT NULL)"
            " ORDER BY created_at, rowid"
        )
        return [LeaseRow(*row) for row in rows]

    def lease_events(self, lease_id: str) -> list[LeaseEvent]:
        """A lease's history: its creation, then each state transition, in order."""
        rows = self._reader().execute(
            "SELECT lease_id, at, old_state, new_state, reason FROM lease_events WHERE lease_id = ? ORDER BY seq",
            (lease_id,),
        )
        return [LeaseEvent(*row) for row in rows]

    def usage_rows(self, lease_id: str | None = None, owner: str | None = None) -> list[UsageRow]:
        """The ended holds (one per lease and host), of one lease and/or one owner if given, oldest first."""
        where, params = _usage_filter(lease_id, owner)
        rows = self._reader().execute(
            "SELECT lease_id, host, slot_id, owner, memory_mb, reserved_at, released_at, ended_by,"
            f" node_seconds, mb_seconds FROM usage{where} ORDER BY reserved_at, host",
            params,
        )
        return [UsageRow(*row) for row in rows]

    def usage_totals(self, lease_id: str | None = None, owner: str | None = None) -> tuple[float, float, int]:
        """(node-seconds, MB-seconds, leases counted) summed over the ended holds that match."""
        where, params = _usage_filter(lease_id, owner)
        node_s, mb_s, leases = self._reader().execute(
            f"SELECT TOTAL(node_seconds), TOTAL(mb_seconds), COUNT(DISTINCT lease_id) FROM usage{where}", params
        ).fetchone()
        return node_s, mb_s, leases

    def slot_access(self, slot_id: str, host: str) -> SlotAccess | None:
        """What the receiver needs to judge a request for (slot, host); None for an unknown slot
        or one from before per-slot secrets.

        Answers are kept (at most :data:`ACCESS_CACHE_SIZE`) once nothing in
        them can change: the slot has its job id and the host has reported.
        """
        with self._access_lock:
            cached = self._access_cache.get((slot_id, host))
            if cached is not None:
                self._access_cache.move_to_end((slot_id, host))
                return cached
        row = self._reader().execute(
            "SELECT s.secret, s.job_id, EXISTS(SELECT 1 FROM pilots p WHERE p.slot_id = s.id AND p.host = ?)"
            " FROM slots s WHERE s.id = ?",
            (host, slot_id),
        ).fetchone()
        if row is None or row[0] is None:
            return None
        access = SlotAccess(row[0], row[1], bool(row[2]))
        if access.job_id is not None and access.host_known:
            with self._access_lock:
                self._access_cache[(slot_id, host)] = access
                while len(self._access_cache) > ACCESS_CACHE_SIZE:
                    self._access_cache.popitem(last=False)
        return access

    def slot_secret(self, slot_id: str) -> str | None:
        """The slot's secret (for its job's environment), or None for an unknown slot."""
        access = self.slot_access(slot_id, "")
        return access.secret if access else None

    def pilots(self, slot_id: str) -> list[PilotRow]:
        """Every pilot that has reported for ``slot_id``, ordered by host."""
        rows = self._reader().execute(
            f"SELECT {_PILOT_COLUMNS} FROM pilots WHERE slot_id = ? ORDER BY host", (slot_id,)
        )
        return [_pilot_row(row) for row in rows]

    def notification_bodies(self, slot_id: str) -> list[tuple[str, str, float, dict]]:
        """(host, state, received_at, body as a dict) of every accepted notification of a slot, in arrival order."""
        rows = self._reader().execute(
            "SELECT host, state, received_at, body FROM notifications WHERE slot_id = ? ORDER BY rowid", (slot_id,)
        )
        return [(host, state, at, json.loads(body)) for host, state, at, body in rows]

    def submit_times(self, slot_id: str) -> tuple[float | None, float | None]:
        """When the slot's job submit started and returned (epoch seconds; None before it did)."""
        row = self._reader().execute(
            "SELECT submit_started_at, submitted_at FROM slots WHERE id = ?", (slot_id,)
        ).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def notifications(self, slot_id: str) -> list[tuple[str, int, str, int]]:
        """(host, seq, state, code) of every accepted notification of a slot, in arrival order."""
        return list(
            self._reader().execute(
                "SELECT host, seq, state, code FROM notifications WHERE slot_id = ? ORDER BY rowid",
                (slot_id,),
            )
        )

    def vms(self, lease_id: str) -> list[VmRow]:
        """A lease's VMs, oldest first."""
        return vmstore.vms_of(self._reader(), lease_id)

    def commands_after(self, slot: str, host: str, after: int, limit: int = 256) -> list[tuple[int, dict]]:
        """(id, body) of the commands for (slot, host) above ``after``, oldest first."""
        return vmstore.commands_after(self._reader(), slot, host, after, limit)

    def commands(self, slot: str) -> list[CommandRow]:
        """Every command of a slot with its outcome, in id order."""
        return vmstore.commands_of(self._reader(), slot)

    def pilot(self, slot: str, host: str) -> tuple[PilotRow, bool] | None:
        """The pilot of (slot, host) and whether its lease has ended; None if no such pilot has reported."""
        row = self._reader().execute(
            f"SELECT {', '.join('p.' + c.strip() for c in _PILOT_COLUMNS.split(','))}, l.ended_at IS NOT NULL"
            " FROM pilots p JOIN slots s ON s.id = p.slot_id JOIN leases l ON l.id = s.lease_id"
            " WHERE p.slot_id = ? AND p.host = ?",
            (slot, host),
        ).fetchone()
        return None if row is None else (PilotRow(*row[:-1]), bool(row[-1]))

    def snapshot(self) -> dict[str, list[tuple]]:
        """Every row of every table: for comparing the whole store before and after."""
        conn = self._reader()
        return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall()) for t in _TABLES}

    # -- waiting for commits ----------------------------------------------------------

    @property
    def version(self) -> int:
        """A number that grows with every commit (for :meth:`wait_changed`)."""
        with self._changed:
            return self._version

    def wait_changed(self, since: int, timeout: float) -> int:
        """Block until a commit moves :attr:`version` past ``since``, ``timeout`` passes, or :meth:`wake`.

        Returns the version then (equal to ``since`` if nothing was
        committed); returns at once if it has already moved. Callers loop:
        a return says "look again", not what changed.
        """
        with self._changed:
            if self._version == since and timeout > 0:
                self._changed.wait(timeout)
            return self._version

    def wake(self) -> None:
        """Wake every :meth:`wait_changed` and :meth:`wait_for` caller without a commit (e.g. to stop a watcher)."""
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate()`` holds, re-checking after every commit; False on timeout.

        ``predicate`` runs while commits wait to be announced: it may read
        the store but must not write to it.
        """
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


def _claim_bound(n: Notification, slot_mb: int, duration_s: float, pilot, now: float,
                 slack_s: float) -> Verdict | None:
    """The bound a notification's claims break, if any (``pilot``: its row's last_seq, reserved_at, ...)."""
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


def _insert_lease(conn, lease_id, owner, nodes, memory_mb, duration_s, now, reason, slot_id) -> None:
    conn.execute(
        "INSERT INTO leases (id, owner, nodes, memory_mb, duration_s, state, reason, slot, job_id,"
        " created_at, updated_at, expires_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, NULL, ?, ?, ?)",
        (lease_id, owner, nodes, memory_mb, float(duration_s), reason, slot_id, now, now, now + duration_s),
    )
    conn.execute(
        "INSERT INTO lease_events (lease_id, at, old_state, new_state, reason) VALUES (?, ?, NULL, 'pending', ?)",
        (lease_id, now, f"created: {nodes} x {memory_mb} MB for {duration_s:g} s, owner {owner}"),
    )


def _usage_filter(lease_id: str | None, owner: str | None) -> tuple[str, list]:
    where, params = [], []
    if lease_id is not None:
        where.append("lease_id = ?")
        params.append(lease_id)
    if owner is not None:
        where.append("owner = ?")
        params.append(owner)
    return (" WHERE " + " AND ".join(where) if where else ""), params


def _pilot_row(row: tuple) -> PilotRow:
    return PilotRow(*row)
