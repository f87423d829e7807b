"""Address pools at the service: each VM's MAC, IP, host name and forwarded port, allocated with its start.

The real aiohttp app, store (SQLite on disk), lease and VM managers on
127.0.0.1, with the operators' API over HTTP (``requests`` with digest) and
the pilots' notifications signed as a node would sign them. The batch
system is the stand-in of ``test_vm_api`` (no pilot runs here: what a pilot
does with the addresses is ``test_lease_network``'s).
"""

from __future__ import annotations

import ipaddress
import json
import sqlite3
import threading

import pytest

from workspace_common.protocol import Command, mac_for
from service_adapter.networks import NetworkPlan, parse_ranges
from tests.support.vmservice import OTHER_OPERATOR, OTHER_SECRET, VmService, cli, one_line_error, spec  # noqa: F401 (cli)

NODE_ADDRESSES = {"node1": "192.0.2.1", "node2": "192.0.2.2", "node3": "192.0.2.3"}


def private_plan(**changes) -> NetworkPlan:
    return NetworkPlan(**{"mode": "private", "lease_range": ipaddress.IPv4Network("10.213.0.0/16"),
                          "lease_prefix": 24, **changes})


@pytest.fixture
def svc(tmp_path, store_location):
    """The VM side of the service with private lease networks, on each store backend (SQLite, PostgreSQL)."""
    service = VmService(tmp_path, network_plan=private_plan(), store_location=store_location)
    yield service
    service.close()


def started(svc, lease_id, *specs, status=202):
    response = svc.start(lease_id, *specs)
    assert response.status_code == status, response.text
    return response.json()["vms"] if status == 202 else one_line_error(response)


def start_vm_commands(svc, slot):
    return {body["vm"]["name"]: (host, Command.from_dict({"id": 1, **body}).vm)
            for host, op, body in svc.commands(slot) if op == "start-vm"}


def test_each_vm_gets_an_address_of_its_leases_subnet_a_mac_a_name_and_a_forward_on_its_node(svc):
    lease_id, slot = svc.ready_lease(("node1", "node2"), addresses=NODE_ADDRESSES)
    vms = started(svc, lease_id, spec("web", 256, host="node1"), spec("db", 256, host="node2"))
    assert [(vm["name"], vm["ip"], vm["mac"], vm["hostname"]) for vm in vms] == [
        ("web", "10.213.0.2", "52:54:0a:d5:00:02", "web"), ("db", "10.213.0.3", "52:54:0a:d5:00:03", "db")]
    # The owner is told where to log in: each VM's node and the port it forwards there.
    assert [vm["login"] for vm in vms] == [{"host": "192.0.2.1", "port": 20000}, {"host": "192.0.2.2", "port": 20000}]

    commands = start_vm_commands(svc, slot)
    host, web = commands["web"]
    assert host == "node1"
    nic = web.nic
    assert (nic.ip, nic.mac, nic.hostname, nic.forward_port) == ("10.213.0.2", mac_for("10.213.0.2"), "web", 20000)
    net = nic.net
    assert (net.kind, net.subnet, net.gateway, net.vni, net.port, net.domain) == (
        "lease", "10.213.0.0/24", "10.213.0.1", 100000, 4789, "vm.internal")
    assert net.nodes == ("192.0.2.1", "192.0.2.2")  # the overlay reaches both nodes
    assert net.hosts == (("web", "10.213.0.2"), ("db", "10.213.0.3"))  # each VM's node knows both names
    assert commands["db"][1].nic.net == net

    shown = svc.api("GET", f"/leases/{lease_id}/vms/web").json()
    assert (shown["ip"], shown["login"]) == ("10.213.0.2", {"host": "192.0.2.1", "port": 20000})


def test_only_the_leases_owner_is_told_how_to_reach_its_vms(svc):
    lease_id, _ = svc.ready_lease(("node1",), addresses=NODE_ADDRESSES)
    started(svc, lease_id, spec("web", 256))
    other = dict(user=OTHER_OPERATOR, secret=OTHER_SECRET)
    for body in (svc.api("GET", f"/leases/{lease_id}/vms/web", **other).json(),
                 svc.api("GET", f"/leases/{lease_id}/vms", **other).json()["vms"][0],
                 svc.api("GET", f"/leases/{lease_id}", **other).json()["vms"][0]):
        assert "login" not in body and "nic" not in body["spec"]
        assert body["ip"] == "10.213.0.2"  # who holds which address is no secret among operators
    owner = svc.api("GET", f"/leases/{lease_id}").json()["vms"][0]
    assert owner["login"] == {"host": "192.0.2.1", "port": 20000} and "nic" in owner["spec"]


