"""Destroying a slot's VMs by their tag, for whoever must clean up after a pilot (replay, teardown, kill-all).

A VM belongs to a slot when its libvirt ``<metadata>`` carries the
project's tag with that slot id (:mod:`pilot.vm.tag`); names and the
service's word do not count. libvirt is imported here, never at the
pilot's start.
"""

from __future__ import annotations

import logging
import time

from workspace_common.errors import one_line

log = logging.getLogger(__name__)


class VmCleanupError(Exception):
    """The slot's VMs could not be listed or destroyed (libvirt unreachable, or a destroy refused)."""


def destroy_domain(domain) -> bool:
    """Destroy ``domain`` (and undefine it if persistent); False if it was already gone.

    Raises ``libvirt.libvirtError`` for anything but "no such domain": a
    VM its pilot destroyed a moment ago is what the caller wanted anyway.
    """
    import libvirt

    try:
        persistent = domain.isPersistent()  # ask first: a transient domain is gone once destroyed
        if domain.isActive():
            domain.destroy()
        if persistent:
            domain.undefine()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise
    return True


def destroy_slot_vms(uri: str, slot: str) -> list[str]:
    """Destroy every domain at ``uri`` tagged with ``slot`` (undefining persistent ones); their names.

    Raises :class:`VmCleanupError` when libvirt cannot be reached or a
    domain cannot be destroyed: the caller then keeps its journal record.
    """
    from pilot.libvirtconn import libvirt_module, open_connection

    try:
        libvirt = libvirt_module()
    except ImportError as exc:
        raise VmCleanupError(f"libvirt-python is missing ({exc})") from None
    from pilot.vm.tag import tagged_domains

    try:
        conn = open_connection(uri)
    except libvirt.libvirtError as exc:
        raise VmCleanupError(f"cannot connect to libvirt at {uri}: {one_line(exc)}") from None
    destroyed = []
    try:
        for domain, tag in tagged_domains(conn):
            if tag.slot != slot:
                continue
            name, t0 = domain.name(), time.monotonic()
            try:
                if not destroy_domain(domain):
                    continue
            except libvirt.libvirtError as exc:
                raise VmCleanupError(f"cannot destroy VM {name} of slot {slot}: {one_line(exc)}") from None
            log.warning("destroyed VM %s of slot %s in %.1f ms", name, slot, (time.monotonic() - t0) * 1000)
            destroyed.append(name)
    except libvirt.libvirtError as exc:
        raise VmCleanupError(f"cannot list the VMs at {uri}: {one_line(exc)}") from None
    finally:
        conn.close()
    return destroyed
