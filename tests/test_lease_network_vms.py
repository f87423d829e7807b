"""Leased VMs a person can reach, end to end: the real service, real pilots, real libvirtd and QEMU on two nodes.

Each node is a network namespace with its own libvirtd (``tests.support.netlab``),
joined to the others, the service's side and the owner's side by an
underlay the module makes and removes. The service (a ``LocalSite`` with
private lease networks) listens in the hub; its local provider starts each
pilot in its node's namespace with that node's config (own journal, own
libvirt, own host cgroup for the lease's memory). The test guest
(scripts/build-test-guest.sh) asks DHCP for its address and answers on
port 22 with a line naming itself, then runs one shell line: the stand-in
for an SSH login, reached only through what ``vm list`` prints.
"""

from __future__ import annotations

import os
import sys

import pytest

from tests.support.libvirt_daemon import missing_commands
from tests.support.netlab import LeaseLab, sh

pytestmark = [pytest.mark.hypervisor,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, libvirtd, nftables)")]

PREFIX = f"wpv{os.getpid() % 100000}"
NODES = {"node1": "192.0.2.1", "node2": "192.0.2.2"}


def make_lab(prefix: str, nodes: dict[str, str]) -> LeaseLab:
    if missing_commands():
        pytest.skip(f"libvirt/QEMU not installed ({', '.join(missing_commands())}): run scripts/bootstrap.sh --vm")
    return LeaseLab(prefix, nodes)


@pytest.fixture(scope="module")
def lab(libvirt_qemu):
    # libvirt_qemu: each node's libvirtd reads this machine's qemu.conf, whose hugetlbfs mount (/dev/hugepages)
    # the session's libvirtd makes; without it their QEMU driver does not load.
    made = make_lab(PREFIX, NODES)
    try:
        yield made.open()
    finally:
        made.close()


@pytest.fixture(scope="module")
def cluster(lab):
    """Lease A on both nodes (web on node1, db on node2) and lease B on node1 (x), their guests up."""
    a, b = lab.lease(2), lab.lease(1)
    vms = {"web": lab.start_vm(a, "web", "node1"), "db": lab.start_vm(a, "db", "node2"),
           "x": lab.start_vm(b, "x", "node1")}
    yield a, b, vms
    for lease in (a, b):
        lab.site.leases.release(lease.id)
    for lease in (a, b):
        lab.site.leases.wait(lease.id, {"released", "expired", "failed"}, 60)


def test_each_vm_got_the_address_and_name_the_service_allocated(cluster):
    _, _, vms = cluster
    for name, vm in vms.items():
        assert vm["console"] == (vm["ip"], vm["hostname"]) == (vm["ip"], name)
    assert vms["web"]["ip"].startswith("10.213.0.") and vms["db"]["ip"].startswith("10.213.0.")
    assert vms["x"]["ip"].startswith("10.213.1.")  # lease B's own subnet
    assert vms["web"]["login"]["host"] == NODES["node1"] and vms["db"]["login"]["host"] == NODES["node2"]


def test_the_owner_logs_in_through_vm_list_and_reaches_the_peer_by_name_and_address(lab, cluster):
    _, _, vms = cluster
    said = lab.login(vms["web"], "a=$(nslookup db | awk '/^Address/ {a=$NF} END {print a}'); echo db is $a; "
                                 "ping -c 1 -W 3 $a >/dev/null && echo reached $a")
    assert said.splitlines()[0] == f"workspace-pilot test guest web {vms['web']['ip']}"
    assert f"db is {vms['db']['ip']}" in said and f"reached {vms['db']['ip']}" in said
    back = lab.login(vms["db"], f"ping -c 1 -W 3 {vms['web']['ip']} >/dev/null && echo reached web")
    assert "reached web" in back


def test_another_leases_vm_reaches_neither(lab, cluster):
    _, _, vms = cluster
    said = lab.login(vms["x"], "ip route add 10.213.0.0/24 via 10.213.1.1; "
                               f"for a in {vms['web']['ip']} {vms['db']['ip']}; do "
                               "ping -c 1 -W 2 $a >/dev/null && echo reached $a || echo unreachable $a; done")
    assert f"unreachable {vms['web']['ip']}" in said and f"unreachable {vms['db']['ip']}" in said


def test_a_vm_that_takes_another_address_is_cut_off(lab, cluster):
    _, _, vms = cluster
    db = vms["db"]["ip"]
    said = lab.login(vms["web"], f"ip addr add 10.213.0.99/24 dev eth0; "
                                 f"ping -c 1 -W 2 -I 10.213.0.99 {db} >/dev/null && echo spoofed || echo dropped; "
                                 f"ip addr del 10.213.0.99/24 dev eth0; "
                                 f"ping -c 1 -W 2 {db} >/dev/null && echo own-address-works")
    assert "dropped" in said and "spoofed" not in said and "own-address-works" in said


def test_release_leaves_no_device_filter_forward_or_dhcp_server(lab):
    lease = lab.lease(2)
    vm = lab.start_vm(lease, "solo", "node2")
    assert lab.leftovers("node2", vm)  # bridge, VXLAN, tap, tables, dnsmasq, files, the domain
    lab.site.leases.release(lease.id)
    done = lab.site.leases.wait(lease.id, {"released", "expired", "failed"}, 60)
    assert done.state == "released", done
    assert lab.leftovers("node2", vm) == []
    assert lab.journal("node2", lease.slot) == []
    refused = sh("busybox", "nc", "-w", "3", vm["login"]["host"], str(vm["login"]["port"]), ns=lab.net.owner,
                 input="", check=False)
    assert refused.stdout == ""  # the forward is gone with the VM


def test_a_sigkilled_pilots_network_is_removed_by_killall():
    # A node of its own: kill-all stops every pilot on its node.
    lone = make_lab(f"{PREFIX}k", {"node1": "192.0.2.1"})
    try:
        lone.open()
        lease = lone.lease(1)
        vm = lone.start_vm(lease, "orphan", "node1")
        (pilot,) = lone.site.provider._jobs[lease.job_id].processes
        pilot.kill()
        pilot.wait(10)
        assert lone.leftovers("node1", vm)
        out = sh(*lone.site.provider.on_node("node1", [sys.executable, "-m", "admin_tools.killall", "--config",
                                                        lone.site.provider.configs["node1"], "--no-notify"]),
                 timeout=120, check=False, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"removed network {vm['spec']['nic']['net']['name']}" in out.stdout, out.stdout
        assert lone.leftovers("node1", vm) == []
        assert lone.journal("node1", lease.slot) == []
    finally:
        lone.close()
