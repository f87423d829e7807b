"""The ``none`` backend: takes nothing from the host."""

from __future__ import annotations

from pilot.node.backends.base import BalloonBackend, read_meminfo_kb


class NoBackend(BalloonBackend):
    """Changes nothing on the host: the level is always 0 and a lease's MB are only counted.

    This gives the lease NO protection: the host keeps all its memory and
    its own processes may use what the leased VMs were promised. It exists
    only for sites that size their VMs by other means (a batch system that
    already keeps the memory free, a dedicated node). Choosing it is an
    explicit configuration decision; the caller, not this backend, logs a
    loud warning whenever it is used.
    """

    name = "none"
    unit = "MB"

    def __init__(self, meminfo: str = "/proc/meminfo"):
        self.meminfo = meminfo

    def params(self) -> dict:
        """Nothing (the meminfo path when not the default)."""
        return {} if self.meminfo == "/proc/meminfo" else {"meminfo": self.meminfo}

    def read(self) -> int:
        """Always 0."""
        return 0

    def write(self, level: int) -> None:
        """Does nothing."""

    def units_for(self, memory_mb: int) -> int:
        """``memory_mb``, so the lease still carries its size."""
        return memory_mb

    def mb_of(self, units: int) -> int:
        """``units`` (the unit is MB)."""
        return units

    def level_after_take(self, level: int, units: int) -> int:
        """``level``, unchanged."""
        return level

    def level_after_give(self, level: int, units: int) -> int:
        """``level``, unchanged."""
        return level

    def host_mb(self, level: int) -> int:
        """The host's MemTotal in MB, whatever the level (nothing is ever taken)."""
        return read_meminfo_kb("MemTotal", self.meminfo) // 1024

    def boot_level(self, boot_mb: int | str) -> int:
        """Always 0."""
        return 0
