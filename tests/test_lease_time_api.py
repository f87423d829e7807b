"""A lease's time and its VMs' pauses through the operators' API and ``workspace-lease``: a real HTTP server on
127.0.0.1, real requests and real CLI processes, SQLite on disk.

The service is tests/test_vm_api.py's (the real app, store and managers); its batch system is that file's
stand-in (named as such: no pilot runs here), which cannot change a job's time limit unless a test gives it
a policy. The pilots' side is their signed notifications over HTTP; what a pilot would receive is read back
from the store.
"""

from __future__ import annotations

import datetime
import json
import time

import pytest

from workspace_common.protocol import format_epoch, parse_time
from tests import test_vm_api
from tests.support.vmservice import BatchSystemStandIn, VmService, one_line_error, single_line, spec

# That file's fixtures: its service (svc) and its workspace-lease runner (cli).
svc = test_vm_api.svc
cli = test_vm_api.cli


class ExtendingStandIn(BatchSystemStandIn):
    """The stand-in with a time-limit policy: it raises a job's limit up to ``most_s`` seconds of lease."""

    def __init__(self, most_s: float):
        super().__init__()
        self.most_s = most_s
        self.limits: dict[str, float] = {}

    def extend(self, job_id, duration_s):
        from service_adapter.providers.base import ProviderError

        if duration_s > self.most_s:
            raise ProviderError(f"the stand-in allows at most {self.most_s:g} s")
        self.limits[job_id] = duration_s


def running_vm(svc, lease_id: str, slot: str, name: str = "a") -> int:
    """Start VM ``name`` and have node1's pilot report it running; returns its start command's id."""
    assert svc.start(lease_id, spec(name)).status_code == 202
    command = [c for c in svc.store.commands(slot) if c.op == "start-vm"][-1]
    svc.notify(slot, "node1", "vm-running", vms=[name], command=command.id, memory_mb=1024)
    return command.id


def last_command(svc, slot: str):
    return svc.store.commands(slot)[-1]


# -- suspend and resume -------------------------------------------------------------------------------------


def test_suspend_and_resume_queue_their_commands_and_the_pilots_reports_move_the_vm(svc):
    lease_id, slot = svc.ready_lease()
    running_vm(svc, lease_id, slot)
    svc.manager.tick()
    assert svc.api("GET", f"/leases/{lease_id}").json()["state"] == "running"

    queued = svc.api("POST", f"/leases/{lease_id}/vms/a/suspend")
    assert queued.status_code == 202, queued.text
    assert (queued.json()["state"], queued.json()["reason"]) == ("running", "suspend-vm queued for node1")
    suspend = last_command(svc, slot)
    assert (suspend.host, suspend.body) == ("node1", {"op": "suspend-vm", "name": "a"})
    svc.notify(slot, "node1", "vm-paused", vms=["a"], command=suspend.id, memory_mb=1024, message="suspended in 2 ms")
    vm = svc.api("GET", f"/leases/{lease_id}/vms/a").json()
    assert (vm["state"], vm["reason"]) == ("paused", "suspended in 2 ms")
    svc.manager.tick()
    assert svc.api("GET", f"/leases/{lease_id}").json()["state"] == "running"  # a paused VM still holds its host

    again = svc.api("POST", f"/leases/{lease_id}/vms/a/suspend")
    assert again.status_code == 409 and "is paused: only a running VM can be suspended" in one_line_error(again)
    count = len(svc.store.commands(slot))
    resumed = svc.api("POST", f"/leases/{lease_id}/vms/a/resume")
    assert resumed.status_code == 202 and len(svc.store.commands(slot)) == count + 1
    resume = last_command(svc, slot)
    assert resume.body == {"op": "resume-vm", "name": "a"}
    svc.notify(slot, "node1", "vm-running", vms=["a"], command=resume.id, memory_mb=1024, message="resumed")
    assert svc.api("GET", f"/leases/{lease_id}/vms/a").json()["state"] == "running"
    twice = svc.api("POST", f"/leases/{lease_id}/vms/a/resume")
    assert twice.status_code == 409 and "only a paused VM can be resumed" in one_line_error(twice)


def test_a_failed_suspend_leaves_the_vm_as_it_was_and_says_why(svc):
    lease_id, slot = svc.ready_lease()
    running_vm(svc, lease_id, slot)
    assert svc.api("POST", f"/leases/{lease_id}/vms/a/suspend").status_code == 202
    suspend = last_command(svc, slot)
    svc.notify(slot, "node1", "vm-failed", code=1, vms=["a"], command=suspend.id, memory_mb=1024,
               message="libvirt could not suspend it")
    vm = svc.api("GET", f"/leases/{lease_id}/vms/a").json()
    assert (vm["state"], vm["reason"]) == ("running", "suspend failed: libvirt could not suspend it")


