#!/usr/bin/env python3
"""From a lease request to an SSH login in a VM of the real cloud image, split into shares (issue 34).

Run from the repository root, as root, after ``scripts/bootstrap.sh --vm --cloud-image``::

    .venv/bin/python bench/bench_lease_slurm.py -- --nodes 1 2 4 --rounds 3 --json bench/results/lease-slurm-34.json
    .venv/bin/python bench/bench_cloud_path.py --nodes 1,2,4 --slurm bench/results/lease-slurm-34.json \\
        --json bench/results/cloud-path.json --plot bench/results/cloud-path.png

For each N a lab of N nodes (``tests.support.netlab.LeaseLab``: each node a network namespace with its own libvirtd,
the real service in the hub, real pilots, a private lease network) approves the Debian 12 cloud image through
the site's catalogue (an endorser's signed list), leases N nodes, and starts one VM on each in one request,
every node's image cache empty. Per VM, on the bench's one clock:

- ``lease``: the reserve call to the lease ready (the local provider's fork/exec, the pilots' start and their
  ``reserved``); the batch system's own dispatch is not in it: ``--slurm`` takes ``dispatch`` (sbatch to the
  pilot's start) from a ``lease-bench --provider slurm`` run of the real 4-node Slurm on this machine;
- ``image``: the VM start request to the domain's creation, less QEMU's start: the command's delivery, the
  image fetched into the node's cache (cold: from the service, or at N > 1 partly from the lease's other
  nodes; chunks from peers counted from the pilot's log), hashed, the seed and the disk overlay written;
- ``qemu``: libvirt's ``createXML`` (the pilot's log);
- ``boot``: the domain created to cloud-init's first stage on the console (kernel, initramfs, systemd);
- ``cloud-init``: its first stage to its ``finished`` line (host name, keys, network-config, user-data);
- ``ssh``: one ``ssh`` login running ``true``, from the owner's side outside every node, right after.

At N = 1 a second VM then starts on the same node with the image in its cache (``image`` warm).
The console is read every 50 ms. All of it under QEMU's software emulation (TCG, no KVM here).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from service_adapter.cloudimage import cloud_vm_spec, endorse_cloud_image  # noqa: E402
from service_adapter.lease import vm_json  # noqa: E402
from service_adapter.vms import parse_vm_request  # noqa: E402
from tests.support.netlab import LeaseLab, sh  # noqa: E402

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLOUD_DIR = os.path.join(TOP, ".cache", "cloud-image")
VM_MB = 512
STARTED = re.compile(r"started in (\d+) ms")
CREATED = re.compile(r"started VM (\S+) as domain \S+ \(\d+ MB\) in ([0-9.]+) ms")
FROM_PEERS = re.compile(r"image ([0-9a-f]{64}): (\d+) chunk\(s\) from peers, (\d+) from the service")
SHARES = ("dispatch", "lease", "image", "qemu", "boot", "cloud-init", "ssh")


def console_times(path: str, since: float, timeout: float = 900) -> tuple[float, float]:
    """Seconds from ``since`` until the console shows cloud-init's first stage, then its end (read every 50 ms)."""
    marks = ["running 'init-local'", " finished at "]
    seen: list[float] = []
    deadline = time.monotonic() + timeout
    while marks and time.monotonic() < deadline:
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except FileNotFoundError:
            text = ""
        while marks and marks[0] in text:
            seen.append(time.monotonic() - since)
            marks.pop(0)
        time.sleep(0.05)
    if marks:
        raise TimeoutError(f"{path}: no {marks[0]!r} within {timeout} s")
    return seen[0], seen[1]


def ssh_seconds(lab: LeaseLab, login: dict, key: str) -> float:
    """One ssh login running ``true`` from the owner's side; its seconds."""
    started = time.monotonic()
    sh("ssh", "-i", key, "-p", str(login["port"]), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
       "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=30", "-o", "LogLevel=ERROR",
       f"debian@{login['host']}", "true", ns=lab.net.owner, timeout=120)
    return time.monotonic() - started


