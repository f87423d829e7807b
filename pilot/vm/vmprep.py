"""A checked VM's own files, planned before its domain is rendered and made once the journal allows it.

:func:`plan` only names paths (the domain XML is rendered from them, and a
refusal there makes nothing); :func:`make` makes the files and lets the
guest user (:mod:`pilot.vm.guestuser`) near exactly what it needs:

- a writable disk gets its overlay (:class:`pilot.vm.overlay.DiskBudget`),
  owned by the guest user;
- where guests do not run as root, the kernel and initrd are the VM's own
  copies (libvirt hands boot files to the guest user while the guest runs;
  a cached original handed over could be rewritten by an escaped guest);
- the seed is the guest user's to read; cached images it boots from or
  backs its disk with become readable by its group, never writable;
- the directories on the way become searchable by its group.
"""

from __future__ import annotations

import dataclasses
import os

from pilot.vm.check import CheckedVm, VmRefused
from pilot.vm.guestuser import GuestUser, give, let_read, let_through, reach_problem
from pilot.vm.overlay import DiskBudget
from pilot.vm.vmfiles import vm_file

_BOOT_FILES = ("kernel", "initrd")


def plan(checked: CheckedVm, *, domain_name: str, disks: DiskBudget | None, user: GuestUser | None) -> CheckedVm:
    """``checked`` with the paths of the VM's own files in place (nothing is made)."""
    changes = {}
    if disks is not None:
        if checked.disk is not None and not checked.spec.disk_readonly:
            changes["overlay"] = vm_file(disks.directory, domain_name, "qcow2")
        if user is not None and not user.root:
            changes.update({kind: vm_file(disks.directory, domain_name, kind)
                            for kind in _BOOT_FILES if getattr(checked, kind) is not None})
    return dataclasses.replace(checked, **changes)


def make(planned: CheckedVm, checked: CheckedVm, *, domain_name: str, disks: DiskBudget | None,
         user: GuestUser | None, image_cache_dir: str | None) -> None:
    """Make what :func:`plan` named, from ``checked``'s images, and open it to ``user``.

    Raises :class:`pilot.vm.check.VmRefused` (over the disk budget, qemu-img
    failed) or OSError; what was made meanwhile is the caller's to remove
    (:func:`pilot.vm.vmfiles.remove_vm_files`).
    """
    if planned.overlay is not None:
        disks.make(domain_name, checked.disk, checked.disk_format)
        give(planned.overlay, user, writable=True)
    for kind in _BOOT_FILES:
        mine, original = getattr(planned, kind), getattr(checked, kind)
        if mine is not None and mine != original:
            disks.copy(domain_name, kind, original)
            give(mine, user, writable=False)
    if planned.seed is not None:
        give(planned.seed, user, writable=False)
    if user is None or user.root:
        return
    through = set()
    if disks is not None:
        through |= {os.path.dirname(disks.directory), disks.directory}
    if planned.seed is not None:
        through |= {os.path.dirname(os.path.dirname(planned.seed)), os.path.dirname(planned.seed)}
    cache = os.path.realpath(image_cache_dir) if image_cache_dir is not None else None
    cached = [path for path in (planned.disk, planned.kernel, planned.initrd)
              if path is not None and cache is not None and os.path.dirname(path) == cache]
    if cached:
        through.add(cache)
    for directory in sorted(through):
        let_through(directory, user)
    for path in cached:
        let_read(path, user)
    # What this node cannot give the guest user (a site image it cannot read, a directory on the way it cannot
    # search) is a refusal in the site's words, not QEMU's "Permission denied" after libvirt's long wait.
    needs = [(field, getattr(planned, field), field == "overlay")
             for field in ("disk", "overlay", "kernel", "initrd", "seed") if getattr(planned, field) is not None]
    for field, path, write in needs:
        problem = reach_problem(path, user, write=write)
        if problem is not None:
            raise VmRefused(f"{field}: {problem}")
