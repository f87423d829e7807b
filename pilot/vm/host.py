"""One slot's VMs on this node, through libvirt.

:class:`VmHost` starts the VMs the service asks for (after
:func:`pilot.vm.check.check_spec`), stops them, notices the ones that
ended on their own, and at the lease's end destroys every domain that
carries this slot's tag, whether or not it remembers starting it.
Domains are transient and tagged from creation; their names are
``wp-<first 8 characters of the slot>-<VM name>``, unique across the
slots of a node. ``libvirt`` is imported only when a connection is first
needed, so a pilot that never hosts a VM never loads it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Callable

from pilot.vm import vmprep
from pilot.vm.domainxml import LEASE_CHANNEL, choose_virt_type, render_domain
from pilot.vm.guestuser import GuestUser, guest_user
from workspace_common.protocol import VmSpec
from workspace_common.errors import one_line
from pilot.vm.check import VmPolicy, VmRefused, check_memory, check_spec, known_sha256
from pilot.vm.cleanup import VmCleanupError, destroy_domain
from pilot.vm.seed import remove_seeds, seed_files, seed_path, write_seed
from workspace_common.nodenames import slot_domain_prefix
from pilot.vm.vmfiles import remove_paths, remove_slot_vm_files, remove_vm_files
from pilot.vm.tag import VmTag, read_tag, tagged_domains

log = logging.getLogger(__name__)

# libvirt's VIR_ERR_NO_DOMAIN, without importing libvirt at module level.
_ERR_NO_DOMAIN = 42
#: How long one write to a VM's lease channel may block (a guest that does not read fills it).
CHANNEL_TIMEOUT_S = 1.0


@dataclasses.dataclass(frozen=True)
class VmOutcome:
    """What became of a start or a stop: ``ok``, the VM's ``name``, and ``reason``.

    ``reason`` is one line: why it was refused, or, when ``ok``, how it went
    (e.g. "shut down in 0.4 s").
    """

    ok: bool
    name: str
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class VmInfo:
    """A VM this host started: its name, its domain's name, its memory, and ``state`` "running" or "gone"."""

    name: str
    domain_name: str
    memory_mb: int
    state: str


class VmTeardownError(VmCleanupError):
    """Teardown could not destroy everything of this slot; ``destroyed`` lists what it did destroy."""

    def __init__(self, message: str, destroyed: list[str]):
        super().__init__(message)
        self.destroyed = destroyed


@dataclasses.dataclass
class _Vm:
    spec: VmSpec
    domain_name: str
    domain: object
    holds: tuple[int, ...] = ()  # shared locks on the cached images it uses (eviction skips those)
    channel: object = None  # the connected socket of its lease channel (from its start, when libvirt gave one)
    told: tuple[str, ...] | None = None  # the warning it was given (its end and why), so it is given once

    def let_go(self) -> None:
        """Release the VM's hold on its cached images and its lease channel (it no longer runs)."""
        holds, self.holds = self.holds, ()
        for fd in holds:
            os.close(fd)
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.close()


