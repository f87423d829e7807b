"""The node lock: serialises changes to the node's memory between pilots on one node.

A pilot holds it only while it reads and changes the balloon (tens of
milliseconds), so pilots of different slots on one node take turns rather
than wait for each other's leases.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

from pilot.node.safedir import directory_problem


class NodeLockError(Exception):
    """The lock directory is unsafe or unusable, or the lock was not free in time."""


class NodeLock:
    """An exclusive ``flock`` on ``<directory>/node.lock``, taken within ``timeout`` seconds.

    The directory is created (mode 0755) if missing and must belong to the
    pilot's own user (root on a real node) and not be writable by group or
    others: otherwise anyone could hold the node's lock or swap the file.
    """

    FILENAME = "node.lock"

    def __init__(self, directory: str, timeout: float):
        self.directory = directory
        self.timeout = timeout
        self._fd: int | None = None

    def check_directory(self) -> None:
        """Create the directory if missing; raise :class:`NodeLockError` if it is unsafe."""
        try:
            os.makedirs(self.directory, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise NodeLockError(f"lock directory {self.directory}: {exc.strerror}") from None
        problem = directory_problem(self.directory)
        if problem:
            raise NodeLockError(f"lock directory {self.directory}{problem}")

    def acquire(self) -> None:
        """Take the lock, retrying with a short backoff until ``timeout``; raises NodeLockError."""
        self.check_directory()
        path = os.path.join(self.directory, self.FILENAME)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise NodeLockError(f"node lock {path}: {exc.strerror}") from None
        deadline = time.monotonic() + self.timeout
        pause = 0.002
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                return
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise NodeLockError(f"node lock {path}: {exc.strerror}") from None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                os.close(fd)
                raise NodeLockError(f"node lock {path} still held by another process after {self.timeout:g} s")
            # flock has no timed wait; holders keep it for milliseconds, so a short backoff is cheap.
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, 0.05)

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the flock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "NodeLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
