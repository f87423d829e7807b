"""Lease networks on real nodes' kernels: bridges, VXLAN, nftables, dnsmasq, forwards (pilot.net), as root.

Two nodes and the owner's side are network namespaces this module makes on
an underlay of its own (a bridge in a fourth namespace, 192.0.2.0/24) and
removes at the end. Each node runs the pilot's :class:`NodeNetworks` in
``tests.support.netnode`` (a process in the node's namespace, as the pilot would
be). A VM's NIC is stood in for by a namespace whose veth has the VM's MAC
and whose other end carries the tap name on the node's bridge, where
libvirt would put the VM's tap (the real VMs' test is
``test_lease_network_vms``); it asks for its address with busybox's udhcpc.
The addresses come from the service's real allocation (a store on disk).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from service_adapter.networks import NetworkPlan, parse_ranges
from tests.support.netlab import NetLab, kill_all_in, sh
from tests.support.vmservice import VmService, spec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)")

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = f"wpn{os.getpid() % 100000}"
NODES = {"node1": "192.0.2.1", "node2": "192.0.2.2"}


class Node:
    """A node's namespace and the pilot's networks in it (``tests.support.netnode``)."""

    def __init__(self, lab: NetLab, name: str, workdir: str):
        self.lab, self.name, self.address = lab, name, lab.nodes[name]
        self.ns = lab.ns(name)
        self.run_root = os.path.join(workdir, name, "net")
        self.journal = os.path.join(workdir, name, "journal.json")
        os.makedirs(os.path.dirname(self.journal), exist_ok=True)
        self.agent: subprocess.Popen | None = None

    def start_agent(self) -> None:
        self.agent = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, os.path.join(TOP, ".venv", "bin", "python"), "-m", "tests.support.netnode",
             self.run_root, self.journal, self.address],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=TOP)
        assert json.loads(self.agent.stdout.readline())["ok"]

    def ask(self, op: str, **fields) -> dict:
        self.agent.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.agent.stdin.flush()
        line = self.agent.stdout.readline()
        assert line, f"the agent on {self.name} ended"
        return json.loads(line)

    def kill_agent(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            os.kill(self.agent.pid, signal.SIGKILL)
            self.agent.wait(10)
        self.agent = None

    def leftovers(self) -> list[str]:
        """What of the pilot's networks is still on this node: devices, nft tables, processes, files."""
        return self.lab.leftovers(self.name, ignore_pids={self.agent.pid} if self.agent else (),
                                  run_root=self.run_root)


class Guest:
    """A stand-in for a VM's NIC: a namespace whose eth0 has the VM's MAC, its other end as the VM's tap."""

    def __init__(self, node: Node, nic: dict, mtu: int | None, bridge: str | None = None):
        self.node, self.nic = node, nic
        mtu = mtu or 1500
        self.ns = f"{PREFIX}-g{int(ipaddress.IPv4Address(nic['ip'])) & 0xffff:x}"
        self.tap = f"wpt-{int(ipaddress.IPv4Address(nic['ip'])):08x}"
        sh("ip", "netns", "add", self.ns)
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", self.tap, "netns", node.ns, "mtu", str(mtu), "type", "veth", "peer", "name", "eth0",
           "netns", self.ns)
        sh("ip", "-n", self.ns, "link", "set", "eth0", "address", nic["mac"], "mtu", str(mtu), "up")
        bridge = bridge or f"wpb-{nic['net']['vni']:06x}"
        sh("ip", "-n", node.ns, "link", "set", self.tap, "master", bridge, "up")

    def dhcp(self) -> dict:
        """Ask for an address like a VM would (busybox udhcpc); what the lease said (empty: no answer)."""
        script = os.path.join(TOP, "tests", "support", "udhcpc-report.sh")
        result = sh("busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-t", "3", "-T", "1", "-s", script,
                    "-O", "mtu", ns=self.ns, check=False, timeout=20)
        for line in result.stdout.splitlines():
            if line.startswith("lease "):
                return dict(part.split("=", 1) for part in line.split()[1:])
        return {}

    def configure(self, ip: str, prefix: int) -> None:
        sh("ip", "-n", self.ns, "addr", "add", f"{ip}/{prefix}", "dev", "eth0")

    def ping(self, address: str, source: str | None = None) -> bool:
        argv = ["busybox", "ping", "-c", "1", "-W", "1"] + (["-I", source] if source else []) + [address]
        return sh(*argv, ns=self.ns, check=False).returncode == 0

    def resolve(self, name: str, server: str) -> str | None:
        out = sh("busybox", "nslookup", name, server, ns=self.ns, check=False).stdout
        answers = [line.split()[-1] for line in out.splitlines()[2:] if line.startswith("Address")]
        return answers[0] if answers else None

    def remove(self) -> None:
        kill_all_in(self.ns)
        sh("ip", "netns", "del", self.ns, check=False)


