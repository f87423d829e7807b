"""The node always comes back: real pilot processes killed at every point, two pilots in both orders.

Each pilot here is a real ``workspace-pilot reserve`` process on the real
hugepage pool, reporting to a real service. The fault checkpoints
(:mod:`pilot.faults`) pause it at a named point until a signal arrives;
the test then ends it one way or another and checks that the pool is
where it started and the journal is empty.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from pilot.exitcodes import ExitCode
from pilot.faults import POINTS
from tests.support.pilots import journal_files, pilot_config, read_until, running_pilot, start_pilot
from tests.support.pool import pool_pages

DEATHS = ("sigterm", "sigkill-then-killall", "sigkill-then-next-pilot")


def config_for(tmp_path, service) -> str:
    return pilot_config(
        tmp_path, service.url, service.node_key_file(),
        sections={"memory": {"minmem": 0}, "libvirt": {"uri": ""}},
    )


@pytest.mark.parametrize("death", DEATHS)
@pytest.mark.parametrize("point", POINTS)
def test_a_pilot_ended_at_any_point_leaves_the_node_as_it_began(tmp_path, hugepages, service, point, death):
    config = config_for(tmp_path, service)
    slot = service.add_slot()
    # The restore points are reached on the pilot's own deadline; the others long before it.
    duration = 1 if point in ("restoring", "restored") else 60
    with running_pilot(config, slot, memory=32, duration=duration, pause_at=point) as pilot:
        read_until(pilot, f"paused at checkpoint {point}")
        if death == "sigterm":
            pilot.send_signal(signal.SIGTERM)
            code = pilot.wait(timeout=20)
            assert code == ExitCode.OK, pilot.stdout.read()
        else:
            pilot.send_signal(signal.SIGKILL)
            pilot.wait(timeout=10)
            if death == "sigkill-then-killall":
                backout = subprocess.run(
                    [sys.executable, "-m", "admin_tools.killall", "--config", config, "--no-notify"],
                    capture_output=True, text=True, timeout=60,
                )
                assert backout.returncode == 0, backout.stdout + backout.stderr
            else:
                nxt = start_pilot(config, service.add_slot(), memory=8, duration=0.5)
                output, _ = nxt.communicate(timeout=30)
                assert nxt.returncode == ExitCode.OK, output
                assert f"of dead pilot {pilot.pid}" in output, output  # the next start undid it
    assert pool_pages() == hugepages, f"{point}/{death}"
    assert journal_files(tmp_path) == []


@pytest.mark.parametrize("first_out", ["first-started", "second-started"])
def test_two_pilots_on_one_node_end_in_either_order(tmp_path, hugepages, service, first_out):
    config = config_for(tmp_path, service)
    slots = [service.add_slot(), service.add_slot(memory_mb=128)]
    with running_pilot(config, slots[0], memory=64, duration=60, host="node1") as one, \
            running_pilot(config, slots[1], memory=128, duration=60, host="node2") as two:
        for slot in slots:
            assert service.store.wait_for(
                lambda slot=slot: "reserved" in [n[2] for n in service.store.notifications(slot)], 15
            )
        assert pool_pages() == hugepages + 32 + 64
        first, second = (one, two) if first_out == "first-started" else (two, one)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=20) == ExitCode.OK
        assert pool_pages() == hugepages + (64 if first is one else 32)
        assert len(journal_files(tmp_path)) == 1
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=20) == ExitCode.OK
    assert pool_pages() == hugepages
    assert journal_files(tmp_path) == []
