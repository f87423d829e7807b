"""The store's writes: each queues a function of :mod:`.leases`, :mod:`.notifications`, :mod:`.vms` or
:mod:`.compaction` on the writer thread and (but for a notification) waits for its commit.

:class:`StoreWrites` is a base of :class:`service_adapter.store.Store`
(whose engine, :mod:`.engine`, runs them); it holds no state of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import sqlite3
from typing import Callable

from service_adapter.store import commands as command_ops
from service_adapter.store import compaction
from service_adapter.store import images as image_ops
from service_adapter.store import leases as lease_ops
from service_adapter.store import notifications as notification_ops
from service_adapter.store import vms as vm_ops
from service_adapter.store.rows import LeaseRow, Verdict
from service_adapter.store.vms import VmRow
from workspace_common.protocol import Notification, VmSpec


class StoreWrites:
    """The write half of :class:`service_adapter.store.Store`'s methods."""

    # -- writes: leases -------------------------------------------------------------

    def create_lease(
        self, lease_id: str, slot_id: str, *, owner: str, nodes: int, memory_mb: int, duration_s: float,
        now: float, reason: str = "submitting the pilot job", images: list[dict] | None = None,
        start_at: float | None = None, release_when_idle_s: float | None = None, exclude_nodes: tuple = (),
    ) -> LeaseRow:
        """Record a new lease (state ``pending``, or ``scheduled`` with ``start_at``) and its one slot in one
        transaction; blocks until committed.

        Called before the pilot job is submitted, so a pilot's first
        notification always finds its slot. ``images`` (resolved) are what
        each host is told to prefetch once it has reserved. ``exclude_nodes``
        are named in its first event (its job's only record of them).
        """

        def write(conn: sqlite3.Connection) -> None:
            lease_ops.insert_lease(conn, lease_id, owner, nodes, memory_mb, duration_s, now, reason, slot_id,
                                   start_at, release_when_idle_s, exclude_nodes)
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
        with its ``reserved`` (see :func:`.reports.apply_notification`).
        """

        def write(conn: sqlite3.Connection) -> int | None:
            if not lease_ops.extend(conn, lease_id, old_duration_s, by_s, reason, now):
                return None
            return command_ops.queue_extend(conn, lease_id, now, self._wake_target)

        return self.submit(write).result()

    def request_release(self, lease_id: str, now: float, *, warn: bool = False, why: str | None = None) -> bool:
        """Record that a release (and so a cancel of the job) was asked; False if the lease has ended or is unknown.

        Repeating it keeps the first request's time. With ``warn`` the lease
        also gets its before-end event (an ``ending`` entry saying ``why``), once.
        """
        return self.submit(lambda conn: lease_ops.request_release(conn, lease_id, now, self._wake_target,
                                                                  warn, why)).result()

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
        return self.submit(self._notification_write(notification, body, account, slack_s))

    def record_notification_on_loop(
        self, notification: Notification, body: bytes, account: str, *, slack_s: float = 300.0
    ) -> "asyncio.Future[Verdict]":
        """:meth:`record_notification` for the receiver's event loop: an asyncio future, settled there after
        the commit (see :meth:`Store.submit_on_loop`)."""
        return self.submit_on_loop(self._notification_write(notification, body, account, slack_s))

    def _notification_write(self, notification: Notification, body: bytes, account: str, slack_s: float):
        body_hash = hashlib.sha256(body).hexdigest()

        def write(conn: sqlite3.Connection) -> Verdict:
            self._pilots_touched.add(notification.slot)
            return notification_ops.record(conn, notification, body, body_hash, account, slack_s, self._wake_target,
                                           self.host_store_bytes)

        return write

    def compact(self, retention_s: float, now: float) -> tuple[int, int, int, int]:
        """One compaction pass (:mod:`.compaction`): the notifications and commands of leases that ended more
        than ``retention_s`` before ``now`` are deleted (a batch of them), then free pages are given back.
        Returns (leases compacted, notifications deleted, commands deleted, free pages before the vacuum)."""

        def write(conn: sqlite3.Connection) -> tuple[int, int, int]:
            return compaction.compact_ended(conn, now - retention_s, now)

        leases, notifications, commands = self.submit(write).result()
        # Its own transaction, after the deletes committed: their pages are free only then.
        # PostgreSQL's autovacuum makes deleted rows' space reusable by itself.
        free = 0 if self.on_postgres else self.submit(compaction.give_back).result()
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
        def write(conn: sqlite3.Connection) -> list[tuple[VmSpec, str]]:
            # New VMs are "starting": no lease counts them as running until their pilots say so.
            self._leaves_leases_be()
            return vm_ops.start_vms(conn, lease_id, requests, overhead_mb, now, self._wake_target, resolve, plan)

        return self.submit(write).result()

    def stop_vm(self, lease_id: str, name: str, *, force: bool, now: float) -> VmRow:
        """Queue a stop-vm for an active VM (it becomes ``stopping``); raises VmRequestError."""
        return self.submit(lambda conn: vm_ops.stop_vm(conn, lease_id, name, force, now, self._wake_target)).result()

    def pause_vm(self, lease_id: str, name: str, *, resume: bool, now: float) -> VmRow:
        """Queue a suspend-vm (or, with ``resume``, a resume-vm) for a VM; raises VmRequestError (404, 409)."""
        op = "resume-vm" if resume else "suspend-vm"

        def write(conn: sqlite3.Connection) -> VmRow:
            self._leaves_leases_be()  # the VM's state moves when its pilot reports
            return vm_ops.pause_vm(conn, lease_id, name, op, now, self._wake_target)

        return self.submit(write).result()

    def mark_lost(self, slot: str, host: str, *, now: float, why: str) -> bool:
        """Give (slot, host) up for lost, its active VMs with it; False if it already was."""
        def write(conn: sqlite3.Connection) -> bool:
            self._pilots_touched.add(slot)
            return vm_ops.mark_lost(conn, slot, host, now, why)

        return self.submit(write).result()