class VmHost:
    """The VMs of one slot on one libvirt connection; every method is thread-safe.

    ``connect`` returns a libvirt connection; it is called once, when one is
    first needed. ``before_first_vm(uri)`` is called once, before the first
    domain is ever created (it journals that VMs may exist); if it raises,
    no VM is created. ``vms_journalled`` says the journal already records
    VMs for this slot (a resumed slot): teardown then looks for them even
    if this host started none. ``warning()`` is the lease channel's line
    once the pilot has warned its VMs (None before): a VM started later is
    told at its start. ``networks`` (a
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
    ):
        self._connect = connect
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
        self._vms: dict[str, _Vm] = {}
        self._gone: dict[str, _Vm] = {}  # ended on their own, not yet handed out by gone()
        self._pending: dict[str, int] = {}  # name -> memory (with overhead) of starts being checked

    def domain_name(self, name: str) -> str:
        """The libvirt domain name of this slot's VM ``name``."""
        return slot_domain_prefix(self.slot) + name

    # -- start ---------------------------------------------------------------------------------

    def start(self, spec: VmSpec, on_fetch: Callable[[str, int, int], None] | None = None) -> VmOutcome:
        """Check ``spec``, then create its transient, tagged domain; a refusal creates nothing.

        Images named by a list are fetched into the node's cache first
        (``on_fetch(label, bytes_so_far, size)`` follows the download); the
        images are fetched and hashed without holding the host's lock, so a
        stop or a teardown never waits for a large image; the VM's memory is
        held for it meanwhile, so two starts cannot both take the last of it.
        """
        name = spec.name
        with self._lock:
            if self._stopping.is_set():
                return VmOutcome(False, name, "the slot is being torn down; no new VMs")
            self._collect_gone()
            if name in self._vms or name in self._pending:
                return VmOutcome(False, name, f"a VM named {name} already runs in this slot; stop it first")
            in_use = self._in_use_mb()
            try:
                check_memory(spec, self.policy, reserved_mb=self.reserved_mb, in_use_mb=in_use)
            except VmRefused as exc:
                return VmOutcome(False, name, str(exc))
            self._pending[name] = spec.memory_mb + self.policy.overhead_mb
        holds: list[int] = []
        try:
            holds = self._cached_images(spec, on_fetch)
            checked = check_spec(
                spec, self.policy, reserved_mb=self.reserved_mb, in_use_mb=in_use, cancel=self._stopping
            )
        except BaseException as exc:
            with self._lock:
                self._pending.pop(name, None)
            for fd in holds:
                os.close(fd)
            if isinstance(exc, VmRefused):
                return VmOutcome(False, name, str(exc))
            raise
        with self._lock:
            # Released with the create, in one hold of the lock: the memory is never counted twice or not at all.
            self._pending.pop(name, None)
            outcome = self._create(spec, checked)
            if outcome.ok:
                self._vms[name].holds = tuple(holds)
                holds = []
        for fd in holds:
            os.close(fd)
        return outcome

    def prefetch(self, image, on_fetch: Callable[[str, int, int], None] | None = None) -> str:
        """Have a listed image in the node's cache ahead of the VMs that will use it; its path.

        Raises :class:`pilot.images.cache.CacheError` (one line); given up
        when the slot is torn down.
        """
        from pilot.images.cache import CacheError

        if self.images is None:
            raise CacheError("this node has no image cache")
        progress = (lambda done, size: on_fetch(image.label, done, size)) if on_fetch else None
        return self.images.ensure(image, cancel=self._stopping, progress=progress)

    def _cached_images(self, spec: VmSpec, on_fetch) -> list[int]:
        """Put the images ``spec`` names by list into the cache; the shared locks that keep them there."""
        from pilot.images.cache import CacheError

        named = [image for image in (spec.disk, spec.kernel, spec.initrd) if image is not None and image.named]
        if not named:
            return []
        if self.images is None:
            raise VmRefused(f"{named[0].label}: this node has no image cache; give a path in its image directory")
        holds: list[int] = []
        try:
            for image in named:
                progress = (lambda done, size, label=image.label: on_fetch(label, done, size)) if on_fetch else None
                path = self.images.ensure(image, cancel=self._stopping, progress=progress)
                holds.append(self.images.cache.hold(image.sha256))
                known_sha256(path, image.sha256)  # verified as it entered the cache (root's alone since)
        except (CacheError, OSError) as exc:
            for fd in holds:
                os.close(fd)
            raise VmRefused(one_line(exc)) from None
        except BaseException:
            for fd in holds:
                os.close(fd)
            raise
        return holds

    def _create(self, spec: VmSpec, checked) -> VmOutcome:
        """Under the lock: journal hook, render, createXML."""
        name = spec.name
        libvirt, missing = _import_libvirt()
        if libvirt is None:
            return VmOutcome(False, name, missing)
        if self._stopping.is_set():
            return VmOutcome(False, name, "the slot is being torn down; no new VMs")
        try:
            conn = self._connection()
            virt_type = self._resolve_virt_type(conn)
            user = self._resolve_guest_user(conn, virt_type)
        except (libvirt.libvirtError, ValueError) as exc:
            return VmOutcome(False, name, f"{self.uri or 'libvirt'}: {one_line(exc)}")
        domain_name = self.domain_name(name)
        if spec.context is not None:
            checked = dataclasses.replace(checked, seed=seed_path(self.policy.seed_dir, domain_name))
        if spec.nic is not None:
            if self.networks is None:
                return VmOutcome(False, name, "nic: this node hosts no lease networks (its pilot has no VM host "
                                              "networking); ask the site")
            # Its interface as it will be (the MTU is the network's): rendered now, so a refusal makes nothing.
            checked = dataclasses.replace(checked, interface=self.networks.interface(spec.nic))
        disks = self.policy.disks
        planned = vmprep.plan(checked, domain_name=domain_name, disks=disks, user=user)
        try:
            xml = render_domain(planned, domain_name=domain_name, virt_type=virt_type, tag=self.tag,
                                hugepage_kb=self.policy.hugepage_kb)
        except VmRefused as exc:
            return VmOutcome(False, name, str(exc))
        if not self._journalled:
            # Before the call: a hook that wrote the journal and then raised still makes teardown look.
            self._may_have_vms = True
            try:
                self._before_first_vm(self.uri)
            except Exception as exc:
                log.error("not starting VM %s: recording that VMs may exist failed: %s", name, exc)
                return VmOutcome(False, name, f"cannot record that VMs may exist on this node: {one_line(exc)}")
            self._journalled = True
        if spec.nic is not None:
            # After the journal says VMs may exist; the network journals itself before its first device.
            from pilot.net.commands import NetError

            try:
                interface = self.networks.attach(spec.nic)
            except NetError as exc:
                return VmOutcome(False, name, f"network {spec.nic.net.name}: {one_line(exc)}")
            checked = dataclasses.replace(checked, interface=interface)
            planned = dataclasses.replace(planned, interface=interface)
            # Again, now with the network's MTU (the first rendering checked everything else).
            xml = render_domain(planned, domain_name=domain_name, virt_type=virt_type, tag=self.tag,
                                hugepage_kb=self.policy.hugepage_kb)
        if checked.seed is not None:
            # After the journal says VMs may exist: whoever undoes this slot removes its seeds too.
            try:
                write_seed(checked.seed, seed_files(spec.context, instance_id=f"{self.slot}-{name}",
                                                    default_hostname=name, nic=spec.nic,
                                                    mtu=(checked.interface or {}).get("mtu")))
            except (OSError, ValueError) as exc:
                self._undo_start(spec, domain_name)
                return VmOutcome(False, name, f"context: cannot write the cloud-init seed: {one_line(exc)}")
        try:
            # After the journal too (the overlay under the node's disk budget): whoever undoes this slot removes them.
            vmprep.make(planned, checked, domain_name=domain_name, disks=disks, user=user,
                        image_cache_dir=self.policy.image_cache_dir)
        except (OSError, VmRefused) as exc:
            self._undo_start(spec, domain_name)
            return VmOutcome(False, name, one_line(exc))
        started = time.monotonic()
        try:
            domain = conn.createXML(xml, 0)
        except libvirt.libvirtError as exc:
            self._undo_start(spec, domain_name)
            return VmOutcome(False, name, f"libvirt refused the domain: {one_line(exc)}")
        vm = self._vms[name] = _Vm(spec, domain_name, domain)
        try:
            # Connected for the VM's life: a guest reading its port while no one is connected reads end-of-file.
            vm.channel = _open_channel(domain)
            line = self.warning()
            if line:  # started after the warning: it ends as soon as the others
                vm.channel.sendall((line + "\n").encode())
                vm.told = _warning_of(line)
        except (OSError, ValueError, libvirt.libvirtError) as exc:  # warn() tries again
            log.debug("VM %s: no lease channel to connect to yet: %s", name, one_line(exc))
        log.info("started VM %s as domain %s (%d MB) in %.1f ms",
                 name, domain_name, spec.memory_mb, (time.monotonic() - started) * 1000)
        return VmOutcome(True, name, f"running as {domain_name}")

    # -- stop ----------------------------------------------------------------------------------

    def stop(self, name: str, *, force: bool = False, timeout_s: float = 30.0) -> VmOutcome:
        """Stop this slot's VM ``name``: ask the guest to shut down; destroy it if it still runs after ``timeout_s``.

        ``force`` destroys it at once. Only a domain whose tag names
        this slot is touched; any other domain of that name is refused as
        "not a VM of this slot". A teardown or close meanwhile cuts the
        wait short.
        """
        libvirt, missing = _import_libvirt()
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
                if self._shutdown_and_wait(domain, timeout_s):
                    how = f"shut down in {time.monotonic() - started:.1f} s"
                    self._forget(name)
                    log.info("stopped VM %s (%s)", name, how)
                    return VmOutcome(True, name, how)
            if _destroy(domain):
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
                if exc.get_error_code() != _ERR_NO_DOMAIN:
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
        libvirt, missing = _import_libvirt()
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

    def warn(self, line: str) -> list[str]:
        """Write ``line`` (one line of text) to the lease channel of each VM this host runs; the names reached.

        The channel is a virtio-serial port named :data:`LEASE_CHANNEL`
        (``/dev/virtio-ports/org.workspace-pilot.lease.0`` in a guest with
        udev); libvirt gives it a unix socket, which this pilot connects to
        when it starts the VM and keeps open for the VM's life (a guest
        reading the port while no one is connected reads end-of-file; what
        is written before the guest opens it waits for it). A VM whose channel cannot be reached is
        logged and skipped: the warning is a courtesy, the stop comes anyway.
        """
        with self._lock:
            vms = list(self._vms.items())
        data = (line.rstrip("\n") + "\n").encode()
        warning = _warning_of(line)
        reached = []
        for name, vm in vms:
            if vm.told == warning:
                # Started between the warning and this broadcast: it was told at its start, once is enough.
                reached.append(name)
                continue
            try:
                channel = vm.channel or _open_channel(vm.domain)
                vm.channel = channel
                channel.sendall(data)
                vm.told = warning
            except (OSError, ValueError) as exc:
                log.warning("could not warn VM %s on its lease channel: %s", name, exc)
                continue
            except Exception as exc:  # libvirtError reading the live XML
                log.warning("could not find VM %s's lease channel: %s", name, one_line(exc))
                continue
            reached.append(name)
        return reached

    def _shutdown_and_wait(self, domain, timeout_s: float) -> bool:
        """Ask for a shutdown; True once the domain is no longer active, False on timeout or teardown."""
        import libvirt

        try:
            domain.shutdown()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == _ERR_NO_DOMAIN:
                return True
            log.warning("shutdown of %s failed (%s); destroying it", domain.name(), one_line(exc))
            return False
        deadline = time.monotonic() + timeout_s
        delay = 0.02
        while _is_active(domain):
            left = deadline - time.monotonic()
            if left <= 0 or self._stopping.wait(min(delay, left)):
                return not _is_active(domain)
            delay = min(delay * 2, 1.0)
        return True

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
                active = _is_active(vm.domain)
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


