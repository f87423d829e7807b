#!/usr/bin/env python3
"""A COBalD pool of leases against fixed pools, on the real 4-node Slurm with real QEMU guests (issue 37).

Run from the repository root, as root (Slurm, libvirtd, hugepages)::

    .venv/bin/python bench/bench_burst.py [--fixed 2,4] [--waves 0:4,120:2,240:3] [--json FILE] [--plot FILE.png]

The workload is simulated, the same for every pool: ``--waves`` says when how many jobs appear in the overlay's
queue (a Slurm partition whose jobs never run, ``tests.support.cobald.OverlayQueue``; the pool's ``waiting`` is
its pending jobs, asked of Slurm for real). A VM takes one job when it runs (the harness cancels it in the
overlay's queue) and is busy ``--job`` seconds from its boot (the test guest's ``wp_busy``: its agent says
busy, then idle). An idle VM takes the next waiting job at once; as the guest's busy time runs from its boot, the
simulation stops that VM and the next VM on its lease (a new boot) runs the job, so a job's run includes a boot.
On the COBalD pool the pool itself starts that VM; on a fixed pool the harness does.

- ``cobald``: a real COBalD daemon (``LinearController``: ``high_allocation`` 1.0, ``low_utilisation`` 0.5,
  rate 0.5 node/s, every 1 s) drives the pool of 1-node leases, at most 4.
- ``fixed-N``: N 1-node leases, reserved and their VMs booted and idle before the first wave; released once
  the last job is done.

Per pool, from one look every second at the service's API and at Slurm: each job's wait (it appeared, a VM took
it); for the COBalD pool, each lease from its VM's last idle word to its pilot job gone from Slurm (the node back
in the batch system); node-hours (nodes whose pilot job runs in Slurm, summed over the run, from the first wave
until the last job is done and every node is back) and the share of them a VM was busy; the time until the
last job was done.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from service_adapter.client import ClientError, LeaseClient  # noqa: E402
from tests.support.cobald import (  # noqa: E402
    CobaldDaemon, OverlayQueue, busy_guest_vm, pool_yaml, slurm_vm_site,
)
from tests.support.libvirt_daemon import LibvirtDaemon  # noqa: E402
from tests.support.realvms import LEASE_MB  # noqa: E402
from tests.support.site import OPERATOR, OPERATOR_SECRET, Site, serving  # noqa: E402
from tests.support.slurm_cluster import SlurmCluster  # noqa: E402

DEMAND = re.compile(r"lease pool: demand ([\d.]+), supply ([\d.]+)")
ENDED = ("released", "expired", "failed", "missing")


class Harness:
    """The workload and the looks of one run: jobs appear by the waves, VMs take them, idle VMs make room."""

    def __init__(self, site: Site, cluster: SlurmCluster, queue: OverlayQueue, client: LeaseClient,
                 waves: list[tuple[float, int]], vm: dict | None):
        self.site, self.cluster, self.queue, self.client = site, cluster, queue, client
        self.waves = sorted(waves)
        self.vm = vm  # the spec the harness starts again itself (a fixed pool); None: the pool does
        self.t0 = 0.0
        self.appeared: dict[str, float] = {}  # job -> when it appeared
        self.taken: dict[str, float] = {}  # job -> when a VM took it
        self.done: dict[str, float] = {}  # job -> when its VM said idle
        self.lives: dict[tuple, str | None] = {}  # (lease, VM name, created_at) -> the job that VM life took
        self.idle_at: dict[str, float] = {}  # lease -> when its VM last turned idle
        self.claimed: dict[str, str] = {}  # lease -> the job its next VM life runs (taken by its idle VM)
        self.returned: dict[str, float] = {}  # lease -> when its pilot job was gone from Slurm
        self.samples: list[dict] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    def submit_due(self) -> None:
        while self.waves and self.waves[0][0] <= self.now():
            _, count = self.waves.pop(0)
            for job in self.queue.submit(count):
                self.appeared[job] = self.now()

    def all_done(self) -> bool:
        return not self.waves and len(self.done) == len(self.appeared)

    def running_pilot_nodes(self) -> dict[str, int]:
        """Pilot jobs that run in Slurm (not the overlay's), with their node counts."""
        result = self.cluster.run(["squeue", "--noheader", "--states", "RUNNING", "--format", "%i %D %P"])
        jobs = {}
        for line in result.stdout.splitlines():
            job, nodes, partition = line.split()
            if partition != self.queue.name:
                jobs[job] = int(nodes)
        return jobs

    def look(self, cobald_log: str | None) -> dict:
        """One look: jobs taken and done, idle VMs stopped (and started again), the numbers of this second."""
        self.submit_due()
        t = self.now()
        leases = self.client.list(owner=OPERATOR)["leases"]
        busy = 0
        for lease in leases:
            open_lease = lease["state"] not in ENDED
            for vm in lease["vms"]:
                life = (lease["id"], vm["name"], vm["created_at"])
                use = vm.get("usage") or {}
                if vm["state"] == "running" and life not in self.lives:
                    job = self.claimed.pop(lease["id"], None)
                    if job is None:
                        job = self.queue.take()
                        if job:
                            self.taken[job] = t
                    self.lives[life] = job
                if vm["state"] != "running" or life not in self.lives:
                    continue
                if use.get("busy") is True:
                    busy += 1
                elif use.get("busy") is False:
                    job = self.lives[life]
                    if job and job not in self.done:
                        self.done[job] = t
                        self.idle_at[lease["id"]] = t
                    if open_lease and lease["id"] not in self.claimed and self.queue.pending():
                        self._take_for_next_life(lease["id"], vm["name"], t)
            if self.vm is not None and open_lease and lease["state"] in ("ready", "running"):
                self._start_again(lease)
        pilots = self.running_pilot_nodes()
        for lease in leases:
            if lease["state"] in ENDED and lease["id"] not in self.returned and str(lease["job_id"]) not in pilots:
                self.returned[lease["id"]] = t
        demand = None
        if cobald_log is not None:
            found = DEMAND.findall(cobald_log)
            demand = float(found[-1][0]) if found else 0.0
        sample = {"t": round(t, 2), "held": sum(pilots.values()), "busy": busy, "waiting": len(self.queue.pending()),
                  "demand": demand}
        self.samples.append(sample)
        return sample

    def _take_for_next_life(self, lease_id: str, name: str, t: float) -> None:
        """An idle VM takes the next job at once; the simulation stops it, and the VM started next on its lease
        (a new boot: the guest's busy time runs from its boot) runs that job. A 409: its lease is ending."""
        try:
            self.client.stop_vm(lease_id, name, force=True)
        except ClientError as exc:
            if exc.status != 409:
                raise
            return
        job = self.queue.take()
        if job:
            self.claimed[lease_id] = job
            self.taken[job] = t

    def _start_again(self, lease: dict) -> None:
        """A fixed pool's held lease whose VM was stopped gets a new one (the harness stands in for the pool)."""
        active = [vm for vm in lease["vms"] if vm["state"] in ("starting", "running", "paused", "stopping")]
        if not active:
            self.client.start_vms(lease["id"], [{**self.vm, "host": lease["pilots"][0]["host"],
                                                 "console_log": f"worker-{lease['id'][:8]}.log"}])


def fixed_pool(harness: Harness, nodes: int, vm: dict, timeout: float = 300) -> list[str]:
    """Reserve ``nodes`` 1-node leases, start their VMs and wait until every VM has said idle (a standing pool)."""
    ids = [harness.client.reserve(1, LEASE_MB, 3600)["id"] for _ in range(nodes)]
    deadline = time.monotonic() + timeout
    started = set()
    while time.monotonic() < deadline:
        leases = [harness.client.show(lease_id) for lease_id in ids]
        for lease in leases:
            if lease["state"] == "ready" and lease["id"] not in started:
                harness.client.start_vms(lease["id"], [{**vm, "host": lease["pilots"][0]["host"],
                                                        "console_log": f"worker-{lease['id'][:8]}.log"}])
                started.add(lease["id"])
        uses = [vm.get("usage") or {} for lease in leases for vm in lease["vms"] if vm["state"] == "running"]
        if len(uses) == nodes and all(use.get("busy") is False for use in uses):
            for lease in leases:  # the boots' own busy time is no job: these VM lives take none
                for vm_row in lease["vms"]:
                    harness.lives[(lease["id"], vm_row["name"], vm_row["created_at"])] = None
            return ids
        time.sleep(1)
    raise TimeoutError(f"the fixed pool of {nodes} was not ready and idle in {timeout} s")


def run_pool(kind: str, workdir: str, cluster: SlurmCluster, libvirt_uri: str, waves, job_s: int,
             timeout: float) -> dict:
    """One run: ``cobald`` or ``fixed-N`` under the same workload; its samples and measures."""
    root = pathlib.Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=workdir))
    os.chmod(root, 0o711)  # the guests' user reaches the consoles below
    site = slurm_vm_site(root, cluster, libvirt_uri)
    queue = OverlayQueue(cluster)
    daemon = None
    vm = busy_guest_vm(job_s)
    try:
        with serving(site), LeaseClient(site.url, OPERATOR, OPERATOR_SECRET, timeout_s=20) as client:
            harness = Harness(site, cluster, queue, client, waves, vm if kind != "cobald" else None)
            fixed = []
            if kind == "cobald":
                config = pool_yaml(str(root / "cobald.yaml"), controller={
                    "low_utilisation": 0.5, "high_allocation": 1.0, "rate": 0.5, "interval": 1,
                }, pool={"service": site.url, "user": OPERATOR, "secret_file": site.secret_file, "nodes": 1,
                         "memory_mb": LEASE_MB, "duration_s": 3600, "vm": vm, "interval": 1, "max_leases": 4,
                         "waiting": {"slurm_partition": queue.name, "slurm_conf": cluster.conf}})
                daemon = CobaldDaemon(config, str(root / "cobald.log"), env=cluster.env())
            else:
                fixed = fixed_pool(harness, int(kind.split("-")[1]), vm)
            harness.t0 = time.monotonic()
            last_done = None
            while harness.now() < timeout:
                started = time.monotonic()
                sample = harness.look(daemon.text() if daemon else None)
                if harness.all_done():
                    last_done = last_done or max(harness.done.values())
                    for lease_id in fixed:
                        client.release(lease_id)
                    fixed = []
                    if sample["held"] == 0:
                        break
                time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
            else:
                raise TimeoutError(f"{kind}: the workload was not done and every node back in {timeout} s")
            return measures(kind, harness, last_done)
    finally:
        if daemon is not None:
            daemon.stop()
        queue.close()


