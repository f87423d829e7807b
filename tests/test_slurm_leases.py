"""Whole leases on a real 4-node Slurm: real sbatch and SchedMD's real qsub, real pilots under sudo.

Each pilot runs on its Slurm node (node1..node4: four slurmd on this machine)
as root through ``sudo``, takes real 2 MiB hugepages, and reports to a real
receiver on 127.0.0.1. The cluster comes from the session fixture
``slurm_cluster`` (tests/support/slurm_cluster.py); each test leaves no job behind.
"""

from __future__ import annotations

import re

import pytest

from tests.support.pool import pool_pages
from tests.support.lease_checks import (
    check_a_host_outside_the_allocation_is_refused, check_a_service_restart_mid_lease_loses_nothing,
)
from tests.support.slurm_cluster import TERMINAL, ServiceOnCluster, close_sites



@pytest.fixture
def make_site(tmp_path, slurm_cluster):
    sites = []

    def make(provider: str, **options) -> ServiceOnCluster:
        site = ServiceOnCluster(str(tmp_path), slurm_cluster, provider, **options)
        sites.append(site)
        return site

    yield make
    close_sites(sites, slurm_cluster)


@pytest.mark.parametrize("provider", ["slurm", "pbs"])
def test_two_node_lease_is_ready_then_released_through_the_lrm(make_site, provider, hugepages):
    site = make_site(provider)
    lease = site.manager.reserve(nodes=2, memory_mb=32, duration_s=300, owner="alice")
    ready = site.wait(lease, {"ready"} | TERMINAL, 60)
    assert ready.state == "ready", ready.reason
    hosts = sorted(p.host for p in ready.pilots)
    assert len(hosts) == 2 and len(set(hosts)) == 2 and set(hosts) <= set(site.cluster.nodes)
    assert pool_pages() == hugepages + 2 * 16
    queue = site.cluster.run(["squeue", "-h", "-j", ready.job_id, "-o", "%T %D"]).stdout.split()
    assert queue == ["RUNNING", "2"]

    site.manager.release(lease.id)  # scancel / qdel: every pilot gets SIGTERM
    done = site.wait(lease, TERMINAL, 60)
    assert done.state == "released", done.reason
    # Each pilot took the early path and reported its end: none was SIGKILLed after KillWait.
    assert site.pilot_states(lease) == {h: ["reserved", "earlyunreserving", "unreserved"] for h in hosts}
    assert pool_pages() == hugepages
    usage = site.manager.usage(lease_id=lease.id)
    assert usage.node_seconds > 0 and usage.mb_seconds == pytest.approx(32 * usage.node_seconds, rel=1e-6)


@pytest.mark.parametrize("provider", ["slurm", "pbs"])
def test_a_node_outside_the_jobs_allocation_is_refused_even_with_the_slot_secret(make_site, provider, hugepages):
    """Slurm's node list (squeue + scontrol) or qstat -f's exec_host decides which hosts may join a slot."""
    check_a_host_outside_the_allocation_is_refused(make_site(provider), 2, hugepages)


def test_a_lease_shorter_than_the_walltime_ends_by_the_pilots_own_deadline(make_site, hugepages):
    site = make_site("slurm", padding_s=120)  # walltime: 3 minutes
    lease = site.manager.reserve(nodes=2, memory_mb=32, duration_s=4)
    done = site.wait(lease, TERMINAL, 60)
    assert done.state == "expired", done.reason
    states = site.pilot_states(lease)
    assert sorted(states) == sorted(p.host for p in done.pilots) and len(states) == 2
    assert all(s == ["reserved", "unreserving", "unreserved"] for s in states.values()), states
    for host in states:
        assert re.search(r"deadline \S+ \(duration\)", site.pilot_log(lease, host)), "the duration was the deadline"
    assert pool_pages() == hugepages


def test_a_short_walltime_sends_the_pilot_home_before_the_lrm_kills_it(make_site, hugepages):
    # A 30 s lease with no padding asks Slurm for 1 minute (its least). The pilot reads the job's end
    # from squeue and leaves the walltime margin (20 s) + grace before it, i.e. before its own duration ends
    # and long before slurmctld's walltime SIGTERM (up to 30 s late) and SIGKILL.
    site = make_site("slurm", padding_s=0, grace_s=5)
    lease = site.manager.reserve(nodes=1, memory_mb=32, duration_s=50)
    ready = site.wait(lease, {"ready"} | TERMINAL, 60)
    assert ready.state == "ready", ready.reason
    [host] = [p.host for p in ready.pilots]
    assert re.search(r"deadline \S+ \(squeue\)", site.pilot_log(lease, host)), "the walltime was the deadline"
    done = site.wait(lease, TERMINAL, 90)
    assert done.state == "expired", done.reason
    assert site.pilot_states(lease) == {host: ["reserved", "unreserving", "unreserved"]}
    assert pool_pages() == hugepages


@pytest.mark.parametrize("how", ["too-many-nodes", "held"])
def test_a_job_that_never_starts_is_cancelled_by_the_queue_timeout(make_site, slurm_cluster, how):
    nodes, extra = (len(slurm_cluster.nodes) + 2, ()) if how == "too-many-nodes" else (1, ("--hold",))
    site = make_site("slurm", queue_timeout_s=3, extra_directives=extra)
    lease = site.manager.reserve(nodes=nodes, memory_mb=32, duration_s=60)
    state = slurm_cluster.run(["squeue", "-h", "-j", lease.job_id, "-o", "%T"]).stdout.strip()
    assert state == "PENDING"
    done = site.wait(lease, TERMINAL, 30)
    assert done.state == "missing", done.reason
    assert done.pilots == []
    # The manager cancels right after it records the lease missing: give scancel its moment.
    assert slurm_cluster.wait_empty(10), "the queue timeout did not cancel the job"
    assert slurm_cluster.run(["squeue", "-h", "--states=all", "-j", lease.job_id, "-o", "%T"]).stdout.strip() in (
        "CANCELLED", "")


def test_a_service_restart_mid_lease_loses_nothing(make_site, hugepages):
    check_a_service_restart_mid_lease_loses_nothing(make_site("slurm"), hugepages)


def test_a_lease_kept_off_nodes_gets_a_node_slurm_was_not_told_to_avoid(make_site, hugepages):
    """A pool's black-holed nodes go to sbatch as --exclude: each lease lands on the one node it left open."""
    site = make_site("slurm")
    nodes = site.cluster.nodes
    leases = {open_node: site.manager.reserve(nodes=1, memory_mb=32, duration_s=300, owner="alice",
                                              exclude_nodes=[node for node in nodes if node != open_node])
              for open_node in (nodes[3], nodes[1])}
    for open_node, lease in leases.items():
        ready = site.wait(lease, {"ready"} | TERMINAL, 60)
        assert ready.state == "ready", ready.reason
        assert [p.host for p in ready.pilots] == [open_node]
        avoided = ", ".join(node for node in nodes if node != open_node)
        assert f"not on {avoided}" in site.manager.history(lease.id)[0].reason
    for lease in leases.values():
        site.manager.release(lease.id)
    for lease in leases.values():
        assert site.wait(lease, TERMINAL, 60).state == "released"
    assert pool_pages() == hugepages


def test_pbs_cannot_keep_a_job_off_nodes_so_such_a_lease_is_refused_and_nothing_recorded(make_site):
    site = make_site("pbs")
    with pytest.raises(ValueError, match="the pbs provider cannot keep a job off named nodes"):
        site.manager.reserve(nodes=1, memory_mb=32, duration_s=300, owner="alice", exclude_nodes=["node1"])
    assert site.manager.list() == []
