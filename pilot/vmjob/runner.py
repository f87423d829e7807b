"""One VM job from start to end, in the order that leaves nothing behind.

1. hold the slot's lock (one VM per job and node);
2. check the VM (:func:`pilot.vm.check.check_spec`: the image's files and
   their sha256, the memory) before anything on the node changes;
3. take the VM's memory from the host through the node's backend (the
   journal entry first, dead pilots' and jobs' entries undone first);
4. journal the run directory, make it; journal the libvirt URI; start the
   shares' daemons as the job's user; create the tagged, transient domain;
5. copy the guest's output as it comes, until the guest's exit status is
   there (the guest then powers off), the VM ends without one, or a signal
   asks to stop (the guest gets ``stop_timeout`` s to power off):
   :mod:`pilot.vmjob.follow`;
6. destroy the domain, stop the daemons, remove the run directory, give the
   memory back; the journal entry goes last.

A wrapper killed at any point leaves its journal entry, which the next
pilot, ``workspace-vmjob epilog`` or ``workspace-killall`` undoes
(:func:`pilot.recovery.undo_entry`): destroy the slot's VMs by tag,
remove the run directory, give back the memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

from pilot.node.backends import BackendError
from pilot.node.journal import Entry, Journal, JournalError
from pilot.node.lock import NodeLockError
from pilot.node.memory import NodeMemory, TakeAborted
from pilot.recovery import replay_dead
from pilot.node.owner import Owner
from workspace_common.errors import one_line
from pilot.vm.check import VmPolicy, VmRefused, check_spec
from pilot.vm.cleanup import VmCleanupError, destroy_domain, destroy_slot_vms
from pilot.vm import vmprep
from pilot.vm.domainxml import choose_virt_type, render_domain
from pilot.vm.guestuser import guest_user
from pilot.vm.tag import VmTag
from pilot.vm.vmfiles import remove_vm_files
from pilot.vmjob.catalog import JobImage
from pilot.vmjob.exitcodes import VmJobExit
from pilot.vmjob.jobshare import (
    UNLIMITED, JobShareError, cpuset_text, job_cpus, job_memory_cgroup, lower_limit, read_limit, restore_limit,
)
from pilot.vmjob.follow import RESTORE_RESERVE_S, GuestFollow, JobFailed, guest_stop_wait
from pilot.vmjob.rundir import (
    SHARE_TAGS, RunDir, RunDirError, SlotBusy, job_domain_name, remove_run_dir,
)
from pilot.vmjob.virtiofs import ShareDaemon, ShareError
from pilot.wakeup import Wakeup

__all__ = ["RESTORE_RESERVE_S", "JobFailed", "JobRequest", "VmJob", "guest_stop_wait"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class JobRequest:
    """What to run and as whom: the slot (one per job and node), the command file, the job's directory and
    user, and the VM's size."""

    slot: str
    host: str
    image: JobImage
    command: bytes
    workdir: str
    uid: int
    gid: int
    memory_mb: int
    cpus: int
    job_id: str | None = None
    """The batch job it runs in (None: root, outside any job): the VM comes out of that job's share."""
    kill_wait_s: float | None = None
    """The batch system's time between its SIGTERM and its SIGKILL (Slurm's KillWait), if known."""


