"""Lease checks that every batch provider must pass, shared by tests/test_slurm_leases.py and
tests/test_sge_leases.py: each takes a running site (tests.support.slurm_cluster.ServiceOnCluster) on its cluster."""

from __future__ import annotations

from tests.support.pool import pool_pages
from tests.support.slurm_cluster import TERMINAL


def check_a_host_outside_the_allocation_is_refused(site, nodes: int, hugepages: int) -> None:
    """A lease of ``nodes`` (fewer than the cluster has): a host outside its job, with its own real node key and
    the slot's leaked secret, is refused (403 not-allocated) and the store does not change."""
    import requests
    from requests.auth import HTTPDigestAuth

    from workspace_common.protocol import NOTIFICATIONS_PATH, SIGNATURE_HEADER, sign
    from tests.support.service import notification

    lease = site.manager.reserve(nodes=nodes, memory_mb=32, duration_s=300)
    ready = site.wait(lease, {"ready"} | TERMINAL, 60)
    assert ready.state == "ready", ready.reason
    outsider = sorted(set(site.cluster.nodes) - {p.host for p in ready.pilots})[0]
    session = requests.Session()
    session.auth = HTTPDigestAuth(outsider, site.nodes.node_key(outsider))  # its own, real key
    body = notification(lease.slot, host=outsider, memory_mb=32).to_json()
    leaked = site.nodes.slot_key(outsider, lease.slot, site.store.slot_secret(lease.slot))
    before = site.store.snapshot()
    answer = session.post(site.url + NOTIFICATIONS_PATH, data=body, headers={SIGNATURE_HEADER: sign(leaked, body)},
                          timeout=30)
    assert answer.status_code == 403 and answer.json()["result"] == "not-allocated", answer.text
    assert site.store.snapshot() == before
    site.manager.release(lease.id)
    assert site.wait(lease, TERMINAL, 60).state == "released"
    assert pool_pages() == hugepages


def check_a_service_restart_mid_lease_loses_nothing(site, hugepages: int) -> None:
    """The service goes away and comes back over the same store: the lease, its job and pilots are still there,
    and a release still reaches every pilot."""
    lease = site.manager.reserve(nodes=2, memory_mb=32, duration_s=300)
    assert site.wait(lease, {"ready"} | TERMINAL, 60).state == "ready"
    site.close()  # the service goes away; the job and its pilots stay
    site.open()  # a new store, receiver (same address and port), provider and manager over the same file
    again = site.manager.get(lease.id)
    assert again.state == "ready" and again.job_id == lease.job_id and len(again.pilots) == 2
    site.manager.release(lease.id)
    done = site.wait(lease, TERMINAL, 60)
    assert done.state == "released", done.reason
    assert all(s[-1] == "unreserved" for s in site.pilot_states(lease).values())
    assert pool_pages() == hugepages
