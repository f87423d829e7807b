"""The pilot's exit codes: one per kind of ending, so the LRM's job record tells what happened.

Every code except RESTORE_FAILED means the node's memory is as it was
before the pilot started (and RESTORE_FAILED leaves what is still taken in
the node journal, for ``workspace-killall`` or the next pilot).
"""

import enum

from workspace_common.exitcodes import ExitCodeRow, ExitTable


class ExitCode(enum.IntEnum):
    """Process exit status of ``workspace-pilot``; :data:`MEANING` explains each (``--help`` and
    docs/reference/exit-codes.md are made from it)."""

    OK = 0
    USAGE = 2
    CONFIG = 3
    LOCK_TIMEOUT = 4
    RESERVE_FAILED = 5
    SERVICE_UNREACHABLE = 6
    SERVICE_REFUSED = 7
    RESTORE_FAILED = 8
    UNDELIVERED = 9
    INTERNAL = 10
    JOURNAL = 11
    NOT_READY = 12


MEANING = {
    ExitCode.OK: "the lease ran and ended (deadline or signal); memory back; the service told",
    ExitCode.USAGE: "a bad command-line argument; nothing changed",
    ExitCode.CONFIG: "a bad or unreadable configuration file, log directory or backend setting; nothing changed",
    ExitCode.LOCK_TIMEOUT: "the node lock was not free in time, or its directory is unsafe; nothing changed",
    ExitCode.RESERVE_FAILED: "the memory could not be reserved (not enough, below minmem, not root, walltime too short); nothing kept",
    ExitCode.SERVICE_UNREACHABLE: "'reserved' could not be delivered in time; memory given back",
    ExitCode.SERVICE_REFUSED: (
        "the service refused 'reserved' (e.g. unknown slot, a node key it did not issue, a host not in the "
        "job's allocation, memory beyond the lease's); memory given back"
    ),
    ExitCode.RESTORE_FAILED: (
        "the memory could NOT be given back: the journal keeps it for workspace-killall or the next pilot"
    ),
    ExitCode.UNDELIVERED: "the node was restored, but 'unreserved' could not be delivered",
    ExitCode.INTERNAL: "an unexpected error (see the log); memory given back if it had been taken",
    ExitCode.JOURNAL: (
        "the node journal is unusable, or holds changes of dead pilots that could not be undone "
        "(run workspace-killall); nothing changed"
    ),
    ExitCode.NOT_READY: "evaluate: the node is not ready for pilots (each problem printed); nothing changed",
}


#: The table ``--help`` and docs/reference/exit-codes.md are made from.
EXITS = ExitTable("workspace-pilot", tuple(
    ExitCodeRow(int(code), MEANING[code], code.name.lower().replace("_", "-")) for code in ExitCode))
