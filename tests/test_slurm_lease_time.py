"""A lease's time through the real 4-node Slurm: a begin time, a raised time limit, the partition's limit,
the before-end event; real sbatch, squeue and scontrol, real pilots under sudo with real hugepages.

The lease that starts 30 s later is reserved by the module's first test and checked by its last, so the
tests in between (about 15 s) run while Slurm holds its job (pytest runs a module's tests in file order).
"""

from __future__ import annotations

import re
import time

import pytest

from workspace_common.protocol import parse_time
from service_adapter.lease import ExtensionRefused
from tests.support.pool import pool_pages
from tests.support.slurm_cluster import SHORT_PARTITION
from tests.support.slurm_cluster import TERMINAL, ServiceOnCluster, close_sites

START_IN_S = 30


@pytest.fixture
def make_site(tmp_path, slurm_cluster):
    sites = []

    def make(provider: str = "slurm", **options) -> ServiceOnCluster:
        site = ServiceOnCluster(str(tmp_path), slurm_cluster, provider, **options)
        sites.append(site)
        return site

    yield make
    close_sites(sites, slurm_cluster, only_theirs=True)  # the module's later lease waits meanwhile


@pytest.fixture(scope="module")
def later(tmp_path_factory, slurm_cluster):
    """A site and its lease of one node that starts START_IN_S after it was reserved: (site, lease, start)."""
    # The queue timeout counts from the start: Slurm's scheduler starts a job whose begin time has passed at
    # its next pass (every 2 s on the test cluster, every 60 s by default).
    site = ServiceOnCluster(str(tmp_path_factory.mktemp("later")), slurm_cluster, "slurm", queue_timeout_s=300)
    start = time.time() + START_IN_S
    try:
        lease = site.manager.reserve(nodes=1, memory_mb=16, duration_s=300, start_at=start)
        yield site, lease, start
    finally:
        close_sites([site], slurm_cluster)


def squeue(site, lease, fields: str) -> list[str]:
    return site.cluster.run(["squeue", "-h", "-j", lease.job_id, "-o", fields]).stdout.split()


def time_limit(site, lease) -> str:
    found = re.search(r"\bTimeLimit=(\S+)", site.cluster.run(["scontrol", "show", "job", "-o", lease.job_id]).stdout)
    return found.group(1)


def pilot_end(site, lease) -> float:
    (pilot,) = site.manager.get(lease.id).pilots
    return parse_time(pilot.expires_at).timestamp()


def events(site, lease) -> list[tuple[str, str]]:
    return [(e.kind, e.new_state) for e in site.manager.history(lease.id)]


def test_a_lease_that_starts_later_is_scheduled_and_slurm_holds_its_job_until_then(later, hugepages):
    site, lease, start = later
    assert lease.state == "scheduled"
    state, reason, begins = squeue(site, lease, "%T %r %S")
    assert (state, reason) == ("PENDING", "BeginTime")
    # %S: the begin time, local time to the second (sbatch --begin rounds up to the second).
    assert time.mktime(time.strptime(begins, "%Y-%m-%dT%H:%M:%S")) == pytest.approx(start, abs=1)
    site.manager.tick()
    assert site.manager.get(lease.id).state == "scheduled"


def test_through_schedmds_qsub_a_lease_that_starts_later_waits_too_and_a_release_cancels_it(make_site, hugepages):
    site = make_site("pbs")
    start = time.time() + 600
    lease = site.manager.reserve(nodes=1, memory_mb=16, duration_s=60, start_at=start)
    assert lease.state == "scheduled"
    state, reason, begins = squeue(site, lease, "%T %r %S")  # "#PBS -a CCYYMMDDhhmm.SS", read by sbatch
    assert (state, reason) == ("PENDING", "BeginTime")
    assert time.mktime(time.strptime(begins, "%Y-%m-%dT%H:%M:%S")) == pytest.approx(start, abs=1)
    site.manager.release(lease.id)
    done = site.wait(lease, TERMINAL, 30)
    assert done.state == "released" and done.pilots == []
    assert [e.new_state for e in site.manager.history(lease.id)] == ["scheduled", "releasing", "released"]


def test_an_extension_raises_the_jobs_time_limit_then_moves_the_pilots_deadline(make_site, hugepages):
    site = make_site(padding_s=120)
    lease = site.manager.reserve(nodes=1, memory_mb=16, duration_s=60)
    ready = site.wait(lease, {"ready"} | TERMINAL, 60)
    assert ready.state == "ready", ready.reason
    assert time_limit(site, lease) == "00:03:00"  # 60 s + 120 s of padding
    before = pilot_end(site, lease)

    longer = site.manager.extend(lease.id, 300)
    assert longer.duration_s == 360
    assert time_limit(site, lease) == "00:08:00"  # 360 s + 120 s
    assert site.store.wait_for(lambda: sum(kind == "extended" for kind, _ in events(site, lease)) == 2, 30)
    # The pilot asked Slurm again (squeue: the job's end 8 minutes after its start) and took its duration,
    # 360 s from its own start: 300 s later than before.
    assert pilot_end(site, lease) == pytest.approx(before + 300, abs=1e-5)
    (host,) = [p.host for p in ready.pilots]
    assert re.search(r"deadline moved from \S+ to \S+ \(duration\)", site.pilot_log(lease, host))

    site.manager.release(lease.id)
    assert site.wait(lease, TERMINAL, 60).state == "released"
    assert pool_pages() == hugepages


