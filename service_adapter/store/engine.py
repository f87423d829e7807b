"""The service's durable state: leases, slots, pilots, every accepted notification and usage, in SQLite
(or PostgreSQL: :mod:`.postgres`).

All writes go through one writer thread that commits in groups: whatever
requests are queued when it wakes share one transaction (one fsync), each
in its own savepoint so that one failing write does not undo its
neighbours. A write's future resolves only after its transaction has
committed, so the receiver answers 200 only for what is on disk.

Readers use their own connections (WAL lets them run beside the writer).
:meth:`Store.wait_for` lets callers block until a predicate over the store
holds, woken by commits rather than by polling; :attr:`Store.version` and
:meth:`Store.wait_changed` let a watcher (the lease manager) sleep until the
next commit (:mod:`.commits` counts them).

This module is the engine; what is written and read lives in functions
over a connection: :mod:`.leases`, :mod:`.notifications`, :mod:`.vms`
(and :mod:`.schema`, :mod:`.rows`). :class:`Store`'s write methods
(:mod:`.writes`) run those on the writer thread, its read methods
(:mod:`.reads`) on the caller's reader connection.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import queue
import sqlite3
import threading
from typing import Callable

from service_adapter.store import pgshare, postgres, schema
from service_adapter.store.commits import StoreCommits
from service_adapter.store.errors import StoreClosed, StoreError, StoreUnavailable
from service_adapter.store.reads import ACCESS_CACHE_SIZE, StoreReads
from service_adapter.store.rows import SlotAccess
from service_adapter.store.waiters import LoopWaiter, resolve
from service_adapter.store.writes import StoreWrites
from workspace_common.errors import first_line

__all__ = ["ACCESS_CACHE_SIZE", "Store"]

log = logging.getLogger("service_adapter.store")

_GROUP_MAX = 256


class Store(StoreWrites, StoreReads, StoreCommits):
    """SQLite-backed state of the service (WAL; ``synchronous=FULL`` by default), or PostgreSQL-backed when
    ``path`` is a ``postgresql://`` URL (:mod:`.postgres`; ``synchronous`` is then the server's business).

    The database file and its -wal and -shm files are mode 0600.

    Thread-safe: writes are serialised through the writer thread, reads use
    one connection per calling thread.
    """

    def __init__(self, path: str, *, synchronous: str = "FULL", host_store_bytes: int | None = None):
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be FULL or NORMAL")
        self.path = path
        #: What one (slot, host) may keep of stored notifications (None: no cap); see :mod:`.compaction`.
        self.host_store_bytes = host_store_bytes
        self._synchronous = synchronous
        #: Whether the store is a PostgreSQL database (else a SQLite file).
        self.on_postgres = postgres.is_url(path)
        if self.on_postgres:
            try:
                import psycopg
            except ImportError:
                raise StoreError("a PostgreSQL store needs psycopg 3: pip install 'workspace-pilot[postgresql]'"
                                 ) from None
            self._errors: tuple[type[BaseException], ...] = (psycopg.Error, StoreUnavailable)
            #: What a read or write raises while the database is away: answered 503 (try again).
            self.unavailable: tuple[type[BaseException], ...] = (StoreUnavailable, psycopg.OperationalError)
        else:
            self._errors = (sqlite3.Error,)
            self.unavailable = (StoreUnavailable,)
            schema.make_private(path)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._init_commits()
        self._quiet_writes = 0  # writes of this batch that left the leases be (writer thread only)
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._woken: set[tuple[str, str]] = set()  # touched by the writer thread only
        self._pilots_touched: set[str] = set()  # slots whose pilot rows this batch wrote (writer thread only)
        # What the receiver asks of every request and what never changes once true: a slot's secret and job
        # id (once it has one), and that a host has reported for a slot. Bounded; misses read the file.
        self._access_cache: collections.OrderedDict[tuple[str, str], SlotAccess] = collections.OrderedDict()
        self._access_lock = threading.Lock()
        self._command_listener: Callable[[set[tuple[str, str]]], None] | None = None
        self._poll_listener: Callable[[set[tuple[str, str]]], None] | None = None
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._writer = threading.Thread(
            target=self._write_loop, args=(ready,), name="store-writer", daemon=True
        )
        self._writer.start()
        ready.result()
        # On PostgreSQL other receivers may write too: their commits wake this one's polls and watchers.
        self._listener: pgshare.CommitListener | None = None
        if self.on_postgres:
            self._token = pgshare.new_token()
            self._listener = pgshare.CommitListener(self._connect, self._token, self._others_committed)
            self._listener.start()

    # -- writer ---------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self.on_postgres:
            return postgres.connect(self.path)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # Before WAL writes the file's first page: on a new file this is what makes it incremental (an existing
        # file keeps its mode; schema.prepare turns an upgraded one over with a VACUUM).
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def _write_loop(self, ready: concurrent.futures.Future) -> None:
        try:
            conn = self._connect()
            if self.on_postgres:
                postgres.prepare(conn, self.path)
            else:
                schema.prepare(conn, self.path)
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
            if conn is None:  # PostgreSQL was away: connect again, or tell this batch's callers it still is
                try:
                    conn = self._connect()
                    log.warning("store: connected to %s again", postgres.shown(self.path))
                except StoreError as exc:
                    resolve([(future, None, StoreUnavailable(str(exc))) for _, future in batch])
                    continue
            self._run_batch(conn, batch)
            if self.on_postgres and conn.raw.broken:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def _begin(self, conn) -> None:
        if self.on_postgres:
            conn.execute("BEGIN")
            conn.execute("SELECT pg_advisory_xact_lock(?)", (pgshare.WRITE_LOCK,))  # one writer at a time
        else:
            conn.execute("BEGIN IMMEDIATE")

    @staticmethod
    def _run_items(conn, batch, savepoints: bool) -> list | None:
        """Each write of the batch in the open transaction: in a savepoint of its own (a failing one is undone
        alone), or all in one go (None as soon as one fails: the caller undoes the batch)."""
        results = []
        for fn, future in batch:
            if not savepoints:
                try:
                    results.append((future, fn(conn), None))
                except Exception:
                    return None
                continue
            conn.execute("SAVEPOINT item")
            try:
                results.append((future, fn(conn), None))
                conn.execute("RELEASE item")
            except Exception as exc:  # this write only; its neighbours go on
                conn.execute("ROLLBACK TO item")
                conn.execute("RELEASE item")
                results.append((future, None, exc))
        return results

    def _run_batch(self, conn: sqlite3.Connection, batch) -> None:
        try:
            self._begin(conn)
            # On PostgreSQL a savepoint costs two round trips per write: the batch first goes without them, and
            # only a batch in which a write failed is undone and run again, each write in its own savepoint.
            results = self._run_items(conn, batch, savepoints=not self.on_postgres)
            if results is None:
                conn.execute("ROLLBACK")
                self._woken, self._pilots_touched, self._quiet_writes = set(), set(), 0
                self._begin(conn)
                results = self._run_items(conn, batch, savepoints=True)
            quiet = self._quiet_writes >= len(batch)
            if self.on_postgres:
                pgshare.announce(conn, self._token, self._woken, self._pilots_touched, quiet=quiet)
            conn.execute("COMMIT")
        except self._errors as exc:
            log.error("store commit failed: %s", exc)
            self._woken, self._pilots_touched, self._quiet_writes = set(), set(), 0
            if self.on_postgres and conn.raw.broken:
                if not isinstance(exc, StoreUnavailable):
                    exc = StoreUnavailable(f"the store's database went away: {first_line(exc)}")
            elif conn.in_transaction:
                conn.execute("ROLLBACK")
            resolve([(future, None, exc) for _, future in batch])
            return
        self._count_commit(quiet, self._pilots_touched)
        self._pilots_touched, self._quiet_writes = set(), 0
        woken, self._woken = self._woken, set()
        if woken and self._command_listener is not None:
            try:
                self._command_listener(woken)
            except Exception:  # a listener's bug must not stop the writer
                log.exception("command listener failed")
        resolve(results)

    def new_lead(self) -> pgshare.Lead | None:
        """For a lease manager: on PostgreSQL, the lead it must hold to act (one manager among the receivers
        that share the database); None on SQLite, whose file has one service."""
        return pgshare.Lead(self._connect) if self.on_postgres else None

    def announce_polls(self, polled: list[tuple[str, str]]) -> None:
        """On PostgreSQL: tell the other receivers that these (slot, host) pilots polled here (their boards
        count them as heard; see :mod:`.pgshare`). Waits for the commit; nothing on SQLite."""
        if self.on_postgres and polled:
            def write(conn) -> None:
                self._leaves_leases_be()
                pgshare.announce(conn, self._token, set(), set(), polled, quiet=True)

            self.submit(write).result()

    def set_poll_listener(self, listener: Callable[[set[tuple[str, str]]], None] | None) -> None:
        """Call ``listener({(slot, host), ...})`` with the pilots another receiver heard polling (PostgreSQL)."""
        self._poll_listener = listener

    def _others_committed(self, woken: set[tuple[str, str]] | None, touched: set[str] | None,
                          polled: set[tuple[str, str]], quiet: bool = False) -> None:
        """Another receiver's commit (on its listener's thread): as for one of ours, the watchers and the
        parked polls it concerns are woken. None: the listener was away, so anything may have changed."""
        if polled and self._poll_listener is not None:
            self._poll_listener(polled)
        self._count_commit(quiet, touched)
        if (woken is None or woken) and self._command_listener is not None:
            try:
                self._command_listener(woken)
            except Exception:
                log.exception("command listener failed")

    def _leaves_leases_be(self) -> None:
        # Called inside a write that changes nothing the lease manager decides on (only VM rows and commands, or
        # nothing): its commit alone does not move lease_version (.commits), so it wakes no lease manager's tick.
        self._quiet_writes += 1

    def _wake_target(self, slot: str, host: str) -> None:
        # Called inside a write: the (slot, host) is announced once the batch has committed.
        self._woken.add((slot, host))

    def set_command_listener(self, listener: Callable[[set[tuple[str, str]] | None], None] | None) -> None:
        """Call ``listener({(slot, host), ...})`` after each commit that queued commands for those pilots (this
        store's or, on PostgreSQL, another receiver's; None: news of others' commits was lost for a while, so
        any pilot may have new commands).

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

    def submit_on_loop(self, fn: Callable[[sqlite3.Connection], object]) -> asyncio.Future:
        """:meth:`submit` for a caller on the running event loop: an asyncio future of ``fn``'s result, settled
        on this loop after the commit (the writer wakes the loop once per batch, not once per write)."""
        if self._closed:
            raise StoreClosed("the store is closed")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((fn, LoopWaiter(loop, future)))
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
        if self._listener is not None:
            self._listener.stop()
        self._queue.put(None)
        self._writer.join()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()


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
