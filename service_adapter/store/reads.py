"""The store's reads: each runs a query of :mod:`.leases`, :mod:`.notifications` or :mod:`.vms` on the
calling thread's reader connection (WAL lets it run beside the writer).

:class:`StoreReads` is a base of :class:`service_adapter.store.Store`;
its only state is the (slot, host) access cache the engine sets up.
"""

from __future__ import annotations

import sqlite3
from typing import Callable

from service_adapter.store import commands as command_ops
from service_adapter.store import leases as lease_ops
from service_adapter.store import notifications as notification_ops
from service_adapter.store import postgres, schema
from service_adapter.store import vms as vm_ops
from service_adapter.store.commands import CommandRow
from service_adapter.store.rows import LeaseEvent, LeaseRow, PilotRow, SlotAccess, UsageRow
from service_adapter.store.vms import VmRow

#: How many (slot, host) answers :meth:`StoreReads.slot_access` keeps in memory.
ACCESS_CACHE_SIZE = 16384


class StoreReads:
    """The read half of :class:`service_adapter.store.Store`'s methods."""


    def get_lease(self, lease_id: str) -> LeaseRow | None:
        """One lease, or None if there is no such lease."""
        return lease_ops.get(self._reader(), lease_id)

    def list_leases(self, states=None, owner: str | None = None) -> list[LeaseRow]:
        """Leases, newest first; only those in ``states`` (an iterable of names) and of ``owner`` if given."""
        return lease_ops.listed(self._reader(), states, owner)

    def lease_counts(self) -> dict[str, int]:
        """How many leases are in each state (states with none are left out)."""
        return dict(self._reader().execute("SELECT state, COUNT(*) FROM leases GROUP BY state").fetchall())

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

    def pilots_by_slot(self, slot_ids: list[str]) -> dict[str, list[PilotRow]]:
        """:meth:`pilots` of many slots at once (the lease manager's tick: a few queries, not one per lease)."""
        return notification_ops.pilots_by_slot(self._reader(), slot_ids)

    def vm_activity(self, lease_id: str) -> tuple[int, float | None]:
        """(the lease's VMs on their hosts or on their way, when the last of the others ended; None: none ran)."""
        return vm_ops.vm_activity(self._reader(), lease_id)

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
        return command_ops.commands_after(self._reader(), slot, host, after, limit)

    def pending_commands(self, slot: str, host: str, after: int, limit: int = 256) -> list[tuple[int, str, str, float]]:
        """(id, op, body as stored, when queued) of the commands for (slot, host) above ``after``, oldest first."""
        return command_ops.pending(self._reader(), slot, host, after, limit)

    def poll_view(self, slot: str, host: str, after: int, limit: int = 256):
        """((the pilot's reserved_at, state, lost_at, whether its lease ended), its pending commands above ``after``)
        in one read; None: no such pilot (:func:`service_adapter.store.commands.poll_view`)."""
        return command_ops.poll_view(self._reader(), slot, host, after, limit)

    def commands(self, slot: str) -> list[CommandRow]:
        """Every command of a slot with its outcome, in id order."""
        return command_ops.commands_of(self._reader(), slot)

    def read(self, fn: Callable[[sqlite3.Connection], object]):
        """``fn(conn)`` on this thread's reader connection: for modules that keep their queries beside them."""
        return fn(self._reader())

    def snapshot(self) -> dict[str, list[tuple]]:
        """Every row of every table: for comparing the whole store before and after (the same columns on
        either backend: PostgreSQL's explicit ``rowid``, SQLite's hidden one, is left out)."""
        conn = self._reader()
        tables = {t: conn.execute(f"SELECT * FROM {t}").fetchall() for t in schema.TABLES}
        if self.on_postgres:
            tables.update({t: [row[:-1] for row in tables[t]] for t in postgres.ROWID_TABLES})
        return {t: sorted(rows) for t, rows in tables.items()}
