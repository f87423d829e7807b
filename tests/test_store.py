"""The store's lease writes: compare-and-set transitions, usage rows, late reservations, waiting for commits.

Notifications go through the real receiver (tests/conftest.py ``service``)
into a real store: every test that is not about SQLite's files runs twice, on a SQLite file and on a
database of the session's real PostgreSQL server (``store_location``).
"""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from service_adapter.store import Store, StoreError
from tests.support.channels import Channel
from tests.support.postgres import rows_elsewhere
from tests.support.service import Service, add_lease, notification


@pytest.fixture
def service(any_store_service):
    """This module's receiver runs on each store backend."""
    return any_store_service


def post(service, slot, seq, state, host="node1", status=200, **fields):
    response = service.post(service.session(host), notification(slot, seq=seq, state=state, host=host, **fields).to_json())
    assert response.status_code == status, response.text
    return response


def received_at(service, slot, host, seq) -> float:
    (at,) = service.store.read(lambda conn: conn.execute(
        "SELECT received_at FROM notifications WHERE slot_id = ? AND host = ? AND seq = ?", (slot, host, seq)
    ).fetchone())
    return at


def test_a_transition_whose_old_state_no_longer_matches_changes_nothing(store_location):
    store = Store(store_location)
    try:
        store.create_lease("L", "S", owner="alice", nodes=1, memory_mb=64, duration_s=60, now=100.0)
        assert store.transition_lease("L", "pending", "ready", "all 1 pilots reserved", now=101.0, ready_at=100.5)
        before = store.snapshot()
        assert not store.transition_lease("L", "pending", "failed", "too late", now=102.0, ended=True, cancel=True)
        assert not store.transition_lease("no-such-lease", "pending", "failed", "x", now=102.0)
        assert store.snapshot() == before
        row = store.get_lease("L")
        assert (row.state, row.reason, row.ready_at, row.ended_at, row.cancel_requested_at) == (
            "ready", "all 1 pilots reserved", 100.5, None, None,
        )
        history = [(e.old_state, e.new_state) for e in store.lease_events("L")]
        assert history == [(None, "pending"), ("pending", "ready")]
        assert store.transition_lease("L", "ready", "failed", "pilot error", now=103.0, ended=True, cancel=True)
        row = store.get_lease("L")
        assert (row.state, row.ended_at, row.cancel_requested_at, row.expires_at) == ("failed", 103.0, 103.0, 160.0)
        assert not store.request_release("L", 104.0)  # an ended lease takes no release
    finally:
        store.close()


def test_the_end_of_a_hold_writes_its_usage_row_with_the_notification(service):
    slot = service.add_slot(nodes=2)
    post(service, slot, 1, "reserved", memory_mb=48)
    post(service, slot, 2, "earlyunreserving", memory_mb=48)
    assert service.store.usage_rows() == []  # still holding
    post(service, slot, 3, "unreserved", memory_mb=0)
    (row,) = service.store.usage_rows(lease_id=service.lease)  # there as soon as the 200 came back
    assert (row.host, row.slot_id, row.owner, row.memory_mb, row.ended_by) == (
        "node1", slot, "operator", 48, "unreserved",
    )
    assert row.reserved_at == received_at(service, slot, "node1", 1)
    assert row.released_at == received_at(service, slot, "node1", 3)
    assert row.node_seconds == pytest.approx(row.released_at - row.reserved_at)
    assert row.mb_seconds == pytest.approx(48 * row.node_seconds)
    (pilot,) = service.store.pilots(slot)
    assert (pilot.reserved_at, pilot.reserved_mb, pilot.ended_by) == (row.reserved_at, 48, "earlyunreserving")

    post(service, slot, 4, "killed")  # kill-all after the end: the hold was already counted
    assert len(service.store.usage_rows()) == 1
    post(service, slot, 1, "unreserved", host="node2")  # never reserved: nothing to count
    assert len(service.store.usage_rows()) == 1
    assert service.store.usage_totals(owner="operator") == (row.node_seconds, row.mb_seconds, 1)
    assert service.store.usage_totals(owner="nobody") == (0.0, 0.0, 0)


