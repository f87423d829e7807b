"""Taking and giving back memory through the journal, and replaying dead pilots' entries (real hugepages)."""

from __future__ import annotations

import re
import uuid

import pytest

from pilot.node.backends import BackendError, read_meminfo_kb
from pilot.node.backends.hugepages import HugepagesBackend
from pilot.node.journal import Entry, Journal, JournalError, MemoryRecord
from pilot.node.memory import NodeMemory, TakeAborted
from pilot.recovery import replay_dead
from pilot.node.owner import Owner
from tests.support.pool import NR_HUGEPAGES, pool_pages
from tests.support.owners import dead_owner


def set_pool(pages: int) -> None:
    with open(NR_HUGEPAGES, "w", encoding="ascii") as handle:
        handle.write(str(pages))


@pytest.fixture
def journal(tmp_path):
    journal = Journal(str(tmp_path / "journal"), lock_timeout=2)
    journal.prepare()
    return journal


def node_memory(journal, *, minmem_mb=0, owner=None, checkpoint=lambda name: None) -> NodeMemory:
    entry = Entry(f"slot-{uuid.uuid4().hex[:8]}", "node1", owner or Owner.current())
    return NodeMemory(
        journal, HugepagesBackend(), entry, minmem_mb=minmem_mb, verify_timeout=1, checkpoint=checkpoint,
        replay=replay_dead,
    )


def test_take_and_give_back_are_exact_and_journalled(hugepages, journal):
    memory = node_memory(journal)
    held = memory.take(64)
    assert (held.units, held.memory_mb, held.phase) == (32, 64, "held")
    assert pool_pages() == hugepages + 32
    assert journal.entries() == [memory.entry]  # on disk while held
    memory.give_back()
    assert pool_pages() == hugepages
    assert journal.entries() == []
    assert memory.held is None


def test_memory_is_rounded_up_to_whole_pages(hugepages, journal):
    memory = node_memory(journal)
    held = memory.take(3)
    assert (held.units, held.memory_mb) == (2, 4)
    memory.give_back()


@pytest.mark.parametrize("first_out", [0, 1])
def test_two_pilots_compose_in_either_order(hugepages, journal, first_out):
    a, b = node_memory(journal), node_memory(journal)
    a.take(64)
    b.take(128)
    assert pool_pages() == hugepages + 32 + 64
    first, second = (a, b) if first_out == 0 else (b, a)
    first.give_back()
    assert pool_pages() == hugepages + second.held.units
    assert journal.entries() == [second.entry]
    second.give_back()
    assert pool_pages() == hugepages
    assert journal.entries() == []


def test_the_minmem_floor_is_never_crossed(hugepages, journal):
    total_mb = read_meminfo_kb("MemTotal") // 1024
    memory = node_memory(journal, minmem_mb=total_mb - 32)
    with pytest.raises(BackendError, match=r"below minmem .* nothing was changed"):
        memory.take(64)
    assert pool_pages() == hugepages
    assert journal.entries() == []


def test_a_partial_grant_is_given_back_and_reported(hugepages, journal):
    # Ask for nearly all of the machine: the floor allows it (minmem 0), the kernel cannot grant it.
    nearly_all = read_meminfo_kb("MemTotal") // 1024 - 256
    memory = node_memory(journal)
    with pytest.raises(BackendError) as caught:
        memory.take(nearly_all)
    message = str(caught.value)
    assert re.search(r"asked for \d+ pages .* got \d+ .* nothing kept", message), message
    assert pool_pages() == hugepages
    assert journal.entries() == []


def test_checkpoints_come_between_the_journal_and_the_node(hugepages, journal):
    seen = []

    def checkpoint(name):
        on_disk = journal.entries()[0].memory.phase if journal.entries() else None
        seen.append((name, on_disk, pool_pages()))

    memory = node_memory(journal, checkpoint=checkpoint)
    memory.take(8)
    memory.give_back()
    assert seen == [
        ("journalled", "taking", hugepages),  # recorded, not yet changed
        ("restoring", "restoring", hugepages + 4),  # recorded, not yet given back
        ("restored", "restoring", hugepages),  # given back, entry not yet removed
    ]


def test_a_stop_after_the_journal_write_changes_nothing(hugepages, journal):
    memory = node_memory(journal)
    with pytest.raises(TakeAborted):
        memory.take(64, should_stop=lambda: True)
    assert pool_pages() == hugepages
    assert journal.entries() == []


# -- replaying the entries of dead pilots -----------------------------------------------------------


def dead_entry(phase: str, units: int, before=None, target=None, owner=None) -> Entry:
    record = MemoryRecord("hugepages", {"page_kb": 2048}, phase, units, units * 2, before, target)
    return Entry(f"dead-{uuid.uuid4().hex[:8]}", "node1", owner or dead_owner(), memory=record)


@pytest.mark.parametrize(
    "case, pool_offset, phase, before_offset, target_offset",
    [
        ("died after the journal write, before the balloon", 0, "taking", 0, 16),
        ("died after the balloon, before the 'held' record", 16, "taking", 0, 16),
        ("died while holding", 16, "held", None, None),
        ("died after recording the restore, before it", 16, "restoring", 16, 0),
        ("died after restoring, before removing the entry", 0, "restoring", 16, 0),
    ],
)
def test_replay_restores_a_dead_pilots_change_in_every_phase(
    hugepages, journal, case, pool_offset, phase, before_offset, target_offset
):
    def level(offset):
        return None if offset is None else hugepages + offset

    set_pool(hugepages + pool_offset)
    journal.write(dead_entry(phase, 16, level(before_offset), level(target_offset)))
    with journal.lock():
        report = replay_dead(journal, verify_timeout=1)
    assert report.clean and len(report.undone) == 1, case
    assert pool_pages() == hugepages, case
    assert journal.entries() == []


def test_replay_leaves_live_pilots_alone(hugepages, journal):
    live = node_memory(journal)
    live.take(32)  # 16 pages, journalled by this (live) process
    set_pool(pool_pages() + 8)  # what a dead pilot took after it
    journal.write(dead_entry("held", 8))
    with journal.lock():
        report = replay_dead(journal, verify_timeout=1)
    assert [e.slot for e in report.live] == [live.entry.slot]
    assert pool_pages() == hugepages + 16
    live.give_back()
    assert pool_pages() == hugepages


def test_an_entry_from_an_earlier_boot_is_dropped_without_a_change(hugepages, journal):
    gone = dead_owner()
    journal.write(dead_entry("held", 16, owner=Owner(gone.pid, gone.start, "an-earlier-boot")))
    with journal.lock():
        report = replay_dead(journal, verify_timeout=1)
    assert "reboot" in report.undone[0][1]
    assert pool_pages() == hugepages  # not shrunk below where it was: the reboot had undone it
    assert journal.entries() == []


def test_the_next_take_replays_dead_entries_first(hugepages, journal):
    set_pool(hugepages + 16)
    journal.write(dead_entry("held", 16))
    memory = node_memory(journal)
    memory.take(8)
    assert pool_pages() == hugepages + 4
    assert journal.entries() == [memory.entry]
    memory.give_back()
    assert pool_pages() == hugepages


def test_an_unreadable_entry_stops_the_next_take(hugepages, journal, tmp_path):
    (tmp_path / "journal" / "mangled.json").write_text("{")
    memory = node_memory(journal)
    with pytest.raises(JournalError, match="mangled.json.*run workspace-killall"):
        memory.take(8)
    assert pool_pages() == hugepages
