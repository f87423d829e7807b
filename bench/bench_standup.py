#!/usr/bin/env python3
"""Lease stand-up on the real 4-node Slurm beside a job that does nothing, submitted the same way.

For N = 1, 2, 4 nodes and R rounds each, through the ``slurm`` provider
(sbatch, ``srun --ntasks-per-node=1``, ``sudo -n --preserve-env=...``):

* **lease**: from ``LeaseManager.reserve()`` until the last pilot's
  ``reserved`` is stored (the lease's ``ready_at``); the pilots reserve
  real 2 MiB hugepages (16 MB each) and report to a real receiver;
* **baseline**: the same job script with a payload that only writes the
  time it started (``date``, standing for ``true``: something must say when
  it ran), from ``provider.submit()`` until the last node's payload started.

Both clocks are this host's ``time.time()``. The ratio of the two medians is
the pilot's own cost on top of the batch system's dispatch. Run as root
from the repository root (it starts its own cluster and stops it by pid)::

    .venv/bin/python bench/bench_standup.py [--rounds R] [--json FILE]
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import os
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.bench_slice import machine, summarize, write_json  # noqa: E402
from service_adapter.providers.base import PilotJob  # noqa: E402
from tests.support.slurm_cluster import ServiceOnCluster, SlurmCluster  # noqa: E402

NR_HUGEPAGES = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
TARGET_RATIO = 1.2
NODE_COUNTS = (1, 2, 4)

NOTHING = """#!/bin/sh
# The baseline payload: note when it started on this node, nothing else.
date +%s.%N > {stamps}/tmp-$SLURM_JOB_ID.$SLURMD_NODENAME
mv {stamps}/tmp-$SLURM_JOB_ID.$SLURMD_NODENAME {stamps}/$SLURM_JOB_ID.$SLURMD_NODENAME
"""


def pool() -> int:
    with open(NR_HUGEPAGES, encoding="ascii") as handle:
        return int(handle.read())


def baseline_round(service: ServiceOnCluster, nothing: str, stamps: str, nodes: int) -> float:
    """Seconds from submit to the last node's payload start, for a job that does nothing."""
    provider = service.provider_for(pilot_command=nothing)
    job = PilotJob(f"baseline-{os.urandom(4).hex()}", nodes, 16, 60, 5, service.url, service.pilot_config)
    t0 = time.time()
    job_id = provider.submit(job)
    pattern = os.path.join(stamps, f"{job_id}.*")
    deadline = time.monotonic() + 60
    while len(glob.glob(pattern)) < nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"baseline job {job_id}: {len(glob.glob(pattern))} of {nodes} payloads started")
        time.sleep(0.002)  # a bench: nothing to wait on but the files
    started = []
    for path in glob.glob(pattern):
        with open(path, encoding="ascii") as handle:
            started.append(float(handle.read()))
    service.cluster.wait_empty(30)
    return max(started) - t0


def lease_round(service: ServiceOnCluster, nodes: int) -> tuple[float, float]:
    """Seconds from reserve() to ready (last 'reserved' stored), and from release() to released."""
    t0 = time.time()
    lease = service.manager.reserve(nodes=nodes, memory_mb=16, duration_s=300, owner="bench")
    ready = service.wait(lease, {"ready"}, 60)
    standup = ready.ready_at - t0
    t1 = time.time()
    service.manager.release(lease.id)
    done = service.wait(lease, {"released"}, 60)
    teardown = done.ended_at - t1
    service.cluster.wait_empty(30)
    return standup, teardown


def main(argv=None) -> int:
    """Run the rounds, print the table, write JSON if asked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds per N and kind (default 7)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not os.access(NR_HUGEPAGES, os.W_OK):
        print("bench_standup: needs root and a writable 2 MiB hugepage pool", file=sys.stderr)
        return 1
    workdir = tempfile.mkdtemp(prefix="bench-standup-")
    os.chmod(workdir, 0o755)  # munged runs as its own user
    cluster = SlurmCluster(os.path.join(workdir, "slurm"))
    os.makedirs(cluster.workdir)
    results: dict = {"machine": machine(), "rounds": args.rounds, "by_nodes": {}}
    with open("/tmp/workspace-pilot-tests.hugepages.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # take turns with test runs: the pool is one per machine
        start_pool = pool()
        service = None
        try:
            cluster.start()
            os.makedirs(os.path.join(workdir, "service"))
            service = ServiceOnCluster(os.path.join(workdir, "service"), cluster, "slurm", queue_timeout_s=120)
            stamps = os.path.join(workdir, "stamps")
            os.makedirs(stamps)
            nothing = os.path.join(workdir, "nothing.sh")
            with open(nothing, "w", encoding="ascii") as handle:
                handle.write(NOTHING.format(stamps=stamps))
            os.chmod(nothing, 0o755)
            for nodes in NODE_COUNTS:
                base, standup, teardown = [], [], []
                for _ in range(args.rounds):  # interleaved, so drift hits both alike
                    base.append(baseline_round(service, nothing, stamps, nodes) * 1000)
                    up, down = lease_round(service, nodes)
                    standup.append(up * 1000)
                    teardown.append(down * 1000)
                results["by_nodes"][str(nodes)] = {
                    "baseline_ms": summarize(base), "lease_standup_ms": summarize(standup),
                    "lease_teardown_ms": summarize(teardown),
                    "ratio_of_medians": statistics.median(standup) / statistics.median(base),
                }
        finally:
            if service is not None:
                service.close()
            cluster.stop()  # by the pids it started, even when set-up failed half-way
            if pool() != start_pool:
                print(f"bench_standup: pool at {pool()} pages, started at {start_pool}", file=sys.stderr)
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"lease stand-up on a 4-node Slurm vs a do-nothing job, {args.rounds} rounds; target ratio <= {TARGET_RATIO}")
    print(f"{'N':>2} {'baseline median':>16} {'lease median':>13} {'ratio':>6} {'lease p90':>10} {'teardown median':>16}")
    for nodes, row in results["by_nodes"].items():
        print(f"{nodes:>2} {row['baseline_ms']['median']:13.0f} ms {row['lease_standup_ms']['median']:10.0f} ms "
              f"{row['ratio_of_medians']:6.2f} {row['lease_standup_ms']['p90']:7.0f} ms "
              f"{row['lease_teardown_ms']['median']:13.0f} ms")
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
