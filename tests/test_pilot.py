"""Real pilot processes against a real receiver: every way a lease can end leaves the pool as it was."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from pilot.exitcodes import ExitCode
from service_adapter.lease import TERMINAL_STATES
from service_adapter.local_site import LocalSite
from service_adapter.receiver import ReceiverThread, make_app
from tests.support.pilots import pilot_config, read_until, running_pilot
from tests.support.pool import pool_pages
from tests.support.ports import free_port
from tests.support.service import throwaway_node_keys


def states(service, slot, host="node1"):
    return [state for h, _seq, state, _code in service.store.notifications(slot) if h == host]


def wait_for_state(service, slot, state, timeout=30):
    assert service.store.wait_for(
        lambda: any(p.state == state for p in service.store.pilots(slot)), timeout
    ), f"no pilot of {slot} reached {state}"


# -- a whole lease through the local provider --------------------------------------------------


@pytest.fixture
def site(tmp_path, hugepages):
    local = LocalSite(str(tmp_path / "site"), grace_s=5, journal_dir=str(tmp_path / "journal"),
                      release_grace_s=5, status_interval_s=0.2)
    yield local
    local.close()


def test_lease_of_two_local_pilots_ends_at_its_deadline(site, hugepages):
    lease = site.leases.reserve(nodes=2, memory_mb=64, duration_s=3)
    ready = site.leases.wait(lease.id, {"ready"} | TERMINAL_STATES, timeout=30)
    assert ready.state == "ready", ready.reason
    assert pool_pages() == hugepages + 2 * 32
    assert {p.host for p in ready.pilots} == set(site.provider.hosts(lease.job_id))
    assert all(p.expires_at for p in ready.pilots)
    done = site.leases.wait(lease.id, TERMINAL_STATES, timeout=30)
    assert done.state == "expired", done.reason
    assert site.provider.wait(lease.job_id, timeout=10) == [0, 0]
    assert pool_pages() == hugepages
    for host in site.provider.hosts(lease.job_id):
        assert states(site, lease.slot, host) == ["reserved", "unreserving", "unreserved"]


def test_release_before_the_deadline_takes_the_early_path(site, hugepages):
    lease = site.leases.reserve(nodes=2, memory_mb=64, duration_s=300)
    assert site.leases.wait(lease.id, {"ready"} | TERMINAL_STATES, timeout=30).state == "ready"
    assert site.leases.release(lease.id).state == "releasing"
    done = site.leases.wait(lease.id, TERMINAL_STATES, timeout=30)
    assert done.state == "released", done.reason
    assert site.provider.wait(lease.job_id, timeout=10) == [0, 0]
    assert pool_pages() == hugepages
    for host in site.provider.hosts(lease.job_id):
        assert states(site, lease.slot, host) == ["reserved", "earlyunreserving", "unreserved"]


# -- single pilots, for the ways a lease goes wrong --------------------------------------------------


def test_service_down_for_the_whole_lease_gives_memory_back(tmp_path, hugepages):
    dead = f"http://127.0.0.1:{free_port()}"
    config = pilot_config(tmp_path, dead, throwaway_node_keys(tmp_path), reserved_timeout_s=2)
    with running_pilot(config, "slot-down", duration=60, grace=3) as pilot:
        assert pilot.wait(timeout=2 + 3 + 10) == ExitCode.SERVICE_UNREACHABLE
    assert pool_pages() == hugepages
    assert "was not delivered within 2 s" in pilot.stdout.read()


def test_sigterm_with_the_service_down_exits_within_the_grace(tmp_path, hugepages):
    dead = f"http://127.0.0.1:{free_port()}"
    config = pilot_config(tmp_path, dead, throwaway_node_keys(tmp_path), reserved_timeout_s=600)
    with running_pilot(config, "slot-down", duration=600, grace=2) as pilot:
        for line in pilot.stdout:  # the pool is taken once it says so
            if "took 64 MB" in line:
                break
        assert pool_pages() == hugepages + 32
        pilot.send_signal(signal.SIGTERM)
        # Exiting at all within grace + slack is the promise; how fast is for the benchmark.
        assert pilot.wait(timeout=2 + 5) == ExitCode.UNDELIVERED
    assert pool_pages() == hugepages


@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGUSR1])
def test_grid_engines_notify_signals_restore_or_are_noted(tmp_path, hugepages, signum):
    """Grid Engine's -notify: SIGUSR2 comes before a qdel's SIGKILL (restore as for SIGTERM), SIGUSR1 before
    a suspend (nothing to do, but not a death: the default action of both would end the pilot shrunk)."""
    dead = f"http://127.0.0.1:{free_port()}"
    config = pilot_config(tmp_path, dead, throwaway_node_keys(tmp_path), reserved_timeout_s=600)
    with running_pilot(config, "slot-sge", duration=600, grace=2) as pilot:
        for line in pilot.stdout:
            if "took 64 MB" in line:
                break
        pilot.send_signal(signum)
        if signum == signal.SIGUSR2:
            assert pilot.wait(timeout=2 + 5) == ExitCode.UNDELIVERED  # restored; the service was never there
        else:
            for line in pilot.stdout:
                if "SIGUSR1: the batch system is about to suspend this job" in line:
                    break
            assert pilot.poll() is None and pool_pages() == hugepages + 32  # still holding, still alive
            pilot.send_signal(signal.SIGTERM)
            assert pilot.wait(timeout=2 + 5) == ExitCode.UNDELIVERED
    assert pool_pages() == hugepages


def test_service_back_during_the_grace_hears_the_end(tmp_path, hugepages, service):
    slot = service.add_slot()
    port = free_port()
    config = pilot_config(tmp_path, f"http://127.0.0.1:{port}", service.node_key_file(), reserved_timeout_s=600)
    late = ReceiverThread(make_app(service.store, service.verifier), port=port)
    with running_pilot(config, slot, duration=600, grace=20) as pilot:
        for line in pilot.stdout:
            if "took 64 MB" in line:
                break
        pilot.send_signal(signal.SIGTERM)
        late.start()
        try:
            assert pilot.wait(timeout=20 + 5) == ExitCode.OK
        finally:
            late.stop()
    assert pool_pages() == hugepages
    assert states(service, slot)[-2:] == ["earlyunreserving", "unreserved"]


def test_service_that_vanishes_mid_lease(tmp_path, hugepages, service):
    slot = service.add_slot()
    config = pilot_config(tmp_path, service.url, service.node_key_file())
    with running_pilot(config, slot, duration=300, grace=2) as pilot:
        wait_for_state(service, slot, "reserved")
        service.receiver.stop()
        pilot.send_signal(signal.SIGTERM)
        assert pilot.wait(timeout=2 + 5) == ExitCode.UNDELIVERED
    assert pool_pages() == hugepages


def test_unknown_slot_is_refused_and_memory_given_back(tmp_path, hugepages, service):
    config = pilot_config(tmp_path, service.url, service.node_key_file())
    with running_pilot(config, "slot-the-service-never-made", duration=300, grace=2) as pilot:
        assert pilot.wait(timeout=30) == ExitCode.SERVICE_REFUSED
    assert pool_pages() == hugepages
    assert "HTTP 404" in pilot.stdout.read()


def test_a_node_key_the_service_did_not_issue_is_refused_and_memory_given_back(tmp_path, hugepages, service):
    slot = service.add_slot()
    config = pilot_config(tmp_path, service.url, throwaway_node_keys(tmp_path))
    with running_pilot(config, slot, duration=300, grace=2) as pilot:
        assert pilot.wait(timeout=30) == ExitCode.SERVICE_REFUSED
    assert pool_pages() == hugepages
    assert service.store.notifications(slot) == []


def test_not_enough_memory_fails_cleanly_and_tells_the_service(tmp_path, hugepages, service):
    slot = service.add_slot()
    config = pilot_config(tmp_path, service.url, service.node_key_file())
    with running_pilot(config, slot, memory=64 * 1024 * 1024, duration=300, grace=5) as pilot:
        assert pilot.wait(timeout=60) == ExitCode.RESERVE_FAILED
    assert pool_pages() == hugepages
    (pilot_row,) = service.store.pilots(slot)
    assert (pilot_row.state, pilot_row.code) == ("error", ExitCode.RESERVE_FAILED)


def test_second_sigterm_does_not_break_the_restore(tmp_path, hugepages, service):
    slot = service.add_slot()
    config = pilot_config(tmp_path, service.url, service.node_key_file())
    with running_pilot(config, slot, duration=300, grace=5) as pilot:
        wait_for_state(service, slot, "reserved")
        pilot.send_signal(signal.SIGTERM)
        pilot.send_signal(signal.SIGINT)
        assert pilot.wait(timeout=15) == ExitCode.OK
    assert pool_pages() == hugepages
    assert states(service, slot) == ["reserved", "earlyunreserving", "unreserved"]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_demo_stopped_by_a_signal_ends_its_lease_and_leaves_the_node_clean(tmp_path, hugepages, stop):
    demo = subprocess.Popen(
        [sys.executable, "-m", "service_adapter", "demo", "--nodes", "2", "--memory", "8",
         "--duration", "300", "--grace", "5", "--workdir", str(tmp_path / "demo"),
         "--journal-dir", str(tmp_path / "journal")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        before_stop = read_until(demo, "lease ready", timeout=60)
        assert pool_pages() == hugepages + 8  # 2 x 8 MB of 2 MiB pages: held
        demo.send_signal(stop)
        out, _ = demo.communicate(timeout=60)  # a hang detector: the pilots restore within their grace
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    text = before_stop + out.decode()
    assert demo.returncode == 128 + stop, text
    assert "Traceback" not in text
    assert f"interrupted ({stop.name}): releasing the lease" in text
    assert f"hugepage pool after: {hugepages} pages" in text and "the node is as it was" in text
    assert pool_pages() == hugepages
    assert not list((tmp_path / "journal").glob("*.json"))  # no pilot left an entry behind


def test_a_failed_demo_says_each_pilots_reason_and_where_its_log_is(tmp_path, hugepages):
    result = subprocess.run(
        [sys.executable, "-m", "service_adapter", "demo", "--nodes", "1", "--memory", str(10**7),
         "--duration", "5", "--grace", "5", "--workdir", str(tmp_path / "demo"),
         "--journal-dir", str(tmp_path / "journal")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if "local-node1 (error, code 5):" in line)
    assert "below minmem" in line and "nothing was changed" in line
    log = line.rsplit("(log ", 1)[1].rstrip(")")
    assert os.path.exists(log) and "below minmem" in open(log).read()
    assert pool_pages() == hugepages


def test_demo_runs_a_lease_and_restores_the_pool(tmp_path, hugepages):
    result = subprocess.run(
        [sys.executable, "-m", "service_adapter", "demo", "--nodes", "2", "--memory", "8",
         "--duration", "2", "--grace", "5", "--workdir", str(tmp_path / "demo"),
         "--journal-dir", str(tmp_path / "journal")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.count(": reserved [seq 1]") == 2 and out.count(": unreserved [seq 3]") == 2
    assert "lease releasing -> expired" in out
    assert f"hugepage pool after: {hugepages} pages" in out
    assert "back where they started" in out
