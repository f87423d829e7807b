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

This module is the engine; what is written and read lives in functions
over a connection: :mod:`.leases`, :mod:`.notifications`, :mod:`.vms`
(and :mod:`.schema`, :mod:`.rows`). The methods here run those on the
writer thread or on the caller's reader connection.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import logging
import queue
import sqlite3
import threading
import time
from typing import Callable

from workspace_common.protocol import Notification, VmSpec
from service_adapter.store import compaction
from service_adapter.store import images as image_ops
from service_adapter.store import leases as lease_ops
from service_adapter.store import notifications as notification_ops
from service_adapter.store import schema
from service_adapter.store import vms as vm_ops
from service_adapter.store.errors import StoreClosed
from service_adapter.store.rows import LeaseEvent, LeaseRow, PilotRow, SlotAccess, UsageRow, Verdict
from service_adapter.store.vms import CommandRow, VmRow

log = logging.getLogger("service_adapter.store")

_GROUP_MAX = 256
#: How many (slot, host) answers :meth:`Store.slot_access` keeps in memory.
ACCESS_CACHE_SIZE = 16384


class Store:
    """SQLite-backed state of the service (WAL; ``synchronous=FULL`` by default).

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
        schema.make_private(path)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._changed = threading.Condition()
        self._version = 0
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._woken: set[tuple[str, str]] = set()  # touched by the writer thread only
        self._pilots_touched: set[str] = set()  # slots whose pilot rows this batch wrote (writer thread only)
        self._pilot_marks: dict[str, int] = {}  # slot -> the version whose commit last changed its pilots
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
            for slot in self._pilots_touched:
                self._pilot_marks[slot] = self._version
            self._changed.notify_all()
        self._pilots_touched = set()
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
        now: float, reason: str = "submitting the pilot job", images: list[dict] | None = None,
        start_at: float | None = None,
    ) -> LeaseRow:
        """Record a new lease (state ``pending``, or ``scheduled`` with ``start_at``) and its one slot in one
        transaction; blocks until committed.

        Called before the pilot job is submitted, so a pilot's first
        notification always finds its slot. ``images`` (resolved) are what
        each host is told to prefetch once it has reserved.
        """

        def write(conn: sqlite3.Connection) -> None:
            lease_ops.insert_lease(conn, lease_id, owner, nodes, memory_mb, duration_s, now, reason, slot_id,
                                   start_at)
            lease_ops.insert_slot(conn, slot_id, lease_id, nodes, memory_mb, now)
            if images:
                image_ops.set_lease_images(conn, lease_id, images)

        self.submit(write).result()
        return self.get_lease(lease_id)

    def set_job_id(self, slot_id: str, job_id: str, reason: str | None = None,
                   submitted: tuple[float, float] | None = None) -> None:
        """Record the LRM's job id for a slot and its lease (and, while pending, the lease's reason).

        ``submitted`` is (when the submit started, when it returned), kept on the slot for ``lease-bench``.
        """
        self.submit(lambda conn: lease_ops.set_job_id(conn, slot_id, job_id, reason, submitted)).result()

    def transition_lease(
        self, lease_id: str, old: str, new: str, reason: str, *, now: float, ended: bool = False,
        ready_at: float | None = None, cancel: bool = False, expires_at: float | None = None,
    ) -> bool:
        """Move a lease from ``old`` to ``new`` only if it is still in ``old`` (compare-and-set).

        Returns whether it moved; a lease in another state (another manager,
        or an earlier process, got there first) is left as it is. The
        transition and its history entry commit together. ``ended`` sets
        ``ended_at`` (a terminal state), ``ready_at`` sets when it became
        ready, ``cancel`` records that the job must be cancelled, ``expires_at``
        (when given) is the lease's end from now on.
        """
        return self.submit(lambda conn: lease_ops.transition(
            conn, lease_id, old, new, reason, now=now, ended=ended, ready_at=ready_at, cancel=cancel,
            expires_at=expires_at,
        )).result()

    def mark_warned(self, lease_id: str, reason: str, now: float) -> bool:
        """Record the lease's before-end event (an ``ending`` history entry) once; whether this call recorded it."""
        return self.submit(lambda conn: lease_ops.mark_warned(conn, lease_id, reason, now)).result()

    def extend_lease(self, lease_id: str, old_duration_s: float, by_s: float, reason: str, now: float) -> int | None:
        """Lengthen a lease by ``by_s`` and queue an ``extend`` for each of its hosts that holds it, in one transaction.

        A compare-and-set on the duration: None (nothing written) if the
        lease's duration is no longer ``old_duration_s`` or it has ended;
        else how many hosts were told. A host that reserves later is told
        with its ``reserved`` (see :func:`vms.apply_notification`).
        """

        def write(conn: sqlite3.Connection) -> int | None:
            if not lease_ops.extend(conn, lease_id, old_duration_s, by_s, reason, now):
                return None
            return vm_ops.queue_extend(conn, lease_id, now, self._wake_target)

        return self.submit(write).result()

    def request_release(self, lease_id: str, now: float, *, warn: bool = False) -> bool:
        """Record that a release (and so a cancel of the job) was asked; False if the lease has ended or is unknown.

        Repeating it keeps the first request's time. With ``warn`` the lease
        also gets its before-end event (an ``ending`` entry), once.
        """
        return self.submit(lambda conn: lease_ops.request_release(conn, lease_id, now, self._wake_target,
                                                                  warn)).result()

    def mark_job_finished(self, lease_id: str, now: float) -> None:
        """Record when the job was first seen finished; a cancel still wanted is then moot."""
        self.submit(lambda conn: lease_ops.mark_job_finished(conn, lease_id, now)).result()

    def mark_cancelled(self, lease_id: str, now: float) -> None:
        """Record that the LRM took the cancel of the lease's job."""
        self.submit(lambda conn: lease_ops.mark_cancelled(conn, lease_id, now)).result()

    # -- writes: notifications, VMs and commands ------------------------------------------------

    def record_notification(
        self, notification: Notification, body: bytes, account: str, *, slack_s: float = 300.0
    ) -> concurrent.futures.Future:
        """Decide on and durably record one authenticated notification; the future gives its
        :class:`Verdict` (see :func:`service_adapter.store.notifications.record`)."""
        body_hash = hashlib.sha256(body).hexdigest()

        def write(conn: sqlite3.Connection) -> Verdict:
            self._pilots_touched.add(notification.slot)
            return notification_ops.record(conn, notification, body, body_hash, account, slack_s, self._wake_target,
                                           self.host_store_bytes)

        return self.submit(write)

    def compact(self, retention_s: float, now: float) -> tuple[int, int, int, int]:
        """One compaction pass (:mod:`.compaction`): the notifications and commands of leases that ended more
        than ``retention_s`` before ``now`` are deleted (a batch of them), then free pages are given back.
        Returns (leases compacted, notifications deleted, commands deleted, free pages before the vacuum)."""

        def write(conn: sqlite3.Connection) -> tuple[int, int, int]:
            return compaction.compact_ended(conn, now - retention_s, now)

        leases, notifications, commands = self.submit(write).result()
        # Its own transaction, after the deletes committed: their pages are free only then.
        free = self.submit(compaction.give_back).result()
        return leases, notifications, commands, free

    def start_vms(self, lease_id: str, requests: list[tuple[VmSpec, str | None]], *, overhead_mb: int,
                  now: float, resolve: Callable[[sqlite3.Connection, VmSpec], VmSpec] | None = None,
                  plan=None) -> list[tuple[VmSpec, str]]:
        """Place and queue the VMs' start-vm commands in one transaction; (spec as queued, host), in order.

        ``resolve(conn, spec)``, when given, turns each spec into the one
        queued (images named by list identifier resolved to their content)
        inside the same transaction, or raises to refuse; ``plan`` (a
        :class:`~service_adapter.networks.NetworkPlan`) gives each VM its
        address in the same transaction. Raises
        :class:`service_adapter.store.vms.VmRequestError` (nothing queued).
        """
        return self.submit(
            lambda conn: vm_ops.start_vms(conn, lease_id, requests, overhead_mb, now, self._wake_target, resolve,
                                          plan)
        ).result()

    def stop_vm(self, lease_id: str, name: str, *, force: bool, now: float) -> VmRow:
        """Queue a stop-vm for an active VM (it becomes ``stopping``); raises VmRequestError."""
        return self.submit(lambda conn: vm_ops.stop_vm(conn, lease_id, name, force, now, self._wake_target)).result()

    def pause_vm(self, lease_id: str, name: str, *, resume: bool, now: float) -> VmRow:
        """Queue a suspend-vm (or, with ``resume``, a resume-vm) for a VM; raises VmRequestError (404, 409)."""
        op = "resume-vm" if resume else "suspend-vm"
        return self.submit(lambda conn: vm_ops.pause_vm(conn, lease_id, name, op, now, self._wake_target)).result()

    def mark_lost(self, slot: str, host: str, *, now: float, why: str) -> bool:
        """Give (slot, host) up for lost, its active VMs with it; False if it already was."""
        def write(conn: sqlite3.Connection) -> bool:
            self._pilots_touched.add(slot)
            return vm_ops.mark_lost(conn, slot, host, now, why)

        return self.submit(write).result()

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
        return lease_ops.get(self._reader(), lease_id)

    def list_leases(self, states=None, owner: str | None = None) -> list[LeaseRow]:
        """Leases, newest first; only those in ``states`` (an iterable of names) and of ``owner`` if given."""
        return lease_ops.listed(self._reader(), states, owner)

    def lease_counts(self) -> dict[str, int]:
        """How many leases are in each state (states with none are left out)."""
        return dict(self._reader().execute("SELECT state, COUNT(*) FROM leases GROUP BY state").fetchall())

    def commands_queued_at(self, ids: list[int]) -> list[tuple[str, float]]:
        """(op, when queued) of the commands with these ids (for the command wait's histogram)."""
        if not ids:
            return []
        return self._reader().execute(
            f"SELECT op, created_at FROM commands WHERE id IN ({', '.join('?' * len(ids))})", ids).fetchall()

    def leases_to_watch(self) -> list[LeaseRow]:
        """Leases the manager must look at: every one not ended, and ended ones whose job still needs a cancel."""
        return lease_ops.to_watch(self._reader())

    def lease_events(self, lease_id: str, after: int = 0) -> list[LeaseEvent]:
        """A lease's history: its creation, then each transition and event, in order (those numbered above
        ``after`` only)."""
        return lease_ops.events(self._reader(), lease_id, after)

    def usage_rows(self, lease_id: str | None = None, owner: str | None = None) -> list[UsageRow]:
        """The ended holds (one per lease and host), of one lease and/or one owner if given, oldest first."""
        return lease_ops.usage_rows(self._reader(), lease_id, owner)

    def usage_totals(self, lease_id: str | None = None, owner: str | None = None) -> tuple[float, float, int]:
        """(node-seconds, MB-seconds, leases counted) summed over the ended holds that match."""
        return lease_ops.usage_totals(self._reader(), lease_id, owner)

    def submit_times(self, slot_id: str) -> tuple[float | None, float | None]:
        """When the slot's job submit started and returned (epoch seconds; None before it did)."""
        return lease_ops.submit_times(self._reader(), slot_id)

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
        access = notification_ops.slot_access(self._reader(), slot_id, host)
        if access is not None and access.job_id is not None and access.host_known:
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
        return notification_ops.pilots(self._reader(), slot_id)

    def pilot_marks(self, slot_ids) -> dict[str, int]:
        """For each slot, the :attr:`version` whose commit last changed its pilots in this process (0: none
        since it opened). Equal marks between two reads: the slot's pilots are as they were."""
        with self._changed:
            return {slot: self._pilot_marks.get(slot, 0) for slot in slot_ids}

    def pilots_by_slot(self, slot_ids: list[str]) -> dict[str, list[PilotRow]]:
        """:meth:`pilots` of many slots at once (the lease manager's tick: a few queries, not one per lease)."""
        return notification_ops.pilots_by_slot(self._reader(), slot_ids)

    def running_vm_counts(self, lease_ids: list[str]) -> dict[str, int]:
        """How many VMs of each lease are running (0 for none), for many leases at once."""
        return vm_ops.running_counts(self._reader(), lease_ids)

    def pilot(self, slot: str, host: str) -> tuple[PilotRow, bool] | None:
        """The pilot of (slot, host) and whether its lease has ended; None if no such pilot has reported."""
        return notification_ops.pilot_of(self._reader(), slot, host)

    def notification_bodies(self, slot_id: str) -> list[tuple[str, str, float, dict]]:
        """(host, state, received_at, body as a dict) of every accepted notification of a slot, in arrival order."""
        return notification_ops.bodies(self._reader(), slot_id)

    def notifications(self, slot_id: str) -> list[tuple[str, int, str, int]]:
        """(host, seq, state, code) of every accepted notification of a slot, in arrival order."""
        return notification_ops.listed(self._reader(), slot_id)

    def vms(self, lease_id: str) -> list[VmRow]:
        """A lease's VMs, oldest first."""
        return vm_ops.vms_of(self._reader(), lease_id)

    def commands_after(self, slot: str, host: str, after: int, limit: int = 256) -> list[tuple[int, dict]]:
        """(id, body) of the commands for (slot, host) above ``after``, oldest first."""
        return vm_ops.commands_after(self._reader(), slot, host, after, limit)

    def commands(self, slot: str) -> list[CommandRow]:
        """Every command of a slot with its outcome, in id order."""
        return vm_ops.commands_of(self._reader(), slot)

    def read(self, fn: Callable[[sqlite3.Connection], object]):
        """``fn(conn)`` on this thread's reader connection: for modules that keep their queries beside them."""
        return fn(self._reader())

    def snapshot(self) -> dict[str, list[tuple]]:
        """Every row of every table: for comparing the whole store before and after."""
        conn = self._reader()
        return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall()) for t in schema.TABLES}

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