def test_a_failed_restore_is_not_the_end_of_the_hold_but_kill_all_is(service):
    slot = service.add_slot()
    post(service, slot, 1, "reserved")
    post(service, slot, 2, "unreserving")
    post(service, slot, 3, "error", code=8)
    assert service.store.usage_rows() == []
    post(service, slot, 4, "killed")
    (row,) = service.store.usage_rows()
    assert row.ended_by == "killed" and row.released_at == received_at(service, slot, "node1", 4)


def test_a_first_reserved_is_refused_once_the_lease_is_released_or_over(service):
    slot = service.add_slot(nodes=3)
    first = notification(slot, seq=1, state="reserved", host="node1").to_json()
    assert service.post(service.session(), first).status_code == 200
    assert service.store.request_release(service.lease, time.time())
    before = service.store.snapshot()
    answer = post(service, slot, 1, "reserved", host="node2", status=404)
    assert answer.json()["result"] == "unknown-slot"
    assert service.store.snapshot() == before
    repeat = service.post(service.session(), first)  # an exact repeat of an accepted one is still 200
    assert (repeat.status_code, repeat.json()["result"]) == (200, "repeat")
    post(service, slot, 2, "earlyunreserving", host="node1")
    post(service, slot, 3, "unreserved", host="node1")
    assert service.store.transition_lease(service.lease, "pending", "released", "done", now=time.time(), ended=True)
    post(service, slot, 1, "reserved", host="node3", status=404)
    post(service, slot, 1, "killed", host="node3")  # news of an end is always taken
    assert [p.host for p in service.store.pilots(slot)] == ["node1", "node3"]


def test_a_store_of_another_schema_version_is_refused_in_one_line(tmp_path):
    path = str(tmp_path / "old.sqlite")
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE leases (id TEXT PRIMARY KEY, nodes INTEGER, memory_mb INTEGER, duration_s INTEGER,"
                 " created_at REAL)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version 0, this workspace-pilot reads version 10: move the file away"):
        Store(path)
    Store(str(tmp_path / "new.sqlite")).close()
    Store(str(tmp_path / "new.sqlite")).close()  # opening again is fine


def test_wait_changed_wakes_on_a_commit_and_on_wake(store_location):
    store = Store(store_location)
    try:
        seen = store.version
        threading.Timer(0.1, add_lease, (store, "L", 1, 64, 60)).start()
        assert store.wait_changed(seen, 10) > seen  # woken by the commit (a timeout returns ``seen``)
        assert store.wait_changed(seen, 10) > seen  # already moved: at once
        now = store.version
        returned = []
        waiter = threading.Thread(target=lambda: returned.append(store.wait_changed(now, 600)))
        waiter.start()
        for _ in range(1200):  # a wake before the waiter waits is lost (as for any condition): wake again
            store.wake()
            waiter.join(0.05)
            if not waiter.is_alive():
                break
        # Ended far inside its own 600 s: only wake() can have done that.
        assert returned == [now] and not waiter.is_alive()
    finally:
        store.close()


def test_a_vm_start_or_pause_is_a_commit_the_lease_manager_need_not_look_at(tmp_path, store_location):
    """:attr:`Store.lease_version` (what wakes the lease manager) moves with every commit but a VM's start or
    pause request: those change no lease, no pilot and no running count until the pilot reports."""
    channel = Channel(tmp_path, store_location)
    store = channel.store
    try:
        lease_id, slot = channel.lease()

        def moved(action) -> tuple[bool, bool]:
            version, lease_version = store.version, store.lease_version
            action()
            return store.version > version, store.lease_version > lease_version

        started = []
        assert moved(lambda: started.append(channel.start(lease_id, "vm1"))) == (True, False)
        assert moved(lambda: channel.notify(slot, "node1", "vm-running", command=started[0], vms=["vm1"])) == (
            True, True)
        assert moved(lambda: store.pause_vm(lease_id, "vm1", resume=False, now=time.time())) == (True, False)
        assert moved(lambda: channel.stop(lease_id, "vm1")) == (True, True)  # no longer counted as running
        assert moved(lambda: store.request_release(lease_id, time.time())) == (True, True)
        # A waiter on the lease version sleeps on through a VM start's commit, and wakes at the next that counts.
        seen, returned = store.lease_version, []
        waiter = threading.Thread(target=lambda: returned.append(store.wait_changed(seen, 600, leases=True)))
        waiter.start()
        channel.start(lease_id, "vm2")
        waiter.join(0.5)
        assert waiter.is_alive() and store.lease_version == seen
        channel.notify(slot, "node1", "heartbeat")
        waiter.join(30)
        assert returned == [store.lease_version] and returned[0] > seen
    finally:
        channel.close()


