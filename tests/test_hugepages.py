"""The hugepages backend on the real kernel pool, and the node lock around it."""

from __future__ import annotations

import os
import re

import pytest

from pilot.backends import BackendError
from pilot.backends.hugepages import HugepagesBackend
from pilot.nodelock import NodeLock, NodeLockError
from tests.conftest import HUGEPAGES_DIR, needs_root, pool_pages


def test_take_and_give_back_are_exact(hugepages):
    backend = HugepagesBackend(HUGEPAGES_DIR)
    taken = backend.take(64)
    assert (taken.units, taken.memory_mb) == (32, 64)
    assert pool_pages() == hugepages + 32
    backend.give_back(taken)
    assert pool_pages() == hugepages


def test_memory_is_rounded_up_to_whole_pages(hugepages):
    backend = HugepagesBackend(HUGEPAGES_DIR)
    taken = backend.take(3)
    assert (taken.units, taken.memory_mb) == (2, 4)
    backend.give_back(taken)


def test_two_reservations_compose_in_either_order(hugepages):
    backend = HugepagesBackend(HUGEPAGES_DIR)
    for first_out in (0, 1):
        a, b = backend.take(64), backend.take(128)
        assert pool_pages() == hugepages + 32 + 64
        order = [a, b] if first_out == 0 else [b, a]
        backend.give_back(order[0])
        assert pool_pages() == hugepages + order[1].units
        backend.give_back(order[1])
        assert pool_pages() == hugepages


def test_a_partial_grant_is_given_back_and_reported(hugepages):
    with open("/proc/meminfo", encoding="ascii") as handle:
        total_kb = next(int(line.split()[1]) for line in handle if line.startswith("MemTotal:"))
    more_than_the_machine = total_kb // 1024 + 1024
    backend = HugepagesBackend(HUGEPAGES_DIR)
    with pytest.raises(BackendError) as caught:
        backend.take(more_than_the_machine)
    message = str(caught.value)
    granted, wanted = map(int, re.search(r"granted (\d+) of (\d+)", message).groups())
    assert 0 < granted < wanted, message  # the kernel gave what it had: a partial grant
    assert "nothing kept" in message
    assert pool_pages() == hugepages


def test_not_a_hugepages_directory_is_refused():
    with pytest.raises(BackendError, match="hugepages-<size>kB"):
        HugepagesBackend("/tmp")


def test_unreadable_pool_gives_a_clear_error(tmp_path):
    fake = tmp_path / "hugepages-2048kB"
    fake.mkdir()
    with pytest.raises(BackendError, match="cannot read"):
        HugepagesBackend(str(fake)).read_pages()


# -- the node lock -------------------------------------------------------------------------------


def test_lock_times_out_while_another_process_holds_it(tmp_path):
    lock_dir = tmp_path / "lock"
    holder = NodeLock(str(lock_dir), timeout=1)
    holder.acquire()
    try:
        # flock locks belong to open files: a second open, as another pilot's, conflicts.
        with pytest.raises(NodeLockError, match="still held"):
            NodeLock(str(lock_dir), timeout=0.05).acquire()
    finally:
        holder.release()
    with NodeLock(str(lock_dir), timeout=0.05):
        pass


def test_lock_in_a_group_writable_directory_is_refused(tmp_path):
    lock_dir = tmp_path / "open"
    lock_dir.mkdir()
    os.chmod(lock_dir, 0o777)
    with pytest.raises(NodeLockError, match="writable by group or others"):
        NodeLock(str(lock_dir), timeout=0.05).acquire()
    assert not (lock_dir / NodeLock.FILENAME).exists()


@needs_root
def test_lock_in_a_directory_owned_by_someone_else_is_refused(tmp_path):
    lock_dir = tmp_path / "theirs"
    lock_dir.mkdir(mode=0o755)
    os.chown(lock_dir, 65534, 65534)
    with pytest.raises(NodeLockError, match="belongs to uid 65534"):
        NodeLock(str(lock_dir), timeout=0.05).acquire()


def test_lock_file_is_not_followed_through_a_symlink(tmp_path):
    lock_dir = tmp_path / "lock"
    lock_dir.mkdir(mode=0o755)
    target = tmp_path / "elsewhere"
    (lock_dir / NodeLock.FILENAME).symlink_to(target)
    with pytest.raises(NodeLockError, match="node lock"):
        NodeLock(str(lock_dir), timeout=0.05).acquire()
    assert not target.exists()