def _import_libvirt():
    """(the libvirt module, None), or (None, a one-line reason)."""
    try:
        import libvirt
    except ImportError as exc:
        return None, f"libvirt-python is missing ({exc}); run scripts/bootstrap.sh or install libvirt-python"
    return libvirt, None


def _is_active(domain) -> bool:
    """Whether the domain runs; a transient domain that ended is simply gone."""
    import libvirt

    try:
        return bool(domain.isActive())
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == _ERR_NO_DOMAIN:
            return False
        raise


def _destroy(domain) -> bool:
    """Destroy the domain if it runs; False when it was already gone."""
    import libvirt

    try:
        if not domain.isActive():
            return False
        domain.destroy()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == _ERR_NO_DOMAIN:
            return False
        raise
    return True


def _warning_of(line: str) -> tuple[str, ...]:
    """What a lease channel line says, without the seconds left (``ending TIME SECONDS WHY``: TIME and WHY)."""
    words = line.split()
    return (words[1], words[3]) if len(words) == 4 and words[0] == "ending" else tuple(words)


def _open_channel(domain):
    """A connected socket to the domain's lease channel (its unix socket, from the live XML); OSError or
    ValueError (no such channel) when there is none to reach."""
    import socket
    import xml.etree.ElementTree as ET

    root = ET.fromstring(domain.XMLDesc(0))
    for channel in root.iterfind("./devices/channel"):
        target, source = channel.find("target"), channel.find("source")
        if target is not None and target.get("name") == LEASE_CHANNEL and source is not None and source.get("path"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(CHANNEL_TIMEOUT_S)
            try:
                sock.connect(source.get("path"))
            except OSError:
                sock.close()
                raise
            return sock
    raise ValueError(f"domain {domain.name()} has no {LEASE_CHANNEL} channel with a socket")