def test_suspending_an_unknown_or_ended_vm_is_refused_and_queues_nothing(svc):
    lease_id, slot = svc.ready_lease()
    assert svc.api("POST", f"/leases/{lease_id}/vms/nosuch/suspend").status_code == 404
    assert svc.api("POST", "/leases/nosuch/vms/a/resume").status_code == 404
    running_vm(svc, lease_id, slot, "gone")
    stop = svc.api("POST", f"/leases/{lease_id}/vms/gone/stop")
    svc.notify(slot, "node1", "vm-stopped", vms=["gone"], command=last_command(svc, slot).id, memory_mb=1024)
    assert stop.status_code == 202
    count = len(svc.store.commands(slot))
    refused = svc.api("POST", f"/leases/{lease_id}/vms/gone/suspend")
    assert refused.status_code == 409 and "is stopped" in one_line_error(refused)
    assert len(svc.store.commands(slot)) == count


# -- extend -----------------------------------------------------------------------------------------------


def test_an_extension_the_batch_system_refuses_is_409_with_its_reason_and_changes_nothing(svc):
    lease_id, slot = svc.ready_lease()
    before = svc.api("GET", f"/leases/{lease_id}").json()
    refused = svc.api("POST", f"/leases/{lease_id}/extend", json={"by_s": 60})
    assert refused.status_code == 409
    assert "cannot be extended by 60 s: the stand-in provider cannot change a job's time limit" in \
        one_line_error(refused)
    after = svc.api("GET", f"/leases/{lease_id}").json()
    assert (after["duration_s"], after["expires_at"]) == (before["duration_s"], before["expires_at"])
    assert [c.op for c in svc.store.commands(slot)] == []
    assert "extended" not in [e["kind"] for e in svc.api("GET", f"/leases/{lease_id}/events").json()["events"]]


@pytest.mark.parametrize("body", [{}, {"by_s": 0}, {"by_s": -5}, {"by_s": "60"}, {"by_s": True}, {"by_s": 1e9},
                                  {"by_s": 60, "to": 5}, [60]])
def test_a_bad_extension_is_400_and_changes_nothing(svc, body):
    lease_id, slot = svc.ready_lease()
    response = svc.api("POST", f"/leases/{lease_id}/extend", json=body)
    assert response.status_code == 400, response.text
    one_line_error(response)
    assert svc.api("GET", f"/leases/{lease_id}").json()["duration_s"] == 600


def test_an_extension_the_batch_system_allows_lengthens_the_lease_and_tells_each_holding_host(tmp_path):
    svc = VmService(tmp_path)
    svc.manager.provider = ExtendingStandIn(most_s=900)
    try:
        lease_id, slot = svc.ready_lease(("node1", "node2"))
        before = svc.api("GET", f"/leases/{lease_id}").json()
        extended = svc.api("POST", f"/leases/{lease_id}/extend", json={"by_s": 120})
        assert extended.status_code == 200, extended.text
        assert extended.json()["duration_s"] == 720
        assert svc.manager.provider.limits == {before["job_id"]: 720}
        assert sorted((c.host, c.body["op"], c.body["duration_s"]) for c in svc.store.commands(slot)) == [
            ("node1", "extend", 720), ("node2", "extend", 720)]
        too_far = svc.api("POST", f"/leases/{lease_id}/extend", json={"by_s": 200})
        assert too_far.status_code == 409 and "the stand-in allows at most 900 s" in one_line_error(too_far)
        assert svc.api("GET", f"/leases/{lease_id}").json()["duration_s"] == 720
        assert len(svc.store.commands(slot)) == 2

        # The pilots answer with their deadlines now; one was held back (its batch system's end came first):
        # the lease ends with the earlier one, whatever the service's sum said.
        longer = parse_time(extended.json()["expires_at"]).timestamp()
        for command, end in zip(sorted(svc.store.commands(slot), key=lambda c: c.host), (longer, longer - 30)):
            svc.notify(slot, command.host, "extended", memory_mb=1024, command=command.id,
                       expires_at=format_epoch(end), message="deadline moved")
        lease = svc.api("GET", f"/leases/{lease_id}").json()
        assert lease["expires_at"] == format_epoch(longer - 30)
        assert [p["expires_at"] for p in lease["pilots"]] == [format_epoch(longer), format_epoch(longer - 30)]
    finally:
        svc.close()


# -- start later, and the events ----------------------------------------------------------------------------


