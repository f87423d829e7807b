"""The operators' VM API and ``workspace-lease vm``: a real HTTP server on 127.0.0.1, real requests, SQLite on disk.

The service here is the real aiohttp app (pilots' receiver and operators'
API), the real store, lease manager and VM manager. Leases become ready
the way they do in production: the pilots' signed, digest-authenticated
``reserved`` notifications over HTTP, then a manager tick. One stand-in is
used, named as such: the batch system (its jobs "run" as soon as they are
submitted), since no pilot process runs here. The VM commands are read
back from the store (what a pilot's long-poll would receive).
"""

from __future__ import annotations

import json
import subprocess

import pytest
import requests
from requests.auth import HTTPDigestAuth

from service_adapter.api import MAX_API_BODY, MAX_VM_BODY
from tests.support.ports import free_port
from tests.support.vmservice import CLI, OPERATOR, OPERATOR_REALM, OPERATOR_SECRET, OVERHEAD_MB, SHA, cli, one_line_error, single_line, spec, svc


# -- start ------------------------------------------------------------------------------------------


def test_start_on_a_ready_lease_queues_one_start_vm_for_its_host(svc):
    lease_id, slot = svc.ready_lease(("node1",))
    wanted = spec("web", 512, vcpus=2, network="default")
    response = svc.start(lease_id, wanted)
    assert response.status_code == 202, response.text
    assert response.headers["Location"] == f"/api/v1/leases/{lease_id}/vms"
    (vm,) = response.json()["vms"]
    assert (vm["name"], vm["host"], vm["state"], vm["memory_mb"], vm["vcpus"]) == ("web", "node1", "starting", 512, 2)
    assert vm["spec"] == wanted and vm["created_at"].endswith("Z") and vm["started_at"] is None
    assert svc.commands(slot) == [("node1", "start-vm", {"op": "start-vm", "vm": wanted})]
    # The pilot's long-poll sees exactly that command.
    assert [body for _, body in svc.store.commands_after(slot, "node1", 0)] == [{"op": "start-vm", "vm": wanted}]
    assert svc.store.commands_after(slot, "node2", 0) == []

    listed = svc.api("GET", f"/leases/{lease_id}/vms")
    assert listed.status_code == 200 and listed.json() == {"vms": [vm]}
    shown = svc.api("GET", f"/leases/{lease_id}/vms/web")
    assert shown.status_code == 200 and shown.json() == vm
    assert svc.api("GET", f"/leases/{lease_id}").json()["vms"] == [vm]


def test_placement_spreads_two_vms_over_two_hosts_and_a_pinned_vm_goes_where_asked(svc):
    lease_id, slot = svc.ready_lease(("node1", "node2"))
    response = svc.start(lease_id, spec("a", 256), spec("b", 256))
    assert response.status_code == 202, response.text
    hosts = {vm["name"]: vm["host"] for vm in response.json()["vms"]}
    assert sorted(hosts.values()) == ["node1", "node2"]
    assert sorted((host, body["vm"]["name"]) for host, _, body in svc.commands(slot)) == sorted(
        (host, name) for name, host in hosts.items()
    )
    pinned = svc.start(lease_id, spec("c", 128, host="node2"))
    assert pinned.status_code == 202, pinned.text
    assert pinned.json()["vms"][0]["host"] == "node2"
    assert svc.commands(slot)[-1][0] == "node2"
    assert "host" not in svc.commands(slot)[-1][2]["vm"]  # the pin is the service's business, not the pilot's
    elsewhere = svc.start(lease_id, spec("d", 128, host="node9"))
    assert elsewhere.status_code == 409 and "node9" in one_line_error(elsewhere)


def test_the_overhead_counts_a_vm_that_does_not_fit_is_409_and_nothing_is_queued(svc):
    lease_id, slot = svc.ready_lease(("node1",), memory_mb=1024)
    too_big = svc.start(lease_id, spec("big", 1024 - OVERHEAD_MB + 1))
    assert too_big.status_code == 409
    assert "1025 MB with overhead" in one_line_error(too_big)
    both = svc.start(lease_id, spec("one", 400), spec("two", 600))  # each fits alone; together they do not
    assert both.status_code == 409
    assert svc.commands(slot) == [] and svc.api("GET", f"/leases/{lease_id}/vms").json() == {"vms": []}
    exact = svc.start(lease_id, spec("exact", 1024 - OVERHEAD_MB))
    assert exact.status_code == 202, exact.text
    assert [op for _, op, _ in svc.commands(slot)] == ["start-vm"]
    full = svc.start(lease_id, spec("more", 1))
    assert full.status_code == 409