def _as_version_9(conn) -> None:
    """Drop what schema version 10 added (a lease's release when idle, the VMs' use)."""
    conn.execute("ALTER TABLE leases DROP COLUMN release_when_idle_s")
    for column in ("busy", "cpu", "usage_at", "busy_since"):
        conn.execute(f"ALTER TABLE vms DROP COLUMN {column}")


def _as_version_8(conn) -> None:
    """Drop what schema versions 9 and 10 added (the VMs' addresses, their lease networks, the nodes' addresses;
    a lease's release when idle, the VMs' use)."""
    _as_version_9(conn)
    for index in ("lease_subnets_held", "lease_vnis_held", "vm_addresses_held", "vm_forwards_held",
                  "vm_addresses_by_lease"):
        conn.execute(f"DROP INDEX {index}")
    conn.execute("DROP TRIGGER vm_address_freed")
    conn.execute("DROP TABLE lease_networks")
    for column in ("ip", "mac", "hostname", "forward_port", "holds_address"):
        conn.execute(f"ALTER TABLE vms DROP COLUMN {column}")
    conn.execute("ALTER TABLE pilots DROP COLUMN address")


def _as_version_7(conn) -> None:
    """Drop what schema versions 8 and 9 added (the bounded store's columns; the addresses) and turn auto-vacuum
    off, as 7 had it."""
    _as_version_8(conn)
    conn.execute("DROP INDEX leases_to_compact")
    for table, column in (("leases", "compacted_at"), ("pilots", "stored_bytes")):
        conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    conn.commit()
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.execute("PRAGMA auto_vacuum = NONE")
    conn.execute("VACUUM")


def _as_version_6(conn) -> None:
    """Drop what schema versions 7 and 8 added (a lease's start and before-end event, the events' kind; the
    bounded store's columns)."""
    _as_version_7(conn)
    for table, column in (("leases", "start_at"), ("leases", "warned_at"), ("lease_events", "kind")):
        conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")


def _as_version_4(path: str) -> None:
    """Turn a store file into what schema version 4 wrote: no slot secrets."""
    conn = sqlite3.connect(path)
    _as_version_6(conn)
    conn.execute("ALTER TABLE slots DROP COLUMN secret")
    conn.execute("PRAGMA user_version = 4")
    conn.commit()
    conn.close()


def test_a_store_with_leases_in_flight_from_before_slot_secrets_is_refused_in_one_line(tmp_path):
    path = str(tmp_path / "v4.sqlite")
    store = Store(path)
    store.create_lease("lease-1", "slot-1", owner="alice", nodes=1, memory_mb=64, duration_s=60, now=time.time())
    store.close()
    _as_version_4(path)
    with pytest.raises(StoreError, match=r"1 lease\(s\) in flight from before per-node credentials.*"
                                         r"release them .* with the previous workspace-pilot") as caught:
        Store(path)
    assert "\n" not in str(caught.value)


def test_a_store_whose_leases_have_all_ended_is_upgraded_and_keeps_them(tmp_path):
    path = str(tmp_path / "v4.sqlite")
    store = Store(path)
    store.create_lease("lease-1", "slot-1", owner="alice", nodes=1, memory_mb=64, duration_s=60, now=time.time())
    assert store.transition_lease("lease-1", "pending", "failed", "ended for the test", now=time.time(), ended=True)
    store.close()
    _as_version_4(path)
    upgraded = Store(path)
    try:
        assert upgraded.get_lease("lease-1").state == "failed"
        assert upgraded.slot_secret("slot-1") is None  # an old slot: no pilot can act for it
    finally:
        upgraded.close()


