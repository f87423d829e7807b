"""VMs on leases end to end: real pilot processes, the real receiver and long-poll, libvirt's test driver.

The test driver keeps its domains inside the pilot process, so these tests
watch the VMs through what the pilots report to the service (and their
logs); tests/test_real_vms.py watches real QEMU guests from outside.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time

import psutil
import pytest

from pilot.exitcodes import ExitCode
from service_adapter.lease import TERMINAL_STATES, vm_json
from service_adapter.local_site import LocalSite
from service_adapter.vms import VmRequestError
from tests.support.pool import pool_pages

pytest.importorskip("libvirt")

KERNEL = b"not really a kernel, but the test driver boots anything\n" * 64


def kernel_spec(name: str, memory_mb: int = 32, sha256: str | None = None) -> dict:
    return {"name": name, "memory_mb": memory_mb,
            "boot": {"kernel": {"path": "vmlinuz", "sha256": sha256 or hashlib.sha256(KERNEL).hexdigest()},
                     "cmdline": "console=ttyS0"},
            "console_log": f"{name}.log"}


def make_site(tmp_path, *, service_overhead=16, pilot_overhead=16, lost_after=120.0, workdir="site",
              usage_interval=None):
    images = tmp_path / "images"
    if not images.exists():
        images.mkdir(mode=0o755)
        (images / "vmlinuz").write_bytes(KERNEL)
    sections = {
        "libvirt": {"uri": "test:///default"},
        "vms": {"image_dir": str(images), "console_dir": str(tmp_path / "consoles"),
                "overhead_mb": pilot_overhead, "poll_wait": 1},
    }
    if usage_interval is not None:
        sections["vms"]["usage_interval"] = usage_interval
    return LocalSite(str(tmp_path / workdir), grace_s=5, journal_dir=str(tmp_path / "journal"),
                     release_grace_s=5, status_interval_s=0.2, lost_after_s=lost_after,
                     vm_overhead_mb=service_overhead, pilot_sections=sections)


def start(site, lease, *specs):
    from service_adapter.vms import parse_vm_request

    return site.vms.start(lease.id, [parse_vm_request(s) for s in specs])


def ready_lease(site, memory_mb=64, duration_s=300, nodes=1):
    lease = site.leases.reserve(nodes=nodes, memory_mb=memory_mb, duration_s=duration_s)
    ready = site.leases.wait(lease.id, {"ready"} | TERMINAL_STATES, timeout=30)
    assert ready.state == "ready", ready.reason
    return ready


def wait_vm(site, lease, name, states, timeout=30):
    vm = site.vms.wait(lease.id, name, states, timeout)
    assert vm is not None, f"VM {name} is {site.vms.get(lease.id, name)}"
    return vm


def test_a_vm_starts_runs_and_stops_and_the_lease_follows(tmp_path, hugepages):
    site = make_site(tmp_path)
    try:
        lease = ready_lease(site)
        [queued] = start(site, lease, kernel_spec("vm1"))
        assert queued.state == "starting" and queued.host == lease.pilots[0].host
        running = wait_vm(site, lease, "vm1", {"running", "failed"})
        assert running.state == "running", running.reason
        assert site.leases.wait(lease.id, {"running"}, timeout=10) is not None
        site.vms.stop(lease.id, "vm1")
        stopped = wait_vm(site, lease, "vm1", {"stopped", "running"})
        assert stopped.state == "stopped", stopped.reason
        assert site.leases.wait(lease.id, {"ready"}, timeout=10) is not None
        outcomes = [(c.op, c.outcome, c.code) for c in site.store.commands(lease.slot)]
        assert outcomes == [("start-vm", "vm-running", 0), ("stop-vm", "vm-stopped", 0)]
        site.leases.release(lease.id)
        assert site.leases.wait(lease.id, TERMINAL_STATES, timeout=30).state == "released"
    finally:
        site.close()
    assert pool_pages() == hugepages


def test_the_pilot_refuses_a_wrong_sha256_and_memory_beyond_its_reservation(tmp_path, hugepages):
    # The service counts no overhead, the pilot 16 MB: the service lets 64 MB through, the pilot does not.
    site = make_site(tmp_path, service_overhead=0, pilot_overhead=16)
    try:
        lease = ready_lease(site, memory_mb=64)
        start(site, lease, kernel_spec("badsum", sha256="0" * 64))
        failed = wait_vm(site, lease, "badsum", {"failed", "running"})
        assert failed.state == "failed" and "sha256" in failed.reason, failed.reason
        start(site, lease, kernel_spec("toobig", memory_mb=64))
        failed = wait_vm(site, lease, "toobig", {"failed", "running"})
        assert failed.state == "failed", failed.reason
        assert "64 MB + 16 MB overhead" in failed.reason and "64 MB reserved" in failed.reason
        assert site.leases.get(lease.id).state == "ready"  # nothing runs
        with pytest.raises(VmRequestError, match="needs 65 MB"):
            start(site, lease, kernel_spec("huge", memory_mb=65))  # the service's own placement
    finally:
        site.close()
    assert pool_pages() == hugepages


def test_release_lets_the_service_stop_the_vms_then_the_pilot_restores(tmp_path, hugepages):
    site = make_site(tmp_path)
    try:
        lease = ready_lease(site, memory_mb=96)
        start(site, lease, kernel_spec("vm1"), kernel_spec("vm2"))
        for name in ("vm1", "vm2"):
            assert wait_vm(site, lease, name, {"running", "failed"}).state == "running"
        site.leases.release(lease.id)
        done = site.leases.wait(lease.id, TERMINAL_STATES, timeout=30)
        assert done.state == "released", done.reason
        assert {vm.name: vm.state for vm in site.store.vms(lease.id)} == {"vm1": "stopped", "vm2": "stopped"}
        ops = [c.op for c in site.store.commands(lease.slot)]
        assert ops[:3] == ["start-vm", "start-vm", "release"]
        # earlyunreserving made the service ask for graceful stops, and the pilot ran them.
        assert sorted((c.op, c.vm, c.outcome) for c in site.store.commands(lease.slot) if c.op == "stop-vm") == [
            ("stop-vm", "vm1", "vm-stopped"), ("stop-vm", "vm2", "vm-stopped")]
    finally:
        site.close()
    assert pool_pages() == hugepages


def test_at_the_deadline_the_pilot_destroys_its_vms_before_giving_the_memory_back(tmp_path, hugepages):
    site = make_site(tmp_path)
    try:
        lease = ready_lease(site, duration_s=4)
        start(site, lease, kernel_spec("vm1"))
        assert wait_vm(site, lease, "vm1", {"running", "failed"}).state == "running"
        done = site.leases.wait(lease.id, TERMINAL_STATES, timeout=30)
        assert done.state == "expired", done.reason
        vm = site.vms.get(lease.id, "vm1")
        assert vm.state == "stopped" and "teardown" in vm.reason, vm.reason
        log = open(os.path.join(site.log_dir, f"{lease.slot}.{lease.pilots[0].host}.log")).read()
        assert log.index("destroyed VM(s) vm1") < log.index("gave 64 MB back")
    finally:
        site.close()
    assert pool_pages() == hugepages


def test_a_pilot_that_stops_polling_is_lost_and_its_node_still_comes_back(tmp_path, hugepages):
    site = make_site(tmp_path, lost_after=3)
    try:
        lease = ready_lease(site)
        start(site, lease, kernel_spec("vm1"))
        assert wait_vm(site, lease, "vm1", {"running", "failed"}).state == "running"
        [pid] = site.provider.pids(lease.job_id)
        os.kill(pid, signal.SIGSTOP)  # frozen: no polls, no notifications
        try:
            failed = site.leases.wait(lease.id, TERMINAL_STATES | {"releasing"}, timeout=30)
            assert failed.state == "failed" and "lost" in failed.reason, failed.reason
            assert site.vms.get(lease.id, "vm1").state == "lost"
        finally:
            os.kill(pid, signal.SIGCONT)  # the cancel's SIGTERM waits for it: then the pilot restores
        assert site.provider.wait(lease.job_id, timeout=30) == [0]
    finally:
        site.close()
    assert pool_pages() == hugepages


def test_a_restarted_service_knows_the_lease_and_its_vm_and_can_still_stop_it(tmp_path, hugepages):
    site = make_site(tmp_path)
    pids = []
    try:
        lease = ready_lease(site)
        pids = site.provider.pids(lease.job_id)
        start(site, lease, kernel_spec("vm1"))
        assert wait_vm(site, lease, "vm1", {"running", "failed"}).state == "running"
        assert site.leases.wait(lease.id, {"running"}, timeout=10) is not None
        site.close(stop_pilots=False)
        site = make_site(tmp_path)
        assert site.leases.get(lease.id).state == "running"
        assert site.vms.get(lease.id, "vm1").state == "running"
        site.vms.stop(lease.id, "vm1", force=True)
        assert wait_vm(site, lease, "vm1", {"stopped", "running"}).state == "stopped"
        site.leases.release(lease.id)
        assert site.leases.wait(lease.id, TERMINAL_STATES, timeout=30).state == "released"
    finally:
        site.close()
        stop_by_pid(pids)  # the restarted site's provider did not start them, so it does not stop them
    assert pool_pages() == hugepages


def test_after_the_service_died_sigterm_destroys_the_vms_at_once_and_the_pilot_exits(tmp_path, hugepages):
    site = make_site(tmp_path)
    pids = []
    try:
        lease = ready_lease(site)
        start(site, lease, kernel_spec("vm1"))
        assert wait_vm(site, lease, "vm1", {"running", "failed"}).state == "running"
        pids = site.provider.pids(lease.job_id)
        log_path = os.path.join(site.log_dir, f"{lease.slot}.{lease.pilots[0].host}.log")
        site.close(stop_pilots=False)  # the service dies; its pilot and VM stay
        # The pilot has seen that nothing answers, after the service was all gone: a request on a connection the
        # closing server still served (a vm-usage report, say) answered until then.
        with open(log_path, encoding="utf-8") as handle:
            gone_at = len(handle.read())
        wait_for_text(log_path, "Connection refused", 30, after=gone_at)
        os.kill(pids[0], signal.SIGTERM)
        # No service can stop vm1 gracefully: the pilot destroys it at once instead of waiting
        # grace x earlywaitratio for stop-vm commands, restores, and does not wait its grace
        # to tell the dead service either.
        assert site.provider.wait(lease.job_id, timeout=30) == [ExitCode.UNDELIVERED]
        log = open(log_path, encoding="utf-8").read()
        assert "not waiting for its stop-vm commands" in log, log
        assert log.index("destroyed VM(s) vm1") < log.index("gave 64 MB back") < log.rindex("not trying again")
    finally:
        stop_by_pid(pids)
    assert pool_pages() == hugepages


def wait_for_text(path: str, needle: str, timeout: float, after: int = 0) -> None:
    """Wait until the file at ``path`` holds ``needle`` past its first ``after`` characters (checked every 50 ms;
    fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, encoding="utf-8") as handle:
            if needle in handle.read()[after:]:
                return
        time.sleep(0.05)
    pytest.fail(f"no {needle!r} in {path} within {timeout} s")