BAD_SPECS = [
    ("missing memory_mb", {"name": "vm1", "disk": {"path": "/i/g.qcow2", "sha256": SHA}}, "vm.memory_mb"),
    ("memory_mb not a number", spec(memory_mb="1G"), "vm.memory_mb"),
    ("bad sha256", spec(disk={"path": "/i/g.qcow2", "sha256": "ABC"}), "vm.disk.sha256"),
    ("sha256 with a newline", spec(disk={"path": "/i/g.qcow2", "sha256": SHA + "\n"}), "vm.disk.sha256"),
    ("unknown field", spec(colour="blue"), "colour"),
    ("bad name", spec(name="vm 1"), "vm.name"),
    ("name with a newline", spec(name="vm1\n"), "vm.name"),
    ("no disk and no kernel", {"name": "vm1", "memory_mb": 256}, "needs a disk image or a boot kernel"),
    ("host not a string", spec(host=7), "'host'"),
    ("zero vcpus", spec(vcpus=0), "vm.vcpus"),
]


@pytest.mark.parametrize("item,expected", [(i, e) for _, i, e in BAD_SPECS], ids=[c[0] for c in BAD_SPECS])
def test_a_bad_spec_is_400_naming_the_field_and_nothing_is_queued(svc, item, expected):
    lease_id, slot = svc.ready_lease()
    response = svc.start(lease_id, spec("fine"), item)
    assert response.status_code == 400
    error = one_line_error(response)
    assert error.startswith("vms[1]") and expected in error, error
    assert svc.commands(slot) == [] and svc.api("GET", f"/leases/{lease_id}/vms").json() == {"vms": []}


