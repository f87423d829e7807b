"""What pilots' reports do to the store's VMs and commands: signed notifications over real HTTP, SQLite on disk.

The service is the real receiver on 127.0.0.1 with its store and command
board (tests/test_command_channel.py ``Channel``); commands are queued the
service's way (``Store.start_vms``, ``stop_vm``, ``request_release``) and
every report is a digest-authenticated, signed notification, as a pilot
sends it. What the store then holds is read back through its own reads.
"""

from __future__ import annotations

import sqlite3
import time
import uuid

import pytest

from service_adapter.store import SCHEMA_VERSION, Store, StoreError
from tests.support.channels import WOKEN_WITHIN_S, Channel, PollThread

ACTIVE = {"starting", "running", "stopping"}


@pytest.fixture
def channel(tmp_path, store_location):
    """The service's VM side on each store backend (SQLite, PostgreSQL)."""
    service = Channel(tmp_path, store_location)
    yield service
    service.close()


def vms(channel: Channel, lease_id: str) -> dict[str, tuple[str, str, str]]:
    """name -> (host, state, reason) of the lease's VMs."""
    return {v.name: (v.host, v.state, v.reason) for v in channel.store.vms(lease_id)}


def vm(channel: Channel, lease_id: str, name: str):
    (row,) = [v for v in channel.store.vms(lease_id) if v.name == name]
    return row


def command(channel: Channel, slot: str, cid: int):
    (row,) = [c for c in channel.store.commands(slot) if c.id == cid]
    return row


def running(channel: Channel, lease_id: str, slot: str, name: str, host: str = "node1") -> int:
    """Queue vm ``name`` on ``host`` and report it running; returns its start-vm id."""
    cid = channel.start(lease_id, name, host)
    channel.notify(slot, host, "vm-running", command=cid, vms=[name], message="started in 7 ms")
    assert vm(channel, lease_id, name).state == "running"
    return cid


# -- reports on commands ------------------------------------------------------------------------


def test_vm_running_moves_a_starting_vm_to_running_and_records_the_outcome(channel):
    lease_id, slot = channel.lease()
    cid = channel.start(lease_id, "vm1")
    queued = vm(channel, lease_id, "vm1")
    assert (queued.state, queued.started_at, command(channel, slot, cid).outcome) == ("starting", None, None)
    channel.notify(slot, "node1", "vm-running", command=cid, vms=["vm1"], message="started in 12 ms")
    row = vm(channel, lease_id, "vm1")
    assert (row.host, row.state, row.reason) == ("node1", "running", "started in 12 ms")
    assert row.started_at is not None and row.stopped_at is None
    done = command(channel, slot, cid)
    assert (done.op, done.vm, done.outcome, done.code, done.message) == (
        "start-vm", "vm1", "vm-running", 0, "started in 12 ms")
    assert done.done_at is not None


def test_the_first_outcome_of_a_command_is_kept(channel):
    lease_id, slot = channel.lease()
    cid = channel.start(lease_id, "vm1")
    channel.notify(slot, "node1", "vm-running", command=cid, vms=["vm1"], message="started in 12 ms")
    first = command(channel, slot, cid)
    channel.notify(slot, "node1", "vm-running", command=cid, vms=["vm1"], message="said again")
    assert command(channel, slot, cid) == first


def test_vm_running_naming_only_the_command_finds_the_vm_by_the_command(channel):
    lease_id, slot = channel.lease()
    cid = channel.start(lease_id, "vm1")
    channel.notify(slot, "node1", "vm-running", command=cid)  # no vms: the command names it
    assert vm(channel, lease_id, "vm1").state == "running"
    assert vm(channel, lease_id, "vm1").reason == "running on node1"


def test_a_report_from_another_host_changes_neither_the_vm_nor_the_command(channel):
    lease_id, slot = channel.lease(hosts=("node1", "node2"))
    cid = channel.start(lease_id, "vm1", "node1")
    before = channel.store.snapshot()
    channel.notify(slot, "node2", "vm-running", command=cid, vms=["vm1"])
    after = channel.store.snapshot()
    assert after["vms"] == before["vms"] and after["commands"] == before["commands"]
    assert vm(channel, lease_id, "vm1").state == "starting"


