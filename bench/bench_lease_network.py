#!/usr/bin/env python3
"""How long until a leased VM has its address and its owner can reach it, and what the network adds (issue 33).

Run from the repository root, as root (namespaces, libvirtd, nftables)::

    .venv/bin/python bench/bench_lease_network.py [--nodes 1,2,4] [--starts 4] [--json FILE]

``reach``: for each node count N, a lab of N nodes (``tests.support.netlab.LeaseLab``: each node a namespace with its
own libvirtd, the real service in the hub, real pilots) leases all N with a private lease network and starts
one test guest on each in one request. Per VM, from the start request: ``running`` (the pilot reported
vm-running), ``address`` (the guest printed the address its node's DHCP gave it; the console is read every
10 ms) and ``reachable`` (the owner's side, outside every node, first read the guest's greeting through the
forward that ``vm list`` names; tried every 20 ms).

``cost``: on one node, ``--starts`` VMs one after another, with the network (private) and without (none);
the pilot's own time from the start-vm to the domain created (the ``started in N ms`` of its vm-running),
the first start (it builds the lease network) apart from the later ones.

``ops``: the network's own steps on a node, without VMs (the pilot's NodeNetworks in a node's namespace,
``tests.support.netnode``, ``--rounds`` times): build and let the first VM on, let another VM on, let one off, remove
it all; milliseconds as the node's agent answered them.

Everything runs under QEMU's software emulation (no KVM here): the guests' boot dominates ``address`` and
``reachable``; ``running`` and ``cost`` are the pilot's and the service's own.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from service_adapter.lease import vm_json  # noqa: E402
from service_adapter.vms import parse_vm_request  # noqa: E402
from tests.support.netlab import GUEST_ADDRESS, LeaseLab, guest_spec, in_netns  # noqa: E402

STARTED = re.compile(r"started in (\d+) ms")


def _wait_console(path: str, since: float, timeout: float = 180) -> float:
    """Seconds from ``since`` until the console at ``path`` holds the guest's address line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                if GUEST_ADDRESS in handle.read():
                    return time.monotonic() - since
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    raise TimeoutError(f"no address line in {path}")


def _wait_reachable(lab: LeaseLab, host: str, port: int, since: float, timeout: float = 180) -> float:
    """Seconds from ``since`` until the owner's side reads the guest's greeting through the forward."""
    deadline = time.monotonic() + timeout
    with in_netns(lab.net.owner):
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((host, port), timeout=1) as sock:
                    sock.settimeout(1)
                    if sock.recv(200).startswith(b"workspace-pilot test guest"):
                        return time.monotonic() - since
            except OSError:
                pass
            time.sleep(0.02)
    raise TimeoutError(f"{host}:{port} never answered")


def reach(nodes: int) -> list[dict]:
    """One lease of ``nodes`` nodes, one guest on each started at once: each VM's three times, in seconds."""
    addresses = {f"node{i}": f"192.0.2.{i}" for i in range(1, nodes + 1)}
    lab = LeaseLab(f"wpb{os.getpid() % 10000}r{nodes}", addresses)
    try:
        lab.open()
        lease = lab.lease(nodes)
        specs = [parse_vm_request(guest_spec(f"vm{i}", host)) for i, host in enumerate(addresses, 1)]
        since = time.monotonic()
        lab.site.vms.start(lease.id, specs)
        results, threads = [], []

        def follow(name: str, host: str) -> None:
            vm = lab.site.vms.wait(lease.id, name, {"running", "failed"}, 120)
            running = time.monotonic() - since
            assert vm is not None and vm.state == "running", vm
            login = vm_json(lab.site.vms.get(lease.id, name))["login"]
            address = _wait_console(lab.console(host, name), since)
            reachable = _wait_reachable(lab, login["host"], login["port"], since)
            results.append({"nodes": nodes, "vm": name, "running_s": running, "address_s": address,
                            "reachable_s": reachable})

        for (spec, host) in specs:
            threads.append(threading.Thread(target=follow, args=(spec.name, host)))
            threads[-1].start()
        for thread in threads:
            thread.join(300)
        lab.site.leases.release(lease.id)
        lab.site.leases.wait(lease.id, {"released", "expired", "failed"}, 60)
        return sorted(results, key=lambda r: r["vm"])
    finally:
        lab.close()


