"""workspace-killall on a real node: real pilots, the real hugepage pool, libvirt's test driver, a real service."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import signal
import subprocess
import sys
import threading


from admin_tools import killall
from pilot.exitcodes import ExitCode
from pilot.node.journal import Entry, Journal
from pilot.node.owner import Owner, boot_id, start_ticks
from tests.support.pilots import journal_files, pilot_config, read_until, running_pilot
from tests.support.pool import pool_pages
from tests.support.service import throwaway_node_keys
from tests.support.owners import dead_owner
from tests.support.nodes import config_for, held_entry, libvirt, set_pool, start_vm

libvirt.registerErrorHandler(lambda *_: None, None)


def run_killall(config: str, *extra: str) -> tuple[int, str]:
    out = io.StringIO()
    code = killall.main(["--config", config, *extra], out=out)
    return code, out.getvalue()


def vm_names(conn) -> set[str]:
    return {d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}


def test_a_dead_pilots_slot_and_vm_are_backed_out_and_the_service_told(tmp_path, hugepages, service, conn):
    slot = service.add_slot()
    config = config_for(tmp_path, service)
    journal = Journal(str(tmp_path / "journal"))
    journal.prepare()
    set_pool(hugepages + 16)  # what the dead pilot took
    journal.write(held_entry(slot, 16, dead_owner(), contact=service.url, sign_key=service.sign_key(slot)))
    start_vm(conn, "wp-test-leased", slot)
    start_vm(conn, "wp-test-neighbour", None)  # not ours: never touched

    code, out = run_killall(config)

    assert code == 0, out
    assert pool_pages() == hugepages
    assert journal_files(tmp_path) == []
    assert "wp-test-leased" not in vm_names(conn)
    assert "wp-test-neighbour" in vm_names(conn)
    assert "destroyed VM wp-test-leased" in out and "node clean" in out
    bodies = [json.loads(row[6]) for row in service.store.snapshot()["notifications"] if row[0] == slot]
    killed = [body for body in bodies if body["state"] == "killed"]
    assert len(killed) == 1 and killed[0]["vms"] == ["wp-test-leased"], bodies
    assert killed[0]["memory_mb"] == 0


def test_a_live_pilot_is_stopped_by_pid_and_restores_itself(tmp_path, hugepages, service):
    slot = service.add_slot()
    config = config_for(tmp_path, service)
    with running_pilot(config, slot, memory=32, duration=60) as pilot:
        service.store.wait_for(lambda: "reserved" in [n[2] for n in service.store.notifications(slot)], 15)
        assert pool_pages() == hugepages + 16
        out = subprocess.run(
            [sys.executable, "-m", "admin_tools.killall", "--config", config],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert pilot.wait(timeout=5) == 0  # SIGTERM: the pilot restored the node itself
    assert f"stopped pilot {pilot.pid}" in out.stdout
    assert pool_pages() == hugepages
    assert journal_files(tmp_path) == []


def test_after_the_service_died_a_pilot_restores_and_exits_at_once_not_after_its_grace(tmp_path, hugepages, service):
    slot = service.add_slot()
    config = config_for(tmp_path, service)
    with running_pilot(config, slot, memory=32, duration=300, grace=120) as pilot:
        read_until(pilot, "polling ", 30)  # holding, and its poller has reached the service
        service.receiver.stop()  # the service dies; its pilot stays
        read_until(pilot, "Connection refused", 30)  # the pilot has seen that nothing answers
        # The grace is far longer than kill-all's wait: a pilot that kept telling the dead
        # service for its whole grace would be SIGKILLed (-9) instead of exiting on its own.
        code, out = run_killall(config, "--term-timeout", "20")
        assert pilot.wait(timeout=5) == ExitCode.UNDELIVERED
        log = pilot.stdout.read()
    assert code == 0, out
    assert f"stopped pilot {pilot.pid} (slot {slot} on node1) with SIGTERM" in out
    assert "not trying again" in log and "the node is restored" in log, log
    assert pool_pages() == hugepages
    assert journal_files(tmp_path) == []


class _Overloaded(http.server.BaseHTTPRequestHandler):
    """Answers every request 503: a service (or its proxy) that is there but takes nothing."""

    def _busy(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _busy

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def overloaded_service(port: int):
    """A real HTTP server on 127.0.0.1:``port`` that answers 503 to everything, for the block."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Overloaded)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_pilot_that_restored_but_still_tells_a_busy_service_is_told_apart_from_a_stuck_one(
        tmp_path, hugepages, service):
    slot = service.add_slot()
    config = config_for(tmp_path, service)
    with running_pilot(config, slot, memory=32, duration=300, grace=120) as pilot:
        read_until(pilot, "polling ", 30)
        service.receiver.stop()
        with overloaded_service(service.receiver.port):
            read_until(pilot, "command poll: HTTP 503", 30)  # the service answers, so it is worth retrying
            code, out = run_killall(config, "--term-timeout", "5", "--no-notify")
        assert pilot.wait(timeout=5) == -signal.SIGKILL
    assert code == 0, out
    assert (f"pilot {pilot.pid} (slot {slot} on node1) had restored the node but was still telling the service"
            in out), out
    assert "stuck" not in out
    assert pool_pages() == hugepages
    assert journal_files(tmp_path) == []


