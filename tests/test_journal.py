"""The node journal on disk, and the owner identity that decides whose entries are dead."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pilot.node.journal import Entry, Journal, JournalError, MemoryRecord, UnreadableEntry
from pilot.node.owner import Owner, boot_id, start_ticks
from tests.support.owners import dead_owner


def held(units: int = 32) -> MemoryRecord:
    return MemoryRecord("hugepages", {"page_kb": 2048}, "held", units, units * 2)


def test_an_entry_round_trips_through_the_directory(tmp_path):
    journal = Journal(str(tmp_path / "journal"))
    journal.prepare()
    entry = Entry("slot-1", "node1", Owner.current(), contact="http://127.0.0.1:9", memory=held())
    journal.write(entry)
    assert journal.entries() == [entry]
    assert oct(os.stat(tmp_path / "journal" / entry.filename).st_mode & 0o777) == "0o600"
    journal.write(entry.with_memory(held(64)))
    assert journal.entries() == [entry.with_memory(held(64))]  # replaced, not added
    assert not [name for name in os.listdir(tmp_path / "journal") if name.endswith(".tmp")]
    journal.remove(entry)
    assert journal.entries() == []


def test_the_directory_is_created_private(tmp_path):
    Journal(str(tmp_path / "a" / "journal")).prepare()
    assert oct(os.stat(tmp_path / "a" / "journal").st_mode & 0o777) == "0o700"


@pytest.mark.parametrize("mode", [0o770, 0o707])
def test_a_directory_others_can_write_is_refused(tmp_path, mode):
    directory = tmp_path / "journal"
    directory.mkdir()
    os.chmod(directory, mode)
    with pytest.raises(JournalError, match="writable by group or others"):
        Journal(str(directory)).prepare()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_a_directory_owned_by_someone_else_is_refused(tmp_path):
    directory = tmp_path / "journal"
    directory.mkdir(mode=0o700)
    os.chown(directory, 65534, 65534)
    with pytest.raises(JournalError, match="belongs to uid 65534"):
        Journal(str(directory)).prepare()


def test_a_symlinked_directory_is_refused(tmp_path):
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "journal").symlink_to(tmp_path / "real")
    with pytest.raises(JournalError, match="not a directory"):
        Journal(str(tmp_path / "journal")).prepare()


def test_files_that_are_not_entries_are_reported_not_trusted(tmp_path):
    journal = Journal(str(tmp_path))
    (tmp_path / "garbage.json").write_text("{not json")
    (tmp_path / "other.json").write_text('{"version": 99}')
    good = Entry("s", "h", Owner.current(), memory=held())
    journal.write(good)
    # A valid entry under another file name is not trusted either: names are how entries are found.
    (tmp_path / "renamed.json").write_bytes(good.to_json())
    found = journal.entries()
    assert good in found
    bad = sorted(e.filename for e in found if isinstance(e, UnreadableEntry))
    assert bad == ["garbage.json", "other.json", "renamed.json"]


def test_memory_records_in_a_moving_phase_need_their_levels(tmp_path):
    with pytest.raises(ValueError, match="before/target"):
        MemoryRecord.from_dict(
            {"backend": "hugepages", "params": {}, "phase": "taking", "units": 1, "memory_mb": 2}
        )


def test_owner_identity_survives_only_as_long_as_the_process():
    me = Owner.current()
    assert me.alive()
    assert not Owner(me.pid, me.start + 1, me.boot).alive()  # same pid, another process: a reused pid
    assert not Owner(me.pid, me.start, "another-boot").alive()
    assert not Owner(me.pid, me.start, "another-boot").from_this_boot()
    gone = dead_owner()
    assert not gone.alive()
    assert not gone.signal(15)  # never signals a process that is not the owner
    assert gone.wait_gone(0)


def test_a_zombie_is_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    owner = Owner(child.pid, start_ticks(child.pid) or 0, boot_id())
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    assert not owner.alive()
    child.wait()


def test_signal_and_wait_gone_end_a_live_owner():
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    owner = Owner(child.pid, start_ticks(child.pid), boot_id())
    assert owner.alive()
    assert not owner.wait_gone(0.05)
    assert owner.signal(15)
    assert owner.wait_gone(5)
    child.wait()
    child.stdin.close()
