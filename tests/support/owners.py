"""Journal owners that no longer run, for the tests of what undoes a dead pilot's entry."""

from __future__ import annotations

import subprocess
import sys

from pilot.node.owner import Owner, boot_id, start_ticks


def dead_owner() -> Owner:
    """The identity of a process that ran and has ended."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    owner = Owner(child.pid, start_ticks(child.pid), boot_id())
    child.communicate(b"")
    return owner