@pytest.mark.parametrize("body,expected", [
    (b"not json", "not JSON"),
    (b"[]", "JSON object"),
    (b"{}", "'vms' must be a non-empty list"),
    (b'{"vms": []}', "'vms' must be a non-empty list"),
    (b'{"vms": {"name": "vm1"}}', "'vms' must be a non-empty list"),
    (b'{"vms": ["vm1"]}', "each VM must be a JSON object"),
    (b'{"vms": [], "name": "vm1"}', "unknown field(s) name"),
])
def test_a_bad_start_body_is_400_and_nothing_is_queued(svc, body, expected):
    lease_id, slot = svc.ready_lease()
    response = svc.api("POST", f"/leases/{lease_id}/vms", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert expected in one_line_error(response)
    assert svc.commands(slot) == []


def test_the_same_name_twice_in_one_request_is_400(svc):
    lease_id, slot = svc.ready_lease(("node1", "node2"))
    response = svc.start(lease_id, spec("twin"), spec("twin"))
    assert response.status_code == 400 and "twin" in one_line_error(response)
    assert svc.commands(slot) == []


def test_unknown_leases_and_vms_are_404(svc):
    lease_id, _ = svc.ready_lease()
    for method, path, kwargs in (
        ("POST", "/leases/no-such-lease/vms", {"json": {"vms": [spec()]}}),
        ("GET", "/leases/no-such-lease/vms", {}),
        ("GET", "/leases/no-such-lease/vms/vm1", {}),
        ("POST", "/leases/no-such-lease/vms/vm1/stop", {}),
        ("GET", f"/leases/{lease_id}/vms/vm1", {}),
        ("POST", f"/leases/{lease_id}/vms/vm1/stop", {}),
        ("GET", f"/leases/{lease_id}/vms/bad%20name", {}),
    ):
        response = svc.api(method, path, **kwargs)
        assert response.status_code == 404, (method, path, response.text)
        one_line_error(response)
    assert svc.api("DELETE", f"/leases/{lease_id}/vms").status_code == 405


def test_an_active_name_is_409_until_the_pilot_reports_it_stopped(svc):
    lease_id, slot = svc.ready_lease()
    assert svc.start(lease_id, spec("vm1")).status_code == 202
    again = svc.start(lease_id, spec("vm1"), spec("vm2"))
    assert again.status_code == 409
    assert "already has an active VM named vm1" in one_line_error(again)
    assert len(svc.commands(slot)) == 1  # vm2 was not queued either: all or nothing

    (start,) = svc.store.commands(slot)
    svc.notify(slot, "node1", "vm-running", vms=["vm1"], command=start.id, memory_mb=1024)
    svc.manager.tick()
    assert svc.api("GET", f"/leases/{lease_id}/vms/vm1").json()["state"] == "running"
    assert svc.api("GET", f"/leases/{lease_id}").json()["state"] == "running"
    assert svc.start(lease_id, spec("vm1")).status_code == 409

    assert svc.api("POST", f"/leases/{lease_id}/vms/vm1/stop").status_code == 202
    stop = svc.store.commands(slot)[-1]
    svc.notify(slot, "node1", "vm-stopped", vms=["vm1"], command=stop.id, memory_mb=1024)
    assert svc.api("GET", f"/leases/{lease_id}/vms/vm1").json()["state"] == "stopped"
    restarted = svc.start(lease_id, spec("vm1"))  # an ended VM's name may be used again
    assert restarted.status_code == 202, restarted.text
    assert restarted.json()["vms"][0]["state"] == "starting"


def test_a_lease_that_is_not_ready_is_409_and_nothing_is_queued(svc):
    made = svc.api("POST", "/leases", json={"nodes": 2, "memory_mb": 1024, "duration_s": 600}).json()
    svc.notify(made["slot"], "node1", "reserved", memory_mb=1024)  # one of two: reserving
    svc.manager.tick()
    assert svc.api("GET", f"/leases/{made['id']}").json()["state"] == "reserving"
    response = svc.start(made["id"], spec())
    assert response.status_code == 409
    assert "is reserving: VMs start only on a ready or running lease" in one_line_error(response)
    assert svc.commands(made["slot"]) == []

    lease_id, slot = svc.ready_lease()
    assert svc.api("POST", f"/leases/{lease_id}/release").status_code == 202
    released = svc.start(lease_id, spec())
    assert released.status_code == 409 and "is releasing" in one_line_error(released)
    assert [op for _, op, _ in svc.commands(slot)] == ["release"]  # the release's own command, nothing else


# -- stop and list ----------------------------------------------------------------------------------


def test_stop_queues_a_stop_vm_for_the_vms_host(svc):
    lease_id, slot = svc.ready_lease(("node1", "node2"))
    started = {vm["name"]: vm for vm in svc.start(lease_id, spec("a"), spec("b")).json()["vms"]}

    gentle = svc.api("POST", f"/leases/{lease_id}/vms/a/stop")
    assert gentle.status_code == 202, gentle.text
    assert (gentle.json()["name"], gentle.json()["state"]) == ("a", "stopping")
    assert svc.commands(slot)[-1] == (started["a"]["host"], "stop-vm", {"op": "stop-vm", "name": "a", "force": False})

    forced = svc.api("POST", f"/leases/{lease_id}/vms/b/stop", json={"force": True})
    assert forced.status_code == 202 and forced.json()["state"] == "stopping"
    assert svc.commands(slot)[-1] == (started["b"]["host"], "stop-vm", {"op": "stop-vm", "name": "b", "force": True})

    listed = svc.api("GET", f"/leases/{lease_id}/vms").json()["vms"]
    assert [(vm["name"], vm["state"]) for vm in listed] == [("a", "stopping"), ("b", "stopping")]

    count = len(svc.commands(slot))
    for body in ({"force": "yes"}, {"force": True, "now": True}, [True]):
        refused = svc.api("POST", f"/leases/{lease_id}/vms/a/stop", json=body)
        assert refused.status_code == 400, body
        one_line_error(refused)
    assert len(svc.commands(slot)) == count


def test_stopping_a_vm_that_has_ended_is_409(svc):
    lease_id, slot = svc.ready_lease()
    svc.start(lease_id, spec("doomed"))
    (start,) = svc.store.commands(slot)
    svc.notify(slot, "node1", "vm-failed", code=3, vms=["doomed"], command=start.id, memory_mb=1024,
               message="image sha256 mismatch")
    vm = svc.api("GET", f"/leases/{lease_id}/vms/doomed").json()
    assert (vm["state"], vm["reason"]) == ("failed", "image sha256 mismatch")
    response = svc.api("POST", f"/leases/{lease_id}/vms/doomed/stop")
    assert response.status_code == 409 and "is failed already" in one_line_error(response)
    assert len(svc.commands(slot)) == 1


# -- credentials and sizes ----------------------------------------------------------------------------


def test_wrong_or_missing_credentials_are_401_on_every_vm_route(svc):
    lease_id, slot = svc.ready_lease()
    routes = (
        ("POST", f"/leases/{lease_id}/vms", {"json": {"vms": [spec()]}}),
        ("GET", f"/leases/{lease_id}/vms", {}),
        ("GET", f"/leases/{lease_id}/vms/vm1", {}),
        ("POST", f"/leases/{lease_id}/vms/vm1/stop", {}),
    )
    for method, path, kwargs in routes:
        for user, secret in ((OPERATOR, "wrong"), ("mallory", OPERATOR_SECRET), ("node1", svc.nodes.node_key("node1"))):
            response = svc.api(method, path, user=user, secret=secret, **kwargs)
            assert response.status_code == 401, (method, path, user)
            assert f'realm="{OPERATOR_REALM}"' in response.headers["WWW-Authenticate"]
        bare = requests.request(method, f"{svc.url}/api/v1{path}", timeout=10, **kwargs)
        assert bare.status_code == 401
    assert svc.commands(slot) == []


def test_a_start_may_carry_more_than_the_pilots_64_kib_the_others_stay_at_4_kib(svc):
    lease_id, slot = svc.ready_lease(("node1", "node2"), memory_mb=100_000)
    long_path = "/var/lib/workspace-pilot/images/" + "d" * 300 + "/guest.qcow2"
    many = [spec(f"vm{i:03d}", 16, disk={"path": long_path, "sha256": SHA}) for i in range(200)]
    body = json.dumps({"vms": many}).encode()
    assert 64 * 1024 < len(body) < MAX_VM_BODY
    response = svc.api("POST", f"/leases/{lease_id}/vms", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 202, response.text
    assert len(response.json()["vms"]) == 200 and len(svc.commands(slot)) == 200
    assert {vm["host"] for vm in response.json()["vms"]} == {"node1", "node2"}

    other = svc.ready_lease(memory_mb=100_000)[0]
    over = b'{"vms": [' + b" " * MAX_VM_BODY + b"]}"
    too_big = svc.api("POST", f"/leases/{other}/vms", data=over, headers={"Content-Type": "application/json"})
    assert too_big.status_code == 413 and str(MAX_VM_BODY) in one_line_error(too_big)

    def chunked():  # no Content-Length: the cap holds while reading
        yield b'{"vms": ['
        for _ in range(MAX_VM_BODY // 4096 + 1):
            yield b" " * 4096
        yield b"]}"

    with requests.Session() as session:
        # A generator cannot be sent twice: authenticate first, so the digest goes with the chunked POST itself.
        session.auth = HTTPDigestAuth(OPERATOR, OPERATOR_SECRET)
        assert session.get(f"{svc.url}/api/v1/leases/{other}/vms", timeout=20).status_code == 200
        streamed = session.post(f"{svc.url}/api/v1/leases/{other}/vms", data=chunked(), timeout=20,
                                headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413, streamed.text
    stop_body = svc.api("POST", f"/leases/{lease_id}/vms/vm000/stop", data=b" " * (MAX_API_BODY + 1),
                        headers={"Content-Type": "application/json"})
    assert stop_body.status_code == 413
    lease_body = svc.api("POST", "/leases", data=b" " * (MAX_API_BODY + 1),
                         headers={"Content-Type": "application/json"})
    assert lease_body.status_code == 413
    assert len(svc.commands(slot)) == 200


# -- workspace-lease vm: the CLI as a real process against the served API ----------------------------------


def test_cli_vm_start_list_stop(svc, cli, tmp_path):
    lease_id, slot = svc.ready_lease(("node1", "node2"))
    started = cli("vm", "start", lease_id, "--name", "web", "--memory", "256", "--vcpus", "2",
                  "--image", "/var/lib/workspace-pilot/images/guest.qcow2", "--image-sha256", SHA.upper(),
                  "--readonly", "--network", "default", "--console-log", "web.log", "--host", "node2")
    assert started.returncode == 0, started.stderr
    header, row = started.stdout.strip().splitlines()
    assert header.split() == ["VM", "HOST", "STATE", "MB", "USE", "REASON"]
    assert row.split()[:5] == ["web", "node2", "starting", "256", "-"]  # its pilot has not said how busy it is
    (command,) = svc.commands(slot)
    assert command == ("node2", "start-vm", {"op": "start-vm", "vm": {
        "name": "web", "memory_mb": 256, "vcpus": 2, "network": "default", "console_log": "web.log",
        "disk": {"path": "/var/lib/workspace-pilot/images/guest.qcow2", "sha256": SHA, "readonly": True}}})

    spec_file = tmp_path / "vms.json"
    spec_file.write_text(json.dumps({"vms": [
        {"name": "k1", "memory_mb": 128, "boot": {"kernel": {"path": "/img/vmlinuz", "sha256": SHA},
                                                   "cmdline": "console=ttyS0"}},
        spec("d1", 128, host="node1"),
    ]}))
    from_file = cli("vm", "start", lease_id, "--spec", str(spec_file), "--json")
    assert from_file.returncode == 0, from_file.stderr
    assert [vm["name"] for vm in json.loads(from_file.stdout)["vms"]] == ["k1", "d1"]
    one = cli("vm", "start", lease_id, "--spec", "-", "--json", stdin=json.dumps(spec("s1", 64)))
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["vms"][0]["name"] == "s1"

    listed = cli("vm", "list", lease_id, "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == svc.api("GET", f"/leases/{lease_id}/vms").json()
    table = cli("vm", "list", lease_id)
    names = [line.split()[0] for line in table.stdout.strip().splitlines()]
    assert names == ["VM", "web", "d1", "k1", "s1"]  # oldest first; one request's VMs by name

    stopped = cli("vm", "stop", lease_id, "web", "--force", "--json")
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout)["state"] == "stopping"
    assert svc.commands(slot)[-1] == ("node2", "stop-vm", {"op": "stop-vm", "name": "web", "force": True})


def test_cli_vm_start_wait_returns_once_the_pilot_reports(svc, cli):
    lease_id, slot = svc.ready_lease()
    waiting = cli("vm", "start", lease_id, "--name", "w", "--memory", "64", "--kernel", "/img/vmlinuz",
                  "--kernel-sha256", SHA, "--wait", "120", "--json", background=True)
    try:
        assert svc.store.wait_for(lambda: len(svc.store.commands(slot)) == 1, timeout=30)
        (start,) = svc.store.commands(slot)
        svc.notify(slot, "node1", "vm-running", vms=["w"], command=start.id, memory_mb=1024)
        out, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert waiting.returncode == 0, err
    assert json.loads(out)["vms"][0]["state"] == "running"


def test_cli_vm_wait_that_runs_out_is_exit_7_and_a_failed_vm_is_exit_1(svc, cli):
    lease_id, slot = svc.ready_lease()
    timed_out = cli("vm", "start", lease_id, "--name", "slow", "--memory", "64", "--kernel", "/img/vmlinuz",
                    "--kernel-sha256", SHA, "--wait", "0.3")
    assert timed_out.returncode == 7
    assert "still starting" in single_line(timed_out.stderr)
    (start,) = svc.store.commands(slot)
    svc.notify(slot, "node1", "vm-failed", code=2, vms=["slow"], command=start.id, memory_mb=1024,
               message="no such image")
    shown = cli("vm", "stop", lease_id, "slow")
    assert shown.returncode == 8  # it has ended already: 409
    assert "409" in single_line(shown.stderr)


def test_cli_vm_refusals_by_the_service_keep_their_exit_codes(svc, cli):
    lease_id, slot = svc.ready_lease(memory_mb=512)
    too_big = cli("vm", "start", lease_id, "--name", "big", "--memory", "1024",
                  "--kernel", "/k", "--kernel-sha256", SHA)
    assert too_big.returncode == 8
    assert "with overhead" in single_line(too_big.stderr)
    unknown = cli("vm", "list", "no-such-lease")
    assert unknown.returncode == 6 and "404" in single_line(unknown.stderr)
    assert cli("vm", "stop", lease_id, "nothing").returncode == 6
    assert svc.commands(slot) == []


@pytest.mark.parametrize("args,expected", [
    (("--name", "v", "--memory", "64", "--image", "/i.qcow2"), "--image needs --image-sha256"),
    (("--name", "v", "--memory", "64", "--image", "/i.qcow2", "--image-sha256", "abc"), "is not a sha256"),
    (("--name", "v", "--memory", "64"), "needs --image (with --image-sha256), --image-name or --kernel"),
    (("--memory", "64", "--kernel", "/k", "--kernel-sha256", SHA), "--name missing"),
    (("--name", "v", "--memory", "64", "--image", "/i", "--image-sha256", SHA, "--cmdline", "x"),
     "--cmdline needs --kernel"),
    (("--name", "v w", "--memory", "64"), "is not a VM name"),
    (("--name", "v", "--memory", "0"), "must be above 0"),
    (("--name", "v", "--memory", "64", "--kernel", "/k", "--kernel-sha256", SHA, "--network", "bad net"),
     "--network: 'bad net' has characters that are not allowed"),
    (("--spec", "vms.json", "--name", "v"), "--spec and --name exclude each other"),
    (("--spec", "missing.json",), "cannot read"),
])
def test_cli_vm_bad_arguments_are_exit_2_one_line_and_nothing_is_sent(svc, cli, tmp_path, args, expected):
    lease_id, slot = svc.ready_lease()
    (tmp_path / "vms.json").write_text(json.dumps({"vms": [spec()]}))
    args = tuple(str(tmp_path / a) if a.endswith(".json") else a for a in args)
    result = cli("vm", "start", lease_id, *args)
    assert result.returncode == 2, result.stderr
    line = single_line(result.stderr)
    assert line.startswith("workspace-lease vm start: error: ") and line.endswith("(see --help)")
    assert expected in line
    assert svc.commands(slot) == []


@pytest.mark.parametrize("content,expected", [
    ("{not json", "not JSON"),
    (json.dumps([spec()]), 'must hold {"vms": [spec, ...]} or one spec object'),
    (json.dumps({"vms": [spec("a"), spec("b", memory_mb=-1)]}), "vms[1] (b): vm.memory_mb"),
    (json.dumps({"vms": [spec("a"), spec("a")]}), "VM name a is given twice"),
    (json.dumps({"vms": [spec(host="no host!")]}), "is not a host name"),
])
def test_cli_vm_bad_spec_files_are_exit_2_and_nothing_is_sent(svc, cli, tmp_path, content, expected):
    lease_id, slot = svc.ready_lease()
    path = tmp_path / "vms.json"
    path.write_text(content)
    result = cli("vm", "start", lease_id, "--spec", str(path))
    assert result.returncode == 2, result.stderr
    assert expected in single_line(result.stderr)
    assert svc.commands(slot) == []


def test_cli_vm_bad_arguments_are_found_before_any_connection(tmp_path):
    """Nothing listens at the URL: had the command tried to send, it would exit 4, not 2."""
    url = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run(
        [*CLI, "vm", "start", "lease-1", "--url", url, "--user", OPERATOR, "--secret-file", "/nonexistent",
         "--name", "v", "--memory", "64", "--image", "/i", "--image-sha256", "nothex"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "--image-sha256" in single_line(result.stderr)


def test_cli_vm_list_shows_a_pilots_reason_escaped(svc, cli):
    """A (compromised) pilot's failure message cannot repaint the operator's terminal or forge a table row."""
    lease_id, slot = svc.ready_lease()
    assert svc.start(lease_id, spec("v1", 64)).status_code == 202
    (start,) = svc.store.commands(slot)
    hostile = "\x1b[2J\x1b[32mall fine\nv2  node1  running  64  -\u202e"
    svc.notify(slot, "node1", "vm-failed", code=2, vms=["v1"], command=start.id, memory_mb=1024, message=hostile)
    table = cli("vm", "list", lease_id)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.strip().splitlines()
    assert len(lines) == 2  # the header and v1: no forged row
    assert "\x1b" not in table.stdout and "\u202e" not in table.stdout
    assert "\\x1b[2J\\x1b[32mall fine\\nv2  node1  running  64  -\\u202e" in lines[1]
    shown = cli("vm", "list", lease_id, "--json")  # JSON keeps the text as sent (escaped by JSON itself)
    assert hostile in json.loads(shown.stdout)["vms"][0]["reason"]
