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

import time
import uuid

import pytest

from service_adapter.local_site import write_pilot_config
from service_adapter.store import commands as commandstore
from tests.support.service import Service
from tests.support.xen_host import LIBVIRT_URI
from workspace_common.protocol.vmspec import VmSpec

#: dom0's memory at boot (the session's host: dom0_mem=1024M), and the floor the pilots' config keeps.
BOOT_MB = 1024
MINMEM_MB = 512
JOURNAL = "/var/lib/workspace-pilot"
#: The PV guest in dom0 (scripts/build-xen-host.sh): dom0's kernel and a busybox initramfs, the pilots' image_dir.
GUEST_DIR = "/srv/xen-guest"
#: Waits on a process in dom0 that is not the waiter's child: its pidfd becomes readable when it ends.
WAIT_GONE = ('python3 -c "import os, select, sys; fd = os.pidfd_open(int(sys.argv[1])); '
             'sys.exit(0 if select.select([fd], [], [], float(sys.argv[2]))[0] else 1)" {pid} {timeout}')


class Dom0Site:
    """A service on this machine and the pilots' config in dom0; starts pilots there and reads what they did.

    ``backend``: the pilots' memory backend, ``xl`` (the command) or ``xen``
    (libvirt's Xen driver, which the site starts in dom0). Either way the
    pilots host VMs through libvirt's Xen driver, booting the PV guest in
    dom0's ``/srv/xen-guest`` (scripts/build-xen-host.sh).
    """

    def __init__(self, host, service: Service, config_dir, backend: str = "xl"):
        self.host, self.service, self.backend = host, service, backend
        port = service.url.rsplit(":", 1)[1]
        config = str(config_dir / "pilot.conf")
        memory = {"backend": backend, "minmem": MINMEM_MB, "verify_timeout": 60, "boot_mb": BOOT_MB}
        if backend == "xen":
            memory["xen_uri"] = LIBVIRT_URI
            host.start_libvirtd()
        write_pilot_config(config, contact=f"http://10.0.2.2:{port}",
                           node_key_file="/etc/workspace-pilot/node-keys/{host}.key",
                           log_dir="/var/log/workspace-pilot", journal_dir=JOURNAL,
                           sections={"memory": memory, "libvirt": {"uri": LIBVIRT_URI},
                                     "vms": {"image_dir": GUEST_DIR, "virt_type": "xen", "overhead_mb": 16,
                                             "poll_wait": 5}})
        with open(config, encoding="utf-8") as handle:
            host.write_file("/etc/workspace-pilot/pilot.conf", handle.read())
        with open(f"{service.key_dir}/node1.key", encoding="utf-8") as handle:
            host.write_file("/etc/workspace-pilot/node-keys/node1.key", handle.read())

    def start(self, memory_mb: int, *, duration_s: float = 300, grace_s: float = 10) -> "Dom0Pilot":
        """A real ``workspace-pilot reserve`` in dom0 for a new slot of the service, in the background."""
        slot = self.service.add_slot(1, memory_mb)
        run = f"/tmp/pilot-{uuid.uuid4().hex[:8]}"
        secret = self.service.slot_secrets[slot]
        # The wrapper keeps the pilot's pid and, once it ends, its exit status.
        self.host.check(f"mkdir -p {run}")
        self.host.check(
            f"(WORKSPACE_PILOT_SLOT_SECRET={secret} workspace-pilot reserve --slot {slot} "
            f"--memory {memory_mb} --duration {duration_s:g} --grace {grace_s:g} --host node1 "
            f"> {run}/out 2>&1 & echo $! > {run}/pid; wait $!; echo $? > {run}/rc) > /dev/null 2>&1 & "
            f"echo $! > {run}/wrapper")
        return Dom0Pilot(self, slot, run)

    def states(self, slot: str) -> list[str]:
        """The states of the slot's notifications the service stored, in order."""
        return [state for _, _, state, _ in self.service.store.notifications(slot)]

    def wait_state(self, slot: str, state: str, timeout: float = 90) -> None:
        """Until the service has stored ``state`` for the slot (woken by the store's commits)."""
        if not self.service.store.wait_for(lambda: state in self.states(slot), timeout):
            raise AssertionError(f"no {state!r} from dom0 in {timeout:g} s: {self.states(slot)}; "
                                 f"{self.host.console_tail()}")

    def start_vm(self, pilot: "Dom0Pilot", name: str, memory_mb: int = 128) -> None:
        """Queue ``start-vm`` for the test's PV guest on the pilot's slot, as the service's VM API does."""
        self.host.start_libvirtd()
        sums = dict(reversed(line.split()) for line in self.host.check(
            f"cd {GUEST_DIR} && sha256sum vmlinuz initrd.img").splitlines())
        spec = VmSpec.from_dict({"name": name, "memory_mb": memory_mb,
                                 "boot": {"kernel": {"path": "vmlinuz", "sha256": sums["vmlinuz"]},
                                          "initrd": {"path": "initrd.img", "sha256": sums["initrd.img"]},
                                          "cmdline": "console=hvc0 quiet"}})
        self.service.store.submit(lambda conn: commandstore.queue_command(
            conn, pilot.slot, "node1", {"op": "start-vm", "vm": spec.to_dict()}, time.time(),
            self.service.store._wake_target)).result()

    def wait_outcome(self, slot: str, op: str, timeout: float = 120) -> tuple[str, str]:
        """(outcome, message) the pilot reported for the slot's last ``op`` command (woken by the store's commits)."""
        def done():
            rows = [row for row in self.service.store.commands(slot) if row.op == op]
            return rows and rows[-1].outcome is not None
        if not self.service.store.wait_for(done, timeout):
            raise AssertionError(f"no outcome of {op} from dom0 in {timeout:g} s; {self.host.console_tail()}")
        row = [row for row in self.service.store.commands(slot) if row.op == op][-1]
        return row.outcome, row.message

    def guest_said(self, domain: str, text: str, timeout: float = 90) -> bool:
        """Whether the guest's Xen console (xenconsoled's log in dom0) shows ``text`` within ``timeout``."""
        log = f"/var/log/xen/console/guest-{domain}.log"
        found = self.host.run(f"timeout {timeout:g} sh -c 'until [ -f {log} ]; do sleep 0.5; done; "
                              f"tail -n +1 -f {log} | grep -q -m 1 \"{text}\"'", timeout=timeout + 10)
        return found.returncode == 0

    def journal(self) -> list[str]:
        """The node journal's entries in dom0 (its lock file is not one)."""
        return [name for name in self.host.check(f"ls {JOURNAL} 2>/dev/null || true").split()
                if name.endswith(".json")]


