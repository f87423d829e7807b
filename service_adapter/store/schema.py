"""The store's tables, their version, and how a file of an older version is brought up to date."""

from __future__ import annotations

import logging
import os
import sqlite3

from service_adapter.store import addresses, commands, images, vms
from service_adapter.store.compaction import ROW_BYTES
from service_adapter.store.errors import StoreError

log = logging.getLogger("service_adapter.store")

#: Bumped whenever a table changes; a file of another version is refused with one clear line.
SCHEMA_VERSION = 10
#: Older versions this one upgrades in place (each step only adds), and how.
UPGRADES = {
    2: "ALTER TABLE pilots ADD COLUMN lost_at REAL;",
    3: "ALTER TABLE slots ADD COLUMN submit_started_at REAL; ALTER TABLE slots ADD COLUMN submitted_at REAL;",
    4: "ALTER TABLE slots ADD COLUMN secret TEXT;",
    5: "",  # the image tables (images.SCHEMA), created by the upgrade's CREATE TABLE IF NOT EXISTS
    6: "ALTER TABLE leases ADD COLUMN start_at REAL; ALTER TABLE leases ADD COLUMN warned_at REAL;"
       " ALTER TABLE lease_events ADD COLUMN kind TEXT NOT NULL DEFAULT 'state';",
    # The bounded store (service_adapter.store.compaction): what each host has stored, which leases are compacted.
    7: "ALTER TABLE leases ADD COLUMN compacted_at REAL;"
       " ALTER TABLE pilots ADD COLUMN stored_bytes INTEGER NOT NULL DEFAULT 0;"
       f" UPDATE pilots SET stored_bytes = (SELECT COALESCE(SUM(length(n.body)), 0) + {ROW_BYTES} * COUNT(*)"
       " FROM notifications n WHERE n.slot_id = pilots.slot_id AND n.host = pilots.host);",
    # The VMs' addresses (service_adapter.store.addresses, and VM_COLUMNS_ADDED below).
    8: "ALTER TABLE pilots ADD COLUMN address TEXT;",
    # A lease that ends itself when idle (the lease watch); the VMs' use (VM_COLUMNS_ADDED).
    9: "ALTER TABLE leases ADD COLUMN release_when_idle_s REAL;",
}
#: Columns added to the VM table since it was made (version 6 files have it, older ones get it whole): added
#: after the tables are created, before the indexes that read them.
VM_COLUMNS_ADDED = (("ip", "TEXT"), ("mac", "TEXT"), ("hostname", "TEXT"), ("forward_port", "INTEGER"),
                    ("holds_address", "INTEGER NOT NULL DEFAULT 0"), ("busy", "INTEGER"), ("cpu", "INTEGER"),
                    ("usage_at", "REAL"), ("busy_since", "REAL"))
#: The first version with per-slot secrets: a lease in flight in an older file cannot go on (its pilots
#: hold the old shared secret), so such a file is upgraded only once every lease in it has ended.
FIRST_WITH_SLOT_SECRETS = 5

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
    cancelled_at         REAL,
    start_at             REAL,
    warned_at            REAL,
    compacted_at         REAL,
    release_when_idle_s  REAL
);
CREATE INDEX IF NOT EXISTS leases_by_state ON leases(state);
CREATE INDEX IF NOT EXISTS leases_by_owner ON leases(owner);
CREATE INDEX IF NOT EXISTS leases_to_compact ON leases(ended_at) WHERE compacted_at IS NULL;
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
    stored_bytes INTEGER NOT NULL DEFAULT 0,
    address     TEXT,
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
    reason      TEXT NOT NULL,
    kind        TEXT NOT NULL DEFAULT 'state'
);
CREATE INDEX IF NOT EXISTS lease_events_by_lease ON lease_events(lease_id);
"""

TABLES = ("leases", "slots", "pilots", "notifications", "usage", "lease_events", "vms", "commands", "image_lists",
          "list_images", "image_approvals", "lease_images", "lease_networks")


def prepare(conn: sqlite3.Connection, path: str) -> None:
    """Create the tables in a new file, upgrade an older one in place, or raise StoreError (one line)."""
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    (tables,) = conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'").fetchone()
    if tables and version in UPGRADES and version < FIRST_WITH_SLOT_SECRETS:
        (in_flight,) = conn.execute("SELECT COUNT(*) FROM leases WHERE ended_at IS NULL").fetchone()
        if in_flight:
            conn.close()
            raise StoreError(
                f"store {path} has {in_flight} lease(s) in flight from before per-node credentials "
                f"(schema version {version}); their pilots hold the old shared secret and would be refused: "
                "release them (or let them end) with the previous workspace-pilot, then start this one"
            )
    if tables and version in UPGRADES:
        # Additive upgrades only: new columns and tables, in one transaction with the new version.
        steps = "".join(UPGRADES[v] for v in sorted(UPGRADES) if v >= version)
        had = {row[1] for row in conn.execute("PRAGMA table_info(vms)")}
        columns = "".join(f"ALTER TABLE vms ADD COLUMN {name} {kind};"
                          for name, kind in VM_COLUMNS_ADDED if had and name not in had)
        conn.executescript(
            f"BEGIN IMMEDIATE;\n{steps}\n{SCHEMA}\n{vms.SCHEMA}\n{commands.SCHEMA}\n{images.SCHEMA}\n{columns}\n"
            f"{addresses.SCHEMA}\n"
            f"PRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;"
        )
        log.warning("store %s upgraded from schema version %d to %d", path, version, SCHEMA_VERSION)
        _incremental_vacuum(conn, path)
        return
    if tables and version != SCHEMA_VERSION:
        conn.close()
        raise StoreError(
            f"store {path} has schema version {version}, this workspace-pilot reads version "
            f"{SCHEMA_VERSION}: move the file away to start with an empty store"
        )
    # One transaction: a file never has the tables without the version, or the other way round.
    conn.executescript(
        f"BEGIN IMMEDIATE;\n{SCHEMA}\n{vms.SCHEMA}\n{commands.SCHEMA}\n{images.SCHEMA}\n{addresses.SCHEMA}\n"
        f"PRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;"
    )


def _incremental_vacuum(conn: sqlite3.Connection, path: str) -> None:
    """Turn an upgraded file's auto-vacuum to incremental (a VACUUM rewrites the file once, at this start)."""
    (mode,) = conn.execute("PRAGMA auto_vacuum").fetchone()
    if mode != 2:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")
        log.warning("store %s rewritten once for incremental vacuum", path)


STORE_FILE_MODE = 0o600


def make_private(path: str) -> None:
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