def stop_by_pid(pids: list[int]) -> None:
    """SIGTERM each pilot still running (it restores its node) and wait for it."""
    for pid in pids:
        try:
            process = psutil.Process(pid)
            process.terminate()
            process.wait(30)
        except psutil.NoSuchProcess:
            pass


# -- how busy the VMs are; leases released when idle -------------------------------------------------


def wait_usage(site, lease, name, predicate, timeout=30):
    """The VM once ``predicate(vm)`` holds for what its pilot last said of its use (re-checked at every commit)."""
    found = []

    def holds():
        vm = site.vms.get(lease.id, name)
        if vm.busy is not None and predicate(vm):
            found.append(vm)
            return True
        return False

    assert site.store.wait_for(holds, timeout), site.vms.get(lease.id, name)
    return found[-1]


def test_a_running_vm_reports_its_use_and_a_paused_one_turns_idle(tmp_path, hugepages):
    site = make_site(tmp_path, usage_interval=0.5)
    try:
        lease = ready_lease(site)
        start(site, lease, kernel_spec("vm1"))
        assert wait_vm(site, lease, "vm1", {"running", "failed"}).state == "running"
        busy = wait_usage(site, lease, "vm1", lambda vm: vm.cpu is not None)
        assert busy.busy == 1 and busy.cpu >= 50 and busy.busy_since is not None  # the counter: a whole vCPU
        shown = vm_json(busy)["usage"]
        assert shown["busy"] is True and shown["cpu"] == busy.cpu and shown["since"].endswith("Z")
        site.vms.suspend(lease.id, "vm1")
        idle = wait_usage(site, lease, "vm1", lambda vm: vm.busy == 0)
        assert idle.cpu == 0 and idle.busy_since > busy.busy_since  # turned idle when it was paused
        site.leases.release(lease.id)
        ended = site.leases.wait(lease.id, TERMINAL_STATES, timeout=30)
        assert vm_json(site.vms.get(lease.id, "vm1"))["usage"] is None  # an ended VM has no use to show
        assert ended.state == "released"
    finally:
        site.close()
    assert pool_pages() == hugepages


