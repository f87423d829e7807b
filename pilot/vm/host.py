"""One slot's VMs on this node, through libvirt.

:class:`VmHost` starts the VMs the service asks for (after
:func:`pilot.vm.check.check_spec`; the start path is
:class:`pilot.vm.starts.VmStarts`), stops them, notices the ones that
ended on their own, and at the lease's end destroys every domain that
carries this slot's tag, whether or not it remembers starting it.
Domains are transient and tagged from creation; their names are
``wp-<first 8 characters of the slot>-<VM name>``, unique across the
slots of a node. ``libvirt`` is imported only when a connection is first
needed, so a pilot that never hosts a VM never loads it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from pilot.vm.books import BookedVm, VmInfo, VmOutcome, VmTeardownError
from pilot.vm.check import VmPolicy
from pilot.vm.cleanup import destroy_domain
from pilot.vm.domains import ERR_NO_DOMAIN, destroy_if_active, import_libvirt, is_active, shutdown_and_wait
from pilot.vm.domainxml import choose_virt_type
from pilot.vm.guestuser import GuestUser, guest_user
from pilot.vm.seed import remove_seeds, seed_path
from pilot.vm.guesttalk import VmGuestTalk
from pilot.vm.starts import VmStarts
from pilot.vm.tag import VmTag, read_tag, tagged_domains
from pilot.vm.vmfiles import remove_paths, remove_slot_vm_files, remove_vm_files
from workspace_common.errors import one_line
from workspace_common.nodenames import slot_domain_prefix
from workspace_common.protocol import VmSpec

__all__ = ["VmHost", "VmInfo", "VmOutcome", "VmTeardownError"]  # the outcomes live in pilot.vm.books

log = logging.getLogger(__name__)


class VmHost(VmStarts, VmGuestTalk):
    """The VMs of one slot on one libvirt connection; every method is thread-safe.

    ``connect`` returns a libvirt connection; it is called once, when one is
    first needed. ``before_first_vm(uri)`` is called once, before the first
    domain is ever created (it journals that VMs may exist); if it raises,
    no VM is created. ``vms_journalled`` says the journal already records
    VMs for this slot (a resumed slot): teardown then looks for them even
    if this host started none. ``warning()`` is the lease channel's line
    once the pilot has warned its VMs (None before): a VM started later is
    told at its start. ``lease_end()`` is when the VMs will be stopped (a
    :class:`pilot.vm.features.LeaseEnd`; None: no features are given).
    ``networks`` (a
    :class:`pilot.net.nodenets.NodeNetworks`) builds the lease network a VM
    with a ``nic`` joins, before its domain is made (None: such a VM is
    refused). Refusals are results, not exceptions.
    """

    def __init__(
        self,
        connect: Callable[[], object],
        *,
        slot: str,
        lease: str,
        pilot_pid: int,
        policy: VmPolicy,
        reserved_mb: int,
        virt_type: str = "auto",
        before_first_vm: Callable[[str], None] = lambda uri: None,
        uri: str = "",
        vms_journalled: bool = False,
        images=None,
        warning: Callable[[], str | None] = lambda: None,
        networks=None,
        lease_end: Callable[[], object] = lambda: None,
    ):
        self._connect = connect
        self.lease_end = lease_end  # when the VMs will be stopped: the guests' Machine/Job Features
        self.networks = networks  # a pilot.net.nodenets.NodeNetworks: the lease networks VMs with a nic join
        self.warning = warning  # the lease channel's line once the pilot warned its VMs: told to a VM at its start
        self.images = images  # a pilot.images.fetch.NodeImages: where images named by a list come from
        self.slot = slot
        self.tag = VmTag(slot, lease, pilot_pid)
        self.policy = policy
        self.reserved_mb = reserved_mb
        self.uri = uri
        self._configured_virt_type = virt_type
        self._virt_type: str | None = None
        self._guest_user: GuestUser | None | object = _UNKNOWN  # whom libvirt runs the guests as, once asked
        self._before_first_vm = before_first_vm
        self._journalled = False  # before_first_vm has succeeded: never call it again
        self._may_have_vms = vms_journalled  # teardown must look (set before the hook runs)
        self._lock = threading.Lock()
        self._stopping = threading.Event()  # set by interrupt/teardown/close: cuts hashing and shutdown waits
        self._conn = None
        self._vms: dict[str, BookedVm] = {}
        self._gone: dict[str, BookedVm] = {}  # ended on their own, not yet handed out by gone()
        self._pending: dict[str, int] = {}  # name -> memory (with overhead) of starts being checked

    def domain_name(self, name: str) -> str:
        """The libvirt domain name of this slot's VM ``name``."""
        return slot_domain_prefix(self.slot) + name

    # -- stop ----------------------------------------------------------------------------------

    def stop(self, name: str, *, force: bool = False, timeout_s: float = 30.0) -> VmOutcome:
        """Stop this slot's VM ``name``: ask the guest to shut down; destroy it if it still runs after ``timeout_s``.

        ``force`` destroys it at once. Only a domain whose tag names
        this slot is touched; any other domain of that name is refused as
        "not a VM of this slot". A teardown or close meanwhile cuts the
        wait short.
        """
        libvirt, missing = import_libvirt()
        if libvirt is None:
            return VmOutcome(False, name, missing)
        domain, refused = self._own_domain(libvirt, name, forget_gone=True)
        if domain is None:
            return refused
        domain_name = self.domain_name(name)
        started = time.monotonic()
        try:
            if not force and domain.info()[0] == libvirt.VIR_DOMAIN_PAUSED:
                domain.resume()  # a paused guest cannot hear the shutdown request
            if not force:
                if shutdown_and_wait(domain, timeout_s, self._stopping):
                    how = f"shut down in {time.monotonic() - started:.1f} s"
                    self._forget(name)
                    log.info("stopped VM %s (%s)", name, how)
                    return VmOutcome(True, name, how)
            if destroy_if_active(domain):
                how = "destroyed" if force else f"destroyed after {time.monotonic() - started:.1f} s without shutting down"
            else:
                how = "already gone"
        except libvirt.libvirtError as exc:
            return VmOutcome(False, name, f"libvirt could not stop {domain_name}: {one_line(exc)}")
        self._forget(name)
        log.info("stopped VM %s (%s) in %.1f ms", name, how, (time.monotonic() - started) * 1000)
        return VmOutcome(True, name, how)

    def _own_domain(self, libvirt, name: str, *, forget_gone: bool = False):
        """(this slot's domain of VM ``name``, None), or (None, the refusal): no such domain, another slot's, or
        libvirt could not say. With ``forget_gone`` a VM on the books whose domain is gone is an ``ok`` outcome."""
        domain_name = self.domain_name(name)
        with self._lock:
            try:
                conn = self._connection()
                domain = conn.lookupByName(domain_name)
                tag = read_tag(domain)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != ERR_NO_DOMAIN:
                    return None, VmOutcome(False, name, f"{self.uri or 'libvirt'}: {one_line(exc)}")
                if forget_gone and (self._vms.pop(name, None) or self._gone.pop(name, None)):
                    return None, VmOutcome(True, name, "already gone (it ended on its own)")
                return None, VmOutcome(False, name, f"not a VM of this slot: no domain {domain_name} on this node")
            if tag is None or tag.slot != self.slot:
                owner = "has no pilot tag" if tag is None else f"belongs to slot {tag.slot}"
                return None, VmOutcome(False, name, f"not a VM of this slot: domain {domain_name} {owner}")
        return domain, None

    def pause(self, name: str, *, resume: bool = False) -> VmOutcome:
        """Suspend this slot's VM ``name`` (its vCPUs stop; it keeps its memory), or with ``resume`` let it run
        again. A VM already in the state asked for is an ``ok`` outcome; only this slot's domains are touched."""
        libvirt, missing = import_libvirt()
        if libvirt is None:
            return VmOutcome(False, name, missing)
        domain, refused = self._own_domain(libvirt, name)
        if domain is None:
            return refused
        started = time.monotonic()
        try:
            paused = domain.info()[0] == libvirt.VIR_DOMAIN_PAUSED
            if paused == (not resume):
                return VmOutcome(True, name, "already " + ("paused" if paused else "running"))
            domain.resume() if resume else domain.suspend()
        except libvirt.libvirtError as exc:
            return VmOutcome(False, name, f"libvirt could not {'resume' if resume else 'suspend'} "
                                          f"{self.domain_name(name)}: {one_line(exc)}")
        how = f"{'resumed' if resume else 'suspended'} in {(time.monotonic() - started) * 1000:.1f} ms"
        log.info("VM %s %s", name, how)
        return VmOutcome(True, name, how)

    def _forget(self, name: str) -> None:
        with self._lock:
            for books in (self._vms, self._gone):
                vm = books.pop(name, None)
                if vm is not None:
                    vm.let_go()
                    self._remove_guest_files(vm.domain_name)
                    self._leave_network(vm.spec)

    def _undo_start(self, spec: VmSpec, domain_name: str) -> None:
        """A start that made files (and let the VM onto its network) but no domain: undo both."""
        self._remove_guest_files(domain_name)
        self._leave_network(spec)

    def _leave_network(self, spec: VmSpec) -> None:
        """The VM is gone (or never came): its forward, filter and DHCP entry go."""
        if spec.nic is not None and self.networks is not None:
            self.networks.detach(spec.nic)

    def apply_network(self, state) -> str:
        """A ``network`` command's newer state of a lease network; what was done (one line). Raises NetError."""
        if self.networks is None:
            return "this node hosts no lease networks: ignored"
        return self.networks.apply(state)

    def _remove_guest_files(self, domain_name: str) -> None:
        """Remove the VM's seed and overlay (its domain is gone, or was never made)."""
        if self.policy.seed_dir is not None:
            remove_paths([seed_path(self.policy.seed_dir, domain_name)])
        if self.policy.disks is not None:
            remove_vm_files(self.policy.disks.directory, domain_name)

    # -- books ---------------------------------------------------------------------------------

    def vms(self) -> list[VmInfo]:
        """The VMs this host started and has not stopped or handed out as gone, by name."""
        with self._lock:
            self._collect_gone()
            infos = [VmInfo(n, vm.domain_name, vm.spec.memory_mb, "running") for n, vm in self._vms.items()]
            infos += [VmInfo(n, vm.domain_name, vm.spec.memory_mb, "gone") for n, vm in self._gone.items()]
        return sorted(infos, key=lambda info: info.name)

    def gone(self) -> list[str]:
        """Names of VMs this host started that have ended on their own since the last call (forgotten now)."""
        with self._lock:
            self._collect_gone()
            names = sorted(self._gone)
            self._gone.clear()
        return names

    def _collect_gone(self) -> None:
        """Under the lock: move VMs whose domains are no longer active from the books to ``_gone``."""
        if self._conn is None:
            return
        import libvirt

        for name, vm in list(self._vms.items()):
            try:
                active = is_active(vm.domain)
            except libvirt.libvirtError as exc:
                # Unknown is not gone: keep it on the books (and its memory counted) until libvirt answers.
                log.warning("cannot tell whether VM %s still runs: %s", name, one_line(exc))
                continue
            if not active:
                log.info("VM %s (domain %s) ended on its own", name, vm.domain_name)
                vm.let_go()
                self._remove_guest_files(vm.domain_name)
                self._leave_network(vm.spec)
                self._gone[name] = self._vms.pop(name)

    def _in_use_mb(self) -> int:
        overhead = self.policy.overhead_mb
        return sum(vm.spec.memory_mb + overhead for vm in self._vms.values()) + sum(self._pending.values())

    # -- teardown ------------------------------------------------------------------------------

    def teardown(self) -> list[str]:
        """Destroy every domain on the connection tagged with this slot; the VM names destroyed.

        Found by tag, not from this host's books (a crash may have left
        some); other slots' domains and untagged ones are never touched.
        Refuses new starts from now on. If no VM was ever started and none
        journalled, returns at once without opening a connection. Raises
        :class:`VmTeardownError` after trying them all if any could not be
        destroyed, or if libvirt could not be asked.
        """
        began = time.monotonic()
        self._stopping.set()
        with self._lock:
            if not self._may_have_vms:
                return []  # nothing was ever created or journalled: keep the restore fast
            import libvirt

            try:
                conn = self._connection()
                found = [(d, t) for d, t in tagged_domains(conn) if t.slot == self.slot]
            except libvirt.libvirtError as exc:
                raise VmTeardownError(f"cannot list the VMs at {self.uri or 'libvirt'}: {one_line(exc)}", []) from None
            destroyed, problems = [], []
            for domain, _tag in found:
                domain_name = domain.name()
                name = self._vm_name(domain_name)
                started = time.monotonic()
                try:
                    destroy_domain(domain)
                except libvirt.libvirtError as exc:
                    log.error("could not destroy VM %s (domain %s): %s", name, domain_name, one_line(exc))
                    problems.append(f"{domain_name}: {one_line(exc)}")
                    continue
                log.info("destroyed VM %s (domain %s) in %.1f ms", name, domain_name, (time.monotonic() - started) * 1000)
                destroyed.append(name)
                for books in (self._vms, self._gone):
                    vm = books.pop(name, None)
                    if vm is not None:
                        vm.let_go()
            if self.policy.seed_dir is not None:
                remove_seeds(self.policy.seed_dir, self.domain_name(""))
            if self.policy.disks is not None:
                remove_slot_vm_files(self.policy.disks.directory, self.domain_name(""))
            log.info("teardown of slot %s: %d VM(s) destroyed in %.1f ms",
                     self.slot, len(destroyed), (time.monotonic() - began) * 1000)
        if problems:
            raise VmTeardownError("could not destroy " + "; ".join(problems), destroyed)
        return destroyed

    def interrupt(self) -> None:
        """Cut short any shutdown wait or image hashing under way, and refuse new starts (teardown does this too).

        A stop whose wait is cut destroys its VM; a start being hashed is refused.
        """
        self._stopping.set()

    def _vm_name(self, domain_name: str) -> str:
        prefix = self.domain_name("")
        return domain_name[len(prefix):] if domain_name.startswith(prefix) else domain_name

    def close(self) -> None:
        """Stop waiting on anything and close the connection ``connect`` gave (VMs keep running: see :meth:`teardown`)."""
        self._stopping.set()
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                except Exception as exc:  # libvirtError: closing is best effort
                    log.warning("closing the libvirt connection: %s", one_line(exc))
                self._conn = None

    # -- connection ----------------------------------------------------------------------------

    def _connection(self):
        """Under the lock: the connection, opened on first use."""
        if self._conn is None:
            from pilot.libvirtconn import libvirt_module

            libvirt_module()  # with its stderr printing off: errors come as exceptions
            self._conn = self._connect()
        return self._conn

    def _resolve_virt_type(self, conn) -> str:
        if self._virt_type is None:
            self._virt_type = choose_virt_type(conn.getType(), self._configured_virt_type)
        return self._virt_type

    def _resolve_guest_user(self, conn, virt_type: str) -> GuestUser | None:
        if self._guest_user is _UNKNOWN:
            self._guest_user = guest_user(conn.getCapabilities(), virt_type)
        return self._guest_user


_UNKNOWN = object()


