"""Real guests on leases: the real 4-node Slurm, real pilots under sudo, real libvirtd and QEMU (TCG).

Each test reserves a one-node lease whose memory is real 2 MiB hugepages,
starts the tiny test guest (Debian's cloud kernel and a busybox initramfs,
built by scripts/build-test-guest.sh) through the service's VM command,
waits for the line the guest prints on its serial console, and then ends
the lease one way: the batch system's ``qdel``, the pilot's own deadline,
or ``workspace-killall`` on the node. Each way, the guest must be gone,
the hugepage pool back where it was, and the node journal empty.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from workspace_common.protocol import parse_time
from pilot.vm.tag import tagged_domains
from service_adapter.vms import parse_vm_request
from tests.support.pool import pool_pages
from tests.support.libvirt_daemon import GUEST_ALIVE, GUEST_DIR, GUEST_UP, guest_files, wait_for_line
from tests.support.slurm_cluster import TERMINAL, ServiceOnCluster, close_sites
from tests.support.realvms import LEASE_MB, VM_MB, assert_node_clean


@pytest.fixture
def vm_site(guest_reachable, slurm_cluster, libvirt_qemu):
    tmp_path = guest_reachable  # the guests' user searches its way to the journal's VM files
    sites = []

    def make(provider: str, vms: dict | None = None, **options) -> ServiceOnCluster:
        sections = {
            "libvirt": {"uri": libvirt_qemu.uri},
            "vms": {"image_dir": GUEST_DIR, "console_dir": str(tmp_path / "consoles"), "poll_wait": 5,
                    "shutdown_timeout": 2, **(vms or {})},
            "timing": {"walltime_margin": 20, "earlywaitratio": 0.3},
        }
        site = ServiceOnCluster(str(tmp_path), slurm_cluster, provider, pilot_sections=sections, grace_s=8,
                                **options)
        sites.append(site)
        return site

    yield make
    close_sites(sites, slurm_cluster)


def guest_spec(name: str) -> dict:
    files = guest_files()
    return {
        "name": name, "memory_mb": VM_MB, "vcpus": 1,
        "boot": {"kernel": {"path": "vmlinuz", "sha256": files.kernel_sha256},
                 "initrd": {"path": "initrd.img", "sha256": files.initrd_sha256},
                 "cmdline": "console=ttyS0 panic=-1 quiet"},
        "console_log": f"{name}.log",
    }


def guest_running(site, libvirt_qemu, tmp_path, duration_s: float, spec: dict | None = None):
    """A ready one-node lease with the test guest (or ``spec``) booted on it; (lease, domain name)."""
    lease = site.manager.reserve(nodes=1, memory_mb=LEASE_MB, duration_s=duration_s)
    ready = site.wait(lease, {"ready"} | TERMINAL, 60)
    assert ready.state == "ready", ready.reason
    available = available_hugepages()
    site.vms.start(lease.id, [parse_vm_request(spec or guest_spec("guest1"))])
    vm = site.vms.wait(lease.id, "guest1", {"running", "failed"}, 60)
    assert vm is not None and vm.state == "running", site.vms.get(lease.id, "guest1")
    console = str(tmp_path / "consoles" / "guest1.log")
    assert wait_for_line(console, GUEST_UP, 90), f"the guest never printed {GUEST_UP!r} on {console}"
    conn = libvirt_qemu.connect()
    try:
        [(domain, tag)] = [(d, t) for d, t in tagged_domains(conn) if t.slot == lease.slot]
        assert tag.lease == lease.id and domain.isActive()
        xml = ET.fromstring(domain.XMLDesc(0))
        assert xml.get("type") in ("qemu", "kvm")
        assert xml.find("memoryBacking/hugepages") is not None  # backed by the pages the pilot reserved
        assert available_hugepages() <= available - VM_MB // 2, "the guest's memory is not on the pool"
        name = domain.name()
    finally:
        conn.close()
    assert site.manager.wait(lease.id, {"running"}, 10) is not None
    return lease, name


def available_hugepages() -> int:
    """Pages of the 2 MiB pool neither in use nor promised to a mapping (HugePages_Free - HugePages_Rsvd)."""
    fields = {}
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            fields[key] = int(value.split()[0]) if value.split() else 0
    return fields["HugePages_Free"] - fields["HugePages_Rsvd"]


def test_qdel_ends_a_lease_with_a_running_guest(vm_site, libvirt_qemu, tmp_path, hugepages):
    # A single-node job script runs the pilot itself: qdel's SIGTERM reaches it (an srun would SIGKILL it).
    site = vm_site("pbs", launcher="single")
    lease, _ = guest_running(site, libvirt_qemu, tmp_path, duration_s=600)
    qdel = site.cluster.run(["qdel", lease.job_id])
    assert qdel.returncode == 0, qdel.stdout + qdel.stderr
    done = site.wait(lease, TERMINAL, 60)
    assert site.vms.get(lease.id, "guest1").state == "stopped", done.reason
    assert_node_clean(site, libvirt_qemu, lease, hugepages)
    host = done.pilots[0].host
    assert site.pilot_states(lease)[host][-1] == "unreserved"


def test_the_pilots_deadline_ends_a_lease_with_a_running_guest(vm_site, libvirt_qemu, tmp_path, hugepages):
    site = vm_site("slurm")
    lease, _ = guest_running(site, libvirt_qemu, tmp_path, duration_s=25)
    done = site.wait(lease, TERMINAL, 90)
    assert done.state == "expired", done.reason
    vm = site.vms.get(lease.id, "guest1")
    assert vm.state == "stopped" and "teardown" in vm.reason, vm.reason
    assert_node_clean(site, libvirt_qemu, lease, hugepages)


def test_killall_on_a_node_with_a_running_guest(vm_site, libvirt_qemu, tmp_path, hugepages):
    site = vm_site("slurm")
    lease, domain = guest_running(site, libvirt_qemu, tmp_path, duration_s=600)
    backout = subprocess.run(
        [sys.executable, "-m", "admin_tools.killall", "--config", site.pilot_config, "--term-timeout", "30"],
        capture_output=True, text=True, timeout=120,
    )
    assert backout.returncode == 0, backout.stdout + backout.stderr
    assert "node clean" in backout.stdout
    done = site.wait(lease, TERMINAL, 60)
    assert site.vms.get(lease.id, "guest1").state in ("stopped",), done.reason
    assert_node_clean(site, libvirt_qemu, lease, hugepages)


def test_a_pilot_killed_with_sigkill_is_cleaned_up_by_the_next_pilot(vm_site, libvirt_qemu, tmp_path, hugepages):
    site = vm_site("slurm")
    lease, domain = guest_running(site, libvirt_qemu, tmp_path, duration_s=600)
    [entry] = [n for n in os.listdir(site.journal_dir) if n.endswith(".json")]
    pid = int(entry.split(".")[-2])
    os.kill(pid, 9)  # no restore, no teardown: the guest and the hugepages stay, the journal says so
    site.wait(lease, TERMINAL, 60)
    conn = libvirt_qemu.connect()
    try:
        assert conn.lookupByName(domain).isActive()  # left behind, as a SIGKILL leaves it
    finally:
        conn.close()
    assert pool_pages() > hugepages

    # The next pilot on the node replays the journal first: the guest goes, then the memory comes back.
    second = site.manager.reserve(nodes=1, memory_mb=32, duration_s=600)
    assert site.wait(second, {"ready"} | TERMINAL, 60).state == "ready"
    assert entry not in os.listdir(site.journal_dir)
    conn = libvirt_qemu.connect()
    try:
        assert [d.name() for d, t in tagged_domains(conn) if t.slot == lease.slot] == []
    finally:
        conn.close()
    assert pool_pages() == hugepages + 16
    site.manager.release(second.id)
    assert site.wait(second, TERMINAL, 60).state == "released"
    assert_node_clean(site, libvirt_qemu, second, hugepages)


def test_a_guest_filling_its_disk_fills_only_its_overlay_within_the_budget(vm_site, libvirt_qemu, tmp_path, hugepages):
    """The guest writes its whole writable disk: the writes land in the pilot's overlay (never the image), the
    overlay stays within the worst case the budget counted, and a dead pilot's overlay goes with kill-all."""
    from pilot.vm.overlay import worst_case_bytes
    from pilot.vm.vmfiles import vm_file, vm_files_dir_of

    images = tmp_path / "images"
    images.mkdir(mode=0o755)
    for name in ("vmlinuz", "initrd.img"):
        shutil.copyfile(os.path.join(GUEST_DIR, name), images / name)
    disk_bytes = 24 * 2**20
    (images / "disk.raw").write_bytes(bytes(disk_bytes))
    image_sha256 = hashlib.sha256((images / "disk.raw").read_bytes()).hexdigest()
    site = vm_site("slurm", vms={"image_dir": str(images), "disk_budget": 45, "disk_reserve": 0})
    spec = guest_spec("guest1")
    spec["boot"]["cmdline"] += " wp_fill"
    spec["disk"] = {"path": "disk.raw", "sha256": image_sha256}
    lease, domain = guest_running(site, libvirt_qemu, tmp_path, duration_s=600, spec=spec)
    console = str(tmp_path / "consoles" / "guest1.log")
    assert wait_for_line(console, f"workspace-pilot test guest filled {disk_bytes // 512}", 120), console
    overlay = vm_file(vm_files_dir_of(site.journal_dir), domain, "qcow2")
    # The guest runs as libvirt-qemu, never root: it owns its overlay and its copy of the kernel, while the
    # images it came from stay root's, as they were (libvirt never handed them over).
    guest_uid = pwd.getpwnam("libvirt-qemu").pw_uid
    assert qemu_uid(domain) == guest_uid
    assert os.stat(overlay).st_uid == guest_uid
    assert os.stat(vm_file(vm_files_dir_of(site.journal_dir), domain, "kernel")).st_uid == guest_uid
    assert [(os.stat(images / n).st_uid, oct(os.stat(images / n).st_mode)) for n in ("disk.raw", "vmlinuz")] == [
        (0, "0o100644")] * 2
    taken = os.stat(overlay).st_blocks * 512
    assert disk_bytes <= taken <= worst_case_bytes(disk_bytes), taken  # every write, and no more than counted
    assert hashlib.sha256((images / "disk.raw").read_bytes()).hexdigest() == image_sha256  # the image: untouched

    # The pilot dies (SIGKILL: no teardown); kill-all destroys its guest and removes the overlay it left.
    [entry] = [n for n in os.listdir(site.journal_dir) if n.endswith(".json")]
    os.kill(int(entry.split(".")[-2]), 9)
    site.wait(lease, TERMINAL, 60)
    assert os.path.exists(overlay)
    backout = subprocess.run(
        [sys.executable, "-m", "admin_tools.killall", "--config", site.pilot_config, "--term-timeout", "30"],
        capture_output=True, text=True, timeout=120,
    )
    assert backout.returncode == 0, backout.stdout + backout.stderr
    assert not os.path.exists(overlay) and not [n for n in os.listdir(os.path.dirname(overlay)) if n.endswith(".qcow2")]
    assert_node_clean(site, libvirt_qemu, lease, hugepages)


def qemu_uid(domain_name: str) -> int:
    """The uid the QEMU process of ``domain_name`` runs as (libvirt's pid file names it)."""
    with open(f"/run/libvirt/qemu/{domain_name}.pid", encoding="ascii") as handle:
        return os.stat(f"/proc/{int(handle.read().strip())}").st_uid


def vcpu_time_ns(domain) -> int:
    """The guest's vCPUs' own CPU time (their threads'), in ns: QEMU's other threads do not count."""
    return sum(vcpu[2] for vcpu in domain.vcpus()[0])


def alive_lines(console: str) -> list[int]:
    with open(console, encoding="utf-8", errors="replace") as handle:
        return [int(n) for n in re.findall(rf"{GUEST_ALIVE} (\d+)", handle.read())]


def test_a_suspended_guest_uses_no_cpu_and_runs_on_once_resumed(vm_site, libvirt_qemu, tmp_path, hugepages):
    import libvirt

    site = vm_site("slurm", warn_before_s=5)  # long before its deadline: only the release warns it
    lease, name = guest_running(site, libvirt_qemu, tmp_path, duration_s=600)
    console = str(tmp_path / "consoles" / "guest1.log")
    conn = libvirt_qemu.connect()
    try:
        domain = conn.lookupByName(name)
        assert wait_for_line(console, f"{GUEST_ALIVE} 1", 30)  # past its boot: it prints a line every 2 s
        assert site.vms.suspend(lease.id, "guest1").state == "running"  # queued; the pilot's report moves it
        paused = site.vms.wait(lease.id, "guest1", {"paused", "failed", "lost"}, 30)
        assert paused is not None and paused.state == "paused", site.vms.get(lease.id, "guest1")
        assert domain.info()[0] == libvirt.VIR_DOMAIN_PAUSED
        assert site.manager.get(lease.id).state == "running"  # a paused VM still holds its memory
        before = vcpu_time_ns(domain)
        time.sleep(3)  # an observation window: longer than the guest's 2 s between "alive" lines
        assert vcpu_time_ns(domain) == before, "a paused guest's vCPUs ran"

        site.vms.resume(lease.id, "guest1")
        resumed = site.vms.wait(lease.id, "guest1", {"running", "failed", "lost"}, 30)
        assert resumed is not None and resumed.state == "running" and resumed.reason.startswith("resumed in")
        last = max(alive_lines(console))
        assert wait_for_line(console, f"{GUEST_ALIVE} {last + 1}", 30), "the guest did not run on"
        assert vcpu_time_ns(domain) > before
    finally:
        conn.close()
    site.manager.release(lease.id)
    assert site.wait(lease, TERMINAL, 60).state == "released"
    with open(console, encoding="utf-8", errors="replace") as handle:
        warnings = re.findall(r"workspace-pilot test guest lease: ending \S+ \d+ (\w+)", handle.read())
    # Told before it was stopped, once. The release reaches the pilot twice, as the service's release command and
    # as the batch system's SIGTERM of the cancelled job; whichever comes first names it.
    assert warnings in (["release"], ["stop"])
    assert_node_clean(site, libvirt_qemu, lease, hugepages)


def test_the_pilot_warns_its_guest_on_the_lease_channel_before_the_deadline(vm_site, libvirt_qemu, tmp_path,
                                                                           hugepages):
    site = vm_site("slurm", warn_before_s=20)
    lease, _ = guest_running(site, libvirt_qemu, tmp_path, duration_s=40)
    console = str(tmp_path / "consoles" / "guest1.log")
    assert wait_for_line(console, "workspace-pilot test guest lease channel open", 30)
    done = site.wait(lease, TERMINAL, 90)
    assert done.state == "expired", done.reason
    with open(console, encoding="utf-8", errors="replace") as handle:
        found = re.search(r"workspace-pilot test guest lease: ending (\S+) (\d+) deadline", handle.read())
    assert found, "the guest never read the pilot's warning"
    (pilot,) = done.pilots
    assert parse_time(found.group(1)) == parse_time(pilot.expires_at)  # the line names the pilot's own deadline
    assert int(found.group(2)) <= 20
    kinds = [e.kind if e.kind == "ending" else e.new_state for e in site.manager.history(lease.id)]
    assert kinds.index("ready") < kinds.index("ending") < kinds.index("releasing") < kinds.index("expired")
    assert_node_clean(site, libvirt_qemu, lease, hugepages)


def test_a_guest_started_after_the_warning_is_told_at_its_start(vm_site, libvirt_qemu, tmp_path, hugepages):
    site = vm_site("slurm", warn_before_s=600)  # more than the lease: the pilot warns as soon as it holds
    lease, _ = guest_running(site, libvirt_qemu, tmp_path, duration_s=300)
    console = str(tmp_path / "consoles" / "guest1.log")
    assert wait_for_line(console, "workspace-pilot test guest lease: ending", 30), "the late guest was not told"
    site.manager.release(lease.id)
    done = site.wait(lease, TERMINAL, 60)
    assert done.state == "released", done.reason
    with open(console, encoding="utf-8", errors="replace") as handle:
        told = re.findall(r"workspace-pilot test guest lease: ending (\S+) \d+ (\w+)", handle.read())
    (pilot,) = done.pilots
    assert told[0] == (pilot.expires_at, "deadline")  # the warning it missed, with the pilot's own deadline
    assert [why for _, why in told[1:]] in (["release"], ["stop"])
    assert_node_clean(site, libvirt_qemu, lease, hugepages)



def mjf_lines(console: str) -> list[int]:
    with open(console, encoding="utf-8", errors="replace") as handle:
        return [int(n) for n in re.findall(r"workspace-pilot test guest mjf shutdowntime_job (\d+)", handle.read())]


def test_a_guest_reads_its_end_in_its_machine_job_features_sees_an_extension_and_says_when_it_is_busy(
        vm_site, libvirt_qemu, tmp_path, hugepages):
    site = vm_site("slurm", vms={"usage_interval": 1})
    spec = guest_spec("guest1")
    spec["context"] = {"hostname": "guest1"}  # a seed: the guest agent comes with it
    spec["boot"]["cmdline"] += " wp_busy=12"  # a workload busy for 12 s, then idle
    lease, _ = guest_running(site, libvirt_qemu, tmp_path, duration_s=120, spec=spec)
    console = str(tmp_path / "consoles" / "guest1.log")
    assert wait_for_line(console, "workspace-pilot test guest mjf shutdowntime_job ", 30)
    (pilot,) = site.manager.get(lease.id).pilots
    first = mjf_lines(console)[0]
    assert first == int(parse_time(pilot.expires_at).timestamp())  # the file names the pilot's own deadline
    # The workload's word reaches the service through the agent, the lease channel and the pilot's vm-usage.
    # Busy while its CPU idles: only the agent's word can say so (by its CPU alone the pilot would say idle).
    vm = lambda: site.vms.get(lease.id, "guest1")  # noqa: E731
    assert site.store.wait_for(lambda: vm().busy == 1 and vm().cpu is not None and vm().cpu < 10, 30), vm()
    assert site.store.wait_for(lambda: vm().busy == 0, 60), vm()
    site.manager.extend(lease.id, 60)
    # The pilot's own answer: its deadline moved (the batch system's new time limit allowing).
    assert site.store.wait_for(lambda: site.manager.get(lease.id).pilots[0].expires_at != pilot.expires_at, 30), \
        site.manager.history(lease.id)
    (pilot,) = site.manager.get(lease.id).pilots
    extended = int(parse_time(pilot.expires_at).timestamp())
    assert extended > first
    assert wait_for_line(console, f"workspace-pilot test guest mjf shutdowntime_job {extended}", 30), mjf_lines(console)
    site.manager.release(lease.id)
    assert site.wait(lease, TERMINAL, 60).state == "released"
    assert mjf_lines(console)[-1] < extended  # the release brought the end closer: the files said so too
    assert_node_clean(site, libvirt_qemu, lease, hugepages)
