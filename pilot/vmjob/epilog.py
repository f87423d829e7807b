"""After a batch job: undo whatever its VM jobs left on this node (run as root by the batch system's epilog).

A wrapper that was SIGKILLed (the batch system's kill after its wait, the
OOM killer) leaves its journal entry, its VM and its memory taken. The
epilog runs once the job's processes are gone: it stops any wrapper of the
job that still runs (SIGTERM, then SIGKILL; outside the node lock, which
the wrapper needs to restore), then undoes the job's entries under the node
lock as the next pilot would, and removes the job's slot locks.
"""

from __future__ import annotations

import glob
import os
import signal

from pilot.node.backends import BackendError
from pilot.node.journal import Entry, Journal, JournalError
from pilot.node.lock import NodeLockError
from pilot.recovery import undo_entry
from pilot.vm.cleanup import VmCleanupError

#: Seconds a wrapper has after SIGKILL to be gone (the kernel's part only).
KILL_WAIT_S = 5.0


def job_entries(journal: Journal, job_id: str) -> list[Entry]:
    """The journal entries of the VM jobs of batch job ``job_id`` (slots ``job<ID>.<node>``)."""
    prefix = f"job{job_id}."
    return [e for e in journal.entries() if isinstance(e, Entry) and e.slot.startswith(prefix)]


def clean_job(config, job_id: str, *, out) -> list[str]:
    """Stop the job's wrappers, undo their entries; one line to ``out`` per thing done; the problems left."""
    journal = Journal(config.journal_dir, config.lock_timeout_s)
    if not os.path.isdir(config.journal_dir):
        return []  # no pilot and no VM job ever ran on this node
    try:
        journal.check()
        entries = job_entries(journal, job_id)
    except JournalError as exc:
        return [str(exc)]
    if not entries:
        _remove_slot_locks(config, job_id)
        return []  # the common case, every job's epilog: no node lock taken
    for entry in entries:
        if entry.owner.alive():
            # Give it the time it would have had from the batch system, then make sure.
            print(f"wrapper {entry.owner.pid} of {entry.slot} still runs: SIGTERM", file=out)
            entry.owner.signal(signal.SIGTERM)
            if not entry.owner.wait_gone(config.vmjob_stop_timeout_s + config.verify_timeout_s):
                print(f"wrapper {entry.owner.pid} of {entry.slot}: SIGKILL", file=out)
                entry.owner.signal(signal.SIGKILL)
                entry.owner.wait_gone(KILL_WAIT_S)
    problems = []
    try:
        with journal.lock():
            for entry in job_entries(journal, job_id):
                if entry.owner.alive():
                    problems.append(f"wrapper {entry.owner.pid} of {entry.slot} did not end; its entry stays")
                    continue
                try:
                    done = undo_entry(journal, entry, config.verify_timeout_s)
                except (BackendError, JournalError, VmCleanupError) as exc:
                    problems.append(f"could not undo {entry.slot}: {exc}")
                    continue
                print(f"undid {entry.slot} of wrapper {entry.owner.pid}: {done}", file=out)
    except NodeLockError as exc:
        return [str(exc)]
    if not problems:
        _remove_slot_locks(config, job_id)
    return problems


def _remove_slot_locks(config, job_id: str) -> None:
    """The job's slot lock files: no run of the job can start once its epilog runs."""
    for path in glob.glob(os.path.join(glob.escape(config.vmjob_run_dir), f"job{glob.escape(job_id)}.*.lock")):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
