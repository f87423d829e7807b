"""The real-VMM test infrastructure works: a tiny guest boots under libvirtd/QEMU (TCG), its balloon obeys.

These test the set-up the pilot's VM tests stand on (``libvirt_qemu``,
``tests/libvirt_daemon.py``, ``scripts/build-test-guest.sh``), not the
pilot. Every domain a test creates is destroyed in a ``finally``.
"""

from __future__ import annotations

import contextlib
import time
import uuid

import pytest

from tests.libvirt_daemon import GUEST_ALIVE, GUEST_UP, guest_xml, wait_for_line

libvirt = pytest.importorskip("libvirt")

BOOT_TIMEOUT_S = 60  # TCG boots the guest in about 3-4 s; this is only the give-up point
BALLOON_TIMEOUT_S = 30


def _name() -> str:
    return "wptest-" + uuid.uuid4().hex[:8]


@contextlib.contextmanager
def _running_guest(daemon, console: str, **xml_options):
    """A transient test guest for the block, destroyed afterwards (whatever happened)."""
    conn = daemon.connect()
    dom = None
    try:
        dom = conn.createXML(guest_xml(_name(), console, **xml_options), 0)
        yield conn, dom
    finally:
        if dom is not None:
            with contextlib.suppress(libvirt.libvirtError):  # already gone (it ended itself)
                dom.destroy()
        conn.close()


def _booted(console: str) -> None:
    if not wait_for_line(console, GUEST_UP, BOOT_TIMEOUT_S):
        with open(console, encoding="utf-8", errors="replace") as handle:
            pytest.fail(f"no {GUEST_UP!r} on the console within {BOOT_TIMEOUT_S} s; console:\n{handle.read()}")


def _gone(conn, name: str) -> bool:
    try:
        conn.lookupByName(name)
    except libvirt.libvirtError as error:
        return error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
    return False


def test_guest_boots_writes_its_console_and_is_destroyed(libvirt_qemu, tmp_path):
    console = str(tmp_path / "console.log")
    with _running_guest(libvirt_qemu, console) as (conn, dom):
        name = dom.name()
        assert dom.isActive()
        _booted(console)
        assert wait_for_line(console, f"{GUEST_ALIVE} 1", BOOT_TIMEOUT_S), "the guest stopped after booting"
        dom.destroy()
        assert _gone(conn, name), "a destroyed transient domain is still known to libvirtd"


def test_balloon_lowers_the_running_guest(libvirt_qemu, tmp_path):
    console = str(tmp_path / "console.log")
    target_kib = 96 * 1024
    with _running_guest(libvirt_qemu, console) as (_conn, dom):
        _booted(console)  # the balloon driver is loaded before the "up" line
        assert dom.info()[2] > target_kib
        dom.setMemoryFlags(target_kib, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        deadline = time.monotonic() + BALLOON_TIMEOUT_S
        while dom.info()[2] > target_kib and time.monotonic() < deadline:
            time.sleep(0.1)  # the balloon reports through QEMU; there is nothing to wait on
        assert dom.info()[2] <= target_kib, f"current memory still {dom.info()[2]} KiB, asked {target_kib} KiB"
