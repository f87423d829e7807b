"""The guest's stdout and stderr, copied to the wrapper's own as they grow, so the batch system's output
files fill while the job runs (not only at its end).

The guest writes ``control/stdout`` and ``control/stderr`` through
virtiofs without caching, so the host sees every write as it happens; a
file has no change notification that works here, so :meth:`GuestOutput.pump`
is called on the wrapper's short poll. Each file is opened only as
:func:`pilot.vmjob.rundir.open_guest_file` allows (a regular file of the job's
user), and at most ``limit`` bytes of each are copied.
"""

from __future__ import annotations

import os

from pilot.vmjob.rundir import RunDirError, open_guest_file, punch_hole

READ_BYTES = 256 * 1024
#: Reads one pump makes at most, so a guest that never stops writing cannot hold the wrapper's loop.
READS_PER_PUMP = 16


class GuestFile:
    """One guest output file followed into the descriptor ``out``."""

    def __init__(self, path: str, out: int, uid: int, limit: int):
        self.path = path
        self.out = out
        self.uid = uid
        self.limit = limit
        self.copied = 0
        self.read = 0  # the file's offset: everything before it is read, and punched out
        self.fd: int | None = None
        self.problem: str | None = None  # why it cannot be followed at all
        self.over = False  # more than the limit came: the rest is read and dropped
        self.closed = False

    def pump(self) -> int:
        """Copy what is new; the number of bytes copied (0 also when the file is not there yet)."""
        if self.problem is not None or self.closed:
            return 0
        if self.fd is None:
            try:
                self.fd = open_guest_file(self.path, self.uid, writable=True)
            except RunDirError as exc:
                self.problem = str(exc)
                return 0
            if self.fd is None:
                return 0
        moved = 0
        for _ in range(READS_PER_PUMP):
            chunk = os.read(self.fd, READ_BYTES)
            if not chunk:
                break
            punch_hole(self.fd, self.read, len(chunk))
            self.read += len(chunk)
            keep = chunk[:max(0, self.limit - self.copied)]
            self.over = self.over or len(keep) < len(chunk)
            if not keep:
                continue  # read and dropped: it takes no room in the run directory
            try:
                _write_all(self.out, keep)
            except OSError as exc:
                # The batch system's output is gone (a closed pipe, a full disk): the job goes on without it.
                self.problem = f"cannot copy {self.path}: {exc.strerror}"
                return moved
            self.copied += len(keep)
            moved += len(keep)
        return moved

    def problems(self) -> list[str]:
        """Why it could not be followed, and whether its output went past the limit."""
        found = [self.problem] if self.problem else []
        if self.over:
            found.append(f"{self.path}: more than {self.limit} bytes; the rest is not copied")
        return found

    def close(self) -> None:
        """Stop following (the descriptor is closed); later pumps copy nothing."""
        self.closed = True
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class GuestOutput:
    """The guest's stdout and stderr (in ``control_dir``) followed into this process's fds 1 and 2."""

    def __init__(self, control_dir: str, uid: int, *, limit: int, stdout: int = 1, stderr: int = 2):
        self.files = [GuestFile(os.path.join(control_dir, "stdout"), stdout, uid, limit),
                      GuestFile(os.path.join(control_dir, "stderr"), stderr, uid, limit)]
        self.first_output = False

    def pump(self) -> bool:
        """Copy what is new in both; True when anything was copied."""
        moved = sum(f.pump() for f in self.files)
        if moved:
            self.first_output = True
        return moved > 0

    def problems(self) -> list[str]:
        """What could not be followed (a file that is not the user's regular file, a file past the limit)."""
        return [problem for f in self.files for problem in f.problems()]

    def close(self) -> None:
        """A last copy, then stop following."""
        self.pump()
        for f in self.files:
            f.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
