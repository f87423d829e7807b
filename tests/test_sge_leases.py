"""Whole leases through the sge provider on a real multi-host Grid Engine, real pilots under sudo.

Each pilot runs on its execution host (sgenode1, sgenode2: network and UTS
namespaces of their own, tests/support/sge_cluster.py) as root through ``sudo``,
started by ``qrsh -inherit``, takes real 2 MiB hugepages, and reports to a
real receiver on this machine's end of the hosts' bridge. The same lease the
Slurm provider passes (tests/test_slurm_leases.py).
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
def make_site(tmp_path, sge_cluster):
    sites = []

    def make(**options) -> ServiceOnCluster:
        site = ServiceOnCluster(str(tmp_path), sge_cluster, "sge", **options)
        sites.append(site)
        return site

    yield make
    close_sites(sites, sge_cluster)


def test_two_node_lease_is_ready_then_released_through_grid_engine(make_site, hugepages):
    site = make_site()
    lease = site.manager.reserve(nodes=2, memory_mb=32, duration_s=300, owner="alice")
    ready = site.wait(lease, {"ready"} | TERMINAL, 60)
    assert ready.state == "ready", ready.reason
    hosts = sorted(p.host for p in ready.pilots)
    assert hosts == ["sgenode1", "sgenode2"]  # one pilot on each host, each reporting as itself
    assert pool_pages() == hugepages + 2 * 16
    assert sorted(site.provider.allocated_hosts(ready.job_id)) == hosts

    site.manager.release(lease.id)  # qdel -notify: every pilot gets SIGUSR2, restores, reports
    done = site.wait(lease, TERMINAL, 60)
    assert done.state == "released", done.reason
    assert site.pilot_states(lease) == {h: ["reserved", "earlyunreserving", "unreserved"] for h in hosts}
    assert pool_pages() == hugepages


def test_a_short_h_rt_sends_the_pilot_home_before_grid_engine_kills_it(make_site, hugepages):
    # A 50 s lease with no padding asks for h_rt=00:01:00. The pilot reads it with qstat -j and leaves the
    # walltime margin (20 s) + grace (5 s) before it: its deadline comes before its own duration's end.
    site = make_site(padding_s=0, grace_s=5)
    lease = site.manager.reserve(nodes=1, memory_mb=32, duration_s=50)
    ready = site.wait(lease, {"ready"} | TERMINAL, 60)
    assert ready.state == "ready", ready.reason
    [host] = [p.host for p in ready.pilots]
    assert re.search(r"deadline \S+ \(qstat -j\)", site.pilot_log(lease, host)), site.pilot_log(lease, host)
    done = site.wait(lease, TERMINAL, 90)
    assert done.state == "expired", done.reason
    assert site.pilot_states(lease) == {host: ["reserved", "unreserving", "unreserved"]}
    assert pool_pages() == hugepages


def test_a_host_outside_the_jobs_allocation_is_refused_even_with_the_slot_secret(make_site, hugepages):
    """qstat's queue instances of the job decide which hosts may join its slot."""
    check_a_host_outside_the_allocation_is_refused(make_site(), 1, hugepages)


@pytest.mark.parametrize("how", ["too-many-nodes", "held"])
def test_a_job_that_never_starts_is_deleted_by_the_queue_timeout(make_site, sge_cluster, how):
    nodes, extra = (len(sge_cluster.nodes) + 1, ()) if how == "too-many-nodes" else (1, ("-h",))
    site = make_site(queue_timeout_s=3, extra_directives=extra)
    lease = site.manager.reserve(nodes=nodes, memory_mb=32, duration_s=60)
    assert "qw" in sge_cluster.run(["qstat", "-u", "*"]).stdout  # waiting (hqw when held)
    done = site.wait(lease, TERMINAL, 30)
    assert done.state == "missing", done.reason
    assert done.pilots == []
    assert sge_cluster.wait_empty(10), "the queue timeout did not delete the job"


def test_a_service_restart_mid_lease_loses_nothing(make_site, hugepages):
    check_a_service_restart_mid_lease_loses_nothing(make_site(), hugepages)


def test_a_lease_shorter_than_h_rt_ends_by_the_pilots_own_duration(make_site, hugepages):
    site = make_site(padding_s=120)  # h_rt: 2 minutes past the lease
    lease = site.manager.reserve(nodes=2, memory_mb=32, duration_s=4)
    done = site.wait(lease, TERMINAL, 60)
    assert done.state == "expired", done.reason
    states = site.pilot_states(lease)
    assert sorted(states) == ["sgenode1", "sgenode2"]
    assert all(s == ["reserved", "unreserving", "unreserved"] for s in states.values()), states
    for host in states:
        assert re.search(r"deadline \S+ \(duration\)", site.pilot_log(lease, host)), "the duration was the deadline"
    assert pool_pages() == hugepages


def test_a_lease_that_starts_later_waits_in_grid_engine_and_a_release_cancels_it(make_site, hugepages):
    import time

    from service_adapter.providers.base import JobState

    site = make_site()
    lease = site.manager.reserve(nodes=1, memory_mb=16, duration_s=60, start_at=time.time() + 600)  # qsub -a
    assert lease.state == "scheduled"
    assert site.provider.status([lease.job_id]) == {lease.job_id: JobState.PENDING}
    details = site.cluster.run(["qstat", "-j", lease.job_id]).stdout
    assert re.search(r"^execution_time:\s+\S", details, re.M), details  # Grid Engine holds it until then
    site.manager.release(lease.id)
    done = site.wait(lease, TERMINAL, 30)
    assert done.state == "released" and done.pilots == []


def test_grid_engine_cannot_raise_a_running_jobs_h_rt_so_an_extension_is_refused_and_nothing_changes(make_site,
                                                                                                     hugepages):
    from service_adapter.lease import ExtensionRefused

    site = make_site()
    lease = site.manager.reserve(nodes=1, memory_mb=16, duration_s=60)
    assert site.wait(lease, {"ready"} | TERMINAL, 60).state == "ready"
    with pytest.raises(ExtensionRefused, match=r"Grid Engine applies a changed h_rt only when the job restarts"):
        site.manager.extend(lease.id, 60)
    assert site.manager.get(lease.id).duration_s == 60
    site.manager.release(lease.id)
    assert site.wait(lease, TERMINAL, 60).state == "released"
    assert pool_pages() == hugepages


def test_a_lease_kept_off_a_host_gets_the_other_one(make_site, hugepages):
    """A pool's black-holed nodes go to qsub as -l h=!HOST: each lease lands on the host it left open."""
    site = make_site()
    leases = {open_host: site.manager.reserve(nodes=1, memory_mb=32, duration_s=300, owner="alice",
                                              exclude_nodes=[other])
              for open_host, other in (("sgenode2", "sgenode1"), ("sgenode1", "sgenode2"))}
    for open_host, lease in leases.items():
        ready = site.wait(lease, {"ready"} | TERMINAL, 60)
        assert ready.state == "ready", ready.reason
        assert [p.host for p in ready.pilots] == [open_host]
    for lease in leases.values():
        site.manager.release(lease.id)
    for lease in leases.values():
        assert site.wait(lease, TERMINAL, 60).state == "released"
    assert pool_pages() == hugepages
