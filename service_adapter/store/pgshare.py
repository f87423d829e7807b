"""What several receivers on one PostgreSQL database share, beyond the rows: turns, news of commits, the lead.

Each ``serve`` process has its own :class:`~service_adapter.store.Store`
(its writer thread, its readers); on PostgreSQL they meet here:

- **One writer at a time.** Every write transaction starts with
  :data:`WRITE_LOCK` (a transaction-level advisory lock), so the store's
  read-check-write functions (a notification's sequence check, a VM's
  placement, an address) run one transaction after another across
  processes, exactly as they do on SQLite's single writer. What costs a
  receiver CPU (HTTP, digest, JSON, signatures) is outside the lock and
  runs in parallel; a transaction holds it for its few statements.
- **News of commits.** Before it commits, a transaction announces on
  :data:`CHANNEL` (``pg_notify``, delivered at commit, in commit order) the
  (slot, host) pairs it queued commands for and the slots whose pilots it
  changed. :class:`CommitListener` hears the others' announcements and
  hands them to the store, which wakes its parked polls and its lease
  manager as it does for its own commits.
- **Who polled.** A pilot's long-poll is its heartbeat, kept in its
  receiver's memory (:class:`~service_adapter.commandboard.CommandBoard`);
  every receiver announces the pilots it heard polling
  (:meth:`Store.announce_polls`), and each hands what it hears to its board,
  so the leading lease manager never gives up a host that polls another.
- **The lead.** :class:`Lead` holds :data:`MANAGER_LOCK`, a session-level
  advisory lock, on a connection of its own: exactly one process's lease
  manager acts; when that process dies its session ends, the lock is free,
  and another's :meth:`Lead.held` takes it at its next look.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import uuid
from typing import Callable

log = logging.getLogger("service_adapter.store")

#: Advisory lock keys (pg_advisory_lock's one-number form; SCHEMA_LOCK is 0x77700001).
WRITE_LOCK = 0x77700002
MANAGER_LOCK = 0x77700003
#: The NOTIFY channel of commits.
CHANNEL = "workspace_store"
#: The most of one announcement's payload (PostgreSQL refuses 8,000 bytes or more).
PAYLOAD_BYTES = 7000
#: How long a lost listener connection waits before it tries again (seconds).
RECONNECT_S = 1.0


def new_token() -> str:
    """This process's store's name in its announcements (so it can skip its own)."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def announce(conn, token: str, woken: set[tuple[str, str]], touched: set[str], polled=(), *,
             quiet: bool = False) -> None:
    """Inside a write transaction, before COMMIT: tell the other receivers what it changed, and which pilots
    polled here (one or more notifications; at least one, so that a commit wakes their watchers even when it
    named nothing). ``quiet``: the commit changed nothing a lease manager decides on (see
    :attr:`Store.lease_version`)."""
    lines = ([f"w\t{slot}\t{host}" for slot, host in woken] + [f"p\t{slot}" for slot in touched]
             + [f"s\t{slot}\t{host}" for slot, host in polled] + (["q"] if quiet else []))
    payload, size = [token], len(token)
    for line in lines:
        if size + len(line) + 1 > PAYLOAD_BYTES:
            conn.execute("SELECT pg_notify(?, ?)", (CHANNEL, "\n".join(payload)))
            payload, size = [token], len(token)
        payload.append(line)
        size += len(line) + 1
    conn.execute("SELECT pg_notify(?, ?)", (CHANNEL, "\n".join(payload)))


