"""libvirt domain helpers the VM host uses: importing libvirt late, is it running, destroy, shut down and wait.

``libvirt`` is imported inside each, so a pilot that never hosts a VM never
loads it.
"""

from __future__ import annotations

import logging
import threading
import time

from workspace_common.errors import one_line

log = logging.getLogger("pilot.vm.host")

#: libvirt's VIR_ERR_NO_DOMAIN, without importing libvirt at module level.
ERR_NO_DOMAIN = 42


def import_libvirt():
    """(the libvirt module, None), or (None, a one-line reason)."""
    try:
        import libvirt
    except ImportError as exc:
        return None, f"libvirt-python is missing ({exc}); run scripts/bootstrap.sh or install libvirt-python"
    return libvirt, None


def is_active(domain) -> bool:
    """Whether the domain runs; a transient domain that ended is simply gone."""
    import libvirt

    try:
        return bool(domain.isActive())
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == ERR_NO_DOMAIN:
            return False
        raise


def destroy_if_active(domain) -> bool:
    """Destroy the domain if it runs; False when it was already gone."""
    import libvirt

    try:
        if not domain.isActive():
            return False
        domain.destroy()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == ERR_NO_DOMAIN:
            return False
        raise
    return True


def shutdown_and_wait(domain, timeout_s: float, stopping: threading.Event) -> bool:
    """Ask for a shutdown; True once the domain is no longer active, False on timeout or once
    ``stopping`` is set (a teardown)."""
    import libvirt

    try:
        domain.shutdown()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == ERR_NO_DOMAIN:
            return True
        log.warning("shutdown of %s failed (%s); destroying it", domain.name(), one_line(exc))
        return False
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while is_active(domain):
        left = deadline - time.monotonic()
        if left <= 0 or stopping.wait(min(delay, left)):
            return not is_active(domain)
        delay = min(delay * 2, 1.0)
    return True