def test_a_lease_with_a_start_is_scheduled_and_its_job_carries_the_begin_time(svc):
    start = int(time.time()) + 86400
    paris = datetime.timezone(datetime.timedelta(hours=1))
    text = datetime.datetime.fromtimestamp(start, paris).isoformat()  # ...T...+01:00
    made = svc.api("POST", "/leases", json={"nodes": 1, "memory_mb": 64, "duration_s": 60, "start_at": text})
    assert made.status_code == 201, made.text
    body = made.json()
    assert body["state"] == "scheduled" and body["start_at"] == format_epoch(start)
    assert body["expires_at"] == format_epoch(start + 60)
    (job,) = svc.provider.submitted
    assert job.begin_at == start
    svc.manager.tick()
    assert svc.api("GET", f"/leases/{body['id']}").json()["state"] == "scheduled"


@pytest.mark.parametrize("start_at", ["2099-01-01T12:00:00", "tomorrow", 4070948400, "2001-01-01T00:00:00Z", "",
                                      "2099-01-01T12:00:00Z"])
def test_a_bad_or_past_start_is_400_and_nothing_is_recorded(svc, start_at):
    response = svc.api("POST", "/leases", json={"nodes": 1, "memory_mb": 64, "duration_s": 60,
                                                "start_at": start_at})
    assert response.status_code == 400, response.text
    one_line_error(response)
    assert svc.store.list_leases() == [] and svc.provider.submitted == []


def test_the_events_come_in_order_with_numbers_a_poller_can_resume_from(svc):
    lease_id, slot = svc.ready_lease()
    events = svc.api("GET", f"/leases/{lease_id}/events").json()["events"]
    assert [(e["kind"], e["old_state"], e["new_state"]) for e in events] == [
        ("created", None, "pending"), ("state", "pending", "ready")]
    assert events[0]["seq"] < events[1]["seq"] and events[1]["at"].endswith("Z")
    later = svc.api("GET", f"/leases/{lease_id}/events", params={"after": events[0]["seq"]}).json()["events"]
    assert later == events[1:]
    assert svc.api("GET", f"/leases/{lease_id}/events", params={"after": events[1]["seq"]}).json() == {"events": []}
    for params in ({"after": "-1"}, {"after": "x"}, {"since": "1"}):
        bad = svc.api("GET", f"/leases/{lease_id}/events", params=params)
        assert bad.status_code == 400, params
        one_line_error(bad)
    assert svc.api("GET", "/leases/nosuch/events").status_code == 404


# -- the command line ----------------------------------------------------------------------------------------


def test_cli_reserve_later_extend_events_suspend(svc, cli):
    before = time.time()
    scheduled = cli("reserve", "--nodes", "1", "--memory", "64", "--duration", "60", "--start-at", "+3600", "--json")
    after = time.time()
    assert scheduled.returncode == 0, scheduled.stderr
    lease = json.loads(scheduled.stdout)
    assert lease["state"] == "scheduled"
    # "+3600" is counted from the command's own clock reading, which lies between these two.
    assert before + 3600 <= svc.provider.submitted[0].begin_at <= after + 3600

    refused = cli("extend", lease["id"], "--by", "60")
    assert refused.returncode == 8
    assert "cannot be extended by 60 s" in single_line(refused.stderr)

    released = cli("release", lease["id"])
    assert released.returncode == 0, released.stderr
    # The stand-in reports the job cancelled: the release ends (no manager thread runs here: wait() ticks).
    assert svc.manager.wait(lease["id"], "released", timeout=10).state == "released"
    listed = cli("events", lease["id"])
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.strip().splitlines()
    assert [line.split()[3] for line in lines][:2] == ["created", "state"]
    assert "- -> scheduled" in lines[0] and "scheduled -> releasing" in lines[1]
    followed = cli("events", lease["id"], "--follow", "--after", lines[0].split()[0], "--json")
    assert followed.returncode == 0, followed.stderr  # released: it has ended, well
    assert [json.loads(line)["new_state"] for line in followed.stdout.strip().splitlines()] == [
        "releasing", "released"]

    lease_id, slot = svc.ready_lease()
    running_vm(svc, lease_id, slot)
    paused = cli("vm", "suspend", lease_id, "a", "--json")
    assert paused.returncode == 0, paused.stderr
    assert last_command(svc, slot).body == {"op": "suspend-vm", "name": "a"}
    not_paused = cli("vm", "resume", lease_id, "a")
    assert not_paused.returncode == 8 and "only a paused VM can be resumed" in single_line(not_paused.stderr)