def parse(payload: str) -> tuple[str, set[tuple[str, str]], set[str], set[tuple[str, str]], bool]:
    """An announcement: (the announcing store's token, its woken (slot, host) pairs, its touched slots, the
    (slot, host) pairs that polled there, whether it said it was quiet)."""
    token, *lines = payload.split("\n")
    woken: set[tuple[str, str]] = set()
    touched: set[str] = set()
    polled: set[tuple[str, str]] = set()
    quiet = False
    for line in lines:
        kind, *fields = line.split("\t")
        if kind == "w" and len(fields) == 2:
            woken.add((fields[0], fields[1]))
        elif kind == "p" and len(fields) == 1:
            touched.add(fields[0])
        elif kind == "s" and len(fields) == 2:
            polled.add((fields[0], fields[1]))
        elif kind == "q" and not fields:
            quiet = True
    return token, woken, touched, polled, quiet


class CommitListener:
    """A thread that LISTENs on :data:`CHANNEL` and calls ``heard(woken, touched, polled, quiet)`` for each
    other store's announcement; after its connection was lost and made again it calls
    ``heard(None, None, set(), False)``: anything may have changed meanwhile."""

    def __init__(self, connect: Callable[[], object], token: str,
                 heard: Callable[[set | None, set | None, set, bool], None]):
        self._connect = connect
        self._token = token
        self._heard = heard
        self._stopping = threading.Event()
        self._listening = threading.Event()
        self._wake_r, self._wake_w = os.pipe()  # stop() writes a byte: the listener's select returns at once
        self._thread = threading.Thread(target=self._run, name="store-listener", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        """Start listening; returns once LISTEN is in force (a commit after this is heard)."""
        self._thread.start()
        self._listening.wait(timeout)

    def stop(self) -> None:
        """Stop listening (at once: the thread is woken)."""
        self._stopping.set()
        os.write(self._wake_w, b"x")
        self._thread.join(30)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self) -> None:
        lost = False
        while not self._stopping.is_set():
            try:
                conn = self._connect()
            except Exception as exc:
                if not lost:
                    log.warning("store listener: cannot connect: %s", exc)
                lost = True
                self._stopping.wait(RECONNECT_S)
                continue
            try:
                conn.execute(f"LISTEN {CHANNEL}")
                self._listening.set()
                if lost:
                    log.info("store listener: connected again")
                    self._heard(None, None, set(), False)
                    lost = False
                while not self._stopping.is_set():
                    readable, _, _ = select.select([conn.raw.fileno(), self._wake_r], [], [])
                    if self._wake_r in readable:
                        break
                    # What arrived, without waiting for more (a dead server: the read raises, and we connect again).
                    for note in conn.raw.notifies(timeout=0):
                        token, woken, touched, polled, quiet = parse(note.payload)
                        if token != self._token:
                            self._heard(woken, touched, polled, quiet)
            except Exception as exc:
                if self._stopping.is_set():
                    break
                log.warning("store listener: connection lost: %s", exc)
                lost = True
                self._stopping.wait(RECONNECT_S)
            finally:
                try:
                    conn.close()
                except Exception:
                    pass


class Lead:
    """Whether this process's lease manager is the one that acts (:data:`MANAGER_LOCK`, held by a session).

    :meth:`held` takes the lock if it is free and checks, on every call,
    that this session still holds it (a lost connection loses the lead).
    """

    def __init__(self, connect: Callable[[], object]):
        self._connect = connect
        self._conn = None
        self._lock = threading.Lock()

    def held(self) -> bool:
        """True while this process leads; takes the lead when it is free. Never raises (False instead)."""
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = self._connect()
                (mine,) = self._conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
                    " AND classid = 0 AND objid::bigint = ? AND objsubid = 1 AND granted)", (MANAGER_LOCK,)).fetchone()
                if mine:
                    return True
                (taken,) = self._conn.execute("SELECT pg_try_advisory_lock(?)", (MANAGER_LOCK,)).fetchone()
                if taken:
                    log.info("lease manager: leading (this process acts on the leases)")
                return bool(taken)
            except Exception as exc:
                log.warning("lease manager: cannot tell whether it leads: %s", exc)
                self._drop()
                return False

    def release(self) -> None:
        """Give the lead up (its connection closed)."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
        self._conn = None