def test_a_version_5_store_with_a_lease_in_flight_gains_the_image_tables_and_keeps_the_lease(tmp_path):
    path = str(tmp_path / "v5.sqlite")
    store = Store(path)
    store.create_lease("lease-1", "slot-1", owner="alice", nodes=1, memory_mb=64, duration_s=60, now=time.time())
    store.close()
    conn = sqlite3.connect(path)
    _as_version_6(conn)
    for table in ("image_approvals", "list_images", "image_lists"):
        conn.execute(f"DROP TABLE {table}")
    conn.execute("PRAGMA user_version = 5")
    conn.commit()
    conn.close()
    upgraded = Store(path)  # version 5 had per-slot secrets: a lease in flight goes on
    try:
        assert upgraded.get_lease("lease-1").state == "pending"
        assert upgraded.snapshot()["image_lists"] == []
    finally:
        upgraded.close()


def test_a_version_6_store_gains_lease_starts_and_event_kinds_and_its_leases_go_on(tmp_path):
    path = str(tmp_path / "v6.sqlite")
    store = Store(path)
    store.create_lease("lease-1", "slot-1", owner="alice", nodes=1, memory_mb=64, duration_s=60, now=time.time())
    store.close()
    conn = sqlite3.connect(path)
    _as_version_6(conn)
    conn.execute("PRAGMA user_version = 6")
    conn.commit()
    conn.close()
    upgraded = Store(path)
    try:
        row = upgraded.get_lease("lease-1")
        assert (row.state, row.start_at, row.warned_at) == ("pending", None, None)
        assert upgraded.transition_lease("lease-1", "pending", "failed", "ended for the test", now=time.time(),
                                         ended=True)
        assert [(e.kind, e.new_state) for e in upgraded.lease_events("lease-1")] == [
            ("state", "pending"), ("state", "failed")]  # an old creation entry reads as a state entry
    finally:
        upgraded.close()


def test_a_version_9_store_gains_release_when_idle_and_vm_use_and_its_leases_go_on(tmp_path):
    path = str(tmp_path / "v9.sqlite")
    store = Store(path)
    store.create_lease("lease-1", "slot-1", owner="alice", nodes=1, memory_mb=64, duration_s=60, now=time.time())
    store.close()
    conn = sqlite3.connect(path)
    _as_version_9(conn)
    conn.execute("PRAGMA user_version = 9")
    conn.commit()
    conn.close()
    upgraded = Store(path)
    try:
        row = upgraded.get_lease("lease-1")
        assert (row.state, row.release_when_idle_s) == ("pending", None)
        columns = upgraded.read(lambda c: [r[1] for r in c.execute("PRAGMA table_info(vms)")])
        assert columns[-4:] == ["busy", "cpu", "usage_at", "busy_since"]
        assert upgraded.read(lambda c: c.execute("PRAGMA user_version").fetchone()) == (10,)
    finally:
        upgraded.close()


