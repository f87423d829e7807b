"""What ``workspace-killall`` finds on a node and would do: the journal's entries, the tagged VMs, the plan.

:func:`make_plan` changes nothing (``workspace-node-status`` uses it too);
:class:`Report` prints each line as it comes and remembers whether
anything failed.
"""

from __future__ import annotations

import dataclasses

from pilot.config import PilotConfig
from pilot.node.journal import Entry, Journal, UnreadableEntry
from workspace_common.cli import silence
from workspace_common.errors import one_line


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


def describe(entry: Entry) -> str:
    """How the lines name an entry: its slot and host."""
    return f"slot {entry.slot} on {entry.host}"


def print_plan(plan: Plan, config: PilotConfig, report: Report, term_timeout: float) -> None:
    """What a run would do, one line per action."""
    for entry in plan.live:
        report.line(
            f"would stop pilot {entry.owner.pid} ({describe(entry)}): SIGTERM, SIGKILL after {term_timeout:g} s"
        )
    for domain, tag in plan.vms:
        report.line(f"would destroy VM {domain.name()} (slot {tag.slot}, pilot {tag.pilot_pid})")
    for entry in plan.entries:
        memory = entry.memory
        what = f"{memory.memory_mb} MB ({memory.backend}, phase {memory.phase})" if memory else "nothing taken yet"
        report.line(f"would restore {describe(entry)} of pilot {entry.owner.pid}: {what}")
        for name in entry.nets:
            report.line(f"would remove lease network {name} of {describe(entry)} (its bridge, VXLAN, nft tables "
                        "and dnsmasq)")
        if entry.contact and entry.sign_key:
            report.line(f"would tell {entry.contact} 'killed' for {describe(entry)}")
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
