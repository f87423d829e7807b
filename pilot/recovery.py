"""Node recovery: undo a dead pilot's journal entry, part by part, and every dead owner's at the node lock.

Above the memory layer (:mod:`pilot.node`), the VMs (:mod:`pilot.vm`), VM
jobs (:mod:`pilot.vmjob`) and lease networks (:mod:`pilot.net`): it knows
the order a node is given back in (VMs, their files, networks, a VM job's
memory limit and run directory, then the memory), and each part's own
module does its part. The memory layer is handed :func:`replay_dead`
(``NodeMemory(replay=...)``) and imports none of them.
"""

from __future__ import annotations

import dataclasses
import logging

from pilot.node.backends import BackendError
from pilot.node.journal import Entry, Journal, JournalError, UnreadableEntry
from pilot.node.memory import undo_memory
from pilot.vm.cleanup import VmCleanupError, destroy_slot_vms

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ReplayReport:
    """What :func:`replay_dead` found and did."""

    undone: list[tuple[Entry, str]] = dataclasses.field(default_factory=list)
    failed: list[tuple[Entry, str]] = dataclasses.field(default_factory=list)
    unreadable: list[UnreadableEntry] = dataclasses.field(default_factory=list)
    live: list[Entry] = dataclasses.field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Whether every dead owner's change was undone and nothing unreadable is left."""
        return not self.failed and not self.unreadable


def undo_entry(journal: Journal, entry: Entry, verify_timeout: float) -> str:
    """Undo what ``entry`` holds and remove it; the caller holds the node lock and knows the owner is gone.

    Returns a line saying what was done. Raises BackendError or JournalError
    when the node could not be restored (the entry then stays).
    """
    vms = ""
    if entry.vm_uri:
        # VMs first: their memory is what the restore gives back to the host.
        destroyed = destroy_slot_vms(entry.vm_uri, entry.slot)
        # Imported here, as the parts below: a pilot's start (which hands replay_dead to its memory) stays lean.
        from pilot.vm.seed import remove_seeds, seed_dir_of
        from pilot.vm.vmfiles import remove_slot_vm_files, remove_vm_files, vm_files_dir_of
        from pilot.vmjob.rundir import job_domain_name
        from workspace_common.nodenames import slot_domain_prefix

        # The files of its VMs: a lease's are named by the slot's prefix, a VM job's after its one domain.
        remove_seeds(seed_dir_of(journal.directory), slot_domain_prefix(entry.slot))
        remove_slot_vm_files(vm_files_dir_of(journal.directory), slot_domain_prefix(entry.slot))
        remove_vm_files(vm_files_dir_of(journal.directory), job_domain_name(entry.slot))
        vms = f"destroyed VM(s) {', '.join(destroyed)}; " if destroyed else "no VM of its slot left; "
    if entry.nets:
        # After the VMs (nothing is on the bridges any more), before the memory: a pilot's networks go with it.
        from pilot.net.cleanup import remove_network
        from pilot.net.commands import NetError

        for name in entry.nets:
            try:
                removed = remove_network(name, entry.net_root)
            except (NetError, ValueError) as exc:
                raise VmCleanupError(f"cannot remove network {name}: {exc}") from None
            vms += f"removed network {name} ({', '.join(removed) or 'nothing left of it'}); "
    if entry.job_limit:
        # After the VM: its batch job gets back the memory limit it had before its VM.
        from pilot.vmjob.jobshare import restore_limit

        try:
            restore_limit(*entry.job_limit)
        except OSError as exc:
            raise BackendError(f"cannot give job cgroup {entry.job_limit[0]} its memory limit back: "
                               f"{exc.strerror}") from None
        vms += f"gave job cgroup {entry.job_limit[0]} its memory limit back; "
    if entry.run_dir:
        # After the VMs: a VM job's virtiofs daemons end with its VM; then its control files can go.
        from pilot.vmjob.rundir import remove_run_dir

        remove_run_dir(entry.run_dir)
        vms += f"removed {entry.run_dir}; "
    return vms + undo_memory(journal, entry, verify_timeout)


def replay_dead(journal: Journal, verify_timeout: float) -> ReplayReport:
    """Undo the entry of every owner that no longer runs; the caller holds the node lock."""
    report = ReplayReport()
    for entry in journal.entries():
        if isinstance(entry, UnreadableEntry):
            log.error("journal entry %s is unreadable (%s): only workspace-killall or an admin can judge it",
                      entry.filename, entry.reason)
            report.unreadable.append(entry)
            continue
        if entry.owner.alive():
            report.live.append(entry)
            continue
        try:
            done = undo_entry(journal, entry, verify_timeout)
        except (BackendError, JournalError, VmCleanupError) as exc:
            log.critical("could not undo slot %s of dead pilot %d: %s", entry.slot, entry.owner.pid, exc)
            report.failed.append((entry, str(exc)))
            continue
        log.warning("undid slot %s on %s of dead pilot %d: %s", entry.slot, entry.host, entry.owner.pid, done)
        report.undone.append((entry, done))
    return report