def test_a_lease_asking_for_it_is_released_once_idle_that_long_and_never_while_a_vm_runs(tmp_path, hugepages):
    idle_s = 2.0
    site = make_site(tmp_path)
    try:
        lease = site.leases.reserve(nodes=1, memory_mb=64, duration_s=300, release_when_idle_s=idle_s)
        assert lease.to_json()["release_when_idle_s"] == idle_s
        ready = site.leases.wait(lease.id, {"ready"} | TERMINAL_STATES, timeout=30)
        assert ready.state == "ready", ready.reason
        start(site, ready, kernel_spec("vm1"))
        assert wait_vm(site, ready, "vm1", {"running", "failed"}).state == "running"
        # Twice its idle time with a VM on it: still held.
        assert site.leases.wait(lease.id, {"releasing"} | TERMINAL_STATES, timeout=2 * idle_s) is None
        site.vms.stop(lease.id, "vm1")
        stopped = wait_vm(site, ready, "vm1", {"stopped"})
        ended = site.leases.wait(lease.id, TERMINAL_STATES, timeout=30)
        assert ended.state == "released", ended.reason
        (ending,) = [e for e in site.leases.history(lease.id) if e.kind == "ending"]
        assert "no VM has been on the lease for" in ending.reason and "after 2 s idle" in ending.reason
        assert ending.at - stopped.stopped_at >= idle_s  # counted from its last VM's end
    finally:
        site.close()
    assert pool_pages() == hugepages


def test_a_lease_that_never_gets_a_vm_is_released_after_its_idle_time_from_ready(tmp_path, hugepages):
    site = make_site(tmp_path)
    try:
        lease = site.leases.reserve(nodes=1, memory_mb=64, duration_s=300, release_when_idle_s=1)
        ended = site.leases.wait(lease.id, TERMINAL_STATES, timeout=30)
        assert ended.state == "released", ended.reason
        (ending,) = [e for e in site.leases.history(lease.id) if e.kind == "ending"]
        assert ending.at - ended.ready_at >= 1
    finally:
        site.close()
    assert pool_pages() == hugepages