def test_each_lease_gets_its_own_subnet_and_vxlan_id_and_a_second_vm_on_a_node_its_own_port(svc):
    first, _ = svc.ready_lease(("node1",), addresses=NODE_ADDRESSES)
    second, slot2 = svc.ready_lease(("node1",), addresses=NODE_ADDRESSES)
    started(svc, first, spec("a", 128))
    (b,) = started(svc, second, spec("b", 128))
    assert b["ip"] == "10.213.1.2"
    (_, vm_b), = start_vm_commands(svc, slot2).values()
    assert (vm_b.nic.net.subnet, vm_b.nic.net.vni) == ("10.213.1.0/24", 100001)
    (c,) = started(svc, second, spec("c", 128))
    # Ports are the node's: lease one's VM holds 20000 on node1, lease two's VMs take the next ones.
    assert (b["login"]["port"], c["login"]["port"]) == (20001, 20002)


def test_an_address_comes_free_when_its_vm_stops_or_fails_and_is_handed_out_again(svc):
    lease_id, slot = svc.ready_lease(("node1",), addresses=NODE_ADDRESSES)
    started(svc, lease_id, spec("a", 64), spec("b", 64))
    commands = {body["vm"]["name"]: cid for cid, body in svc.store.commands_after(slot, "node1", 0)}
    svc.notify(slot, "node1", "vm-stopped", command=commands["a"], vms=["a"])
    svc.notify(slot, "node1", "vm-failed", command=commands["b"], vms=["b"], code=2, message="no disk")
    (c,) = started(svc, lease_id, spec("c", 64))
    assert (c["ip"], c["login"]["port"]) == ("10.213.0.2", 20000)  # a's address and port, free again
    listed = {vm["name"]: vm for vm in svc.api("GET", f"/leases/{lease_id}/vms").json()["vms"]}
    assert listed["a"]["ip"] == "10.213.0.2" and listed["a"]["login"] is None  # what it had; nothing to reach


def test_a_lost_vm_keeps_its_address_until_its_lease_ends(svc):
    lease_id, slot = svc.ready_lease(("node1",), addresses=NODE_ADDRESSES)
    started(svc, lease_id, spec("a", 64))
    assert svc.store.mark_lost(slot, "node1", now=0, why="silent for the test")
    assert svc.api("GET", f"/leases/{lease_id}/vms/a").json()["state"] == "lost"
    held = svc.store.read(lambda c: c.execute("SELECT ip FROM vms WHERE holds_address = 1").fetchall())
    assert held == [("10.213.0.2",)]  # it may still run on a node nobody hears from
    svc.api("POST", f"/leases/{lease_id}/release")
    svc.manager.tick()
    svc.notify(slot, "node1", "unreserved", memory_mb=0)
    svc.manager.tick()
    assert svc.api("GET", f"/leases/{lease_id}").json()["terminal"]
    assert svc.store.read(lambda c: c.execute("SELECT COUNT(*) FROM vms WHERE holds_address = 1").fetchone()) == (0,)
    assert svc.store.read(lambda c: c.execute("SELECT freed_at IS NOT NULL FROM lease_networks").fetchall()) == [(1,)]


def test_a_vm_started_later_is_made_known_to_the_nodes_that_run_the_leases_vms(svc):
    lease_id, slot = svc.ready_lease(("node1", "node2"), addresses=NODE_ADDRESSES)
    started(svc, lease_id, spec("a", 64, host="node1"))
    started(svc, lease_id, spec("b", 64, host="node2"))
    ops = [(host, op) for host, op, _ in svc.commands(slot)]
    assert ops == [("node1", "start-vm"), ("node2", "start-vm"), ("node1", "network")]
    update = Command.from_dict({"id": 1, **svc.commands(slot)[-1][2]}).net
    assert update.hosts == (("a", "10.213.0.2"), ("b", "10.213.0.3"))
    first = start_vm_commands(svc, slot)["a"][1].nic.net
    assert update.generation > first.generation  # a pilot keeps the newest whatever order it applies them in


