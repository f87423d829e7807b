"""Starting a slot's VMs: check the spec, fetch its images, journal, network, seed, overlay, then the domain.

:class:`VmStarts` is the start half of :class:`pilot.vm.host.VmHost`
(which keeps the books, stops, warns and tears down); it uses the host's
lock, books, policy and connection, and is never used alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable

from pilot.vm import leasechannel, vmprep
from pilot.vm.books import BookedVm, VmOutcome
from pilot.vm.check import VmRefused, check_memory, check_spec, known_sha256
from pilot.vm.domains import import_libvirt
from pilot.vm.domainxml import render_domain
from pilot.vm.seed import seed_files, seed_path, write_seed
from workspace_common.errors import one_line
from workspace_common.protocol import VmSpec

log = logging.getLogger("pilot.vm.host")


class VmStarts:
    """The start path of a :class:`pilot.vm.host.VmHost` (a base class of it; it holds no state of its own)."""

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
        libvirt, missing = import_libvirt()
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
        started_at = time.time()  # the VM's start as its Machine/Job Features count it
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
                                                    mtu=(checked.interface or {}).get("mtu"),
                                                    features=self._features_text(spec, started_at)))
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
        vm = self._vms[name] = BookedVm(spec, domain_name, domain, started_at=started_at)
        try:
            # Connected for the VM's life (a guest reading its port while no one is connected reads end-of-file),
            # told its features at once, and the warning if it starts after it: it ends as soon as the others.
            vm.channel = leasechannel.open_channel(domain)
            line = self.warning()
            vm.channel.sendall(self._features_of(vm) + ((line + "\n").encode() if line else b""))
            if line:
                vm.told = leasechannel.warning_of(line)
        except (OSError, ValueError, libvirt.libvirtError) as exc:  # the next look or warning connects again
            log.debug("VM %s: no lease channel to connect to yet: %s", name, one_line(exc))
            self._drop_channel(vm)
        log.info("started VM %s as domain %s (%d MB) in %.1f ms",
                 name, domain_name, spec.memory_mb, (time.monotonic() - started) * 1000)
        return VmOutcome(True, name, f"running as {domain_name}")
