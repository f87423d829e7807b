"""The pilot balloons a real Xen dom0 and hosts a leased guest there: Xen 4.17 under QEMU, the real pilot and
kill-all in dom0, a real service.

The module's Xen host (``xen_host``: tests/support/xen_host.py) boots dom0
with 1024 MB. Each test's pilots run in dom0, once with the ``xl`` backend
(``xl mem-set 0``, read back with ``xl list 0``) and once with the ``xen``
backend (libvirt's Xen driver, libxl, in a libvirtd the tests start in dom0),
and report to a real receiver on this machine's 127.0.0.1 (dom0 reaches it
as 10.0.2.2). What dom0 holds is read from its balloon driver
(``current_kb``), not from what the pilot says. Leased VMs are PV guests
(dom0's kernel, a busybox initramfs) that the pilot starts through libvirt's
Xen driver on the service's ``start-vm``; that a guest runs is read from
``xl list`` and from its own console (xenconsoled's log). Each test ends with
dom0 back at its boot memory, an empty journal and no guest, or fails (after
kill-all has put the host back for the next test).
"""

from __future__ import annotations

import pytest

from tests.support.dom0site import BOOT_MB, MINMEM_MB, Dom0Site
from tests.support.service import Service


@pytest.fixture(params=["xl", "xen"])
def dom0(request, xen_host, tmp_path):
    """A fresh service and dom0 at its boot memory, the pilots on the ``xl`` or the ``xen`` (libvirt) backend;
    checks the host ends the test as it began: dom0's memory, no journal entry, no guest."""
    assert xen_host.balloon_mb() == BOOT_MB, "an earlier test left dom0 ballooned"
    service = Service(str(tmp_path / "service"))
    site = Dom0Site(xen_host, service, tmp_path, backend=request.param)
    try:
        yield site
        left = site.journal()
        memory = xen_host.balloon_mb()
        domains = xen_host.domains()
    finally:
        service.close()
    if left or memory != BOOT_MB or domains != ["Domain-0"]:
        xen_host.run("workspace-killall --no-notify", timeout=120)  # the next test starts from a clean host
        pytest.fail(f"the test left dom0 at {memory} MB, journal entries {left}, domains {domains}")


def test_a_pilot_balloons_dom0_down_and_gives_it_back_on_sigterm(dom0):
    pilot = dom0.start(256)
    dom0.wait_state(pilot.slot, "reserved")
    assert dom0.host.balloon_mb() == BOOT_MB - 256
    assert len(dom0.journal()) == 1
    pilot.signal("TERM")
    assert pilot.exit_code() == 0, pilot.output()
    assert dom0.states(pilot.slot) == ["reserved", "earlyunreserving", "unreserved"]
    assert dom0.host.balloon_mb() == BOOT_MB


def test_a_pilot_gives_dom0_its_memory_back_at_its_deadline(dom0):
    pilot = dom0.start(128, duration_s=15, grace_s=5)
    dom0.wait_state(pilot.slot, "reserved")
    assert dom0.host.balloon_mb() == BOOT_MB - 128
    assert pilot.exit_code(timeout=120) == 0, pilot.output()
    assert dom0.states(pilot.slot) == ["reserved", "unreserving", "unreserved"]
    assert dom0.host.balloon_mb() == BOOT_MB