def cost(mode: str, starts: int) -> list[int]:
    """The pilot's start-vm to domain-created times (ms) of ``starts`` VMs one after another on one node."""
    lab = LeaseLab(f"wpb{os.getpid() % 10000}c{mode[0]}", {"node1": "192.0.2.1"}, network_mode=mode)
    try:
        lab.open()
        lease = lab.site.leases.reserve(nodes=1, memory_mb=starts * 160, duration_s=600)
        assert lab.site.leases.wait(lease.id, {"ready"}, 60) is not None
        took = []
        for i in range(starts):
            name = f"c{i}"
            lab.site.vms.start(lease.id, [parse_vm_request(guest_spec(name, "node1"))])
            vm = lab.site.vms.wait(lease.id, name, {"running", "failed"}, 120)
            assert vm is not None and vm.state == "running", vm
            took.append(int(STARTED.search(vm.reason).group(1)))
        lab.site.leases.release(lease.id)
        lab.site.leases.wait(lease.id, {"released", "expired", "failed"}, 60)
        return took
    finally:
        lab.close()


def ops(rounds: int) -> dict[str, list[float]]:
    """Milliseconds of each network step, ``rounds`` times, on one node of a NetLab (no VMs, no libvirt)."""
    import subprocess
    import tempfile

    from workspace_common.protocol.network import NetState, Nic, mac_for
    from tests.support.netlab import NetLab

    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workdir = tempfile.mkdtemp(prefix="wpb-ops-")
    os.chmod(workdir, 0o755)
    lab = NetLab(f"wpb{os.getpid() % 10000}o", {"node1": "192.0.2.1", "node2": "192.0.2.2"})
    took: dict[str, list[float]] = {"build_and_first_vm": [], "another_vm": [], "vm_off": [], "remove": []}
    try:
        lab.open()
        agent = subprocess.Popen(
            ["ip", "netns", "exec", lab.ns("node1"), sys.executable, "-m", "tests.support.netnode",
             os.path.join(workdir, "net"), os.path.join(workdir, "journal.json"), "192.0.2.1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=top)
        agent.stdout.readline()

        def ask(op: str, **fields) -> float:
            t0 = time.perf_counter()
            agent.stdin.write(json.dumps({"op": op, **fields}) + "\n")
            agent.stdin.flush()
            answer = json.loads(agent.stdout.readline())
            assert answer["ok"], answer
            return (time.perf_counter() - t0) * 1000

        for round_ in range(rounds):
            hosts = [{"name": "a", "ip": "10.213.0.2"}, {"name": "b", "ip": "10.213.0.3"}]
            net = NetState.from_dict("net", {
                "name": "l100000", "kind": "lease", "subnet": "10.213.0.0/24", "gateway": "10.213.0.1",
                "domain": "vm.internal", "generation": round_ + 1, "vni": 100000, "port": 4789,
                "nodes": ["192.0.2.1", "192.0.2.2"], "hosts": hosts})
            nics = [Nic(mac_for(h["ip"]), h["ip"], h["name"], net, 20000 + i).to_dict() for i, h in enumerate(hosts)]
            took["build_and_first_vm"].append(ask("attach", nic=nics[0]))
            took["another_vm"].append(ask("attach", nic=nics[1]))
            took["vm_off"].append(ask("detach", nic=nics[1]))
            ask("detach", nic=nics[0])
            took["remove"].append(ask("teardown"))
        agent.stdin.close()
        agent.wait(10)
        return took
    finally:
        lab.close()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1,2,4", help="node counts for the reach run (default 1,2,4)")
    parser.add_argument("--starts", type=int, default=4, help="VMs one after another for the cost run (default 4)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the network's own steps (default 10)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_lease_network: needs root", file=sys.stderr)
        return 2
    out: dict = {"reach": [], "cost": {}, "ops": ops(args.rounds)}
    for step, values in out["ops"].items():
        print(f"ops: {step}: median {statistics.median(values):.1f} ms, max {max(values):.1f} ms")
    print("reach (s from the start request): nodes  vm  running  address  reachable")
    for nodes in (int(n) for n in args.nodes.split(",")):
        for row in reach(nodes):
            out["reach"].append(row)
            print(f"  {row['nodes']}  {row['vm']}  {row['running_s']:.2f}  {row['address_s']:.2f}  "
                  f"{row['reachable_s']:.2f}")
    for mode in ("none", "private"):
        took = out["cost"][mode] = cost(mode, args.starts)
        later = statistics.median(took[1:]) if len(took) > 1 else float("nan")
        print(f"cost ({mode}): first start {took[0]} ms, later ones median {later:.0f} ms ({took})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(out, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