def test_concurrent_starts_never_share_an_address(svc):
    lease_id, slot = svc.ready_lease(("node1", "node2"), addresses=NODE_ADDRESSES, memory_mb=4096)
    results, errors = [], []

    def start(index):
        response = svc.start(lease_id, spec(f"v{index}a", 32), spec(f"v{index}b", 32))
        (results if response.status_code == 202 else errors).append(response)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and len(results) == 12
    ips = [vm["ip"] for response in results for vm in response.json()["vms"]]
    assert len(ips) == len(set(ips)) == 24
    ports = [(vm["host"], vm["login"]["port"]) for response in results for vm in response.json()["vms"]]
    assert len(ports) == len(set(ports))
    queued = [vm.nic.ip for _, vm in start_vm_commands(svc, slot).values()]
    assert sorted(queued) == sorted(ips)


def test_the_store_itself_refuses_a_second_holder_of_an_address(svc):
    lease_id, _ = svc.ready_lease(("node1",), addresses=NODE_ADDRESSES)
    started(svc, lease_id, spec("a", 64))
    import psycopg

    with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError), match="UNIQUE|vm_addresses_held"):
        svc.store.submit(lambda c: c.execute(
            "INSERT INTO vms (lease_id, name, slot_id, host, memory_mb, vcpus, spec, state, reason, created_at,"
            " updated_at, ip, holds_address) SELECT lease_id, 'x', slot_id, host, 1, 1, '{}', 'starting', '', 0, 0,"
            " ip, 1 FROM vms WHERE name = 'a'")).result()


def test_an_exhausted_subnet_is_409_naming_it_and_starts_nothing(tmp_path):
    service = VmService(tmp_path, network_plan=private_plan(lease_prefix=29))
    try:
        lease_id, slot = service.ready_lease(("node1",), addresses=NODE_ADDRESSES, memory_mb=4096)
        vms = started(service, lease_id, *(spec(f"v{i}", 32) for i in range(5)))  # .2 to .6 of a /29
        assert [vm["ip"] for vm in vms] == [f"10.213.0.{i}" for i in range(2, 7)]
        before = service.commands(slot)
        error = started(service, lease_id, spec("v5", 32), spec("v6", 32), status=409)
        assert error == f"lease {lease_id}: lease subnet 10.213.0.0/29 is exhausted: every address is held by a VM"
        assert service.commands(slot) == before
        assert "v5" not in {vm["name"] for vm in service.api("GET", f"/leases/{lease_id}/vms").json()["vms"]}
    finally:
        service.close()


def test_an_exhausted_range_of_lease_subnets_is_409_and_the_lease_gets_no_network(tmp_path):
    service = VmService(tmp_path, network_plan=private_plan(lease_range=ipaddress.IPv4Network("10.213.0.0/28"),
                                                            lease_prefix=29))
    try:
        for _ in range(2):
            lease_id, _ = service.ready_lease(("node1",), addresses=NODE_ADDRESSES)
            started(service, lease_id, spec("a", 64))
        third, slot = service.ready_lease(("node1",), addresses=NODE_ADDRESSES)
        error = started(service, third, spec("a", 64), status=409)
        assert error == (f"lease {third}: lease_range 10.213.0.0/28 (/29 per lease) is exhausted: all 2 lease "
                         "subnets are held")
        assert service.commands(slot) == []
        assert service.store.read(lambda c: c.execute("SELECT COUNT(*) FROM lease_networks").fetchone()) == (2,)
    finally:
        service.close()


def test_an_exhausted_port_range_is_409_naming_the_node(tmp_path):
    service = VmService(tmp_path, network_plan=private_plan(forward_ports=(20000, 20001)))
    try:
        lease_id, _ = service.ready_lease(("node1",), addresses=NODE_ADDRESSES)
        started(service, lease_id, spec("a", 64), spec("b", 64))
        error = started(service, lease_id, spec("c", 64), status=409)
        assert error == f"lease {lease_id}: forward_ports 20000-20001 is exhausted on node1: every port forwards to a VM"
    finally:
        service.close()