def test_vm_failed_for_a_start_vm_fails_the_vm_with_the_message_as_reason(channel):
    lease_id, slot = channel.lease()
    cid = channel.start(lease_id, "vm1")
    why = "disk /var/lib/workspace-pilot/images/vm1.qcow2: sha256 does not match"
    channel.notify(slot, "node1", "vm-failed", code=1, command=cid, vms=["vm1"], message=why)
    row = vm(channel, lease_id, "vm1")
    assert (row.state, row.reason) == ("failed", why)
    assert row.stopped_at is not None and row.started_at is None
    done = command(channel, slot, cid)
    assert (done.outcome, done.code, done.message) == ("vm-failed", 1, why)
    # Its memory is free again and its name can be used anew.
    again = channel.start(lease_id, "vm1")
    assert again > cid and vm(channel, lease_id, "vm1").state == "starting"


def test_vm_failed_without_a_message_has_a_reason_all_the_same(channel):
    lease_id, slot = channel.lease()
    cid = channel.start(lease_id, "vm1")
    channel.notify(slot, "node1", "vm-failed", code=2, command=cid, vms=["vm1"])
    row = vm(channel, lease_id, "vm1")
    assert row.state == "failed" and row.reason


def test_vm_failed_for_a_stop_vm_puts_the_vm_back_to_running(channel):
    lease_id, slot = channel.lease()
    running(channel, lease_id, slot, "vm1")
    stop = channel.stop(lease_id, "vm1")
    assert vm(channel, lease_id, "vm1").state == "stopping"
    channel.notify(slot, "node1", "vm-failed", code=1, command=stop, vms=["vm1"], message="shutdown timed out")
    row = vm(channel, lease_id, "vm1")
    assert (row.state, row.reason, row.stopped_at) == ("running", "stop failed: shutdown timed out", None)
    done = command(channel, slot, stop)
    assert (done.op, done.outcome, done.code, done.message) == ("stop-vm", "vm-failed", 1, "shutdown timed out")
    # It can be stopped again, this time for good.
    again = channel.stop(lease_id, "vm1", force=True)
    channel.notify(slot, "node1", "vm-stopped", command=again, vms=["vm1"], message="destroyed")
    assert vm(channel, lease_id, "vm1").state == "stopped"


def test_a_late_vm_running_does_not_undo_a_queued_stop(channel):
    lease_id, slot = channel.lease()
    start = channel.start(lease_id, "vm1")
    stop = channel.stop(lease_id, "vm1")  # the operator changed their mind before the pilot reported
    channel.notify(slot, "node1", "vm-running", command=start, vms=["vm1"], message="started in 9 ms")
    assert command(channel, slot, start).outcome == "vm-running"
    assert command(channel, slot, stop).outcome is None  # the stop is still on its way to the pilot
    assert vm(channel, lease_id, "vm1").state == "stopping"


def test_a_contradicting_second_report_on_a_done_command_leaves_the_vm_as_it_was(channel):
    lease_id, slot = channel.lease()
    cid = running(channel, lease_id, slot, "vm1")
    channel.notify(slot, "node1", "vm-failed", code=1, command=cid, vms=["vm1"],
                   message="internal error in the pilot (see its log)")
    assert command(channel, slot, cid).outcome == "vm-running"  # the first outcome is kept ...
    assert vm(channel, lease_id, "vm1").state == "running"  # ... and the VM should agree with it


def test_vm_stopped_for_a_stop_vm_stops_the_vm(channel):
    lease_id, slot = channel.lease()
    running(channel, lease_id, slot, "vm1")
    stop = channel.stop(lease_id, "vm1")
    channel.notify(slot, "node1", "vm-stopped", command=stop, vms=["vm1"], message="stopped in 900 ms")
    row = vm(channel, lease_id, "vm1")
    assert (row.state, row.reason) == ("stopped", "stopped in 900 ms") and row.stopped_at is not None
    assert command(channel, slot, stop).outcome == "vm-stopped"


def test_vm_stopped_without_a_command_is_a_guest_that_shut_down(channel):
    lease_id, slot = channel.lease()
    running(channel, lease_id, slot, "vm1")
    running(channel, lease_id, slot, "vm2")
    commands_before = channel.store.snapshot()["commands"]
    channel.notify(slot, "node1", "vm-stopped", vms=["vm1"], message="shut down from inside the guest")
    row = vm(channel, lease_id, "vm1")
    assert (row.state, row.reason) == ("stopped", "shut down from inside the guest") and row.stopped_at is not None
    assert vm(channel, lease_id, "vm2").state == "running"
    assert channel.store.snapshot()["commands"] == commands_before  # no command's outcome was touched


