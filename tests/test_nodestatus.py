"""``workspace-node-status``: what pilots hold on the node, read without changing anything."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from admin_tools import nodestatus
from pilot.node.journal import Journal
from pilot.node.owner import Owner
from tests.support.pilots import journal_files, running_pilot
from tests.support.pool import pool_pages
from tests.support.owners import dead_owner
from tests.support.nodes import config_for, held_entry, set_pool, start_vm

libvirt = pytest.importorskip("libvirt")


def status_of(config: str, *extra: str) -> tuple[int, str]:
    out = io.StringIO()
    code = nodestatus.main(["--config", config, *extra], out=out)
    return code, out.getvalue()


def test_a_live_pilot_and_its_vm_are_consistent_and_a_dead_ones_leftovers_need_attention(tmp_path, hugepages, conn):
    config = config_for(tmp_path)
    journal = Journal(str(tmp_path / "journal"))
    journal.prepare()
    me = Owner.current()  # stands for a live pilot: this process runs
    journal.write(held_entry("slot-live", 8, me))
    start_vm(conn, "wp-test-held", "slot-live")
    start_vm(conn, "wp-test-neighbour", None)  # not a pilot's: not shown

    code, out = status_of(config)
    assert code == nodestatus.EXIT_CONSISTENT, out
    assert "slot-live" in out and "wp-test-held" in out and "wp-test-neighbour" not in out
    assert "consistent" in out and "ATTENTION" not in out

    set_pool(hugepages + 16)
    journal.write(held_entry("slot-dead", 16, dead_owner()))
    start_vm(conn, "wp-test-orphan", "slot-gone")
    before = (pool_pages(), sorted(journal_files(tmp_path)), {d.name() for d in conn.listAllDomains(0)})

    code, out = status_of(config, "--json")
    status = json.loads(out)
    assert code == nodestatus.EXIT_ATTENTION
    entries = {e["slot"]: e for e in status["entries"]}
    assert entries["slot-live"]["alive"] is True and entries["slot-live"]["pilot_pid"] == os.getpid()
    assert entries["slot-dead"]["alive"] is False and entries["slot-dead"]["memory_mb"] == 32
    assert entries["slot-dead"]["backend"] == "hugepages" and entries["slot-dead"]["phase"] == "held"
    assert {v["name"]: v["slot"] for v in status["vms"]} == {"wp-test-held": "slot-live", "wp-test-orphan": "slot-gone"}
    assert status["backend"]["name"] == "hugepages" and status["backend"]["level"] == hugepages + 16
    assert any("slot-dead" in a and "is gone" in a for a in status["attention"])
    assert any("wp-test-orphan" in a for a in status["attention"])
    assert not any("slot-live" in a or "wp-test-held" in a for a in status["attention"])
    # Read only: nothing on the node moved.
    assert (pool_pages(), sorted(journal_files(tmp_path)), {d.name() for d in conn.listAllDomains(0)}) == before
    set_pool(hugepages)


def test_a_real_pilot_shows_as_running_with_the_memory_it_holds(tmp_path, hugepages, service):
    slot = service.add_slot()
    config = config_for(tmp_path, service)
    with running_pilot(config, slot, memory=32, duration=60) as pilot:
        service.store.wait_for(lambda: "reserved" in [n[2] for n in service.store.notifications(slot)], 15)
        done = subprocess.run([sys.executable, "-m", "admin_tools.nodestatus", "--config", config, "--json"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        (entry,) = json.loads(done.stdout)["entries"]
        assert (entry["slot"], entry["pilot_pid"], entry["alive"], entry["memory_mb"]) == (slot, pilot.pid, True, 32)
        assert pool_pages() == hugepages + 16
        pilot.terminate()
        pilot.wait(30)
    assert pool_pages() == hugepages


def test_a_bad_config_is_one_line_and_exit_3(tmp_path):
    bad = tmp_path / "pilot.conf"
    bad.write_text("[memory]\nbackend = balloon\n")
    done = subprocess.run([sys.executable, "-m", "admin_tools.nodestatus", "--config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "backend = 'balloon'" in done.stderr