def test_where_the_time_limit_bounds_the_pilot_it_asks_slurm_again_for_the_jobs_new_end(make_site, hugepages):
    # No padding: a 60 s lease asks for 1 minute, and the pilot leaves the walltime margin (20 s) and its grace
    # (5 s) before the job's end: its deadline is 35 s after the job's start, not its duration's 60.
    site = make_site(padding_s=0)
    lease = site.manager.reserve(nodes=1, memory_mb=16, duration_s=60)
    ready = site.wait(lease, {"ready"} | TERMINAL, 60)
    assert ready.state == "ready", ready.reason
    (host,) = [p.host for p in ready.pilots]
    before = pilot_end(site, lease)
    assert time_limit(site, lease) == "00:01:00"

    site.manager.extend(lease.id, 60)  # 120 s: a 2-minute limit
    assert time_limit(site, lease) == "00:02:00"
    assert site.store.wait_for(lambda: sum(kind == "extended" for kind, _ in events(site, lease)) == 2, 30)
    # The job's environment still says the old end (SLURM_JOB_END_TIME is fixed at its start): the pilot took
    # squeue's new one, a minute later, and so holds exactly a minute longer.
    assert pilot_end(site, lease) == pytest.approx(before + 60, abs=1e-5)
    assert re.search(r"deadline moved from \S+ to \S+ \(squeue\)", site.pilot_log(lease, host))
    site.manager.release(lease.id)
    assert site.wait(lease, TERMINAL, 60).state == "released"
    assert pool_pages() == hugepages


def test_an_extension_past_the_partitions_limit_is_refused_and_nothing_changes(make_site, hugepages):
    site = make_site(padding_s=120, queue=SHORT_PARTITION)  # MaxTime=5 minutes
    lease = site.manager.reserve(nodes=1, memory_mb=16, duration_s=60)
    ready = site.wait(lease, {"ready"} | TERMINAL, 60)
    assert ready.state == "ready", ready.reason
    before = pilot_end(site, lease)

    with pytest.raises(ExtensionRefused, match=rf"partition {SHORT_PARTITION} allows at most 00:05:00 \(5 min\): "
                                               r"the job would need a time limit of 8 min"):
        site.manager.extend(lease.id, 300)
    assert time_limit(site, lease) == "00:03:00"
    after = site.manager.get(lease.id)
    assert (after.duration_s, after.expires_at) == (60, ready.expires_at)
    assert [c for c in site.store.commands(lease.slot) if c.op == "extend"] == []
    assert pilot_end(site, lease) == before

    assert site.manager.extend(lease.id, 60).duration_s == 120  # within the limit it goes through
    assert time_limit(site, lease) == "00:04:00"
    site.manager.release(lease.id)
    assert site.wait(lease, TERMINAL, 60).state == "released"
    assert pool_pages() == hugepages


def test_schedmds_qalter_cannot_raise_a_walltime_so_the_pbs_provider_refuses_and_nothing_changes(make_site,
                                                                                                 hugepages):
    site = make_site("pbs", padding_s=120)
    lease = site.manager.reserve(nodes=1, memory_mb=16, duration_s=60)
    assert site.wait(lease, {"ready"} | TERMINAL, 60).state == "ready"
    with pytest.raises(ExtensionRefused, match=r"qalter refused a walltime of 00:04:00"):
        site.manager.extend(lease.id, 60)
    assert time_limit(site, lease) == "00:03:00" and site.manager.get(lease.id).duration_s == 60
    site.manager.release(lease.id)
    assert site.wait(lease, TERMINAL, 60).state == "released"


def test_the_before_end_event_comes_after_ready_and_before_the_pilots_deadline(make_site, hugepages):
    site = make_site(warn_before_s=3)
    lease = site.manager.reserve(nodes=1, memory_mb=16, duration_s=8)
    done = site.wait(lease, TERMINAL, 60)
    assert done.state == "expired", done.reason
    history = events(site, lease)
    assert history[history.index(("state", "ready")) + 1] == ("ending", "ready")
    assert history[-2:] == [("state", "releasing"), ("state", "expired")]
    assert pool_pages() == hugepages


def test_the_lease_that_starts_later_is_ready_after_its_start(later, hugepages):
    site, lease, start = later
    ready = site.wait(lease, {"ready"} | TERMINAL, START_IN_S + 120)
    assert ready.state == "ready", ready.reason
    assert ready.ready_at >= start
    assert [state for kind, state in events(site, lease) if kind != "ending"][:2] == ["scheduled", "pending"]
    site.manager.release(lease.id)
    assert site.wait(lease, TERMINAL, 60).state == "released"
    assert pool_pages() == hugepages
