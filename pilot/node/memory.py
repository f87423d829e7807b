"""A lease's memory on this node: taken and given back under the node lock, journal first.

Every change follows one order, for every backend:

1. take the node lock, and undo the entries of dead owners first (so the
   level this pilot reads is one that only live pilots have shaped);
2. write the journal entry that says what is about to change and how to
   undo it;
3. change the level, then read it back until it has taken effect or the
   verify timeout passes (a Xen balloon moves in the background);
4. record the outcome in the journal before the lock is released.

A pilot that dies at any point leaves an entry that the next lock holder
(:func:`pilot.recovery.replay_dead`, which this layer is handed, never
imports) can undo exactly; see :data:`pilot.node.journal.PHASES`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pilot.node.backends import BackendError, BalloonBackend, make_backend
from pilot.node.journal import Entry, Journal, JournalError, MemoryRecord

#: Undoes every dead owner's entry (the caller holds the node lock); what it returns has ``clean``, ``failed`` and
#: ``unreadable``. :func:`pilot.recovery.replay_dead`, given by whoever builds a :class:`NodeMemory`.
Replay = Callable[[Journal, float], Any]

log = logging.getLogger(__name__)


class TakeAborted(Exception):
    """A stop was requested after the journal write and before the change: nothing was changed."""


def settle(backend: BalloonBackend, target: int, timeout: float) -> int:
    """Read the level until it counts as ``target`` or ``timeout`` seconds pass; returns the last level.

    Hugepages and cgroups settle at once (their writes are synchronous); a
    Xen balloon moves over time and has no completion event to wait on,
    so this polls with a short backoff.
    """
    level = backend.read()
    if backend.reached(level, target):
        return level
    deadline = time.monotonic() + timeout
    pause = 0.005
    while (remaining := deadline - time.monotonic()) > 0:
        time.sleep(min(pause, remaining))
        level = backend.read()
        if backend.reached(level, target):
            return level
        pause = min(pause * 2, 0.25)
    return level


def _still_held(record: MemoryRecord, start: int, now: int) -> MemoryRecord:
    """A ``held`` record for what stays taken when a change meant to give back stopped part-way.

    Only backends whose levels move linearly (hugepages, Xen) can stop
    part-way; a cgroup write lands whole or not at all.
    """
    moved = min(abs(now - start), record.units)
    return dataclasses.replace(record, phase="held", units=record.units - moved, before=None, target=None)


def undo_memory(journal: Journal, entry: Entry, verify_timeout: float) -> str:
    """Give back the memory ``entry`` says is taken and remove the entry; the caller holds the node lock, knows
    the owner is gone and has undone the entry's other parts (:func:`pilot.recovery.undo_entry`).

    Returns a line saying what was done. Raises BackendError or JournalError
    when the memory could not be given back (the entry then stays).
    """
    memory = entry.memory
    if memory is None:
        journal.remove(entry)
        return "no memory was taken"
    if not entry.owner.from_this_boot():
        # Balloon targets, hugepage pools and cgroup limits do not survive a reboot.
        journal.remove(entry)
        return f"written before the last reboot: its {memory.memory_mb} MB were given back by the reboot"
    backend = make_backend(memory.backend, memory.params)
    try:
        level = backend.read()
        if memory.phase == "taking":
            target = memory.before
        elif memory.phase == "held":
            target = backend.level_after_give(level, memory.units)
        else:
            target = memory.target
        t0 = time.monotonic()
        if not backend.reached(level, target):
            backend.write(target)
        got = settle(backend, target, verify_timeout)
        if not backend.reached(got, target):
            raise BackendError(
                f"{memory.backend}: asked for {target} {backend.unit}, still at {got} after {verify_timeout:g} s"
            )
    finally:
        backend.close()
    journal.remove(entry)
    return (
        f"{memory.backend} {level} -> {got} {backend.unit} (phase {memory.phase}, "
        f"{memory.memory_mb} MB) in {(time.monotonic() - t0) * 1000:.1f} ms"
    )


class NodeMemory:
    """One pilot's memory reservation on this node, journalled before every change.

    ``checkpoint(name)`` is called at the points where a pilot can be
    killed mid-way (``journalled``, ``restoring``, ``restored``); the
    fault-injection tests pause there.
    """

    def __init__(
        self,
        journal: Journal,
        backend: BalloonBackend,
        entry: Entry,
        *,
        minmem_mb: int,
        verify_timeout: float,
        replay: Replay,
        checkpoint: Callable[[str], None] = lambda name: None,
    ):
        self.journal = journal
        self.replay = replay
        self.backend = backend
        self.entry = entry
        self.minmem_mb = minmem_mb
        self.verify_timeout = verify_timeout
        self.checkpoint = checkpoint
        # The VM worker journals VMs while the main thread journals memory: one entry, one writer at a time.
        self._entry_lock = threading.Lock()

    @property
    def held(self) -> MemoryRecord | None:
        """What this pilot holds now (None before a take and after a full give-back)."""
        return self.entry.memory

    def _replay_first(self) -> None:
        report = self.replay(self.journal, self.verify_timeout)
        if not report.clean:
            problems = [f"{e.filename}: {why}" for e, why in report.failed]
            problems += [f"{e.filename}: {e.reason}" for e in report.unreadable]
            raise JournalError(
                "the journal holds changes of dead pilots that could not be undone ("
                + "; ".join(problems) + "); run workspace-killall"
            )

    def _record(self, memory: MemoryRecord | None) -> None:
        with self._entry_lock:
            self._store(self.entry.with_memory(memory))

    def _store(self, entry: Entry) -> None:
        if entry.empty:
            self.journal.remove(entry)
        else:
            self.journal.write(entry)
        self.entry = entry

    def note_vms(self, uri: str | None) -> None:
        """Journal that this slot's VMs may run at libvirt ``uri`` (before the first is created); None: none can.

        Replay and kill-all destroy the VMs tagged with the slot before
        they restore its memory. Raises JournalError.
        """
        with self._entry_lock:
            self._store(dataclasses.replace(self.entry, vm_uri=uri))

    def note_nets(self, names: tuple[str, ...], root: str | None) -> None:
        """Journal the lease networks this pilot may make (before the first device of each) and where their files
        go; ``()`` once they are all removed. Raises JournalError (then nothing is made)."""
        with self._entry_lock:
            self._store(dataclasses.replace(self.entry, nets=tuple(names), net_root=root if names else None))

    def note_run_dir(self, path: str | None) -> None:
        """Journal a VM job's run directory before it is made (None once it is removed); raises JournalError."""
        with self._entry_lock:
            self._store(dataclasses.replace(self.entry, run_dir=path))

    def note_job_limit(self, limit: tuple[str, int] | None) -> None:
        """Journal a VM job's batch job's memory cgroup and its limit before the wrapper lowers it (None once it is
        put back); raises JournalError."""
        with self._entry_lock:
            self._store(dataclasses.replace(self.entry, job_limit=limit))

    def note_fetching(self, sha256s: tuple[str, ...]) -> None:
        """Journal the images this pilot is downloading into the node's image cache (before the first byte).

        Raises JournalError (then nothing is fetched).
        """
        with self._entry_lock:
            self._store(dataclasses.replace(self.entry, fetching=tuple(sha256s)))

    def take(self, memory_mb: int, should_stop: Callable[[], bool] = lambda: False) -> MemoryRecord:
        """Take ``memory_mb`` from the host, all or nothing; returns what is held.

        Raises BackendError (nothing kept, or what is kept is journalled),
        JournalError, NodeLockError, or TakeAborted when ``should_stop()``
        turned true before the change.
        """
        backend = self.backend
        if backend.name == "none":
            log.warning(
                "MEMORY BACKEND 'none': nothing is set aside for this lease's %d MB; the host and the "
                "VMs share memory unprotected ([memory] backend says so)", memory_mb,
            )
        with self.journal.lock():
            self._replay_first()
            before = backend.read()
            units = backend.units_for(memory_mb)
            target = backend.level_after_take(before, units)
            host_after = backend.host_mb(target)
            if host_after < self.minmem_mb:
                raise BackendError(
                    f"taking {memory_mb} MB would leave the host {host_after} MB, below minmem "
                    f"{self.minmem_mb} MB; nothing was changed"
                )
            record = MemoryRecord(
                backend.name, backend.params(), "taking", units, backend.mb_of(units), before, target
            )
            self._record(record)
            self.checkpoint("journalled")
            if should_stop():
                self._record(None)
                raise TakeAborted("stop requested before the memory was taken")
            t0 = time.monotonic()
            try:
                backend.write(target)
                got = settle(backend, target, self.verify_timeout)
            except BackendError:
                self._roll_back(record, before)
                raise
            if not backend.reached(got, target):
                self._roll_back(record, before)
                raise BackendError(
                    f"{backend.name}: asked for {target} {backend.unit} ({memory_mb} MB), got {got} within "
                    f"{self.verify_timeout:g} s; gave it back, nothing kept"
                )
            held = dataclasses.replace(record, phase="held", before=None, target=None)
            self._record(held)
        log.info(
            "took %d MB from the host (%s %d -> %d %s) in %.1f ms",
            held.memory_mb, backend.name, before, got, backend.unit, (time.monotonic() - t0) * 1000,
        )
        return held

    def _roll_back(self, record: MemoryRecord, before: int) -> None:
        """Return to ``before`` after a failed take; journal what could not be returned."""
        try:
            self.backend.write(before)
            now = settle(self.backend, before, self.verify_timeout)
        except BackendError as exc:
            log.critical("could not undo a failed take: %s", exc)
            now = None
        if now is not None and self.backend.reached(now, before):
            self._record(None)
            return
        # Part of it is still taken: keep that journalled (relatively) for workspace-killall or the next pilot.
        log.critical("a failed take left the level at %s %s instead of %d; journalled", now, self.backend.unit, before)
        if now is None:
            self._record(dataclasses.replace(record, phase="held", before=None, target=None))
        else:
            # The level is `now`, `before` means nothing taken: the distance is what stays taken.
            units = min(abs(now - before), record.units)
            self._record(dataclasses.replace(record, phase="held", units=units, before=None, target=None))

    def give_back(self) -> None:
        """Give back exactly what this pilot holds and remove its entry.

        Raises BackendError, JournalError or NodeLockError when the node could
        not be restored; what is still held stays journalled.
        """
        held = self.entry.memory
        if held is None:
            return
        backend = self.backend
        with self.journal.lock():
            self._replay_first()
            current = backend.read()
            target = backend.level_after_give(current, held.units)
            self._record(dataclasses.replace(held, phase="restoring", before=current, target=target))
            self.checkpoint("restoring")
            t0 = time.monotonic()
            try:
                backend.write(target)
                got = settle(backend, target, self.verify_timeout)
            except BackendError:
                self._record(held)  # the host refused: nothing changed, still held
                raise
            if not backend.reached(got, target):
                self._record(_still_held(held, current, got))
                raise BackendError(
                    f"{backend.name}: asked for {target} {backend.unit} to give back {held.memory_mb} MB, "
                    f"still at {got} after {self.verify_timeout:g} s; the journal keeps it for workspace-killall"
                )
            self.checkpoint("restored")
            self._record(None)
        log.info(
            "gave %d MB back to the host (%s %d -> %d %s) in %.1f ms",
            held.memory_mb, backend.name, current, got, backend.unit, (time.monotonic() - t0) * 1000,
        )
