"""A VM's own files on the node, one directory for all of them: ``<journal dir>/vm-files/``.

Each file is named after its domain: ``<domain>.qcow2`` (its writable
disk's overlay, :mod:`pilot.vm.overlay`), ``<domain>.kernel`` and
``<domain>.initrd`` (copies of its boot files, made where the guest runs as
a user of its own: libvirt hands a guest's boot files to that user while it
runs, and a copy is all the guest may ever own, never the image it came
from). They are made after the journal says the slot may have VMs and are
removed with the VM; whoever undoes a dead pilot's entry removes its
slot's by the domain-name prefix.
"""

from __future__ import annotations

import glob
import os

#: The kinds of file a VM may have here, by suffix.
KINDS = ("qcow2", "kernel", "initrd")


def vm_files_dir_of(journal_dir: str) -> str:
    """Where the node's VMs' own files are: ``vm-files/`` in the journal directory."""
    return os.path.join(journal_dir, "vm-files")


def vm_file(directory: str, domain_name: str, kind: str) -> str:
    """The path of the domain's file of ``kind`` (one of :data:`KINDS`)."""
    if kind not in KINDS:
        raise ValueError(f"no VM file of kind {kind!r}")
    return os.path.join(directory, f"{domain_name}.{kind}")


def remove_vm_files(directory: str, domain_name: str) -> list[str]:
    """Remove the domain's files (and half-made ones); the paths removed."""
    def its_own(name: str) -> bool:
        return name.startswith(domain_name + ".") and name[len(domain_name) + 1:].split(".")[0] in KINDS

    found = glob.glob(os.path.join(glob.escape(directory), glob.escape(domain_name) + ".*"))
    return remove_paths([path for path in found if its_own(os.path.basename(path))])


def remove_slot_vm_files(directory: str, prefix: str) -> list[str]:
    """Remove the files of every domain whose name starts with ``prefix`` (a slot's); the paths removed."""
    return remove_paths(glob.glob(os.path.join(glob.escape(directory), glob.escape(prefix) + "*")))


def remove_paths(paths: list[str]) -> list[str]:
    """Unlink each of ``paths``; those that were there (one already gone is no error)."""
    removed = []
    for path in paths:
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed
