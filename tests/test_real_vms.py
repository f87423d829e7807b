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

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from pilot.vm.tag import tagged_domains
from service_adapter.vms import parse_vm_request
from tests.conftest import pool_pages
from tests.libvirt_daemon import GUEST_DIR, GUEST_UP, guest_files, wait_for_line
from tests.slurm_cluster import TERMINAL, ServiceOnCluster, close_sites

VM_MB = 128
LEASE_MB = VM_MB + 64  # the pilots' default per-VM overhead


@pytest.fixture
def vm_site(tmp_path, slurm_cluster, libvirt_qemu):
    sites = []

    def make(provider: str, **options) -> ServiceOnCluster:
        sections = {
            "libvirt": {"uri": libvirt_qemu.uri},
            "vms": {"image_dir": GUEST_DIR, "console_dir": str(tmp_path / "consoles"), "poll_wait": 5,
                    "shutdown_timeout": 2},
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


def guest_running(site, libvirt_qemu, tmp_path, duration_s: float):
    """A ready one-node lease with the test guest booted on it; (lease, domain name)."""
    lease = site.manager.reserve(nodes=1, memory_mb=LEASE_MB, duration_s=duration_s)
    ready = site.wait(lease, {"ready"} | TERMINAL, 60)
    assert ready.state == "ready", ready.reason
    available = available_hugepages()
    site.vms.start(lease.id, [parse_vm_request(guest_spec("guest1"))])
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


def assert_node_clean(site, libvirt_qemu, lease, pool_before: int) -> None:
    conn = libvirt_qemu.connect()
    try:
        assert [d.name() for d, t in tagged_domains(conn) if t.slot == lease.slot] == []
    finally:
        conn.close()
    assert pool_pages() == pool_before
    journal = [n for n in os.listdir(site.journal_dir) if n.endswith(".json")]
    assert journal == []


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
