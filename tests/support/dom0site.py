"""Pilots in a Xen test host's dom0 reporting to a real service here: the tests' and the Xen bench's site.

:class:`Dom0Site` writes the pilots' config and node key into dom0 (a
:class:`tests.support.xen_host.XenHost`), starts real ``workspace-pilot
reserve`` processes there for slots of a :class:`tests.support.service.Service`
on this machine (dom0 reaches it as 10.0.2.2), queues ``start-vm`` commands
for the PV guest the host's build put in dom0's ``/srv/xen-guest``, and reads
back what the pilots did.
"""

from __future__ import annotations

import uuid

from service_adapter.local_site import write_pilot_config
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
        self.service.queue_command(pilot.slot, "node1", {"op": "start-vm", "vm": spec.to_dict()})

    def lease_with_a_guest(self, memory_mb: int = 256, name: str = "vm1") -> tuple["Dom0Pilot", str]:
        """A pilot holding ``memory_mb`` that started the test's 128 MB guest ``name``: (the pilot, its domain).

        AssertionError if the pilot did not report ``vm-running``.
        """
        pilot = self.start(memory_mb)
        self.wait_state(pilot.slot, "reserved")
        self.start_vm(pilot, name)
        outcome, message = self.wait_outcome(pilot.slot, "start-vm")
        assert outcome == "vm-running", message
        [domain] = [domain for domain in self.host.domains() if domain.endswith(name)]
        return pilot, domain

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
