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

``--dry-run`` prints the plan and changes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
import time

from pilot.node.backends import BackendError, backend_from_config
from pilot.config import DEFAULT_PATH, PilotConfig, load_node_tool_config
from pilot.node.journal import Entry, Journal, JournalError, UnreadableEntry
from pilot.node.lock import NodeLockError
from pilot.node.memory import settle
from pilot.recovery import replay_dead
from workspace_common.cli import OneLineParser, WrappingFormatter, silence
from workspace_common.errors import one_line
from workspace_common.exitcodes import ExitCodeRow, ExitTable
from pilot.vm.cleanup import destroy_domain

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


@dataclasses.dataclass
class Plan:
    """What is on the node now, and so what kill-all will do."""

    entries: list[Entry]
    unreadable: list[UnreadableEntry]
    vms: list[tuple[object, object]]  # (libvirt domain, VmTag)
    libvirt_problems: list[str]  # hypervisors where VMs may run that could not be checked
    conns: list[object]  # open libvirt connections, one per URI checked
    notes: list[str] = dataclasses.field(default_factory=list)  # e.g. "no hypervisor running at ..."

    @property
    def live(self) -> list[Entry]:
        """Entries whose owner pilot still runs."""
        return [entry for entry in self.entries if entry.owner.alive()]

    @property
    def empty(self) -> bool:
        """Nothing journalled, nothing tagged, nothing unknown."""
        return not (self.entries or self.unreadable or self.vms or self.libvirt_problems)


class Report:
    """Lines for the administrator, and whether anything failed."""

    def __init__(self, out):
        self.out = out
        self.failed = False

    def line(self, text: str) -> None:
        """Print one line at once (the admin may be watching a slow step).

        A reader that went away (``workspace-killall | head -1``) stops the
        printing, never the backout: a half-done kill-all is what this tool
        exists to prevent.
        """
        if self.out is None:
            return
        try:
            print(text, file=self.out, flush=True)
        except (BrokenPipeError, ValueError):  # ValueError: the stream was closed
            silence(self.out)
            self.out = None

    def problem(self, text: str) -> None:
        """Print a problem; the node will not count as clean."""
        self.failed = True
        self.line(f"PROBLEM: {text}")


def _open_libvirt(uri: str, read_only: bool):
    """(connection, None), or (None, why it could not connect)."""
    from pilot.libvirtconn import libvirt_module, open_connection

    try:
        libvirt = libvirt_module()
    except ImportError as exc:
        return None, f"libvirt-python is missing ({exc})"
    try:
        conn = open_connection(uri, read_only=read_only)
    except libvirt.libvirtError as exc:
        return None, f"cannot connect to libvirt at {uri}: {one_line(exc)}"
    return conn, None


def make_plan(config: PilotConfig, journal: Journal, *, read_only: bool) -> Plan:
    """Look at the node: journal entries, tagged VMs. Changes nothing.

    libvirt is checked where the journal says VMs may have run (each
    entry's ``vm_uri``; the configured URI too when an entry is
    unreadable): not reaching it there is a problem. The configured URI
    is also checked when its daemon answers; when it does not and no
    entry points at it, that is only noted: no hypervisor runs, so no VM
    of a pilot's can.
    """
    from pilot.vm.tag import tagged_domains

    found = journal.entries()
    entries = [e for e in found if isinstance(e, Entry)]
    unreadable = [e for e in found if isinstance(e, UnreadableEntry)]
    journalled = {e.vm_uri for e in entries if e.vm_uri}
    if unreadable and config.vm_uri:
        journalled.add(config.vm_uri)
    plan = Plan(entries, unreadable, [], [], [])
    for uri in sorted(journalled | ({config.vm_uri} if config.vm_uri else set())):
        conn, problem = _open_libvirt(uri, read_only)
        if conn is None:
            if uri in journalled:
                plan.libvirt_problems.append(f"{problem} (a journal entry says VMs may run there)")
            else:
                plan.notes.append(f"no hypervisor running at {uri} (and no journal entry has VMs there)")
            continue
        plan.conns.append(conn)
        try:
            plan.vms += tagged_domains(conn)
        except Exception as exc:  # libvirtError, without importing libvirt at module level
            plan.libvirt_problems.append(f"cannot list the VMs at {uri}: {one_line(exc)}")
    return plan


def _describe(entry: Entry) -> str:
    return f"slot {entry.slot} on {entry.host}"


