"""What the store's commits have changed, counted for those who wait on them (a base of :class:`Store`).

- :attr:`StoreCommits.version` grows with every commit (this process's, and on PostgreSQL the other
  receivers' it heard of); :meth:`StoreCommits.wait_changed` and :meth:`StoreCommits.wait_for` sleep
  until one comes.
- :attr:`StoreCommits.lease_version` moves only with the commits that may change what the lease manager
  decides on: all but those whose every write said it left the leases be (a VM's start or pause request
  queues commands and VM rows; nothing counts them until their pilots report).
- :meth:`StoreCommits.pilot_marks`: for each slot, the version whose commit last changed its pilots.
"""

from __future__ import annotations

import threading
import time
from typing import Callable


class StoreCommits:
    """The commit-counting half of :class:`service_adapter.store.Store`."""

    def _init_commits(self) -> None:
        self._changed = threading.Condition()
        self._version = 0
        self._lease_version = 0
        self._wakes = 0  # calls of wake(): they end every wait_changed
        self._pilot_marks: dict[str, int] = {}  # slot -> the version whose commit last changed its pilots
        self._marks_floor = 0  # every slot's mark is at least this (news of others' commits was lost before it)

    def _count_commit(self, quiet: bool, touched: set[str] | None) -> None:
        """One commit is done: ``quiet``, it changed nothing the lease manager decides on; ``touched``, the slots
        whose pilots it changed (None: any may have changed). Wakes every waiter."""
        with self._changed:
            self._version += 1
            if not quiet or touched is None:
                self._lease_version = self._version
            if touched is None:
                self._marks_floor = self._version
            else:
                for slot in touched:
                    self._pilot_marks[slot] = self._version
            self._changed.notify_all()

    @property
    def version(self) -> int:
        """A number that grows with every commit (for :meth:`wait_changed`)."""
        with self._changed:
            return self._version

    @property
    def lease_version(self) -> int:
        """The :attr:`version` of the last commit that may have changed what the lease manager decides on: its
        leases, their pilots, their running VMs (every commit but a VM's start or pause request)."""
        with self._changed:
            return self._lease_version

    def pilot_marks(self, slot_ids) -> dict[str, int]:
        """For each slot, the :attr:`version` whose commit last changed its pilots (this process's commits and,
        on PostgreSQL, the others' it heard of; 0: none since it opened). Equal marks between two reads: the
        slot's pilots are as they were."""
        with self._changed:
            floor = self._marks_floor
            return {slot: max(self._pilot_marks.get(slot, 0), floor) for slot in slot_ids}

    def wait_changed(self, since: int, timeout: float, *, leases: bool = False) -> int:
        """Block until a commit moves :attr:`version` (with ``leases``: :attr:`lease_version`) past ``since``,
        ``timeout`` passes, or :meth:`wake`.

        Returns that version then (equal to ``since`` if nothing was
        committed); returns at once if it has already moved. Callers loop:
        a return says "look again", not what changed.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            wakes = self._wakes
            # Every commit notifies: a waiter on the lease version sleeps on through those that leave it.
            while (self._lease_version if leases else self._version) == since and self._wakes == wakes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            return self._lease_version if leases else self._version

    def wake(self) -> None:
        """Wake every :meth:`wait_changed` and :meth:`wait_for` caller without a commit (e.g. to stop a watcher)."""
        with self._changed:
            self._wakes += 1
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