def created_ms(lab: LeaseLab, host: str, slot: str, name: str) -> float:
    """QEMU's start of VM ``name`` (createXML), from its pilot's log."""
    with open(os.path.join(lab.node_dir(host, "logs"), f"{slot}.{host}.log"), encoding="utf-8") as handle:
        for vm, ms in CREATED.findall(handle.read()):
            if vm == name:
                return float(ms)
    raise LookupError(f"no 'started VM {name}' in {host}'s log")


def peer_chunks(lab: LeaseLab, host: str, slot: str) -> tuple[int, int]:
    """Chunks the node had from its peers and from the service, over the images it fetched."""
    with open(os.path.join(lab.node_dir(host, "logs"), f"{slot}.{host}.log"), encoding="utf-8") as handle:
        found = FROM_PEERS.findall(handle.read())
    return sum(int(p) for _, p, _ in found), sum(int(s) for _, _, s in found)


def one_vm(lab: LeaseLab, lease, name: str, host: str, key: str, since: float, out: dict) -> None:
    """Follow one VM from its start request (at ``since``) to its first ssh login; its shares into ``out``."""
    vm = lab.site.vms.wait(lease.id, name, {"running", "failed"}, 900)
    running = time.monotonic() - since
    assert vm is not None and vm.state == "running", vm
    pilot_ms = int(STARTED.search(vm.reason).group(1))
    qemu_ms = created_ms(lab, host, lease.slot, name)
    first_stage, finished = console_times(lab.console(host, name), since)
    ssh_s = ssh_seconds(lab, vm_json(lab.site.vms.get(lease.id, name))["login"], key)
    out.update({"vm": name, "host": host, "image": running - qemu_ms / 1000, "pilot_prepare_ms": pilot_ms - qemu_ms,
                "qemu": qemu_ms / 1000, "boot": first_stage - running, "cloud-init": finished - first_stage,
                "ssh": ssh_s, "total_vm": finished + ssh_s})