def print_plan(plan: Plan, config: PilotConfig, report: Report, term_timeout: float) -> None:
    """What a run would do, one line per action."""
    for entry in plan.live:
        report.line(
            f"would stop pilot {entry.owner.pid} ({_describe(entry)}): SIGTERM, SIGKILL after {term_timeout:g} s"
        )
    for domain, tag in plan.vms:
        report.line(f"would destroy VM {domain.name()} (slot {tag.slot}, pilot {tag.pilot_pid})")
    for entry in plan.entries:
        memory = entry.memory
        what = f"{memory.memory_mb} MB ({memory.backend}, phase {memory.phase})" if memory else "nothing taken yet"
        report.line(f"would restore {_describe(entry)} of pilot {entry.owner.pid}: {what}")
        for name in entry.nets:
            report.line(f"would remove lease network {name} of {_describe(entry)} (its bridge, VXLAN, nft tables "
                        "and dnsmasq)")
        if entry.contact and entry.sign_key:
            report.line(f"would tell {entry.contact} 'killed' for {_describe(entry)}")
    for bad in plan.unreadable:
        action = (
            f"would return the {config.backend} backend to boot_mb = {config.boot_mb}"
            if config.boot_mb is not None else "cannot judge it: set [memory] boot_mb or inspect it by hand"
        )
        report.line(f"unreadable journal entry {bad.filename} ({bad.reason}): {action}")
    for problem in plan.libvirt_problems:
        report.line(f"cannot check VMs: {problem}")
    for note in plan.notes:
        report.line(note)
    if plan.empty:
        report.line("nothing to do: no journal entries, no tagged VMs")


def stop_owners(entries: list[Entry], journal: Journal, term_timeout: float, report: Report) -> None:
    """SIGTERM every live owner, wait for all within ``term_timeout``, SIGKILL the rest.

    One still running at the timeout is told apart by its journal entry:
    gone means it restored the node and was only still telling the service
    (a line, not a problem: kill-all tells the service 'killed' itself);
    still there means it was stuck, and the restore below undoes the entry.
    """
    started = time.monotonic()
    termed = [entry for entry in entries if entry.owner.signal(signal.SIGTERM)]
    deadline = started + term_timeout
    for entry in termed:
        if entry.owner.wait_gone(deadline - time.monotonic()):
            report.line(
                f"stopped pilot {entry.owner.pid} ({_describe(entry)}) with SIGTERM in "
                f"{(time.monotonic() - started) * 1000:.1f} ms"
            )
            continue
        restored = not journal.holds(entry)
        entry.owner.signal(signal.SIGKILL)
        if not entry.owner.wait_gone(5.0):
            report.problem(f"pilot {entry.owner.pid} ({_describe(entry)}) survived SIGKILL (stuck in the kernel?)")
        elif restored:
            report.line(
                f"pilot {entry.owner.pid} ({_describe(entry)}) had restored the node but was still telling "
                f"the service after {term_timeout:g} s: killed it with SIGKILL (nothing of the node's was left with it)"
            )
        else:
            report.line(
                f"pilot {entry.owner.pid} ({_describe(entry)}) was stuck: {term_timeout:g} s after SIGTERM its "
                "journal entry was still there; killed it with SIGKILL (its entry is undone below)"
            )


def destroy_vms(vms, report: Report) -> None:
    """Destroy every tagged VM (and undefine the persistent ones)."""
    for domain, tag in vms:
        name = domain.name()
        t0 = time.monotonic()
        try:
            gone_before = not destroy_domain(domain)
        except Exception as exc:  # libvirtError
            report.problem(f"could not destroy VM {name} (slot {tag.slot}): {one_line(exc)}")
            continue
        if gone_before:
            # Its pilot destroyed it on the SIGTERM above: what we wanted.
            report.line(f"VM {name} (slot {tag.slot}) was already gone (its pilot destroyed it)")
            continue
        report.line(f"destroyed VM {name} (slot {tag.slot}) in {(time.monotonic() - t0) * 1000:.1f} ms")


def restore_memory(config: PilotConfig, journal: Journal, report: Report) -> None:
    """Under the node lock: undo dead owners' entries; else return to the boot value if configured."""
    try:
        with journal.lock():
            replay = replay_dead(journal, config.verify_timeout_s)
            for entry, done in replay.undone:
                report.line(f"restored {_describe(entry)} of pilot {entry.owner.pid}: {done}")
            for entry, why in replay.failed:
                report.problem(f"could not restore {_describe(entry)} of pilot {entry.owner.pid}: {why}")
            _remove_partial_images(config, [entry for entry, _ in replay.undone], report)
            for entry in replay.live:
                report.problem(f"pilot {entry.owner.pid} ({_describe(entry)}) still runs; its entry stays")
            if config.boot_mb is not None and not replay.live and not replay.failed:
                _return_to_boot(config, journal, replay.unreadable, report)
            else:
                for bad in replay.unreadable:
                    report.problem(
                        f"journal entry {bad.filename} is unreadable ({bad.reason}); set [memory] boot_mb "
                        "so kill-all can return the node to its boot state, or inspect it by hand"
                    )
    except (NodeLockError, JournalError) as exc:
        report.problem(str(exc))


