"""``workspace-vmjob``'s exit codes.

A job that ran ends with its command's own exit status (0-255), as it would
without a VM, so the batch system's record shows the command's code. The
wrapper's own endings use codes from 117 up (as ``docker run`` and
``timeout`` keep theirs at the top of the range): a command can exit with
them too, so each of them also prints one ``workspace-vmjob: ...`` line on
stderr. A signal that stops the job gives 128 + its number, as a shell does.
"""

import enum
import signal

from workspace_common.exitcodes import ExitCodeRow, ExitTable


class VmJobExit(enum.IntEnum):
    """The wrapper's own exit statuses; :data:`MEANING` explains each (``--help`` and
    docs/reference/exit-codes.md are made from it)."""

    INTERNAL = 117
    RESTORE_FAILED = 118
    JOURNAL = 119
    USAGE = 120
    CONFIG = 121
    IMAGE = 122
    ALLOCATION = 123
    VM_FAILED = 124
    STOPPED = 128 + signal.SIGTERM


MEANING = {
    VmJobExit.INTERNAL: "an unexpected error (see the log); the node restored if it could be",
    VmJobExit.RESTORE_FAILED: (
        "the VM or its memory could NOT be cleaned up: the journal keeps it for workspace-vmjob epilog or "
        "workspace-killall"
    ),
    VmJobExit.JOURNAL: "the node journal is unusable or its lock was not free in time; nothing changed",
    VmJobExit.USAGE: "a bad command-line argument, or not run as root or through the sudo rule; nothing changed",
    VmJobExit.CONFIG: "a bad configuration file, image list or run directory; nothing changed",
    VmJobExit.IMAGE: "the image is not on the node's list, or a file of it is missing or has another sha256; "
                     "nothing changed",
    VmJobExit.ALLOCATION: (
        "not inside a batch job of this user, more cores or memory than the job has here, or the job already "
        "runs a VM on this node; nothing changed"
    ),
    VmJobExit.VM_FAILED: (
        "the VM could not be started (memory, virtiofsd, libvirt), or it ended without an exit status; "
        "node restored"
    ),
    VmJobExit.STOPPED: "SIGTERM (scancel, qdel, walltime): the guest was shut down, its VM destroyed, node restored",
}


#: The table ``--help`` and docs/reference/exit-codes.md are made from.
EXITS = ExitTable("workspace-vmjob", tuple(
    ExitCodeRow(int(code), MEANING[code], code.name.lower().replace("_", "-")) for code in VmJobExit),
    preamble=(("0-255", "the command's own exit status, as the guest reported it"),))