@pytest.mark.parametrize("args, words", [
    (("reserve", "--nodes", "1", "--memory", "64", "--duration", "60", "--start-at", "yesterday"), "is not +SECONDS"),
    (("reserve", "--nodes", "1", "--memory", "64", "--duration", "60", "--start-at", "2001-01-01T00:00Z"),
     "is not in the future"),
    (("extend", "L", "--by", "0"), "must be above 0"),
    (("events", "L", "--after", "-1"), "must be 0 or more"),
])
def test_cli_bad_time_arguments_are_exit_2_in_one_line_and_nothing_is_sent(svc, cli, args, words):
    result = cli(*args)
    assert result.returncode == 2 and words in result.stderr.strip().splitlines()[-1]
    assert svc.store.list_leases() == []


def test_a_nodes_unasked_extended_reports_leave_the_lease_history_alone(svc):
    lease_id, slot = svc.ready_lease()
    running_vm(svc, lease_id, slot)
    before = svc.api("GET", f"/leases/{lease_id}/events").json()["events"]
    start = [c for c in svc.store.commands(slot) if c.op == "start-vm"][0]
    for _ in range(3):
        svc.notify(slot, "node1", "extended", memory_mb=1024, message="I hold for ever")
    svc.notify(slot, "node1", "extended", memory_mb=1024, command=start.id, message="not an extend")
    assert svc.api("GET", f"/leases/{lease_id}/events").json()["events"] == before


def test_cli_vm_suspend_wait_returns_once_the_pilot_reports_and_a_failure_is_exit_1(svc, cli):
    lease_id, slot = svc.ready_lease()
    running_vm(svc, lease_id, slot)
    waiting = cli("vm", "suspend", lease_id, "a", "--wait", "30", "--json", background=True)
    assert svc.store.wait_for(lambda: last_command(svc, slot).op == "suspend-vm", 20)
    svc.notify(slot, "node1", "vm-paused", vms=["a"], command=last_command(svc, slot).id, memory_mb=1024)
    out, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 0, err
    assert json.loads(out)["state"] == "paused"

    failing = cli("vm", "resume", lease_id, "a", "--wait", "30", background=True)
    assert svc.store.wait_for(lambda: last_command(svc, slot).op == "resume-vm", 20)
    svc.notify(slot, "node1", "vm-failed", code=1, vms=["a"], command=last_command(svc, slot).id, memory_mb=1024,
               message="libvirt could not resume it")
    out, err = failing.communicate(timeout=30)
    assert failing.returncode == 1
    assert "is paused: resume failed: libvirt could not resume it" in single_line(err)


def test_a_lease_kept_off_nodes_hands_them_to_its_job_and_names_them_in_its_history(svc, cli):
    svc.provider.excludes_nodes = True  # the stand-in as a batch system that can (Slurm, Grid Engine)
    made = svc.api("POST", "/leases", json={"nodes": 1, "memory_mb": 64, "duration_s": 60,
                                            "exclude_nodes": ["node2", "node1", "node2"]})
    assert made.status_code == 201, made.text
    by_cli = cli("reserve", "--nodes", "1", "--memory", "64", "--duration", "60", "--exclude-node", "node3",
                 "--json")
    assert by_cli.returncode == 0, by_cli.stderr
    assert [job.exclude_nodes for job in svc.provider.submitted] == [("node2", "node1"), ("node3",)]
    events = svc.api("GET", f"/leases/{made.json()['id']}/events").json()["events"]
    assert events[0]["reason"].endswith("for 60 s, not on node2, node1, owner alice")


@pytest.mark.parametrize("exclude, can, words", [
    ("node1", True, "exclude_nodes must be a list of at most 64 node names"),
    ([f"n{i}" for i in range(65)], True, "exclude_nodes must be a list of at most 64 node names"),
    (["node1,node2"], True, "exclude_nodes: 'node1,node2' is not a node name"),
    (["!node1"], True, "exclude_nodes: '!node1' is not a node name"),
    ([7], True, "exclude_nodes: '7' is not a node name"),
    (["node1"], False, "the stand-in provider cannot keep a job off named nodes"),
])
@pytest.mark.parametrize("dry_run", [False, True])
def test_a_bad_exclusion_or_one_the_batch_system_cannot_make_is_400_and_nothing_is_recorded(svc, exclude, can, words,
                                                                                            dry_run):
    svc.provider.excludes_nodes = can
    body = {"nodes": 1, "memory_mb": 64, "duration_s": 60, "exclude_nodes": exclude}
    response = svc.api("POST", "/leases", json={**body, "dry_run": True} if dry_run else body)
    assert response.status_code == 400, response.text
    assert words in one_line_error(response)
    assert svc.store.list_leases() == [] and svc.provider.submitted == []