def test_a_vm_report_from_the_wrong_host_does_not_stop_a_vm(channel):
    lease_id, slot = channel.lease(hosts=("node1", "node2"))
    running(channel, lease_id, slot, "vm1", "node1")
    channel.notify(slot, "node2", "vm-stopped", vms=["vm1"])
    assert vm(channel, lease_id, "vm1").state == "running"


# -- the host's lifecycle -----------------------------------------------------------------------------


def test_earlyunreserving_queues_one_stop_vm_per_vm_of_that_host_and_wakes_its_poll(channel):
    lease_id, slot = channel.lease(hosts=("node1", "node2"))
    running(channel, lease_id, slot, "vm1", "node1")
    running(channel, lease_id, slot, "vm2", "node1")
    starting = channel.start(lease_id, "vm3", "node1")  # not yet reported: stopped as well
    running(channel, lease_id, slot, "vm4", "node1")
    asked = channel.stop(lease_id, "vm4")  # already being stopped: not asked twice
    running(channel, lease_id, slot, "vm-elsewhere", "node2")
    channel.start(lease_id, "vm-failed", "node1")
    failed = [c.id for c in channel.store.commands(slot) if c.vm == "vm-failed"][-1]
    channel.notify(slot, "node1", "vm-failed", command=failed, vms=["vm-failed"], message="no")
    last = max(c.id for c in channel.store.commands(slot))
    assert last > starting and last > asked

    poll = PollThread(channel, slot, "node1", f"after={last}&wait=30")
    poll.start()
    channel.wait_parked(slot, "node1")
    channel.notify(slot, "node1", "earlyunreserving", expires_at=None, message="SIGTERM: unreserving early")
    answered = channel.commands(poll.result(WOKEN_WITHIN_S))

    assert sorted((c["op"], c["name"], c["force"]) for c in answered) == [
        ("stop-vm", "vm1", False), ("stop-vm", "vm2", False), ("stop-vm", "vm3", False)]
    assert [c["id"] for c in answered] == sorted(c["id"] for c in answered)
    queued = [c for c in channel.store.commands(slot) if c.id > last]
    assert [(c.host, c.op, c.vm) for c in queued] == [("node1", "stop-vm", c["name"]) for c in answered]
    states = vms(channel, lease_id)
    assert {n: s[1] for n, s in states.items()} == {
        "vm1": "stopping", "vm2": "stopping", "vm3": "stopping", "vm4": "stopping",
        "vm-elsewhere": "running", "vm-failed": "failed",
    }
    assert all("unreserving early" in states[n][2] for n in ("vm1", "vm2", "vm3"))
    assert channel.commands(channel.poll(slot, "node2", f"after={last}&wait=0")) == []
    commands_now = channel.store.snapshot()["commands"]
    channel.notify(slot, "node1", "earlyunreserving")  # said again: nothing is asked twice
    assert channel.store.snapshot()["commands"] == commands_now
    # The pilot stops them and says so; then it ends its hold.
    for c in answered:
        channel.notify(slot, "node1", "vm-stopped", command=c["id"], vms=[c["name"]])
    channel.notify(slot, "node1", "unreserved", memory_mb=0)
    assert {n: s[1] for n, s in vms(channel, lease_id).items()} == {
        "vm1": "stopped", "vm2": "stopped", "vm3": "stopped", "vm4": "stopped",
        "vm-elsewhere": "running", "vm-failed": "failed",
    }


def test_earlyunreserving_with_no_vms_queues_nothing(channel):
    lease_id, slot = channel.lease()
    before = channel.store.snapshot()["commands"]
    channel.notify(slot, "node1", "earlyunreserving")
    assert channel.store.snapshot()["commands"] == before