class VmJob(GuestFollow):
    """Runs one :class:`JobRequest`; :meth:`run` returns the guest's exit status or raises :class:`JobFailed`.

    ``stop`` (set from a signal handler) ends the job early: the guest gets
    ``config.vmjob_stop_timeout_s`` to power off, then its VM is destroyed.
    ``moments`` collects when each phase ended (seconds since ``started``).
    """

    def __init__(self, config, journal: Journal, backend, request: JobRequest, *, stop: Wakeup,
                 started: float):
        self.config = config
        self.journal = journal
        self.backend = backend
        self.request = request
        self.stop = stop
        self.started = started
        self.moments: dict[str, float] = {}
        self.run_dir = RunDir(config.vmjob_run_dir, request.slot, config.vmjob_run_size_mb)
        self.uri = config.vm_uri
        self.memory: NodeMemory | None = None
        self.daemons: list[ShareDaemon] = []
        self.domain = None
        self.conn = None

    def mark(self, name: str) -> None:
        """Record that phase ``name`` ended now."""
        self.moments.setdefault(name, round(time.monotonic() - self.started, 4))

    @property
    def domain_name(self) -> str:
        """The libvirt name of the job's domain."""
        return job_domain_name(self.request.slot)

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> int:
        """Run the job; the guest's exit status (0-255). Raises :class:`JobFailed`; the node is restored
        either way, or the failure is ``RESTORE_FAILED`` with the journal keeping what is left."""
        try:
            lock_fd = self.run_dir.lock()
        except SlotBusy as exc:
            raise JobFailed(VmJobExit.ALLOCATION, str(exc)) from None
        except RunDirError as exc:
            raise JobFailed(VmJobExit.CONFIG, str(exc)) from None
        try:
            checked = self._check()
            failure: JobFailed | None = None
            status = None
            try:
                self._take_memory()
                self._share_with_job()
                status = self._run_vm(checked)
            except JobFailed as exc:
                failure = exc
            finally:
                restore_problem = self._restore()
            if restore_problem:
                raise JobFailed(VmJobExit.RESTORE_FAILED, restore_problem)
            if failure is not None:
                raise failure
            return status
        finally:
            self.run_dir.unlock(lock_fd, remove=self.request.slot.startswith("vmjob"))
            log.info("vmjob timings %s", json.dumps(self.moments, sort_keys=True))

    def _policy(self) -> VmPolicy:
        config = self.config
        return VmPolicy(
            image_dir=config.image_dir, console_dir=config.console_dir, overhead_mb=config.vm_overhead_mb,
            hugepage_kb=config.hugepage_kb if config.backend == "hugepages" else None, disks=config.disk_budget,
        )

    def _check(self):
        request = self.request
        # No console log here: it goes in the run directory's tmpfs, once that exists (see _run_vm).
        spec = request.image.spec("job", memory_mb=request.memory_mb, vcpus=request.cpus, console_log=None)
        policy = self._policy()
        try:
            checked = check_spec(spec, policy, reserved_mb=request.memory_mb + policy.overhead_mb, in_use_mb=0,
                                 cancel=self.stop)
        except VmRefused as exc:
            raise JobFailed(VmJobExit.IMAGE, f"image {request.image.name}: {exc}") from None
        if request.image.network == "user":
            checked = dataclasses.replace(checked, interface={"type": "user"})
        self.mark("image_ready")
        return checked

    def _take_memory(self) -> None:
        request, config = self.request, self.config
        entry = Entry(request.slot, request.host, Owner.current())
        self.memory = NodeMemory(self.journal, self.backend, entry, minmem_mb=config.minmem_mb,
                                 verify_timeout=config.verify_timeout_s, replay=replay_dead)
        need = request.memory_mb + config.vm_overhead_mb
        try:
            self.memory.take(need, should_stop=self.stop.is_set)
        except (JournalError, NodeLockError) as exc:
            raise JobFailed(VmJobExit.JOURNAL, one_line(exc)) from None
        except BackendError as exc:
            raise JobFailed(VmJobExit.VM_FAILED, f"cannot set aside {need} MB for the VM: {one_line(exc)}") from None
        except TakeAborted:
            raise JobFailed(VmJobExit.VM_FAILED, "stopped before the VM started") from None
        self.mark("memory_taken")

    def _share_with_job(self) -> None:
        """Lower the job's memory limit by what the VM takes from the host (journalled first; see jobshare)."""
        request = self.request
        directory = job_memory_cgroup(request.job_id) if request.job_id else None
        if directory is None:
            return
        try:
            limit = read_limit(directory)
        except (OSError, ValueError) as exc:
            raise JobFailed(VmJobExit.ALLOCATION, f"cannot read the job's memory limit in {directory}: {exc}") from None
        if limit >= UNLIMITED:
            return
        need = request.memory_mb + self.config.vm_overhead_mb
        try:
            self.memory.note_job_limit((directory, limit))
        except JournalError as exc:
            raise JobFailed(VmJobExit.JOURNAL, one_line(exc)) from None
        try:
            lowered = lower_limit(directory, limit, need)
        except JobShareError as exc:
            raise JobFailed(VmJobExit.ALLOCATION, str(exc)) from None
        log.info("job %s: memory limit %d -> %d MB while its VM runs", request.job_id, limit >> 20, lowered >> 20)
        self.mark("job_limit_lowered")

    def _run_vm(self, checked) -> int:
        request, config = self.request, self.config
        try:
            self.memory.note_run_dir(self.run_dir.path)
            self.run_dir.make(request.command, request.uid, request.gid)
            self.memory.note_vms(self.uri)
        except (JournalError, RunDirError) as exc:
            raise JobFailed(VmJobExit.JOURNAL if isinstance(exc, JournalError) else VmJobExit.CONFIG,
                            one_line(exc)) from None
        sources = {"control": self.run_dir.control, "workdir": request.workdir}
        for tag in SHARE_TAGS:
            daemon = ShareDaemon(
                tag, sources[tag], self.run_dir.socket(tag), virtiofsd=config.vmjob_virtiofsd, uid=request.uid,
                gid=request.gid,
                log_path=os.path.join(config.log_dir, f"vmjob-{request.slot}.{tag}.virtiofsd.log"),
            )
            try:
                daemon.start()
            except ShareError as exc:
                raise JobFailed(VmJobExit.VM_FAILED, str(exc)) from None
            self.daemons.append(daemon)
        # The console goes where the job's other files are: the slot's capped tmpfs, removed with it.
        self._create_domain(dataclasses.replace(checked, console=self.run_dir.console))
        return self._follow()

    def _create_domain(self, checked) -> None:
        from pilot.libvirtconn import libvirt_module, open_connection

        try:
            libvirt = libvirt_module()
        except ImportError as exc:
            raise JobFailed(VmJobExit.VM_FAILED, f"libvirt-python is missing ({exc})") from None
        try:
            self.conn = open_connection(self.uri)
            virt_type = choose_virt_type(self.conn.getType(), self.config.virt_type)
            disks = self.config.disk_budget
            user = guest_user(self.conn.getCapabilities(), virt_type)
            planned = vmprep.plan(checked, domain_name=self.domain_name, disks=disks, user=user)
            xml = render_domain(
                planned, domain_name=self.domain_name, virt_type=virt_type,
                tag=VmTag(self.request.slot, "", os.getpid()), hugepage_kb=self._policy().hugepage_kb,
                # Inside a batch job its guest runs on the job's cores only (see pilot.vmjob.jobshare).
                cpuset=cpuset_text(job_cpus()) if self.request.job_id else None,
                shares=tuple((tag, self.run_dir.socket(tag)) for tag in SHARE_TAGS),
            )
            if self.stop.is_set():
                raise JobFailed(VmJobExit.VM_FAILED, "stopped before the VM started")
            # The journal says VMs may exist (note_vms): whoever undoes the job removes these files too.
            vmprep.make(planned, checked, domain_name=self.domain_name, disks=disks, user=user, image_cache_dir=None)
            self.run_dir.open_sockets_to(user, SHARE_TAGS)
            self.domain = self.conn.createXML(xml, 0)
        except (libvirt.libvirtError, ValueError, VmRefused, OSError) as exc:
            for daemon in self.daemons:
                daemon.drain()
            why = "; ".join(filter(None, (daemon.failed() for daemon in self.daemons)))
            raise JobFailed(VmJobExit.VM_FAILED, f"the VM could not be started: {one_line(exc)}"
                            + (f" ({why})" if why else "")) from None
        self.mark("domain_created")
        log.info("VM %s created (%d MB, %d cores) for slot %s", self.domain_name, self.request.memory_mb,
                 self.request.cpus, self.request.slot)


    # -- restore -------------------------------------------------------------------------------

    def _restore(self) -> str | None:
        """Undo everything this run did, in reverse; None, or what could not be undone (journal keeps it)."""
        problems = []
        memory = self.memory
        if memory is not None and memory.entry.vm_uri:
            try:
                if self.domain is not None:
                    destroy_domain(self.domain)
                else:
                    # Journalled, but createXML never handed a domain back: look for one by tag all the same.
                    destroy_slot_vms(self.uri, self.request.slot)
                remove_vm_files(self.config.disk_budget.directory, self.domain_name)
                memory.note_vms(None)
            except (VmCleanupError, JournalError, OSError) as exc:
                problems.append(one_line(exc))
            except Exception as exc:  # libvirtError from destroy_domain
                problems.append(f"cannot destroy VM {self.domain_name}: {one_line(exc)}")
            self.mark("domain_destroyed")
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # libvirtError: closing is best effort
                pass
        for daemon in self.daemons:
            daemon.stop()
        if self.daemons:
            self.mark("shares_stopped")
        if memory is not None and memory.entry.job_limit and not problems:
            try:
                restore_limit(*memory.entry.job_limit)
                memory.note_job_limit(None)
            except JournalError as exc:
                problems.append(one_line(exc))
            except OSError as exc:
                problems.append(f"cannot give the job its memory limit back: {exc.strerror}")
        if memory is not None and memory.entry.run_dir and not problems:
            try:
                remove_run_dir(self.run_dir.path)
                memory.note_run_dir(None)
            except (VmCleanupError, JournalError) as exc:
                problems.append(one_line(exc))
        if memory is not None and not problems:
            try:
                memory.give_back()
            except (BackendError, JournalError, NodeLockError) as exc:
                problems.append(f"the VM's memory could not be given back: {one_line(exc)}")
        self.mark("restored")
        if problems:
            log.critical("VM job %s not fully undone: %s", self.request.slot, "; ".join(problems))
            return "; ".join(problems) + "; the node journal keeps it for workspace-vmjob epilog or workspace-killall"
        return None