@pytest.fixture(scope="module")
def lan():
    """The underlay: nodes 192.0.2.1 and .2 and the owner's side .100 on one bridge; removed at the end.

    The nodes' files are in a directory others may search (pytest's own are root's alone): dnsmasq reads
    its files as nobody, as it would in /run/workspace-pilot/net."""
    workdir = tempfile.mkdtemp(prefix=f"{PREFIX}-")
    os.chmod(workdir, 0o755)
    lab = NetLab(PREFIX, NODES)
    try:
        lab.open()
        yield {name: Node(lab, name, workdir) for name in NODES}
    finally:
        lab.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def service(tmp_path):
    plan = NetworkPlan(mode="private", lease_range=ipaddress.IPv4Network("10.213.0.0/16"), lease_prefix=24)
    svc = VmService(tmp_path, network_plan=plan)
    yield svc
    svc.close()


@pytest.fixture
def nodes(lan):
    for node in lan.values():
        node.start_agent()
    guests: list[Guest] = []
    yield lan, guests
    for guest in guests:
        guest.remove()
    for node in lan.values():
        if node.agent is not None:
            node.ask("teardown")
        node.kill_agent()
        if os.path.exists(node.journal):
            journalled = json.load(open(node.journal))
            for name in journalled["nets"]:
                sh("ip", "netns", "exec", node.ns, os.path.join(TOP, ".venv", "bin", "python"), "-c",
                   f"from pilot.net.cleanup import remove_network; remove_network({name!r}, {node.run_root!r})",
                   cwd=TOP)
            os.unlink(node.journal)


def start(service, lease_id, slot, *names_hosts):
    """Start VMs through the service's API; {name: (host, nic dict)} from the start-vm commands queued."""
    response = service.start(lease_id, *(spec(name, 64, host=host) for name, host in names_hosts))
    assert response.status_code == 202, response.text
    return {body["vm"]["name"]: (host, body["vm"]["nic"]) for host, op, body in service.commands(slot)
            if op == "start-vm"}


def network_updates(service, slot):
    return [(host, body["net"]) for host, op, body in service.commands(slot) if op == "network"]


def boot(nodes, guests, host, nic) -> Guest:
    """What the pilot does at a VM's start (attach), then the VM's NIC appears on the bridge."""
    answer = nodes[host].ask("attach", nic=nic)
    assert answer["ok"], answer
    guest = Guest(nodes[host], nic, answer["interface"]["mtu"], answer["interface"]["bridge"])
    guests.append(guest)
    return guest