@pytest.mark.parametrize("item,expected", [
    (spec("web", 64, nic={"mac": "52:54:0a:d5:00:02", "ip": "10.213.0.2", "hostname": "web", "net": {}}),
     "vm.nic.net.name"),
    (spec("web_1", 64), "VM web_1: its name must be a host name"),
    (spec("web", 64, network="default"), "this site gives each VM its lease's network; leave out 'network'"),
])
def test_a_vm_that_cannot_take_an_address_is_400_and_nothing_is_queued(svc, item, expected):
    lease_id, slot = svc.ready_lease(("node1",), addresses=NODE_ADDRESSES)
    response = svc.start(lease_id, item)
    assert response.status_code == 400, response.text
    assert expected in one_line_error(response)
    assert svc.commands(slot) == []


def test_a_given_nic_is_refused_even_when_well_formed(svc):
    lease_id, slot = svc.ready_lease(("node1",), addresses=NODE_ADDRESSES)
    started(svc, lease_id, spec("a", 64))
    (_, vm), = start_vm_commands(svc, slot).values()
    error = started(svc, lease_id, dict(spec("b", 64), nic=vm.nic.to_dict()), status=400)
    assert error == "vm.nic: the service gives each VM its address; leave out 'nic'"


def test_a_context_hostname_names_the_vm_on_its_network(svc):
    lease_id, slot = svc.ready_lease(("node1",), addresses=NODE_ADDRESSES)
    (vm,) = started(svc, lease_id, spec("web.1", 64, context={"hostname": "frontend"}))
    assert vm["hostname"] == "frontend"


def test_site_mode_hands_out_pool_addresses_on_the_site_bridge_and_the_vm_is_reached_directly(tmp_path):
    plan = NetworkPlan(mode="site", site_network=ipaddress.IPv4Network("198.51.100.0/24"),
                       site_gateway=ipaddress.IPv4Address("198.51.100.1"),
                       site_pool=parse_ranges("198.51.100.20-198.51.100.21"), site_bridge="br0")
    service = VmService(tmp_path, network_plan=plan)
    try:
        first, slot = service.ready_lease(("node1",), addresses=NODE_ADDRESSES)
        second, _ = service.ready_lease(("node1",), addresses=NODE_ADDRESSES)
        (a,) = started(service, first, spec("a", 64))
        (b,) = started(service, second, spec("b", 64))
        assert (a["ip"], b["ip"]) == ("198.51.100.20", "198.51.100.21")  # one pool for every lease
        assert a["login"] == {"host": "198.51.100.20", "port": 22}
        (_, vm), = start_vm_commands(service, slot).values()
        assert (vm.nic.net.kind, vm.nic.net.bridge, vm.nic.net.gateway, vm.nic.forward_port) == (
            "site", "br0", "198.51.100.1", None)
        error = started(service, first, spec("c", 64), status=409)
        assert error == (f"lease {first}: site_pool 198.51.100.20-198.51.100.21 is exhausted: every address is held"
                         " by a VM")
    finally:
        service.close()


def test_vm_list_and_show_tell_the_owner_each_vms_address_and_where_to_log_in(svc, cli):
    lease_id, _ = svc.ready_lease(("node1", "node2"), addresses=NODE_ADDRESSES)
    started(svc, lease_id, spec("web", 64, host="node1"), spec("db", 64, host="node2"))
    table = cli("vm", "list", lease_id)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.strip().splitlines()
    assert header.split() == ["VM", "HOST", "STATE", "MB", "USE", "ADDRESS", "LOGIN", "REASON"]
    assert [row.split()[:7] for row in rows] == [
        ["db", "node2", "starting", "64", "-", "10.213.0.3", "192.0.2.2:20000"],
        ["web", "node1", "starting", "64", "-", "10.213.0.2", "192.0.2.1:20000"]]
    shown = cli("vm", "show", lease_id, "db", "--json")
    assert shown.returncode == 0, shown.stderr
    body = json.loads(shown.stdout)
    assert (body["ip"], body["mac"], body["login"]) == ("10.213.0.3", "52:54:0a:d5:00:03",
                                                        {"host": "192.0.2.2", "port": 20000})
    text = cli("vm", "show", lease_id, "db").stdout.splitlines()
    assert text[0] == "VM db on node2: starting: start-vm queued for node2"
    assert "  address  10.213.0.3 (db, MAC 52:54:0a:d5:00:03)" in text
    assert "  login    ssh -p 20000 USER@192.0.2.2" in text
