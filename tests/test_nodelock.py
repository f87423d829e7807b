"""The node lock: exclusive, timed, and only in a safe directory."""

from __future__ import annotations

import os

import pytest

from pilot.node.lock import NodeLock, NodeLockError
from tests.support.pool import needs_root


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