def test_each_vm_gets_its_address_by_dhcp_from_its_own_node_and_reaches_the_other_by_address_and_name(service, nodes):
    nodes, guests = nodes
    lease_id, slot = service.ready_lease(("node1", "node2"), addresses=NODES)
    vms = start(service, lease_id, slot, ("web", "node1"), ("db", "node2"))
    web = boot(nodes, guests, *vms["web"])
    db = boot(nodes, guests, *vms["db"])
    for guest in (web, db):
        lease = guest.dhcp()
        assert lease["ip"] == guest.nic["ip"] and lease["mask"] == "24"
        assert (lease["dns"], lease["domain"], lease.get("router", "")) == ("10.213.0.1", "vm.internal", "")
        assert lease["hostname"] == guest.nic["hostname"] and lease["mtu"] == "1450"  # the overlay's MTU
        guest.configure(lease["ip"], 24)
    assert web.ping(db.nic["ip"]) and db.ping(web.nic["ip"])
    assert web.resolve("db", "10.213.0.1") == db.nic["ip"]
    assert db.resolve("web.vm.internal", "10.213.0.1") == web.nic["ip"]
    assert web.resolve("example.org", "10.213.0.1") is None  # the lease's names and nothing else


def test_a_mac_the_service_did_not_allocate_gets_no_address(service, nodes):
    nodes, guests = nodes
    lease_id, slot = service.ready_lease(("node1", "node2"), addresses=NODES)
    vms = start(service, lease_id, slot, ("web", "node1"))
    boot(nodes, guests, *vms["web"])
    host, nic = vms["web"]
    stranger = Guest(nodes[host], dict(nic, ip="10.213.0.77", mac="52:54:0a:d5:00:4d"), 1450)
    guests.append(stranger)
    assert stranger.dhcp() == {}


def test_a_vm_started_later_is_answered_by_name_on_the_node_of_an_earlier_one(service, nodes):
    nodes, guests = nodes
    lease_id, slot = service.ready_lease(("node1", "node2"), addresses=NODES)
    first = start(service, lease_id, slot, ("a", "node1"))
    a = boot(nodes, guests, *first["a"])
    a.configure(a.dhcp()["ip"], 24)
    later = start(service, lease_id, slot, ("b", "node2"))
    boot(nodes, guests, *later["b"])
    assert a.resolve("b", "10.213.0.1") is None  # node1 has not heard of b yet
    ((host, net),) = network_updates(service, slot)
    assert host == "node1"
    assert nodes["node1"].ask("apply", net=net)["ok"]
    assert a.resolve("b", "10.213.0.1") == later["b"][1]["ip"]


def test_a_vm_that_takes_another_address_or_mac_is_cut_off(service, nodes):
    nodes, guests = nodes
    lease_id, slot = service.ready_lease(("node1", "node2"), addresses=NODES)
    vms = start(service, lease_id, slot, ("web", "node1"), ("db", "node2"))
    web, db = (boot(nodes, guests, *vms[name]) for name in ("web", "db"))
    for guest in (web, db):
        guest.configure(guest.dhcp()["ip"], 24)
    assert web.ping(db.nic["ip"])
    web.configure("10.213.0.99", 24)
    assert not web.ping(db.nic["ip"], source="10.213.0.99")  # a second address: its packets are dropped
    assert web.ping(db.nic["ip"])  # its own still works
    sh("ip", "-n", web.ns, "link", "set", "eth0", "address", "52:54:0a:d5:00:63")
    assert not web.ping(db.nic["ip"])  # another MAC: nothing it sends passes
    sh("ip", "-n", web.ns, "link", "set", "eth0", "address", web.nic["mac"])
    assert web.ping(db.nic["ip"])


def test_another_leases_vms_are_never_reachable(service, nodes):
    nodes, guests = nodes
    first, slot1 = service.ready_lease(("node1", "node2"), addresses=NODES)
    second, slot2 = service.ready_lease(("node1", "node2"), addresses=NODES)
    mine = start(service, first, slot1, ("a", "node1"), ("b", "node2"))
    theirs = start(service, second, slot2, ("x", "node1"))
    a, b = (boot(nodes, guests, *mine[name]) for name in ("a", "b"))
    x = boot(nodes, guests, *theirs["x"])
    for guest in (a, b, x):
        guest.configure(guest.dhcp()["ip"], 24)
    assert x.nic["ip"].startswith("10.213.1.")
    assert a.ping(b.nic["ip"])
    # A route through the node's gateway to the other lease's subnet: the node routes nothing.
    sh("ip", "-n", x.ns, "route", "add", "10.213.0.0/24", "via", "10.213.1.1")
    assert not x.ping(a.nic["ip"]) and not x.ping(b.nic["ip"])