@pytest.mark.parametrize("end", ["unreserved", "killed"])
def test_the_end_of_a_hold_ends_every_vm_still_active_on_that_host(channel, end):
    lease_id, slot = channel.lease(hosts=("node1", "node2"))
    running(channel, lease_id, slot, "vm1", "node1")
    running(channel, lease_id, slot, "vm2", "node1")
    channel.stop(lease_id, "vm2")
    channel.start(lease_id, "vm3", "node1")
    running(channel, lease_id, slot, "vm-elsewhere", "node2")
    channel.notify(slot, "node1", end, memory_mb=0)
    states = vms(channel, lease_id)
    for name in ("vm1", "vm2", "vm3"):
        host, state, reason = states[name]
        assert (host, state, reason) == ("node1", "stopped", f"node1 ended its hold ({end})"), name
        assert vm(channel, lease_id, name).stopped_at is not None
    assert states["vm-elsewhere"][1] == "running"
    assert not [v for v in channel.store.vms(lease_id) if v.host == "node1" and v.active]
    # node1's memory is no longer offered: a new VM goes to node2 or nowhere.
    channel.start(lease_id, "vm5")
    assert vm(channel, lease_id, "vm5").host == "node2"


def test_killed_names_the_vms_kill_all_destroyed(channel):
    lease_id, slot = channel.lease()
    running(channel, lease_id, slot, "vm1")
    running(channel, lease_id, slot, "vm2")
    channel.notify(slot, "node1", "killed", memory_mb=0, vms=["vm1"])
    states = vms(channel, lease_id)
    assert states["vm1"][1:] == ("stopped", "destroyed by workspace-killall on node1")
    assert states["vm2"][1:] == ("stopped", "node1 ended its hold (killed)")


def test_a_release_request_queues_exactly_one_release_per_held_host(channel):
    lease_id, slot = channel.lease(hosts=("node1", "node2", "node3"), nodes=4)
    channel.notify(slot, "node3", "earlyunreserving")  # already leaving: needs no release
    channel.notify(slot, "node4", "heartbeat")  # never reserved: holds nothing
    running(channel, lease_id, slot, "vm1", "node1")
    assert channel.store.request_release(lease_id, time.time())
    assert channel.store.request_release(lease_id, time.time())  # asked twice: still one each
    releases = [(c.host, c.body) for c in channel.store.commands(slot) if c.op == "release"]
    assert sorted(releases) == [("node1", {"op": "release"}), ("node2", {"op": "release"})]
    for host in ("node1", "node2"):
        answered = channel.commands(channel.poll(slot, host, "after=0&wait=0"))
        assert [c["op"] for c in answered].count("release") == 1, host
    assert [c["op"] for c in channel.commands(channel.poll(slot, "node3"))].count("release") == 0
    assert vm(channel, lease_id, "vm1").state == "running"  # the pilot stops it on its way out, not the release


def test_a_release_request_for_an_ended_lease_queues_nothing(channel):
    lease_id, slot = channel.lease()
    assert channel.store.transition_lease(lease_id, "ready", "failed", "pilot error", now=time.time(), ended=True)
    before = channel.store.snapshot()["commands"]
    assert not channel.store.request_release(lease_id, time.time())
    assert channel.store.snapshot()["commands"] == before


def test_when_the_lease_ends_no_vm_is_left_active(channel):
    lease_id, slot = channel.lease(hosts=("node1", "node2"))
    running(channel, lease_id, slot, "vm-running", "node1")
    running(channel, lease_id, slot, "vm-stopping", "node2")
    channel.stop(lease_id, "vm-stopping")
    channel.start(lease_id, "vm-starting", "node1")
    stop = channel.stop(lease_id, "vm-running")
    channel.notify(slot, "node1", "vm-failed", command=stop, vms=["vm-running"], message="busy")
    running(channel, lease_id, slot, "vm-stopped", "node2")
    channel.notify(slot, "node2", "vm-stopped", vms=["vm-stopped"])
    channel.start(lease_id, "vm-failed", "node2")
    failed = [c.id for c in channel.store.commands(slot) if c.vm == "vm-failed"][-1]
    channel.notify(slot, "node2", "vm-failed", command=failed, vms=["vm-failed"], message="refused")

    assert channel.store.transition_lease(lease_id, "ready", "expired", "the job ended", now=time.time(), ended=True)
    states = vms(channel, lease_id)
    assert not [n for n, s in states.items() if s[1] in ACTIVE]
    for name in ("vm-running", "vm-stopping", "vm-starting"):
        assert states[name][1:] == ("lost", "the lease ended (expired) without a report on this VM"), name
    assert states["vm-stopped"][1] == "stopped" and states["vm-failed"][1] == "failed"
    # A late report does not bring a VM of an ended lease back: the lease's account is closed (410).
    channel.notify(slot, "node1", "vm-running", vms=["vm-running"], status=410)
    assert vm(channel, lease_id, "vm-running").state == "lost"


