"""What every part of ``workspace-lease`` shares: the exit codes (and their --help text) and the one error line."""

from __future__ import annotations

import sys

from service_adapter.safetext import printable
from workspace_common.exitcodes import ExitCodeRow, ExitTable

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_UNREACHABLE = 4
EXIT_REFUSED = 5
EXIT_NOT_FOUND = 6
EXIT_TIMEOUT = 7
EXIT_CONFLICT = 8
EXIT_UNTRUSTED = 9
EXIT_ENVIRONMENT = EXIT_CONFIG  # the demo's "cannot run here" (kept for its callers)

EXIT_CODES = {  # --help and docs/reference/exit-codes.md are made from these (tests/test_reference.py checks)
    EXIT_OK: "success (with --wait: the lease or the VMs reached the state waited for)",
    EXIT_FAILED: "the lease failed, or ended failed or missing; or the batch system refused the job; or the "
                 "demo's lease failed; or (vm ... --wait) a VM failed, was lost, or did not stop",
    EXIT_USAGE: "bad arguments or a malformed VM spec, found before anything is sent (or a request the service "
                "found invalid: 400)",
    EXIT_CONFIG: "bad or unreadable configuration, secret or accounts file; serve cannot listen or open its store "
                 "or log; the demo cannot run here",
    EXIT_UNREACHABLE: "the service could not be reached, or did not answer within --timeout, or cannot serve now "
                      "(503: its store's database is away; try again)",
    EXIT_REFUSED: "the service refused the credentials (401/403), or holds back this address after too many "
                  "failed logins (429)",
    EXIT_NOT_FOUND: "no such lease, VM, image or image list (404)",
    EXIT_TIMEOUT: "--wait gave up (after --timeout seconds; vm: after its --wait SECONDS); the lease or VM goes on",
    EXIT_CONFLICT: "the service refused a request as the lease stands (409): the lease is not ready or running, "
                   "a VM name is in use, the VMs do not fit its hosts, an image is not endorsed and approved, "
                   "the VM has ended already or is not running (suspend) or paused (resume); or an extension the "
                   "batch system or the partition's limit refused; nothing was queued or changed",
    EXIT_UNTRUSTED: "an image list was refused (bad signature, untrusted endorser key, expired, malformed); "
                    "nothing changed",
}
EXITS = ExitTable("workspace-lease", tuple(ExitCodeRow(code, text) for code, text in EXIT_CODES.items()))
EXIT_CODES_HELP = EXITS.help()
#: ``workspace-lease demo``'s own: a subset, said its way.
DEMO_EXITS = ExitTable("workspace-lease demo", (
    ExitCodeRow(EXIT_OK, "the lease (and its VM) ran and ended; the node is as it was"),
    ExitCodeRow(EXIT_FAILED, "the lease or its VM failed (each pilot's reason and log are printed)"),
    ExitCodeRow(EXIT_USAGE, "bad arguments, also --vm with more than one node or too little memory; nothing leased"),
    ExitCodeRow(EXIT_ENVIRONMENT, "cannot run here: not root, no hugepages, libvirtd does not start"),
    ExitCodeRow(130, "stopped by ^C (SIGINT; 143 SIGTERM, 129 SIGHUP): the lease released, the node given back"),
))

UP_STATES = ("ready", "running")
FAILED_STATES = ("failed", "missing")


def say(text: str) -> None:
    """One line on stderr, escaped (it may quote what a pilot or the service wrote)."""
    print(f"workspace-lease: {printable(text)}", file=sys.stderr)


class Exit(Exception):
    """Leave a command with ``code`` (its line already said)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code