def test_killall_restores_dom0_after_a_sigkilled_pilot_and_tells_the_service(dom0):
    pilot = dom0.start(256)
    dom0.wait_state(pilot.slot, "reserved")
    pilot.signal("KILL")
    assert pilot.exit_code() == 128 + 9
    assert dom0.host.balloon_mb() == BOOT_MB - 256  # nobody gave it back yet: the journal says what to undo
    assert len(dom0.journal()) == 1
    done = dom0.host.run("workspace-killall", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "node clean" in done.stdout
    dom0.wait_state(pilot.slot, "killed")
    assert dom0.host.balloon_mb() == BOOT_MB
    assert dom0.journal() == []


# On xl only: the undo is the backend's write of the journalled size, which every xen-backend test above does.
@pytest.mark.parametrize("dom0", ["xl"], indirect=True)
def test_the_next_pilot_undoes_a_sigkilled_pilots_balloon_before_taking_its_own(dom0):
    dead = dom0.start(256)
    dom0.wait_state(dead.slot, "reserved")
    dead.signal("KILL")
    assert dead.exit_code() == 128 + 9
    pilot = dom0.start(128)
    dom0.wait_state(pilot.slot, "reserved")
    assert dom0.host.balloon_mb() == BOOT_MB - 128  # the dead pilot's 256 MB went back first
    assert len(dom0.journal()) == 1
    pilot.signal("TERM")
    assert pilot.exit_code() == 0, pilot.output()
    assert dom0.host.balloon_mb() == BOOT_MB


def test_a_reserve_that_would_cross_minmem_fails_and_leaves_dom0_alone(dom0):
    pilot = dom0.start(BOOT_MB - MINMEM_MB + 64)
    assert pilot.exit_code() == 5, pilot.output()  # reserve-failed
    assert "minmem" in pilot.output()
    assert "reserved" not in dom0.states(pilot.slot)
    assert dom0.host.balloon_mb() == BOOT_MB


# Both orders on xl; on xen one (the order is the journal's, the same for every backend).
@pytest.mark.parametrize("dom0, first_to_end", [("xl", "first started"), ("xl", "last started"),
                                               ("xen", "first started")], indirect=["dom0"])
def test_two_pilots_compose_whichever_ends_first(dom0, first_to_end):
    one = dom0.start(128)
    dom0.wait_state(one.slot, "reserved")
    two = dom0.start(256)
    dom0.wait_state(two.slot, "reserved")
    assert dom0.host.balloon_mb() == BOOT_MB - 128 - 256
    ending, staying = (one, two) if first_to_end == "first started" else (two, one)
    ending.signal("TERM")
    assert ending.exit_code() == 0, ending.output()
    assert dom0.host.balloon_mb() == BOOT_MB - (256 if staying is two else 128)
    staying.signal("TERM")
    assert staying.exit_code() == 0, staying.output()
    assert dom0.host.balloon_mb() == BOOT_MB


# The VM tests run once each: VM hosting speaks libvirt whichever backend balloons dom0; between them they meet both.
@pytest.mark.parametrize("dom0", ["xen"], indirect=True)
def test_a_leased_pv_guest_runs_on_xen_and_is_destroyed_when_the_pilot_ends(dom0):
    pilot, domain = dom0.lease_with_a_guest(256)
    assert dom0.guest_said(domain, "workspace-pilot xen guest alive"), dom0.host.console_tail()
    assert dom0.host.check(f"xl list {domain}").split()[-4] == "128"  # Xen gave it the memory asked for (MB)
    assert dom0.host.balloon_mb() == BOOT_MB - 256  # the guest's memory is the lease's, not dom0's
    pilot.signal("TERM")
    assert pilot.exit_code() == 0, pilot.output()
    assert dom0.host.domains() == ["Domain-0"]
    assert dom0.states(pilot.slot)[-1] == "unreserved"
    assert dom0.host.balloon_mb() == BOOT_MB


@pytest.mark.parametrize("dom0", ["xl"], indirect=True)
def test_killall_destroys_the_leased_guest_of_a_sigkilled_pilot_on_xen(dom0):
    pilot, domain = dom0.lease_with_a_guest(256)
    pilot.signal("KILL")
    assert pilot.exit_code() == 128 + 9
    assert domain in dom0.host.domains()  # the guest outlives its pilot
    done = dom0.host.run("workspace-killall", timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert domain in done.stdout and "node clean" in done.stdout
    dom0.wait_state(pilot.slot, "killed")
    assert dom0.host.domains() == ["Domain-0"]
    assert dom0.host.balloon_mb() == BOOT_MB
    assert dom0.journal() == []
