"""``workspace-node-status``: what the pilots hold on this node, read without changing anything.

It reads what ``workspace-killall --dry-run`` reads (the node journal, the libvirt domains
carrying the project's tag) and the memory backend's level now, and says for each journal
entry whether its pilot still runs. Nothing is locked, signalled or written: it is safe to
run at any moment, from monitoring too.

Exit codes: 0 the node is consistent (every journal entry's pilot runs, every tagged VM
belongs to one of them); 1 it needs attention (a dead pilot's entry, a tagged VM no live
pilot holds, an unreadable entry, a hypervisor or backend that could not be read: each is
one ``ATTENTION:`` line, or in ``attention`` with ``--json``); 2 a bad argument; 3 a bad
configuration file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from pilot.config import PilotConfig, load_node_tool_config
from pilot.node.journal import Journal, JournalError
from workspace_common.cli import OneLineParser, WrappingFormatter, quiet_on_closed_pipe
from workspace_common.errors import one_line
from workspace_common.exitcodes import ExitCodeRow, ExitTable

EXIT_CONSISTENT = 0
EXIT_ATTENTION = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3

EXITS = ExitTable("workspace-node-status", (
    ExitCodeRow(0, "consistent: every journal entry's pilot runs, every tagged VM belongs to one of them"),
    ExitCodeRow(1, "needs attention: a dead pilot's entry, a tagged VM that no live pilot holds, an unreadable entry, "
                   "a hypervisor or memory backend that could not be read (workspace-killall --dry-run shows what "
                   "it would do about them)"),
    ExitCodeRow(2, "a bad command-line argument"),
    ExitCodeRow(3, "a bad or unreadable configuration file"),
))
EXIT_HELP = EXITS.help()


def build_parser() -> argparse.ArgumentParser:
    """The command line, every option explained in ``--help``."""
    parser = OneLineParser(
        prog="workspace-node-status",
        description=(
            "Show what pilots hold on this node: each journal entry (slot, host, pilot pid and whether "
            "it still runs, the memory it took and through which backend, whether it may have VMs), "
            "each VM tagged by a pilot, and the memory backend's level now. Reads only: no lock, no "
            "signal, no write. Run as root (the journal is root's)."
        ),
        epilog=EXIT_HELP, formatter_class=WrappingFormatter,
    )
    parser.add_argument("--config", metavar="FILE",
                        help="the pilot configuration (default /etc/workspace-pilot/pilot.conf if it exists)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    return parser


def survey(config: PilotConfig) -> dict:
    """Everything the status shows, as JSON-able data; ``attention`` lists what is not consistent."""
    from admin_tools.killplan import make_plan

    status: dict = {"journal_dir": config.journal_dir, "backend": None, "entries": [], "unreadable": [],
                    "vms": [], "notes": [], "attention": []}
    journal = Journal(config.journal_dir, config.lock_timeout_s)
    if os.path.isdir(config.journal_dir):
        try:
            journal.check()
        except JournalError as exc:
            status["attention"].append(str(exc))
            return status
    try:
        plan = make_plan(config, journal, read_only=True)
    except JournalError as exc:  # e.g. not root: the journal is root's alone
        status["attention"].append(str(exc))
        return status
    try:
        live_slots = set()
        for entry in plan.entries:
            alive = entry.owner.alive()
            memory = entry.memory
            status["entries"].append({
                "slot": entry.slot, "host": entry.host, "pilot_pid": entry.owner.pid, "alive": alive,
                "memory_mb": memory.memory_mb if memory else 0, "backend": memory.backend if memory else None,
                "phase": memory.phase if memory else None, "vm_uri": entry.vm_uri,
                "fetching": list(entry.fetching), "contact": entry.contact,
            })
            if alive:
                live_slots.add(entry.slot)
            else:
                status["attention"].append(
                    f"pilot {entry.owner.pid} of slot {entry.slot} on {entry.host} is gone and its journal entry "
                    "is still there: the next pilot or workspace-killall undoes it")
        for bad in plan.unreadable:
            status["unreadable"].append({"file": bad.filename, "reason": bad.reason})
            status["attention"].append(f"journal entry {bad.filename} is unreadable ({bad.reason})")
        for domain, tag in plan.vms:
            status["vms"].append({"name": domain.name(), "slot": tag.slot, "lease": tag.lease,
                                  "pilot_pid": tag.pilot_pid, "state": _state(domain),
                                  "memory_mb": domain.maxMemory() // 1024})
            if tag.slot not in live_slots:
                status["attention"].append(f"VM {domain.name()} of slot {tag.slot} runs, and no live pilot holds "
                                           "that slot")
        status["attention"] += [f"cannot check VMs: {problem}" for problem in plan.libvirt_problems]
        status["notes"] = list(plan.notes)
    finally:
        for conn in plan.conns:
            conn.close()
    status["backend"] = _backend_now(config, status["attention"])
    return status


def _state(domain) -> str:
    try:
        code = domain.state()[0]
    except Exception:  # libvirtError: it went away between the listing and now
        return "gone"
    return {0: "no state", 1: "running", 2: "blocked", 3: "paused", 4: "shutting down", 5: "shut off",
            6: "crashed", 7: "suspended"}.get(code, f"state {code}")


def _backend_now(config: PilotConfig, attention: list[str]) -> dict:
    from pilot.node.backends import BackendError, backend_from_config

    try:
        backend = backend_from_config(config)
        try:
            level = backend.read()
            return {"name": backend.name, "describe": backend.describe(), "level": level,
                    "unit": backend.unit, "host_mb": backend.host_mb(level)}
        finally:
            backend.close()
    except BackendError as exc:
        attention.append(f"cannot read the {config.backend} backend: {one_line(exc)}")
        return {"name": config.backend, "error": one_line(exc)}


def print_tables(status: dict, out) -> None:
    """The status as short tables, one problem per ``ATTENTION:`` line at the end."""
    backend = status["backend"] or {}
    if "level" in backend:
        print(f"memory backend {backend['describe']}: {backend['level']} {backend['unit']} now "
              f"(the host keeps {backend['host_mb']} MB)", file=out)
    print(f"journal {status['journal_dir']}: {len(status['entries'])} entr{'y' if len(status['entries']) == 1 else 'ies'}"
          f", {len(status['vms'])} tagged VM(s)", file=out)
    if status["entries"]:
        rows = [("SLOT", "HOST", "PILOT", "RUNS", "MEMORY", "PHASE", "VMS AT")] + [
            (e["slot"], e["host"], str(e["pilot_pid"]), "yes" if e["alive"] else "NO",
             f"{e['memory_mb']} MB {e['backend']}" if e["backend"] else "-", e["phase"] or "-", e["vm_uri"] or "-")
            for e in status["entries"]]
        _table(rows, out)
    if status["vms"]:
        rows = [("VM", "SLOT", "LEASE", "PILOT", "STATE", "MEMORY")] + [
            (v["name"], v["slot"], v["lease"] or "-", str(v["pilot_pid"]), v["state"], f"{v['memory_mb']} MB")
            for v in status["vms"]]
        _table(rows, out)
    for note in status["notes"]:
        print(note, file=out)
    for problem in status["attention"]:
        print(f"ATTENTION: {problem}", file=out)
    if not status["attention"]:
        print("consistent: every entry's pilot runs, every tagged VM is held", file=out)


def _table(rows: list[tuple[str, ...]], out) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip(), file=out)


@quiet_on_closed_pipe
def main(argv: list[str] | None = None, out=None) -> int:
    """Entry point of ``workspace-node-status``; returns its exit code (141 when its reader went away)."""
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    config = load_node_tool_config("workspace-node-status", args.config)
    if config is None:
        return EXIT_CONFIG
    status = survey(config)
    status["at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if args.json:
        json.dump(status, out, indent=1)
        out.write("\n")
    else:
        print_tables(status, out)
    return EXIT_ATTENTION if status["attention"] else EXIT_CONSISTENT


if __name__ == "__main__":
    sys.exit(main())
