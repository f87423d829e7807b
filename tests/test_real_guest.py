"""The real-VMM test infrastructure works: a tiny guest boots under libvirtd/QEMU (TCG), its balloon obeys.

These test the set-up the pilot's VM tests stand on (``libvirt_qemu``,
``tests/support/libvirt_daemon.py``, ``scripts/build-test-guest.sh``), not the
pilot. Every domain a test creates is destroyed in a ``finally``.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid

import pytest

from tests.support.libvirt_daemon import GUEST_ALIVE, GUEST_UP, guest_files, guest_xml, wait_for_line

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


def test_guest_runs_a_job_in_a_shared_directory_and_ends_itself(libvirt_qemu, tmp_path):
    """The guest side of a VM batch job (issue 19): virtiofs shares from the host, the command run in the
    working directory, its output and exit code back in the control directory, the domain gone after."""
    control, workdir = tmp_path / "control", tmp_path / "workdir"
    control.mkdir()
    workdir.mkdir()
    (workdir / "input.txt").write_text("from the host\n")
    (control / "command").write_text('#!/bin/sh\nuname -r; cat input.txt; echo made > output.txt; echo oops >&2; exit 3\n')
    (control / "command").chmod(0o755)
    console = str(tmp_path / "console.log")
    with _running_guest(libvirt_qemu, console, shares={"control": str(control), "workdir": str(workdir)}) as (conn, dom):
        name = dom.name()
        assert wait_for_line(console, "workspace-pilot test guest job done 3", BOOT_TIMEOUT_S), open(console).read()
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while not _gone(conn, name) and time.monotonic() < deadline:
            time.sleep(0.1)  # the guest's reboot ends the domain; libvirt forgets it a moment later
        assert _gone(conn, name), "the guest's reboot did not end the domain"
    stdout = (control / "stdout").read_text().splitlines()
    inputs = open(os.path.join(os.path.dirname(guest_files().kernel), "inputs"), encoding="utf-8").read()
    assert stdout[0] == re.search(r"kernel=linux-image-(\S+?)=", inputs).group(1)  # the guest's kernel release
    assert stdout[1:] == ["from the host"]
    assert (control / "stderr").read_text() == "oops\n"
    assert (control / "status").read_text() == "3\n"
    assert (workdir / "output.txt").read_text() == "made\n"  # written by the guest, seen on the host


def test_a_guests_qemu_is_orphaned_to_the_daemons_subreaper_and_reaped_when_destroyed(libvirt_qemu, tmp_path):
    # QEMU daemonizes, and libvirtd waits at each destroy for the process to be gone: under tini (the embedded
    # site's libvirtd, service_adapter/localvirt.py) it is reaped at once, not whenever this container's PID 1 does.
    if not libvirt_qemu.owned:
        pytest.skip("this session uses a libvirtd it did not start")
    reaper = libvirt_qemu.daemon.processes["libvirtd"].pid
    console = str(tmp_path / "console.log")
    with _running_guest(libvirt_qemu, console) as (_conn, dom):
        with open(f"/run/libvirt/qemu/{dom.name()}.pid", encoding="ascii") as handle:
            qemu = int(handle.read())
        with open(f"/proc/{qemu}/status", encoding="ascii") as handle:
            parent = int(re.search(r"^PPid:\s+(\d+)", handle.read(), re.M).group(1))
        assert parent == reaper != 1
        dom.destroy()
        assert not os.path.exists(f"/proc/{qemu}")  # reaped, not left a zombie
