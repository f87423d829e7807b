"""Moments of one pilot's life on its own wall clock, sent in the notifications' ``timings``.

``lease-bench`` (``admin_tools/leasebench``) splits a lease's stand-up and
tear-down into phases from these and the service's own timestamps. Each
moment is one ``time.time()`` taken where the thing happens, kept once
(the first mark of a name wins), so recording them costs microseconds and
never touches the node or the network.
"""

from __future__ import annotations

import os
import time

from workspace_common.protocol import format_epoch


class Moments:
    """Named wall-clock moments (epoch seconds); :meth:`pick` renders some of them for the wire."""

    def __init__(self) -> None:
        self._at: dict[str, float] = {}

    def mark(self, name: str, at: float | None = None) -> None:
        """Note that ``name`` happened now (or at epoch ``at``); a name already marked keeps its first moment."""
        self._at.setdefault(name, time.time() if at is None else at)  # one dict op: safe across threads

    def pick(self, *names: str, prefix: str | None = None) -> dict[str, str] | None:
        """The protocol's ``timings`` for ``names`` (and every name starting with ``prefix``) that were marked.

        None when none was, so a notification without moments carries no field.
        """
        chosen = [n for n in names if n in self._at]
        if prefix is not None:
            chosen += sorted(n for n in list(self._at) if n.startswith(prefix) and n not in chosen)
        return {n: format_epoch(self._at[n]) for n in chosen} or None


def process_started_at(stat_path: str = "/proc/self/stat") -> float | None:
    """When this process started, in epoch seconds, to the kernel's clock tick (10 ms at USER_HZ=100).

    The kernel counts a process's start in ticks since boot; this turns that
    into the wall clock through CLOCK_BOOTTIME, not ``btime`` (whole seconds
    only). None where /proc cannot tell (the caller then uses its own first
    moment).
    """
    try:
        with open(stat_path, "rb") as handle:
            stat = handle.read()
        # The command name (field 2) may hold spaces and parentheses: count from the last ')'.
        fields = stat[stat.rindex(b")") + 2:].split()
        ticks = int(fields[19])  # field 22 of the whole line: starttime
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - max(age, 0.0)