def test_a_lost_host_takes_its_vms_with_it(channel):
    lease_id, slot = channel.lease(hosts=("node1", "node2"))
    running(channel, lease_id, slot, "vm1", "node1")
    running(channel, lease_id, slot, "vm2", "node2")
    assert channel.store.mark_lost(slot, "node1", now=time.time(), why="node1 has not polled for 200 s")
    assert not channel.store.mark_lost(slot, "node1", now=time.time(), why="again")
    states = vms(channel, lease_id)
    assert states["vm1"][1:] == ("lost", "node1 has not polled for 200 s")
    assert states["vm2"][1] == "running"
    channel.notify(slot, "node1", "vm-running", vms=["vm1"])  # a late word from the lost host
    assert vm(channel, lease_id, "vm1").state == "lost"


# -- the schema upgrade from version 2 ---------------------------------------------------------------

# The CREATE statements of schema version 2, as service_adapter/store/ had them (git show HEAD~4).
SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS leases (
    id                   TEXT PRIMARY KEY,
    owner                TEXT NOT NULL,
    nodes                INTEGER NOT NULL,
    memory_mb            INTEGER NOT NULL,
    duration_s           REAL NOT NULL,
    state                TEXT NOT NULL,
    reason               TEXT NOT NULL,
    slot                 TEXT,
    job_id               TEXT,
    created_at           REAL NOT NULL,
    updated_at           REAL NOT NULL,
    ready_at             REAL,
    release_requested_at REAL,
    ended_at             REAL,
    expires_at           REAL NOT NULL,
    job_finished_at      REAL,
    cancel_requested_at  REAL,
    cancelled_at         REAL
);
CREATE INDEX IF NOT EXISTS leases_by_state ON leases(state);
CREATE INDEX IF NOT EXISTS leases_by_owner ON leases(owner);
CREATE TABLE IF NOT EXISTS slots (
    id          TEXT PRIMARY KEY,
    lease_id    TEXT NOT NULL REFERENCES leases(id),
    nodes       INTEGER NOT NULL,
    memory_mb   INTEGER NOT NULL,
    job_id      TEXT,
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pilots (
    slot_id     TEXT NOT NULL REFERENCES slots(id),
    host        TEXT NOT NULL,
    state       TEXT NOT NULL,
    code        INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,
    memory_mb   INTEGER NOT NULL,
    expires_at  TEXT,
    updated_at  REAL NOT NULL,
    reserved_at REAL,
    reserved_mb INTEGER,
    ended_by    TEXT,
    PRIMARY KEY (slot_id, host)
);
CREATE TABLE IF NOT EXISTS notifications (
    slot_id     TEXT NOT NULL,
    host        TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    state       TEXT NOT NULL,
    code        INTEGER NOT NULL,
    account     TEXT NOT NULL,
    body        BLOB NOT NULL,
    body_sha256 TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (slot_id, host, seq)
);
CREATE TABLE IF NOT EXISTS usage (
    lease_id     TEXT NOT NULL REFERENCES leases(id),
    host         TEXT NOT NULL,
    slot_id      TEXT NOT NULL,
    owner        TEXT NOT NULL,
    memory_mb    INTEGER NOT NULL,
    reserved_at  REAL NOT NULL,
    released_at  REAL NOT NULL,
    ended_by     TEXT NOT NULL,
    node_seconds REAL NOT NULL,
    mb_seconds   REAL NOT NULL,
    PRIMARY KEY (lease_id, host)
);
CREATE INDEX IF NOT EXISTS usage_by_owner ON usage(owner);
CREATE TABLE IF NOT EXISTS lease_events (
    seq         INTEGER PRIMARY KEY,
    lease_id    TEXT NOT NULL REFERENCES leases(id),
    at          REAL NOT NULL,
    old_state   TEXT,
    new_state   TEXT NOT NULL,
    reason      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS lease_events_by_lease ON lease_events(lease_id);
"""


def version_2_file(path: str, lease_id: str, slot: str, host: str = "node1", *,
                   ended: bool = False) -> dict[str, list[tuple]]:
    """A store file as schema version 2 left it: one ready lease (or, ``ended``, one released), its slot,
    one reserved pilot; its rows."""
    now = time.time()
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA_V2)
        conn.execute(
            "INSERT INTO leases (id, owner, nodes, memory_mb, duration_s, state, reason, slot, job_id, created_at,"
            " updated_at, ready_at, expires_at) VALUES (?, 'alice', 1, 1024, 600.0, 'ready', 'all 1 pilots reserved',"
            " ?, 'job-7', ?, ?, ?, ?)",
            (lease_id, slot, now - 60, now - 30, now - 30, now + 540),
        )
        conn.execute("INSERT INTO slots VALUES (?, ?, 1, 1024, 'job-7', ?)", (slot, lease_id, now - 60))
        conn.execute(
            "INSERT INTO pilots VALUES (?, ?, 'reserved', 0, 1, 1024, NULL, ?, ?, 1024, NULL)",
            (slot, host, now - 30, now - 30),
        )
        conn.execute(
            "INSERT INTO lease_events (lease_id, at, old_state, new_state, reason)"
            " VALUES (?, ?, NULL, 'pending', 'created')",
            (lease_id, now - 60),
        )
        if ended:
            conn.execute("UPDATE leases SET state = 'released', ended_at = ? WHERE id = ?", (now - 5, lease_id))
        conn.execute("PRAGMA user_version = 2")
        conn.commit()
        return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall())
                for t in ("leases", "slots", "pilots", "notifications", "usage", "lease_events")}
    finally:
        conn.close()


def test_a_version_2_store_opens_as_the_current_version_with_its_rows_kept(tmp_path):
    path = str(tmp_path / "service.sqlite")
    lease_id, slot = "lease-" + uuid.uuid4().hex[:8], str(uuid.uuid4())
    old = version_2_file(path, lease_id, slot, ended=True)

    Store(path).close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) == (10,)
        assert conn.execute("PRAGMA auto_vacuum").fetchone() == (2,)  # incremental, since version 8
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"vms", "commands", "image_lists", "list_images", "image_approvals"} <= tables  # 6's
        indexes = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"vms_by_host", "commands_by_target"} <= indexes
        columns = [row[1] for row in conn.execute("PRAGMA table_info(pilots)")]
        assert columns[-3:] == ["lost_at", "stored_bytes", "address"]  # versions 2's, 8's and 9's
        columns = [row[1] for row in conn.execute("PRAGMA table_info(slots)")]
        assert columns[-3:] == ["submit_started_at", "submitted_at", "secret"]  # versions 4's and 5's
        for table, rows in old.items():
            now = sorted(conn.execute(f"SELECT * FROM {table}").fetchall())
            added = {"pilots": 3, "slots": 3, "leases": 4, "lease_events": 1}.get(table, 0)
            if added:
                now = [row[:-added] for row in now]
                default = {"state"} if table == "lease_events" else {None}  # version 7's event kind
                for row in conn.execute(f"SELECT * FROM {table}"):
                    if table == "pilots":  # version 8 counts what each host has stored
                        (stored,) = conn.execute(
                            "SELECT COALESCE(SUM(length(body)), 0) + 128 * COUNT(*) FROM notifications"
                            " WHERE slot_id = ? AND host = ?", row[:2]).fetchone()
                        assert row[-3:] == (None, stored, None)
                    else:
                        assert set(row[-added:]) == default, table
            assert now == rows, table
    finally:
        conn.close()

    reopened = Store(path)  # the current version now: opened as it is
    try:
        (pilot,) = reopened.pilots(slot)
        assert (pilot.host, pilot.state, pilot.reserved_mb, pilot.lost_at) == ("node1", "reserved", 1024, None)
    finally:
        reopened.close()


def test_a_version_2_store_with_a_lease_in_flight_is_refused_and_left_as_it_was(tmp_path):
    """Its pilots hold the shared secret of before per-node credentials: no way to let them go on."""
    path = str(tmp_path / "service.sqlite")
    lease_id, slot = "lease-" + uuid.uuid4().hex[:8], str(uuid.uuid4())
    old = version_2_file(path, lease_id, slot)
    with pytest.raises(StoreError) as caught:
        Store(path)
    assert str(caught.value) == (
        f"store {path} has 1 lease(s) in flight from before per-node credentials (schema version 2); their "
        "pilots hold the old shared secret and would be refused: release them (or let them end) with the "
        "previous workspace-pilot, then start this one"
    )
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone() == (2,)
        for table, rows in old.items():
            assert sorted(conn.execute(f"SELECT * FROM {table}").fetchall()) == rows, table
    finally:
        conn.close()
