"""The Grid Engine the tests stand on (tests/support/sge_cluster.py) is real and has several hosts.

These test the set-up, not the project: a qmaster and two sge_execd, each on
a host of its own (network and UTS namespaces), Debian's Son of Grid Engine
8.1.9 unpacked beside the Slurm the other tests use.
"""

from __future__ import annotations

import os
import re
import tempfile
import time

import pytest


def wait_ended(cluster, job: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while cluster.run(["qstat", "-j", job]).returncode == 0:
        if time.monotonic() > deadline:
            pytest.fail(f"job {job} still known after {timeout} s: {cluster.run(['qstat', '-f']).stdout}")
        time.sleep(0.2)  # qstat has no way to wait


def test_a_parallel_job_gets_one_slot_on_each_host_and_reaches_them_with_qrsh_inherit(sge_cluster):
    work = tempfile.mkdtemp(prefix="sge-job-")
    script = os.path.join(work, "job.sh")
    with open(script, "w") as handle:
        handle.write('#!/bin/sh\necho "batch host $(hostname)"\n'
                     'for host in $(cut -d" " -f1 "$PE_HOSTFILE"); do qrsh -inherit "$host" hostname; done\n'
                     "exit 3\n")
    result = sge_cluster.run(["qsub", "-terse", "-pe", "workspace-pilot", "2", "-o", f"{work}/out.txt", "-j", "y", script])
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip()
    wait_ended(sge_cluster, job)
    lines = open(f"{work}/out.txt").read().splitlines()
    assert lines[0] in ("batch host sgenode1", "batch host sgenode2")
    assert sorted(lines[1:]) == ["sgenode1", "sgenode2"]  # each host ran its part, as itself
    deadline = time.monotonic() + 30
    while (accounting := sge_cluster.run(["qacct", "-j", job])).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.2)  # the qmaster writes the accounting file within its flush time (1 s here)
    # One record per qrsh -inherit task (exit 0 on each host), and the job script's own, written last.
    statuses = re.findall(r"^exit_status\s+(\d+)", accounting.stdout, re.M)
    assert statuses == ["0", "0", "3"], accounting.stdout


def test_qdel_ends_a_running_job(sge_cluster):
    work = tempfile.mkdtemp(prefix="sge-job-")
    result = sge_cluster.run(["qsub", "-terse", "-o", f"{work}/out.txt", "-j", "y", "-b", "y", "/bin/sleep", "600"])
    job = result.stdout.strip()
    deadline = time.monotonic() + 30
    while " r " not in sge_cluster.run(["qstat"]).stdout:
        assert time.monotonic() < deadline, sge_cluster.run(["qstat", "-j", job]).stdout
        time.sleep(0.2)
    assert sge_cluster.run(["qdel", job]).returncode == 0
    wait_ended(sge_cluster, job)
