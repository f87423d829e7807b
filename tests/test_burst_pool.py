"""A real COBalD daemon (its own process, its own YAML, COBalD's standard LinearController) drives the lease pool
against a real ``workspace-lease serve``: on the real 4-node Slurm with real QEMU guests, and on the local provider
for what a bad profile and a service that is down do."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.support.cobald import CobaldDaemon, OverlayQueue, busy_guest_vm, pool_yaml, slurm_vm_site
from tests.support.realvms import LEASE_MB
from tests.support.site import OPERATOR, Site, end_pilots, serving, site, stop_process, start_serve  # noqa: F401

pytest.importorskip("cobald")

#: How long each guest's work takes (it is busy that long after its boot, then idle).
JOB_S = 20


def test_cobald_holds_more_nodes_while_work_waits_and_gives_them_back_once_the_guests_idle(
        guest_reachable, slurm_cluster, libvirt_qemu, hugepages):
    root = guest_reachable
    site = slurm_vm_site(root, slurm_cluster, libvirt_qemu.uri)
    queue = OverlayQueue(slurm_cluster)
    daemon = None
    try:
        with serving(site):
            queue.submit(3)
            config = pool_yaml(str(root / "cobald.yaml"), controller={
                "low_utilisation": 0.5, "high_allocation": 1.0, "rate": 0.5, "interval": 1,
            }, pool={
                "service": site.url, "user": OPERATOR, "secret_file": site.secret_file, "nodes": 1,
                "memory_mb": LEASE_MB, "duration_s": 900, "vm": busy_guest_vm(JOB_S), "interval": 1,
                "waiting": {"slurm_partition": queue.name, "slurm_conf": slurm_cluster.conf},
            })
            daemon = CobaldDaemon(config, str(root / "cobald.log"), env=slurm_cluster.env())
            seen_leases: dict[str, str] = {}  # lease -> last state seen
            took: dict[str, str] = {}  # VM (lease/name) -> the overlay job it took
            last_use: dict[str, dict] = {}  # lease -> its VM's use when last seen open
            released_busy = []
            deadline = time.monotonic() + 420
            while time.monotonic() < deadline:
                assert daemon.process.poll() is None, daemon.text()[-3000:]
                leases = site.api("GET", "/leases", params={"owner": OPERATOR}).json()["leases"]
                for lease in leases:
                    before = seen_leases.get(lease["id"])
                    seen_leases[lease["id"]] = lease["state"]
                    if lease["state"] == "releasing" and before in ("ready", "running"):
                        use = last_use.get(lease["id"])
                        if use is None or use.get("busy") is not False:
                            released_busy.append((lease["id"], use))
                    for vm in lease["vms"]:
                        key = f"{lease['id']}/{vm['name']}"
                        if vm["state"] == "running" and key not in took:
                            took[key] = queue.take()  # the VM took a job from the overlay's queue
                        if lease["state"] in ("ready", "running"):
                            last_use[lease["id"]] = vm.get("usage") or {}
                if len(took) >= 3 and seen_leases and all(
                        state in ("released", "expired", "failed", "missing") for state in seen_leases.values()):
                    break
                time.sleep(1)
            log = daemon.text()
            assert len(took) >= 3 and None not in list(took.values())[:3], (took, log[-3000:])
            assert queue.pending() == []
            states = sorted(seen_leases.values())
            assert states and set(states) == {"released"}, (seen_leases, log[-3000:])
            assert 3 <= len(seen_leases) <= 4, seen_leases  # a lease per waiting job (one more at most, in flight)
            assert released_busy == [], released_busy  # never a lease whose VM was busy
            assert slurm_cluster.wait_empty(60), slurm_cluster.queue()  # the nodes are back in the batch system
            assert "lease pool: reserved lease" in log and "lease pool: released lease" in log
    finally:
        if daemon is not None:
            daemon.stop()
        queue.close()
        end_pilots(site)


def local_pool(site: Site, **extra) -> dict:
    return {"service": site.url, "user": OPERATOR, "secret_file": site.secret_file, "nodes": 1, "memory_mb": 64,
            "duration_s": 300, "interval": 0.5, **extra}


@pytest.mark.parametrize("profile, reason", [
    ({"memory_mb": 64, "duration_s": 300, "vm": {"name": "w", "memory_mb": 512,
                                                   "boot": {"kernel": {"path": "vmlinuz", "sha256": "0" * 64}}}},
     "VM w: its 512 MB and the service's 32 MB overhead per VM do not fit a node's 64 MB"),
    ({"memory_mb": 64, "duration_s": 300, "vm": {"name": "w", "memory_mb": 16,
                                                   "disk": {"image": "never-approved", "version": "1"}}},
     "never-approved"),
    ({"memory_mb": 64, "duration_s": 300, "release_when_idle_s": 10**9},
     "release_when_idle_s must be a number of seconds above 0, at most"),
])
def test_a_profile_the_service_would_refuse_stops_cobald_at_load_with_the_services_reason(site, tmp_path, profile,
                                                                                         reason):
    with serving(site):
        config = pool_yaml(str(tmp_path / "cobald.yaml"), controller={"interval": 1}, tag=False,
                           pool={**local_pool(site), **profile})
        result = subprocess.run([sys.executable, "-m", "cobald.daemon", config], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode != 0
        assert "the service refuses this pool's leases" in result.stderr and reason in result.stderr, \
            result.stderr[-2000:]
        assert site.api("GET", "/leases").json()["leases"] == []  # nothing reserved


def test_a_pool_whose_service_goes_away_keeps_its_numbers_reserves_nothing_twice_and_goes_on(site, tmp_path,
                                                                                             hugepages):
    process = start_serve(site)
    daemon = None
    try:
        config = pool_yaml(str(tmp_path / "cobald.yaml"), controller={
            "low_utilisation": 0.0, "high_allocation": 1.0, "rate": 1, "interval": 0.5,
        }, pool=local_pool(site, waiting={"command": [sys.executable, "-c", "print(2)"]}))
        daemon = CobaldDaemon(config, str(tmp_path / "cobald.log"))
        wait_for(lambda: len(open_leases(site)) == 2, 60, daemon)
        stop_process(process)  # the service goes away
        wait_for(lambda: daemon.text().count("the service did not answer") >= 3, 30, daemon)  # rounds without it
        process = start_serve(site)
        rounds = daemon.text().count("lease pool: demand")
        wait_for(lambda: daemon.text().count("lease pool: demand") >= rounds + 3, 30, daemon)  # rounds with it again
        assert len(open_leases(site)) == 2  # the same two: found again, none reserved twice
        assert daemon.text().count("lease pool: reserved lease") == 2
    finally:
        if daemon is not None:
            daemon.stop()
        stop_process(process)
        for lease in open_leases(site) if process.poll() is None else ():
            site.cli("release", lease["id"])
        end_pilots(site)


def open_leases(site: Site) -> list[dict]:
    leases = site.api("GET", "/leases", params={"owner": OPERATOR}).json()["leases"]
    return [lease for lease in leases if lease["state"] not in ("released", "expired", "failed", "missing")]


def wait_for(predicate, timeout: float, daemon: CobaldDaemon) -> None:
    """Re-check ``predicate`` until it holds (COBalD's log and the API have no way to wait on)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline and daemon.process.poll() is None, daemon.text()[-3000:]
        time.sleep(0.2)


def test_a_node_whose_vms_keep_failing_gets_no_more_of_them(tmp_path, hugepages):
    images = tmp_path / "images"
    images.mkdir(mode=0o755)
    (images / "vmlinuz").write_bytes(b"not the kernel the spec names\n")
    site = Site(tmp_path, pilot_sections={"libvirt": {"uri": "test:///default"},
                                          "vms": {"image_dir": str(images), "poll_wait": 1, "overhead_mb": 16}})
    process = start_serve(site)
    daemon = None
    try:
        vm = {"name": "worker", "memory_mb": 16,
              "boot": {"kernel": {"path": "vmlinuz", "sha256": "0" * 64}}}  # the node refuses it: wrong sha256
        config = pool_yaml(str(tmp_path / "cobald.yaml"), controller={
            "low_utilisation": 0.0, "high_allocation": 1.0, "rate": 1, "interval": 0.5,
        }, pool=local_pool(site, vm=vm, blackhole_failures=3,
                           waiting={"command": [sys.executable, "-c", "print(1)"]}))
        daemon = CobaldDaemon(config, str(tmp_path / "cobald.log"))
        wait_for(lambda: "it gets no more VMs" in daemon.text(), 60, daemon)
        rounds = daemon.text().count("lease pool: demand")
        wait_for(lambda: daemon.text().count("lease pool: demand") >= rounds + 4, 30, daemon)
        log = daemon.text()
        assert log.count(": started worker-") == 3, log[-3000:]  # three tries, then none
        (lease,) = open_leases(site)
        assert [vm["state"] for vm in lease["vms"]] == ["failed"]
        assert "sha256" in lease["vms"][0]["reason"]
        host = lease["vms"][0]["host"]
        site.cli("release", lease["id"])  # the pool's next lease asks the batch system to keep off that node
        def others() -> list[dict]:
            return [other for other in open_leases(site) if other["id"] != lease["id"]]

        wait_for(lambda: others(), 60, daemon)
        (later,) = others()
        created = site.api("GET", f"/leases/{later['id']}/events").json()["events"][0]
        assert f"not on {host}," in created["reason"]
        assert later["pilots"] == [] or later["pilots"][0]["host"] != host
    finally:
        if daemon is not None:
            daemon.stop()
        for lease in open_leases(site):
            site.cli("release", lease["id"])
        stop_process(process)
        end_pilots(site)
