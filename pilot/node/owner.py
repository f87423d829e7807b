"""Who owns a journal entry: a process named by pid, start time and boot, so a reused pid is not it.

A pid alone is not an identity: after a pilot dies its pid may be given to
an unrelated process. The kernel's start time of the process (clock ticks
since boot, ``/proc/<pid>/stat`` field 22) and the boot id tell them apart,
and a different boot id means every process of the entry's boot is gone.
"""

from __future__ import annotations

import dataclasses
import os
import select
import signal

_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str:
    """This boot's id (changes at every boot)."""
    with open(_BOOT_ID_PATH, encoding="ascii") as handle:
        return handle.read().strip()


def start_ticks(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot; None if it does not run.

    A zombie (exited, not yet reaped by its parent) does not run: it holds
    no locks and changes nothing any more.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            stat = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22 overall; 20th after pid and comm


@dataclasses.dataclass(frozen=True)
class Owner:
    """One process, for as long as it lives: pid, start ticks and boot id."""

    pid: int
    start: int
    boot: str

    @classmethod
    def current(cls) -> "Owner":
        """The calling process."""
        pid = os.getpid()
        return cls(pid, start_ticks(pid), boot_id())

    @classmethod
    def from_dict(cls, data: dict) -> "Owner":
        """Rebuild from :meth:`to_dict`; ValueError if fields are missing or of the wrong type."""
        pid, start, boot = data.get("pid"), data.get("start"), data.get("boot")
        if not (isinstance(pid, int) and isinstance(start, int) and isinstance(boot, str)):
            raise ValueError(f"not an owner record: {data!r}")
        return cls(pid, start, boot)

    def to_dict(self) -> dict:
        """A JSON-able record."""
        return {"pid": self.pid, "start": self.start, "boot": self.boot}

    def from_this_boot(self) -> bool:
        """Whether the owner ran in the current boot (changes it made may still be in effect)."""
        return self.boot == boot_id()

    def alive(self) -> bool:
        """Whether this very process still runs (same boot, pid present, same start time)."""
        return self.from_this_boot() and start_ticks(self.pid) == self.start

    def signal(self, signum: int) -> bool:
        """Send ``signum`` if this very process is alive; returns whether it was sent.

        A pidfd pins the process between the identity check and the kill, so
        a pid reused in between is never signalled.
        """
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return False
        try:
            if not self.alive():
                return False
            signal.pidfd_send_signal(pidfd, signum)
            return True
        except ProcessLookupError:
            return False
        finally:
            os.close(pidfd)

    def wait_gone(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for this process to end; returns whether it has.

        Uses a pidfd (readable when the process exits), so there is no polling.
        """
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return True
        try:
            if not self.alive():
                return True
            readable, _, _ = select.select([pidfd], [], [], max(timeout, 0))
            return bool(readable) or not self.alive()
        finally:
            os.close(pidfd)
