"""Whole leases through the sge provider on a real multi-host Grid Engine, real pilots under sudo.

Each pilot runs on its execution host (sgenode1, sgenode2: network and UTS
namespaces of their own, tests/sge_cluster.py) as root through ``sudo``,
started by ``qrsh -inherit``, takes real 2 MiB hugepages, and reports to a
real receiver on this machine's end of the hosts' bridge. The same lease the
Slurm provider passes (tests/test_slurm_leases.py).
"""

from __future__ import annotations

import re

import pytest

from tests.conftest import pool_pages
from tests.slurm_cluster import TERMINAL, ServiceOnCluster, close_sites


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