class Dom0Pilot:
    """One pilot process in dom0."""

    def __init__(self, site: Dom0Site, slot: str, run: str):
        self.site, self.slot, self.run = site, slot, run

    @property
    def pid(self) -> int:
        return int(self.site.host.check(f"cat {self.run}/pid"))

    def signal(self, name: str) -> None:
        """Send the pilot SIGTERM, SIGKILL, ... by its pid."""
        self.site.host.check(f"kill -{name} {self.pid}")

    def exit_code(self, timeout: float = 90) -> int:
        """Wait for the pilot to end; its exit status (128 + the signal for a killed one)."""
        wrapper = self.site.host.check(f"cat {self.run}/wrapper").strip()
        gone = self.site.host.run(WAIT_GONE.format(pid=wrapper, timeout=timeout), timeout=timeout + 10)
        assert gone.returncode == 0, f"the pilot still runs after {timeout:g} s: {self.output()}"
        return int(self.site.host.check(f"cat {self.run}/rc"))

    def output(self) -> str:
        return self.site.host.run(f"tail -20 {self.run}/out").stdout


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
    pilot = dom0.start(128, duration_s=25, grace_s=5)
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


@pytest.mark.parametrize("first_to_end", ["first started", "last started"])
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
    pilot = dom0.start(256)
    dom0.wait_state(pilot.slot, "reserved")
    dom0.start_vm(pilot, "vm1")
    outcome, message = dom0.wait_outcome(pilot.slot, "start-vm")
    assert outcome == "vm-running", message
    [domain] = [name for name in dom0.host.domains() if name.endswith("vm1")]
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
    pilot = dom0.start(256)
    dom0.wait_state(pilot.slot, "reserved")
    dom0.start_vm(pilot, "vm1")
    outcome, message = dom0.wait_outcome(pilot.slot, "start-vm")
    assert outcome == "vm-running", message
    pilot.signal("KILL")
    assert pilot.exit_code() == 128 + 9
    [domain] = [name for name in dom0.host.domains() if name.endswith("vm1")]  # the guest outlives its pilot
    done = dom0.host.run("workspace-killall", timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert domain in done.stdout and "node clean" in done.stdout
    dom0.wait_state(pilot.slot, "killed")
    assert dom0.host.domains() == ["Domain-0"]
    assert dom0.host.balloon_mb() == BOOT_MB
    assert dom0.journal() == []