def test_a_version_9_postgresql_store_is_upgraded_in_place_and_its_leases_go_on(postgres_server):
    """The same additive steps bring a PostgreSQL database up to date, in one transaction at the first start."""
    url = postgres_server.new_database()
    store = Store(url)
    store.create_lease("lease-1", "slot-1", owner="alice", nodes=1, memory_mb=64, duration_s=60, now=time.time())
    store.close()
    rows_elsewhere(url, "ALTER TABLE leases DROP COLUMN release_when_idle_s, DROP COLUMN rowid;"
                        " ALTER TABLE vms DROP COLUMN busy, DROP COLUMN cpu, DROP COLUMN usage_at,"
                        " DROP COLUMN busy_since")
    rows_elsewhere(url, "UPDATE store_meta SET value = '9'")
    upgraded = Store(url)
    try:
        row = upgraded.get_lease("lease-1")
        assert (row.state, row.release_when_idle_s) == ("pending", None)
        columns = upgraded.read(lambda c: [r[0] for r in c.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'vms' ORDER BY ordinal_position")])
        assert columns[-4:] == ["busy", "cpu", "usage_at", "busy_since"]
        assert upgraded.read(lambda c: c.execute("SELECT value FROM store_meta").fetchone()) == ("10",)
        assert upgraded.list_leases()[0].id == "lease-1"  # read in written order again: rowid is back
    finally:
        upgraded.close()


def test_a_version_7_store_counts_what_each_host_stored_and_turns_to_incremental_vacuum(tmp_path):
    service = Service(str(tmp_path))  # a SQLite file's upgrade
    slot = service.add_slot()
    post(service, slot, 1, "reserved", host="node1")
    post(service, slot, 2, "heartbeat", host="node1")
    service.receiver.stop()
    service.store.close()
    conn = sqlite3.connect(service.store.path)
    _as_version_7(conn)
    conn.execute("PRAGMA user_version = 7")
    conn.commit()
    (bodies,) = conn.execute("SELECT SUM(length(body)) FROM notifications WHERE slot_id = ?", (slot,)).fetchone()
    conn.close()
    upgraded = Store(service.store.path)
    try:
        assert upgraded.read(lambda c: c.execute("PRAGMA auto_vacuum").fetchone()) == (2,)
        assert upgraded.read(lambda c: c.execute("SELECT stored_bytes FROM pilots WHERE slot_id = ?",
                                                 (slot,)).fetchone()) == (bodies + 2 * 128,)
        assert upgraded.get_lease(service.lease).state == "pending"
    finally:
        upgraded.close()


# -- a lease's account closes ----------------------------------------------------------------------


def test_at_the_leases_end_the_service_closes_the_usage_of_a_host_that_never_reported_its_end(service):
    slot = service.add_slot(nodes=2)
    post(service, slot, 1, "reserved", host="node1")
    post(service, slot, 1, "reserved", host="node2")
    post(service, slot, 2, "unreserved", host="node1")
    ended_at = time.time()
    assert service.store.transition_lease(service.lease, "pending", "released", "done", now=ended_at, ended=True)
    rows = {row.host: row for row in service.store.usage_rows(lease_id=service.lease)}
    assert rows["node1"].ended_by == "unreserved"
    closed = rows["node2"]
    assert closed.ended_by == "closed-by-service" and closed.released_at == ended_at
    # Late news from that host: a heartbeat changes nothing (410); its unreserved, the documented clean-up, is
    # taken (the node did give the memory back) but the account stays as the service closed it.
    before = service.store.snapshot()
    refused = post(service, slot, 2, "heartbeat", host="node2", status=410)
    assert refused.json()["result"] == "lease-ended"
    assert service.store.snapshot() == before
    post(service, slot, 3, "unreserved", host="node2")
    assert {row.host: row for row in service.store.usage_rows(lease_id=service.lease)}["node2"] == closed
    assert {p.host: p.state for p in service.store.pilots(slot)} == {"node1": "unreserved", "node2": "unreserved"}


def test_no_usage_row_is_longer_than_the_leases_duration(service):
    service.store.submit(lambda conn: conn.execute("UPDATE leases SET duration_s = 1 WHERE id = ?",
                                                   (service.lease,))).result()
    slot = service.add_slot()
    post(service, slot, 1, "reserved", host="node1", memory_mb=64)
    time.sleep(1.2)  # the hold outlives the lease's window: its end is reported late
    post(service, slot, 2, "unreserved", host="node1", memory_mb=0)
    (row,) = service.store.usage_rows(lease_id=service.lease)
    assert row.node_seconds == 1.0 and row.mb_seconds == 64.0
    assert row.released_at == row.reserved_at + 1


# -- a bounded store -------------------------------------------------------------------------------

#: A heartbeat as large as the protocol lets a pilot make one (256 VM names and a 4 KiB message): ~21 KB.
BIG = {"vms": [f"vm-{i:03d}-" + "x" * 56 for i in range(256)], "message": "m" * 4096}


def stored_bytes(store, slot: str, host: str = "node1") -> tuple[int, int]:
    """(what the rows of (slot, host) hold, what its pilot row counts) in bytes."""
    return store.read(lambda conn: (
        conn.execute("SELECT COALESCE(SUM(length(body)), 0) + 128 * COUNT(*) FROM notifications"
                     " WHERE slot_id = ? AND host = ?", (slot, host)).fetchone()[0],
        conn.execute("SELECT stored_bytes FROM pilots WHERE slot_id = ? AND host = ?", (slot, host)).fetchone()[0]))


def test_a_live_hosts_stored_notifications_stay_under_its_cap_and_its_lifecycle_stays(tmp_path, store_location):
    cap = 256 * 1024
    service = Service(str(tmp_path), store_options={"host_store_bytes": cap}, store_location=store_location)
    try:
        slot = service.add_slot()
        post(service, slot, 1, "reserved", host="node1")
        for seq in range(2, 102):  # ~2 MB of heartbeats, 8 times the cap
            post(service, slot, seq, "heartbeat", host="node1", **BIG)
        held, counted = stored_bytes(service.store, slot)
        assert held == counted and cap // 2 < held <= cap
        kept = service.store.notifications(slot)
        assert kept[0][1:3] == (1, "reserved") and kept[-1][1:3] == (101, "heartbeat")
        assert [seq for _, seq, _, _ in kept[1:]] == list(range(kept[1][1], 102))  # the newest, without a gap
        post(service, slot, 102, "unreserved", host="node1")
        (row,) = service.store.usage_rows(lease_id=service.lease)
        assert row.ended_by == "unreserved"
    finally:
        service.close()


def test_an_ended_lease_is_compacted_after_its_retention_and_its_account_stays(service):
    old_slot = service.add_slot()
    post(service, old_slot, 1, "reserved", host="node1")
    for seq in range(2, 40):
        post(service, old_slot, seq, "heartbeat", host="node1", **BIG)
    post(service, old_slot, 40, "unreserved", host="node1")
    ended = time.time()
    assert service.store.transition_lease(service.lease, "pending", "released", "done", now=ended, ended=True)
    usage, events = service.store.usage_rows(), service.store.lease_events(service.lease)
    on_sqlite = not service.store.on_postgres
    if on_sqlite:
        pages_before = service.store.read(lambda conn: conn.execute("PRAGMA page_count").fetchone()[0])
    # Within its retention: kept whole.
    assert service.store.compact(retention_s=3600, now=ended + 60)[:3] == (0, 0, 0)
    assert len(service.store.notifications(old_slot)) == 40
    # Past it: the notifications go, the lease, its history, its pilot's summary and its usage stay.
    leases, notifications, commands, free = service.store.compact(retention_s=3600, now=ended + 3601)
    assert (leases, notifications, commands) == (1, 40, 0)
    assert service.store.notifications(old_slot) == []
    assert service.store.usage_rows() == usage and service.store.lease_events(service.lease) == events
    assert [(p.state, p.last_seq) for p in service.store.pilots(old_slot)] == [("unreserved", 40)]
    assert service.store.get_lease(service.lease).state == "released"
    if on_sqlite:  # the space went back to the file system in the same pass: nothing is left free for the next
        assert free > 150
        pages_after = service.store.read(lambda conn: conn.execute("PRAGMA page_count").fetchone()[0])
        assert pages_after < pages_before - 150  # ~800 KB of heartbeats, 4 KiB pages
    else:  # PostgreSQL's autovacuum makes the space reusable: the pass reports none given back
        assert free == 0
    assert service.store.compact(retention_s=3600, now=ended + 3602) == (0, 0, 0, 0)
    # A replay of a compacted notification is still refused.
    post(service, old_slot, 2, "heartbeat", host="node1", status=409)


def test_the_compactor_thread_compacts_what_passes_its_retention_and_stops_by_itself(service):
    from service_adapter.compactor import Compactor

    slot = service.add_slot()
    post(service, slot, 1, "reserved", host="node1")
    post(service, slot, 2, "unreserved", host="node1")
    assert service.store.transition_lease(service.lease, "pending", "released", "done", now=time.time(), ended=True)
    compactor = Compactor(service.store, retention_s=0, every_s=0.05)
    compactor.start()
    try:
        assert service.store.wait_for(lambda: service.store.get_lease(service.lease).compacted_at is not None, 30)
    finally:
        compactor.stop()
    assert service.store.notifications(slot) == [] and len(service.store.usage_rows()) == 1