def test_the_owner_reaches_each_vms_ssh_through_its_nodes_forward(service, nodes):
    nodes, guests = nodes
    lease_id, slot = service.ready_lease(("node1", "node2"), addresses=NODES)
    vms = start(service, lease_id, slot, ("web", "node1"), ("db", "node2"))
    listed = {vm["name"]: vm for vm in service.api("GET", f"/leases/{lease_id}/vms").json()["vms"]}
    for name in ("web", "db"):
        guest = boot(nodes, guests, *vms[name])
        guest.configure(guest.dhcp()["ip"], 24)
        # The VM's SSH stand-in: it says it listens once it does, then greets one client.
        server = subprocess.Popen(
            ["ip", "netns", "exec", guest.ns, sys.executable, "-c",
             "import socket; s = socket.create_server(('0.0.0.0', 22)); print('listening', flush=True); "
             f"c, _ = s.accept(); c.sendall(b'SSH-2.0-stand-in {name}\\r\\n'); c.close()"],
            stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "listening"
            login = listed[name]["login"]
            # From outside both nodes, to what vm list told the owner: the node's address and the port.
            said = sh("busybox", "nc", "-w", "5", login["host"], str(login["port"]), ns=nodes["node1"].lab.owner,
                      input="").stdout
            assert said.strip() == f"SSH-2.0-stand-in {name}"
        finally:
            server.kill()
            server.wait(10)


def test_teardown_leaves_no_device_filter_process_or_file(service, nodes):
    nodes, guests = nodes
    lease_id, slot = service.ready_lease(("node1", "node2"), addresses=NODES)
    vms = start(service, lease_id, slot, ("web", "node1"), ("db", "node2"))
    for name in ("web", "db"):
        boot(nodes, guests, *vms[name]).dhcp()
    assert nodes["node1"].leftovers()  # there is something to remove
    for guest in guests:
        guest.remove()  # the VMs are destroyed first
    guests.clear()
    for node in nodes.values():
        answer = node.ask("teardown")
        assert answer == {"ok": True, "removed": ["l100000"]}
        assert node.leftovers() == []
        assert json.load(open(node.journal))["nets"] == []


def test_after_a_sigkill_the_journalled_name_is_enough_to_remove_everything(service, nodes):
    nodes, guests = nodes
    lease_id, slot = service.ready_lease(("node1", "node2"), addresses=NODES)
    vms = start(service, lease_id, slot, ("web", "node1"))
    boot(nodes, guests, *vms["web"]).dhcp()
    node = nodes["node1"]
    node.kill_agent()
    journalled = json.load(open(node.journal))
    assert journalled["nets"] == ["l100000"]
    assert any(item.startswith("process") for item in node.leftovers())  # its dnsmasq outlives it
    for guest in guests:
        guest.remove()
    guests.clear()
    removed = sh("ip", "netns", "exec", node.ns, os.path.join(TOP, ".venv", "bin", "python"), "-c",
                 "import json, sys; from pilot.net.cleanup import remove_network; "
                 f"print(json.dumps(remove_network('l100000', {journalled['net_root']!r})))", cwd=TOP)
    assert json.loads(removed.stdout) == ["dnsmasq", "nft bridge table", "nft ip table", "wpx-0186a0", "wpb-0186a0"]
    assert node.leftovers() == []
    os.unlink(node.journal)
    node.start_agent()  # for the fixture's teardown


def test_a_node_without_an_address_builds_nothing_and_says_why(tmp_path):
    from pilot.net.commands import NetError
    from pilot.net.nodenets import NodeNetworks
    from workspace_common.protocol.network import NetState, Nic, mac_for

    net = NetState("l100000", "lease", "10.213.0.0/24", "10.213.0.1", "vm.internal", 1, 100000, 4789)
    journalled = []
    networks = NodeNetworks(own_address=None, forward_address=None, run_root=str(tmp_path / "net"),
                            before_first=journalled.append)
    with pytest.raises(NetError, match=r"this node has no address for the lease network's overlay: set \[networks\] "
                                       "address"):
        networks.attach(Nic(mac_for("10.213.0.2"), "10.213.0.2", "web", net))
    assert journalled == [("l100000",), ()]  # noted before anything was made, cleared once nothing was left
    assert not os.path.exists("/sys/class/net/wpb-0186a0")
    assert networks.teardown() == []


def test_site_mode_puts_the_vm_on_the_sites_bridge_with_the_same_filters_and_leaves_the_bridge(tmp_path, nodes):
    nodes, guests = nodes
    plan = NetworkPlan(mode="site", site_network=ipaddress.IPv4Network("198.51.100.0/24"),
                       site_gateway=ipaddress.IPv4Address("198.51.100.1"),
                       site_pool=parse_ranges("198.51.100.20-198.51.100.29"), site_bridge="br-site")
    site = VmService(tmp_path, network_plan=plan)
    node = nodes["node1"]
    # The site's bridge on the node, with the site's router address (the site makes these, not the pilot).
    sh("ip", "-n", node.ns, "link", "add", "br-site", "type", "bridge")
    sh("ip", "-n", node.ns, "addr", "add", "198.51.100.1/24", "dev", "br-site")
    sh("ip", "-n", node.ns, "link", "set", "br-site", "up")
    try:
        lease_id, slot = site.ready_lease(("node1",), addresses=NODES)
        vms = start(site, lease_id, slot, ("a", "node1"), ("b", "node1"))
        a, b = (boot(nodes, guests, *vms[name]) for name in ("a", "b"))
        for guest in (a, b):
            guest.configure(guest.nic["ip"], 24)  # from its seed's network-config: no DHCP on a site network
        assert a.ping(b.nic["ip"]) and a.ping("198.51.100.1")
        a.configure("198.51.100.99", 24)
        assert not a.ping(b.nic["ip"], source="198.51.100.99")
        for guest in guests:
            guest.remove()
        guests.clear()
        assert node.ask("teardown")["ok"]
        assert [t for t in sh("nft", "list", "tables", ns=node.ns).stdout.splitlines() if "wpilot_" in t] == []
        assert sh("ip", "-o", "link", "show", "dev", "br-site", ns=node.ns).returncode == 0  # the site's stays
    finally:
        sh("ip", "-n", node.ns, "link", "delete", "br-site", check=False)
        site.close()


def test_a_network_that_cannot_be_built_is_removed_at_once_and_the_vm_is_refused_with_why(service, lan):
    # dnsmasq, running as nobody, could not read its files under a root-only directory: found after the bridge,
    # the VXLAN and the filters were made.
    node = lan["node1"]
    hidden = tempfile.mkdtemp(prefix=f"{PREFIX}-hidden-")  # 0700
    broken = Node(node.lab, "node1", hidden)
    broken.start_agent()
    try:
        lease_id, slot = service.ready_lease(("node1",), addresses=NODES)
        (_, nic), = start(service, lease_id, slot, ("web", "node1")).values()
        answer = broken.ask("attach", nic=nic)
        assert not answer["ok"]
        assert "dnsmasq runs as nobody and cannot reach" in answer["error"]
        assert broken.leftovers() == []
        assert json.load(open(broken.journal))["nets"] == []
    finally:
        broken.kill_agent()
        shutil.rmtree(hidden, ignore_errors=True)
