#!/usr/bin/env python3
"""Benchmark of a lease's time on the real 4-node Slurm, and of a VM's suspend and resume under QEMU.

Run from the repository root, as root::

    .venv/bin/python bench/bench_lease_time.py [--rounds N] [--json FILE]

Three parts, each for real (the tests' harnesses: tests/support/slurm_cluster.py, tests/support/libvirt_daemon.py):

- start later: a one-node lease whose job begins 15 s after the reserve (``sbatch --begin``); how long after
  its begin time Slurm started the job (squeue's start time) and the lease was ready;
- extend: one lease extended by 60 s each round; the manager's call (``scontrol show job``, ``show
  partition``, ``update``, the store) and the time until the pilot's ``extended`` answer is recorded (the
  command's long-poll, the pilot's ``squeue``, its notification);
- suspend/resume: libvirt's ``suspend()`` and ``resume()`` of the booted test guest (TCG), each timed.

The hugepage pool is checked back at its start at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.support.libvirt_daemon import GUEST_UP, LibvirtDaemon, guest_xml, wait_for_line  # noqa: E402
from tests.support.slurm_cluster import TERMINAL, ServiceOnCluster, SlurmCluster  # noqa: E402

NR_HUGEPAGES = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
START_IN_S = 15


def summary(values: list[float]) -> dict:
    """Median, min and max in ms."""
    ms = [v * 1000 for v in values]
    return {"n": len(ms), "median_ms": round(statistics.median(ms), 1), "min_ms": round(min(ms), 1),
            "max_ms": round(max(ms), 1)}


def start_later(site, rounds: int) -> dict:
    job_late, ready_late = [], []
    for _ in range(rounds):
        start = time.time() + START_IN_S
        lease = site.manager.reserve(nodes=1, memory_mb=16, duration_s=300, start_at=start)
        ready = site.wait(lease, {"ready"} | TERMINAL, START_IN_S + 180)
        started = site.cluster.run(["squeue", "-h", "-j", lease.job_id, "-o", "%S"]).stdout.strip()
        job_late.append(time.mktime(time.strptime(started, "%Y-%m-%dT%H:%M:%S")) - start)
        ready_late.append(ready.ready_at - start)
        site.manager.release(lease.id)
        site.wait(lease, TERMINAL, 60)
    return {"job_start_after_begin": summary(job_late), "ready_after_begin": summary(ready_late)}


def extend(site, rounds: int) -> dict:
    lease = site.manager.reserve(nodes=1, memory_mb=16, duration_s=600)
    site.wait(lease, {"ready"} | TERMINAL, 60)
    call, answered = [], []
    for n in range(1, rounds + 1):
        t0 = time.monotonic()
        site.manager.extend(lease.id, 60)
        call.append(time.monotonic() - t0)
        site.store.wait_for(
            lambda: sum(e.kind == "extended" for e in site.manager.history(lease.id)) == 2 * n, 60)
        answered.append(time.monotonic() - t0)
    site.manager.release(lease.id)
    site.wait(lease, TERMINAL, 60)
    return {"extend_call": summary(call), "to_the_pilots_answer": summary(answered)}


def suspend_resume(workdir: str, rounds: int) -> dict:
    os.makedirs(workdir, exist_ok=True)
    daemon = LibvirtDaemon(workdir).start()
    conn = daemon.connect()
    console = os.path.join(workdir, "console.log")
    domain = conn.createXML(guest_xml("wptest-bench-pause", console), 0)
    suspends, resumes = [], []
    try:
        if not wait_for_line(console, GUEST_UP, 120):
            raise SystemExit("the test guest did not boot")
        for _ in range(rounds):
            t0 = time.monotonic()
            domain.suspend()
            suspends.append(time.monotonic() - t0)
            t0 = time.monotonic()
            domain.resume()
            resumes.append(time.monotonic() - t0)
    finally:
        domain.destroy()
        conn.close()
        daemon.stop()
    return {"suspend": summary(suspends), "resume": summary(resumes)}


def main(argv=None) -> int:
    """Run the three parts; print (and with --json write) their numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each part (default 5; suspend/resume x4)")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)
    with open(NR_HUGEPAGES, encoding="ascii") as handle:
        pool = int(handle.read())
    workdir = tempfile.mkdtemp(prefix="bench-lease-time-")
    os.chmod(workdir, 0o755)  # munged and the job steps must reach it
    results = {}
    cluster = SlurmCluster(os.path.join(workdir, "slurm"))
    os.makedirs(cluster.workdir)
    try:
        cluster.start()
        site = ServiceOnCluster(os.path.join(workdir, "site"), cluster, "slurm", queue_timeout_s=300)
        try:
            results["start_later"] = start_later(site, args.rounds)
            results["extend"] = extend(site, args.rounds)
        finally:
            site.close()
    finally:
        cluster.stop()
    results["suspend_resume"] = suspend_resume(os.path.join(workdir, "libvirt"), args.rounds * 4)
    shutil.rmtree(workdir, ignore_errors=True)
    with open(NR_HUGEPAGES, encoding="ascii") as handle:
        if int(handle.read()) != pool:
            print(f"the hugepage pool did not end at {pool} pages", file=sys.stderr)
            return 1
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