def test_a_pilot_that_ignores_sigterm_is_killed_and_its_entry_undone(tmp_path, hugepages):
    config = config_for(tmp_path)
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        read_until(stubborn, "ready")
        owner = Owner(stubborn.pid, start_ticks(stubborn.pid), boot_id())
        journal = Journal(str(tmp_path / "journal"))
        journal.prepare()
        set_pool(hugepages + 8)
        journal.write(held_entry("stubborn", 8, owner))
        code, out = run_killall(config, "--term-timeout", "0.2", "--no-notify")
        assert code == 0, out
        assert f"pilot {stubborn.pid} (slot stubborn on node1) was stuck" in out
        assert stubborn.wait(timeout=5) == -signal.SIGKILL
        assert pool_pages() == hugepages
        assert journal_files(tmp_path) == []
    finally:
        if stubborn.poll() is None:
            stubborn.kill()
            stubborn.wait()


def test_dry_run_prints_the_plan_and_changes_nothing(tmp_path, hugepages, conn):
    config = config_for(tmp_path)
    journal = Journal(str(tmp_path / "journal"))
    journal.prepare()
    set_pool(hugepages + 4)
    entry = held_entry("planned", 4, dead_owner())
    journal.write(entry)
    start_vm(conn, "wp-test-planned", "planned")
    try:
        code, out = run_killall(config, "--dry-run")
        assert code == 1  # there is work to do
        assert "would destroy VM wp-test-planned" in out and "would restore slot planned" in out
        assert pool_pages() == hugepages + 4
        assert journal_files(tmp_path) == [entry.filename]
        assert "wp-test-planned" in vm_names(conn)
    finally:
        set_pool(hugepages)


def test_dry_run_on_a_clean_node_exits_0(tmp_path, conn):
    code, out = run_killall(config_for(tmp_path), "--dry-run")
    assert code == 0 and "nothing to do" in out


def test_an_unreadable_entry_is_backed_out_to_the_boot_value(tmp_path, hugepages):
    config = config_for(tmp_path, boot_mb=hugepages * 2)
    Journal(str(tmp_path / "journal")).prepare()
    (tmp_path / "journal" / "lost.json").write_text("{truncated")
    set_pool(hugepages + 8)
    code, out = run_killall(config, "--no-notify")
    assert code == 0, out
    assert "returned hugepages to its boot value" in out
    assert pool_pages() == hugepages
    assert journal_files(tmp_path) == []


def test_without_a_boot_value_an_unreadable_entry_is_a_problem_and_stays(tmp_path, hugepages):
    config = config_for(tmp_path)
    Journal(str(tmp_path / "journal")).prepare()
    (tmp_path / "journal" / "lost.json").write_text("{truncated")
    code, out = run_killall(config, "--no-notify")
    assert code == 1
    assert "PROBLEM: journal entry lost.json is unreadable" in out and "boot_mb" in out
    assert journal_files(tmp_path) == ["lost.json"]
    assert pool_pages() == hugepages


def test_a_node_without_a_hypervisor_and_nothing_journalled_is_clean(tmp_path):
    """No libvirtd on the node (the socket is absent) and no entry with VMs: nothing to check, exit 0."""
    uri = f"qemu+unix:///system?socket={tmp_path}/no-such-socket"
    config = pilot_config(tmp_path, "http://127.0.0.1:9", throwaway_node_keys(tmp_path), sections={"libvirt": {"uri": uri}})
    for extra in ((), ("--dry-run",)):
        code, out = run_killall(config, "--no-notify", *extra)
        assert code == 0, out
        assert f"no hypervisor running at {uri}" in out
        assert "PROBLEM" not in out and "cannot connect" not in out


def test_libvirt_that_cannot_be_reached_where_the_journal_has_vms_means_not_clean(tmp_path):
    uri = f"qemu+unix:///system?socket={tmp_path}/no-such-socket"
    config = pilot_config(tmp_path, "http://127.0.0.1:9", throwaway_node_keys(tmp_path), sections={"libvirt": {"uri": "test:///default"}})
    journal = Journal(str(tmp_path / "journal"))
    journal.prepare()
    journal.write(Entry("slot-vms", "node1", dead_owner(), vm_uri=uri))  # a pilot that had VMs there, then died
    code, out = run_killall(config, "--no-notify")
    assert code == 1, out
    assert f"PROBLEM: cannot check VMs: cannot connect to libvirt at {uri}" in out
    assert "a journal entry says VMs may run there" in out
    assert "node NOT clean" in out


def test_bad_arguments_and_bad_config_are_one_line_with_their_own_codes(tmp_path):
    bad_arg = subprocess.run(
        [sys.executable, "-m", "admin_tools.killall", "--term-timeout", "soon"], capture_output=True, text=True
    )
    assert bad_arg.returncode == 2 and len(bad_arg.stderr.strip().splitlines()) == 1
    config = tmp_path / "bad.conf"
    config.write_text("[memory]\nbackend = balloon\n")
    bad_config = subprocess.run(
        [sys.executable, "-m", "admin_tools.killall", "--config", str(config)], capture_output=True, text=True
    )
    assert bad_config.returncode == 3
    assert bad_config.stderr.strip().splitlines() == [
        f"workspace-killall: config error: {config}: [memory] backend = 'balloon': "
        "must be one of hugepages, cgroup, xen, xl, none"
    ]


def test_a_reader_that_goes_away_stops_the_printing_not_the_backout(tmp_path, hugepages):
    """``workspace-killall | head -1``: the pipe closes before the first line; the node is still backed out."""
    config = config_for(tmp_path, boot_mb=hugepages * 2)
    Journal(str(tmp_path / "journal")).prepare()
    (tmp_path / "journal" / "lost.json").write_text("{truncated")
    set_pool(hugepages + 8)
    process = subprocess.Popen([sys.executable, "-m", "admin_tools.killall", "--config", config, "--no-notify"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # no reader left: its first line meets a closed pipe
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err
    assert pool_pages() == hugepages
    assert journal_files(tmp_path) == []
