"""The lease pool's parts that decide: its profile, its numbers for COBalD, which leases it gives back, and where its
waiting work comes from (the pool against a real service and a real COBalD daemon: tests/test_burst_pool.py)."""

from __future__ import annotations

import sys

import pytest

from service_adapter.burst.profile import ProfileError, parse_profile
from service_adapter.burst.view import look_at, numbers, to_release
from service_adapter.burst.waiting import waiting_from
from workspace_common.protocol import format_epoch

VM = {"name": "worker", "memory_mb": 128, "boot": {"kernel": {"path": "vmlinuz", "sha256": "0" * 64}}}


@pytest.mark.parametrize("options, needle", [
    ({"duration_s": 600}, "memory_mb and duration_s are required"),
    ({"memory_mb": 0, "duration_s": 600}, "memory_mb must be a whole number from 1"),
    ({"memory_mb": 256, "duration_s": -1}, "duration_s must be a number of seconds above 0"),
    ({"memory_mb": 256, "duration_s": 600, "nodes": 1.5}, "nodes must be a whole number"),
    ({"memory_mb": 256, "duration_s": 600, "stagger": 1}, "stagger must be a share"),
    ({"memory_mb": 256, "duration_s": 600, "vm": ["x"]}, "vm must be a VM spec"),
    ({"memory_mb": 256, "duration_s": 600, "vm": {**VM, "host": "node1"}}, "leave out 'host'"),
    ({"memory_mb": 256, "duration_s": 600, "images": ["debian"]}, "images must be a list of"),
])
def test_a_bad_profile_is_refused_naming_the_option(options, needle):
    with pytest.raises(ProfileError, match=needle):
        parse_profile(**options)


def test_leases_reserved_together_end_apart_within_the_stagger():
    profile = parse_profile(memory_mb=256, duration_s=1000, stagger=0.2, vm=VM)
    durations = [profile.duration_of(n) for n in range(1, 11)]
    assert all(800 <= d <= 1000 for d in durations)
    assert len(set(durations)) == 10  # no two of ten the same
    assert max(durations) - min(durations) >= 150  # spread over most of the 200 s allowed
    assert profile.vm_for("node3", "0123456789") == {**VM, "name": "worker-node3", "host": "node3"}
    logged = parse_profile(memory_mb=256, duration_s=1000, vm={**VM, "console_log": "worker.log"})
    # Two leases' VMs on one node never share a console log.
    assert logged.vm_for("node3", "0123456789")["console_log"] == "worker-node3-01234567.log"


def lease(state: str, nodes: int = 1, *, hosts=(), vms=(), created=1000.0, ready=None) -> dict:
    return {"id": f"l{created:g}", "state": state, "nodes": nodes, "created_at": format_epoch(created),
            "ready_at": format_epoch(ready) if ready else None, "expires_at": None,
            "pilots": [{"host": h, "state": "reserved"} for h in hosts], "vms": list(vms)}


def vm(host: str, busy: bool | None, since: float = 2000.0, state: str = "running") -> dict:
    usage = None if busy is None else {"busy": busy, "cpu": 50 if busy else 1, "at": format_epoch(since),
                                       "since": format_epoch(since)}
    return {"name": f"w-{host}", "host": host, "state": state, "usage": usage}


def test_the_pools_numbers_grow_it_while_work_waits_and_shrink_it_when_its_vms_idle():
    assert numbers([], 0).allocation == 0 and numbers([], 0).utilisation == 0  # nothing held, nothing waits
    empty = numbers([], 3)
    assert (empty.supply, empty.utilisation, empty.allocation) == (0, 1.0, 4.0)  # work waits: grow
    coming = [look_at(lease("pending", created=1)), look_at(lease("reserving", created=2))]
    growing = numbers(coming, 3)
    assert (growing.supply, growing.utilisation, growing.allocation) == (0, 1.0, 1.5)  # still more than coming
    held = [look_at(lease("running", hosts=["n1"], vms=[vm("n1", True)], ready=1500)),
            look_at(lease("running", hosts=["n2"], vms=[vm("n2", None)], ready=1500, created=2)),
            look_at(lease("ready", hosts=["n3"], ready=1500, created=3))]
    enough = numbers(held, 0)
    # n1 busy, n2 not yet said (in use), n3 has no VM yet (idle): allocation counts only the busy one.
    assert (enough.supply, enough.busy, enough.utilisation, enough.allocation) == (3, 1, 2 / 3, 1 / 3)
    idle = numbers([look_at(lease("running", hosts=["n1"], vms=[vm("n1", False)], ready=1500))], 0)
    assert (idle.utilisation, idle.allocation) == (0, 0)
    # A pool that starts a VM on each node: a node without one yet is in use, unless it is black-holed.
    assert numbers(held, 0, expect_vm=True).utilisation == 1.0
    assert numbers(held, 0, expect_vm=True, no_vm_for=frozenset({"n3"})).utilisation == 2 / 3


def test_it_gives_back_leases_not_yet_held_first_then_the_longest_idle_and_never_a_busy_one():
    leases = [look_at(x) for x in (
        lease("running", hosts=["n1"], vms=[vm("n1", False, since=3000)], ready=1500, created=1),
        lease("running", hosts=["n2"], vms=[vm("n2", True)], ready=1500, created=2),
        lease("running", hosts=["n3"], vms=[vm("n3", False, since=2500)], ready=1500, created=3),
        lease("pending", created=4), lease("pending", created=5),
        lease("ready", hosts=["n4"], ready=2700, created=6),  # no VM: idle since it was ready
        lease("running", hosts=["n5", "n6"], vms=[vm("n5", False), vm("n6", None)], ready=1500, created=7),
    )]
    order = [x.id for x in to_release(leases, 10)]
    assert order == ["l5", "l4", "l3", "l6", "l1"]  # the busy one and the one with an unsaid VM stay
    assert [x.id for x in to_release(leases, 3)] == ["l5", "l4", "l3"]
    # Where a VM is to start on each node, the lease with none yet is kept too.
    assert [x.id for x in to_release(leases, 10, expect_vm=True)] == ["l5", "l4", "l3", "l1"]


def test_waiting_work_comes_from_a_sites_command_or_a_slurm_partition_and_bad_sources_are_refused():
    source = waiting_from({"command": [sys.executable, "-c", "print(2.5)"]})
    assert source.nodes() == 2.5
    assert waiting_from({"command": [sys.executable, "-c", "print('lots')"]}).nodes() is None  # keeps the last
    assert waiting_from({"command": [sys.executable, "-c", "import sys; sys.exit(3)"]}).nodes() is None
    assert waiting_from(None) is None
    for bad, needle in (({"slurm_partition": "a", "command": ["x"]}, "one of them"),
                        ({"slurm_partition": "--all"}, "one partition's name"),
                        ({"command": "squeue"}, "list of words"), ({"queue": "x"}, "unknown option"),
                        ({"command": ["x"], "jobs_per_node": 0}, "above 0")):
        with pytest.raises(ValueError, match=needle):
            waiting_from(bad)