def measures(kind: str, harness: Harness, last_done: float) -> dict:
    waits = [harness.taken[job] - harness.appeared[job] for job in harness.taken]
    # Only the COBalD pool gives nodes back by itself; a fixed pool's are released once all work is done.
    returns = [harness.returned[lease] - harness.idle_at[lease] for lease in harness.returned
               if kind == "cobald" and lease in harness.idle_at and harness.returned[lease] >= harness.idle_at[lease]]
    samples = harness.samples
    node_s = sum(s["held"] * (b["t"] - s["t"]) for s, b in zip(samples, samples[1:]))
    busy_s = sum(s["busy"] * (b["t"] - s["t"]) for s, b in zip(samples, samples[1:]))
    return {"pool": kind, "jobs": len(harness.appeared), "wait_s": waits, "idle_to_returned_s": returns,
            "node_hours": node_s / 3600, "busy_node_hours": busy_s / 3600, "last_job_done_s": last_done,
            "end_s": samples[-1]["t"], "samples": samples}


def summary(result: dict) -> str:
    waits, returns = result["wait_s"], result["idle_to_returned_s"]
    text = (f"{result['pool']:>8}: {result['jobs']} jobs, wait median {statistics.median(waits):.1f} s max "
            f"{max(waits):.1f} s; last job done at {result['last_job_done_s']:.0f} s; node-hours "
            f"{result['node_hours']:.3f} ({result['node_hours'] * 3600:.0f} node-s, "
            f"{result['busy_node_hours'] / result['node_hours']:.0%} of them busy) until {result['end_s']:.0f} s")
    if returns:
        text += f"; idle to node back median {statistics.median(returns):.1f} s max {max(returns):.1f} s"
    return text


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(9, 2.6 * len(results)), sharex=True)
    for axis, result in zip(axes if len(results) > 1 else [axes], results):
        t = [s["t"] for s in result["samples"]]
        axis.step(t, [s["held"] for s in result["samples"]], where="post", label="nodes held (supply)")
        axis.step(t, [s["busy"] for s in result["samples"]], where="post", label="busy VMs")
        axis.step(t, [s["waiting"] for s in result["samples"]], where="post", label="jobs waiting", linestyle=":")
        if result["samples"][0]["demand"] is not None:
            axis.plot(t, [s["demand"] for s in result["samples"]], label="COBalD demand", linestyle="--")
        axis.set_title(f"{result['pool']}: {result['node_hours'] * 3600:.0f} node-s, job wait median "
                       f"{statistics.median(result['wait_s']):.0f} s", fontsize=10)
        axis.set_ylabel("nodes / jobs")
        axis.legend(fontsize=7, loc="upper right")
    (axes[-1] if len(results) > 1 else axes).set_xlabel("seconds from the first wave")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parse_waves(text: str) -> list[tuple[float, int]]:
    waves = []
    for part in text.split(","):
        at, _, count = part.partition(":")
        waves.append((float(at), int(count)))
    return waves


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixed", default="2,4", help="fixed pool sizes to compare with (default 2,4)")
    parser.add_argument("--waves", default="0:4,120:2,240:3", help="SECONDS:JOBS,... (default 0:4,120:2,240:3)")
    parser.add_argument("--job", type=int, default=30, help="seconds a VM is busy with its job (default 30)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a run may take (default 900)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a plot of supply, demand and use over time here (PNG)")
    args = parser.parse_args()
    waves = parse_waves(args.waves)
    kinds = ["cobald"] + [f"fixed-{n}" for n in args.fixed.split(",") if n]
    workdir = tempfile.mkdtemp(prefix="bench-burst-")
    os.chmod(workdir, 0o755)  # munged, the job steps and the guests' user reach it
    cluster = SlurmCluster(os.path.join(workdir, "slurm"))
    os.makedirs(cluster.workdir)
    libvirt = LibvirtDaemon(os.path.join(workdir, "libvirt"))
    os.makedirs(libvirt.workdir, exist_ok=True)
    results = []
    try:
        cluster.start()
        libvirt.start()
        for kind in kinds:
            result = run_pool(kind, workdir, cluster, libvirt.uri, waves, args.job, args.timeout)
            print(summary(result), flush=True)
            results.append(result)
    finally:
        libvirt.stop()
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"waves": args.waves, "job_s": args.job, "results": results}, handle, indent=1)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ClientError as exc:
        sys.exit(f"bench-burst: {exc.message}")
