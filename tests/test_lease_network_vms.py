"""Leased VMs a person can reach, end to end: the real service, real pilots, real libvirtd and QEMU on two nodes.

Each node is a network namespace with its own libvirtd (``tests.netlab``),
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

import ipaddress
import os
import re
import shutil
import sys
import tempfile

import pytest

from service_adapter.local_site import LocalSite, write_pilot_config
from service_adapter.networks import NetworkPlan
from service_adapter.providers.local import LocalProvider
from service_adapter.vms import parse_vm_request
from tests.libvirt_daemon import GUEST_DIR, guest_files, missing_commands, wait_for_line
from tests.netlab import HUB_ADDRESS, NetLab, NodeLibvirtd, in_netns, sh

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, libvirtd, nftables)")

PREFIX = f"wpv{os.getpid() % 100000}"
NODES = {"node1": "192.0.2.1", "node2": "192.0.2.2"}
VM_MB = 96
LEASE_MB = 2 * (VM_MB + 64)
CGROUP_ROOT = "/sys/fs/cgroup/memory"
ADDRESS_LINE = re.compile(r"workspace-pilot test guest address (\S+) (\S+)")


class NetnsProvider(LocalProvider):
    """The local provider, each pilot started in its node's namespace with its node's own config."""

    def __init__(self, output_dir: str, lab: NetLab):
        super().__init__(output_dir, fixed_hosts=tuple(lab.nodes))
        self.lab = lab
        self.configs: dict[str, str] = {}

    def pilot_argv(self, job, host):
        argv = super().pilot_argv(job, host)
        if self.configs:
            argv[argv.index("--config") + 1] = self.configs[host]
        # nsenter, not ip netns exec: that mounts a /sys of the namespace, without the cgroups under it.
        return ["nsenter", f"--net=/run/netns/{self.lab.ns(host)}", *argv]


class Lab:
    """``nodes`` (name -> address), their daemons and cgroups, and the service in the hub; names start ``prefix``."""

    def __init__(self, prefix: str, nodes: dict[str, str]):
        if missing_commands():
            pytest.skip(f"libvirt/QEMU not installed ({', '.join(missing_commands())}): run scripts/bootstrap.sh --vm")
        self.prefix, self.nodes = prefix, dict(nodes)
        self.workdir = tempfile.mkdtemp(prefix=f"{prefix}-")
        os.chmod(self.workdir, 0o755)  # the guests' user and dnsmasq's find their way down
        self.net = NetLab(prefix, nodes)
        self.daemons: dict[str, NodeLibvirtd] = {}
        self.cgroups: dict[str, str] = {}
        self.site: LocalSite | None = None

    def node_dir(self, host: str, *parts: str) -> str:
        return os.path.join(self.workdir, host, *parts)

    def open(self) -> "Lab":
        self.net.open()
        for host in self.nodes:
            self.daemons[host] = NodeLibvirtd(self.net.ns(host), self.node_dir(host, "libvirt")).start()
            self.cgroups[host] = os.path.join(CGROUP_ROOT, f"{self.prefix}-{host}")
            os.makedirs(self.cgroups[host])
        provider = NetnsProvider(os.path.join(self.workdir, "site", "jobs"), self.net)
        plan = NetworkPlan(mode="private", lease_range=ipaddress.IPv4Network("10.213.0.0/16"), lease_prefix=24)
        with in_netns(self.net.hub):  # the receiver's and the manager's threads live there
            self.site = LocalSite(os.path.join(self.workdir, "site"), listen_host=HUB_ADDRESS, provider=provider,
                                  network_plan=plan, grace_s=8, status_interval_s=0.3)
        for host in self.nodes:
            provider.configs[host] = self.write_config(host)
        return self

    def write_config(self, host: str) -> str:
        path = self.node_dir(host, "pilot.conf")
        write_pilot_config(
            path, contact=self.site.contact, node_key_file=os.path.join(self.site.node_key_dir, "{host}.key"),
            log_dir=self.node_dir(host, "logs"), journal_dir=self.node_dir(host, "journal"),
            sections={
                "memory": {"backend": "cgroup", "cgroup": self.cgroups[host], "minmem": 64},
                "libvirt": {"uri": self.daemons[host].uri},
                "vms": {"image_dir": GUEST_DIR, "console_dir": self.node_dir(host, "consoles"), "poll_wait": 5,
                        "shutdown_timeout": 2},
                "networks": {"run_dir": self.node_dir(host, "net")},
            })
        return path

    def close(self) -> None:
        try:
            if self.site is not None:
                self.site.close()
        finally:
            for daemon in self.daemons.values():
                daemon.stop()
            self.net.close()
            for cgroup in self.cgroups.values():
                os.rmdir(cgroup)
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- leases and VMs ---------------------------------------------------------------------------

    def lease(self, nodes: int):
        lease = self.site.leases.reserve(nodes=nodes, memory_mb=LEASE_MB, duration_s=600)
        ready = self.site.leases.wait(lease.id, {"ready", "failed", "expired", "released"}, 60)
        assert ready is not None and ready.state == "ready", ready
        return lease

    def start_vm(self, lease, name: str, host: str) -> dict:
        """Start the test guest ``name`` on ``host``; once it printed its address: the VM as ``vm list`` shows it
        to the owner, with ``console`` (what the guest said its address and name were)."""
        files = guest_files()
        spec = {"name": name, "memory_mb": VM_MB, "host": host,
                "boot": {"kernel": {"path": "vmlinuz", "sha256": files.kernel_sha256},
                         "initrd": {"path": "initrd.img", "sha256": files.initrd_sha256},
                         "cmdline": "console=ttyS0 panic=-1 quiet"},
                "console_log": f"{name}.log"}
        self.site.vms.start(lease.id, [parse_vm_request(spec)])
        vm = self.site.vms.wait(lease.id, name, {"running", "failed"}, 60)
        assert vm is not None and vm.state == "running", self.site.vms.get(lease.id, name)
        console = self.node_dir(host, "consoles", f"{name}.log")
        assert wait_for_line(console, "workspace-pilot test guest address", 120), open(console).read()[-2000:]
        from service_adapter.lease import vm_json

        shown = vm_json(self.site.vms.get(lease.id, name), owner=True)
        shown["console"] = ADDRESS_LINE.search(open(console).read()).groups()
        return shown

    def login(self, vm: dict, line: str) -> str:
        """From the owner's side, through what ``vm list`` told the owner: the guest's greeting and ``line``'s output."""
        host, port = vm["login"]["host"], vm["login"]["port"]
        return sh("busybox", "nc", "-w", "20", host, str(port), ns=self.net.owner, input=line + "\n",
                  timeout=40).stdout

    def leftovers(self, host: str, vm: dict) -> list[str]:
        """What of ``vm``'s lease network (and the VM itself) is still on ``host``: devices, tables, its DHCP
        server, files, the domain."""
        net = vm["spec"]["nic"]["net"]["name"]
        tag = f"{int(net[1:]):06x}"
        ours = (f"wpb-{tag}", f"wpx-{tag}", f"wpt-{int(ipaddress.IPv4Address(vm['ip'])):08x}", f"wpilot_{net}",
                os.path.join(self.node_dir(host, "net"), net))
        found = [item for item in self.net.leftovers(host, ignore_pids=self.daemons[host].pids(),
                                                     run_root=self.node_dir(host, "net"))
                 if any(mark in item for mark in ours) or item == f"file {net}"]
        domains = sh("virsh", "-c", self.daemons[host].uri, "list", "--name").stdout.split()
        found += [f"domain {d}" for d in domains if d.endswith(f"-{vm['name']}")]
        return found

    def journal(self, host: str, slot: str) -> list[str]:
        """The slot's entries in ``host``'s journal."""
        directory = self.node_dir(host, "journal")
        return [name for name in os.listdir(directory) if name.startswith(slot + ".")]


@pytest.fixture(scope="module")
def lab():
    made = Lab(PREFIX, NODES)
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
    lone = Lab(f"{PREFIX}k", {"node1": "192.0.2.1"})
    try:
        lone.open()
        lease = lone.lease(1)
        vm = lone.start_vm(lease, "orphan", "node1")
        (pilot,) = lone.site.provider._jobs[lease.job_id].processes
        pilot.kill()
        pilot.wait(10)
        assert lone.leftovers("node1", vm)
        out = sh("nsenter", f"--net=/run/netns/{lone.net.ns('node1')}", sys.executable, "-m", "admin_tools.killall",
                 "--config", lone.site.provider.configs["node1"], "--no-notify", timeout=120, check=False,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"removed network {vm['spec']['nic']['net']['name']}" in out.stdout, out.stdout
        assert lone.leftovers("node1", vm) == []
        assert lone.journal("node1", lease.slot) == []
    finally:
        lone.close()
