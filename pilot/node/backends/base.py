"""The interface every balloon backend implements.

A backend knows one knob on the host and nothing else: how to read its
current *level*, how to ask for another level, and how a lease's memory
maps onto levels. Everything that makes a change safe (the node lock, the
write-ahead journal, the ``minmem`` floor, verification within a timeout,
undoing a partial change) lives in :mod:`pilot.node.memory`, once for all
backends.

Levels are integers in the backend's own unit (``unit``): hugepages count
pages in the pool (taking memory raises the level), Xen counts dom0's KiB
(taking lowers it), a cgroup counts its limit in bytes. Takes and gives
are *relative* to the current level, so two pilots on one node compose
and may end in either order.
"""

from __future__ import annotations

import abc


class BackendError(Exception):
    """A backend could not read or change memory; the message says why and what to do."""


def read_meminfo_kb(field: str, path: str = "/proc/meminfo") -> int:
    """One ``/proc/meminfo`` field in kB (``MemTotal``, ``Hugetlb``, ...); BackendError if absent."""
    try:
        with open(path, encoding="ascii") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                if name == field:
                    return int(rest.split()[0])
    except OSError as exc:
        raise BackendError(f"cannot read {path}: {exc.strerror}") from None
    raise BackendError(f"{path} has no {field} line")


class BalloonBackend(abc.ABC):
    """One way to take memory from the host for a lease and give it back.

    Implementations are small and stateless beyond their parameters:
    :meth:`params` must be enough for :func:`pilot.node.backends.make_backend`
    to rebuild an equal backend from the journal in another process.
    Callers hold the node lock around :meth:`write`.
    """

    #: The name in the configuration and the journal.
    name: str
    #: The unit of levels, for log lines ("pages", "KiB", "MB", "bytes").
    unit: str

    @abc.abstractmethod
    def params(self) -> dict:
        """JSON-able keyword arguments that rebuild this backend (see ``make_backend``)."""

    @abc.abstractmethod
    def read(self) -> int:
        """The current level; raises BackendError if it cannot be read."""

    @abc.abstractmethod
    def write(self, level: int) -> None:
        """Ask the host for ``level``; it may take effect later (callers verify with :meth:`read`).

        Raises BackendError when the host refuses outright (the old level stays).
        """

    @abc.abstractmethod
    def units_for(self, memory_mb: int) -> int:
        """How many units a lease of ``memory_mb`` takes (rounded up to whole units, >= 0)."""

    @abc.abstractmethod
    def mb_of(self, units: int) -> int:
        """The memory in MB that ``units`` taken give the lease's VMs."""

    @abc.abstractmethod
    def level_after_take(self, level: int, units: int) -> int:
        """The level after taking ``units`` more from the host at ``level``."""

    @abc.abstractmethod
    def level_after_give(self, level: int, units: int) -> int:
        """The level after giving ``units`` back to the host at ``level``."""

    @abc.abstractmethod
    def host_mb(self, level: int) -> int:
        """The host's own memory in MB at ``level`` (what the ``minmem`` floor protects)."""

    @abc.abstractmethod
    def boot_level(self, boot_mb: int | str) -> int:
        """The level ``[memory] boot_mb`` stands for: killall's target when the journal is gone.

        ``boot_mb`` is an int (MB, in this backend's sense: dom0's memory,
        the pool's size, the cgroup's limit) or ``"max"`` (no cgroup limit).
        Raises BackendError for a value this backend cannot use.
        """

    def reached(self, level: int, target: int) -> bool:
        """Whether a read ``level`` counts as ``target`` (exact unless the host rounds)."""
        return level == target

    def describe(self) -> str:
        """A short human description for logs and ``evaluate``."""
        detail = ", ".join(f"{key}={value}" for key, value in sorted(self.params().items()))
        return f"{self.name} ({detail})" if detail else self.name

    def close(self) -> None:
        """Release connections the backend holds (libvirt); safe to call twice."""