def run(nodes: int, prefix: str) -> dict:
    """One lab of ``nodes`` nodes: the lease, one VM per node at once, and at N = 1 a warm-cache start."""
    addresses = {f"node{i}": f"192.0.2.{i}" for i in range(1, nodes + 1)}
    lab = LeaseLab(f"{prefix}n{nodes}", addresses, images=True)
    try:
        lab.open()
        endorse_cloud_image(lab.site.catalog, CLOUD_DIR, os.path.join(lab.workdir, "endorser"), "operator")
        key = os.path.join(lab.workdir, "owner_key")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True, timeout=30)
        with open(key + ".pub", encoding="utf-8") as handle:
            public = handle.read().strip()
        asked = time.monotonic()
        lease = lab.site.leases.reserve(nodes=nodes, memory_mb=2 * (VM_MB + 64), duration_s=1800)
        ready = lab.site.leases.wait(lease.id, {"ready", "failed"}, 120)
        assert ready is not None and ready.state == "ready", ready
        lease_s = time.monotonic() - asked
        since = time.monotonic()
        names = {f"vm{i}": host for i, host in enumerate(addresses, 1)}
        lab.site.vms.start(lease.id, [parse_vm_request(cloud_vm_spec(name, host, VM_MB, public))
                                      for name, host in names.items()])
        results = {name: {} for name in names}
        threads = [threading.Thread(target=one_vm, args=(lab, lease, name, host, key, since, results[name]))
                   for name, host in names.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(1200)
        vms = []
        for name, host in names.items():
            assert results[name], f"{name} did not finish (see its thread's error above)"
            peers, service = peer_chunks(lab, host, lease.slot)
            vms.append({**results[name], "lease": lease_s, "chunks_from_peers": peers, "chunks_from_service": service})
        warm = None
        if nodes == 1:
            started = time.monotonic()
            lab.site.vms.start(lease.id, [parse_vm_request(cloud_vm_spec("warm", "node1", VM_MB, public))])
            vm = lab.site.vms.wait(lease.id, "warm", {"running", "failed"}, 300)
            assert vm is not None and vm.state == "running", vm
            qemu_ms = created_ms(lab, "node1", lease.slot, "warm")
            warm = {"image": time.monotonic() - started - qemu_ms / 1000, "qemu": qemu_ms / 1000}
        lab.site.leases.release(lease.id)
        lab.site.leases.wait(lease.id, {"released", "expired", "failed"}, 120)
        return {"nodes": nodes, "vms": vms, "warm": warm}
    finally:
        lab.close()


def slurm_dispatch(path: str | None) -> dict[int, float]:
    """N -> the median dispatch (s) of a lease-bench --provider slurm JSON, if given."""
    if not path:
        return {}
    with open(path, encoding="utf-8") as handle:
        summary = json.load(handle)["summary"]
    return {int(n): stages["standup"]["phases"]["dispatch"]["median"] / 1000 for n, stages in summary.items()}


def table(runs: list[dict], dispatch: dict[int, float]) -> list[dict]:
    """Per N, the median of each share over the VMs (seconds)."""
    rows = []
    for one in runs:
        row = {"nodes": one["nodes"], "dispatch": dispatch.get(one["nodes"])}
        for share in ("lease", "image", "qemu", "boot", "cloud-init", "ssh", "total_vm"):
            row[share] = statistics.median(vm[share] for vm in one["vms"])
        row["peers"] = f"{sum(vm['chunks_from_peers'] for vm in one['vms'])}/" \
                       f"{sum(vm['chunks_from_peers'] + vm['chunks_from_service'] for vm in one['vms'])}"
        row["warm_image"] = one["warm"]["image"] if one["warm"] else None
        rows.append(row)
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = ("#777777", "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")
    fig, ax = plt.subplots(figsize=(9, 3.2))
    for y, row in enumerate(rows):
        left = 0.0
        for share, colour in zip(SHARES, colours):
            width = row[share] or 0.0
            ax.barh(y, width, left=left, color=colour, label=share if y == 0 else None)
            left += width
    ax.set_yticks(range(len(rows)), [f"N = {row['nodes']}" for row in rows])
    ax.invert_yaxis()
    ax.set_xlabel("seconds (median VM), QEMU software emulation (TCG) on 2 shared cores")
    ax.set_title("Lease request to SSH login in a Debian 12 cloud-init VM")
    ax.legend(ncol=7, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,2,4", help="node counts, comma-separated (default 1,2,4)")
    parser.add_argument("--slurm", metavar="FILE", help="a lease-bench --provider slurm JSON for the dispatch share")
    parser.add_argument("--json", metavar="FILE", help="write every VM's shares and the table here")
    parser.add_argument("--plot", metavar="FILE", help="a PNG of the shares")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_cloud_path: needs root", file=sys.stderr)
        return 3
    if not os.path.isfile(os.path.join(CLOUD_DIR, "SHA256SUMS")):
        print(f"bench_cloud_path: no cloud image in {CLOUD_DIR}: run scripts/bootstrap.sh --cloud-image",
              file=sys.stderr)
        return 3
    prefix = f"wpk{os.getpid() % 10000}"
    runs = []
    for nodes in (int(n) for n in args.nodes.split(",")):
        runs.append(run(nodes, prefix))
        print(json.dumps(runs[-1]), flush=True)
    rows = table(runs, slurm_dispatch(args.slurm))
    header = ("N", "dispatch (Slurm)", "lease", "image", "qemu", "boot", "cloud-init", "ssh", "VM total",
              "chunks from peers", "image warm")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    fmt = lambda value: "-" if value is None else f"{value:.2f}"  # noqa: E731
    for row in rows:
        print(f"| {row['nodes']} | {fmt(row['dispatch'])} | {fmt(row['lease'])} | {fmt(row['image'])} | "
              f"{fmt(row['qemu'])} | {fmt(row['boot'])} | {fmt(row['cloud-init'])} | {fmt(row['ssh'])} | "
              f"{fmt(row['total_vm'])} | {row['peers']} | {fmt(row['warm_image'])} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"runs": runs, "table": rows}, handle, indent=1)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