def _remove_partial_images(config: PilotConfig, undone: list[Entry], report: Report) -> None:
    """Remove the partial image downloads the undone entries' dead pilots left (a pilot would resume them)."""
    fetching = sorted({sha256 for entry in undone for sha256 in entry.fetching})
    if not fetching:
        return
    from pilot.images.cache import ImageCache

    removed = ImageCache(config.image_cache_dir, 0).remove_partials(fetching)
    for sha256 in removed:
        report.line(f"removed the partial download of image {sha256} from {config.image_cache_dir}")


def _return_to_boot(config: PilotConfig, journal: Journal, unreadable, report: Report) -> None:
    """Set the configured backend to its boot level (no live pilot is left to share it with)."""
    try:
        backend = backend_from_config(config)
        try:
            target = backend.boot_level(config.boot_mb)
            level = backend.read()
            if not backend.reached(level, target):
                backend.write(target)
                got = settle(backend, target, config.verify_timeout_s)
                if not backend.reached(got, target):
                    raise BackendError(f"asked for {target} {backend.unit}, still at {got}")
                report.line(f"returned {backend.name} to its boot value: {level} -> {got} {backend.unit}")
        finally:
            backend.close()
    except BackendError as exc:
        report.problem(f"could not return the {config.backend} backend to boot_mb = {config.boot_mb}: {exc}")
        return
    for bad in unreadable:
        journal.remove(bad)
        report.line(f"cleared unreadable journal entry {bad.filename} (the node is at its boot value)")


def _preload_notifier(plan: Plan, config: PilotConfig, no_notify: bool):
    """Import the HTTP stack (requests: ~70 ms) in a thread, overlapping the waits on pilots and libvirt."""
    if no_notify or not any(entry.contact for entry in plan.entries):
        return None
    import importlib
    import threading

    thread = threading.Thread(target=importlib.import_module, args=("pilot.notifier",), daemon=True)
    thread.start()
    return thread


def notify_killed(plan: Plan, config: PilotConfig, report: Report) -> None:
    """Tell each slot's service ``killed`` (in parallel, bounded by the request timeout; one try where nothing answers)."""
    from pilot.credentials import CredentialError, PilotCredentials, node_key_path, read_node_key
    from pilot.notifier import Notifier, Outcome

    # seq must exceed every seq the pilot used for this (slot, host): microseconds since the
    # epoch are far above any pilot's counter and grow if kill-all runs twice.
    first_seq = time.time_ns() // 1000
    pending = []
    for entry in plan.entries:
        if not entry.contact:
            continue
        if not entry.sign_key:
            report.line(f"not telling {entry.contact} about {_describe(entry)}: its journal entry holds no key")
            continue
        try:
            node_key = read_node_key(node_key_path(config.node_key_file, entry.host))
        except CredentialError as exc:
            report.line(f"not telling {entry.contact} about {_describe(entry)}: {exc}")
            continue
        vms = sorted(domain.name() for domain, tag in plan.vms if tag.slot == entry.slot)
        notifier = Notifier(
            entry.contact, PilotCredentials(entry.host, node_key, entry.sign_key), entry.slot, entry.host,
            request_timeout=config.request_timeout_s, verify_tls=config.tls_verify, first_seq=first_seq,
        )
        # An emergency backout does not wait on a service that nothing answers for: one try,
        # and the line below says it was undelivered. One that answers (a 503) gets the retries.
        notifier.give_up_if_silent_before(math.inf)
        delivery = notifier.notify(
            "killed", 0, vms=vms, deliver_within=config.request_timeout_s,
            message=f"workspace-killall on {os.uname().nodename} (uid {os.getuid()})",
        )
        pending.append((entry, notifier, delivery))
    for entry, notifier, delivery in pending:
        outcome = delivery.wait(config.request_timeout_s + 1)
        notifier.close()
        detail = "" if outcome is Outcome.DELIVERED else f" ({delivery.status or ''} {delivery.detail})".rstrip()
        report.line(f"told {entry.contact} 'killed' for {_describe(entry)}: {outcome.value if outcome else 'undelivered'}{detail}")


def check_clean(config: PilotConfig, journal: Journal, plan: Plan, report: Report) -> None:
    """Look again: the node is clean only if nothing of any pilot is left."""
    from pilot.vm.tag import tagged_domains

    left = journal.entries()
    if left:
        report.problem(f"{len(left)} journal entr{'y' if len(left) == 1 else 'ies'} left: "
                       + ", ".join(e.filename for e in left))
    for conn in plan.conns:
        vms = tagged_domains(conn)
        if vms:
            report.problem("tagged VMs left: " + ", ".join(domain.name() for domain, _ in vms))
    for problem in plan.libvirt_problems:
        report.problem(f"cannot check VMs: {problem}")
    for note in plan.notes:
        report.line(note)
    for entry in plan.entries:
        if entry.owner.alive():
            report.problem(f"pilot {entry.owner.pid} ({_describe(entry)}) still runs")


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
        preload = _preload_notifier(plan, config, args.no_notify)
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
