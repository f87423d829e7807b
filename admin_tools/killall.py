"""``workspace-killall``: the node-level emergency backout.

For every entry in the node journal and every libvirt domain that carries
the project's tag, it

1. stops the entry's owner pilot if it still runs: by pid, checked against
   the journalled start time (never by process name); SIGTERM first, so
   the pilot restores the node itself, then SIGKILL after a timeout;
2. destroys the tagged VMs (all of them: this is the node's backout);
3. undoes what the journal says is still taken, under the node lock, and
   clears the entries (and removes the partial image downloads they name); with no usable journal, puts the backend back to
   the configured boot value (``[memory] boot_mb``, e.g. dom0_mem);
4. tells the service ``killed`` for each slot whose contact is known;
5. prints what it did, and exits 0 only if the node is clean afterwards.

What it finds is :mod:`admin_tools.killplan`; each step is
:mod:`admin_tools.killsteps`.

``--dry-run`` prints the plan and changes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from admin_tools.killplan import Report, make_plan, print_plan
from admin_tools.killsteps import (
    check_clean, destroy_vms, notify_killed, preload_notifier, restore_memory, stop_owners,
)
from pilot.config import DEFAULT_PATH, load_node_tool_config
from pilot.node.journal import Journal, JournalError
from workspace_common.cli import OneLineParser, WrappingFormatter
from workspace_common.exitcodes import ExitCodeRow, ExitTable

EXIT_CLEAN = 0
EXIT_NOT_CLEAN = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3

EXITS = ExitTable("workspace-killall", (
    ExitCodeRow(0, "the node is clean: no journal entries, no tagged VMs, no live pilots of the journal, memory at "
                   "the boot value (when [memory] boot_mb is set); with --dry-run: already clean. A configured "
                   "libvirt that does not answer is only noted (\"no hypervisor running\") unless a journal entry "
                   "says VMs may run there"),
    ExitCodeRow(1, "something could not be undone (each problem printed); with --dry-run: there is work to do"),
    ExitCodeRow(2, "a bad command-line argument"),
    ExitCodeRow(3, "a bad or unreadable configuration file"),
))
EXIT_HELP = EXITS.help()


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} must be from 0 to 3600 seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line, every option explained in ``--help``."""
    parser = OneLineParser(
        prog="workspace-killall",
        description=(
            "Emergency backout of this node: stop every pilot in the node journal (SIGTERM, then "
            "SIGKILL; by pid checked against its start time), destroy every VM tagged by a pilot, "
            "give back the memory the journal says is taken (or return to [memory] boot_mb when "
            "the journal is unusable), clear the journal, and tell the service 'killed' where its "
            "contact is known. Run as root on the node."
        ),
        epilog=EXIT_HELP,
        formatter_class=WrappingFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help=f"the pilots' configuration file (default {DEFAULT_PATH} if it exists)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    parser.add_argument(
        "--term-timeout", type=_seconds, default=10.0, metavar="SECONDS",
        help="how long a pilot gets after SIGTERM to restore and exit before SIGKILL (default 10)",
    )
    parser.add_argument("--no-notify", action="store_true", help="do not tell the service 'killed'")
    return parser


def main(argv: list[str] | None = None, out=None) -> int:
    """Entry point of ``workspace-killall``; returns its exit code."""
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    config = load_node_tool_config("workspace-killall", args.config)
    if config is None:
        return EXIT_CONFIG
    journal = Journal(config.journal_dir, config.lock_timeout_s)
    report = Report(out)
    try:
        if os.path.isdir(config.journal_dir):
            journal.check()
        elif not args.dry_run:
            journal.prepare()  # no journal yet: nothing of a pilot's, but the lock lives there
        plan = make_plan(config, journal, read_only=args.dry_run)
    except JournalError as exc:
        report.problem(f"{exc}; fix it by hand first")
        return EXIT_NOT_CLEAN
    try:
        if args.dry_run:
            print_plan(plan, config, report, args.term_timeout)
            return EXIT_CLEAN if plan.empty else EXIT_NOT_CLEAN
        preload = preload_notifier(plan, config, args.no_notify)
        stop_owners(plan.live, journal, args.term_timeout, report)
        destroy_vms(plan.vms, report)
        restore_memory(config, journal, report)
        if preload is not None:
            preload.join()
            notify_killed(plan, config, report)
        check_clean(config, journal, plan, report)
    finally:
        for conn in plan.conns:
            conn.close()
    elapsed = (time.monotonic() - started) * 1000
    if report.failed:
        report.line(f"node NOT clean after {elapsed:.1f} ms (problems above)")
        return EXIT_NOT_CLEAN
    report.line(f"node clean: no journal entries, no tagged VMs, no live pilots ({elapsed:.1f} ms)")
    return EXIT_CLEAN


if __name__ == "__main__":
    sys.exit(main())
