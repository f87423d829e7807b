"""The steps of ``workspace-killall``, in the order it takes them: stop the pilots, destroy the tagged VMs,
restore the memory (under the node lock), tell the services, and look again.

Each step reports through a :class:`admin_tools.killplan.Report` and goes
on after a problem: a half-done backout is what this tool exists to
prevent.
"""

from __future__ import annotations

import math
import os
import signal
import time

from admin_tools.killplan import Plan, Report, describe
from pilot.config import PilotConfig
from pilot.node.backends import BackendError, backend_from_config
from pilot.node.journal import Entry, Journal, JournalError
from pilot.node.lock import NodeLockError
from pilot.node.memory import settle
from pilot.recovery import replay_dead
from pilot.vm.cleanup import destroy_domain
from workspace_common.errors import one_line


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
                f"stopped pilot {entry.owner.pid} ({describe(entry)}) with SIGTERM in "
                f"{(time.monotonic() - started) * 1000:.1f} ms"
            )
            continue
        restored = not journal.holds(entry)
        entry.owner.signal(signal.SIGKILL)
        if not entry.owner.wait_gone(5.0):
            report.problem(f"pilot {entry.owner.pid} ({describe(entry)}) survived SIGKILL (stuck in the kernel?)")
        elif restored:
            report.line(
                f"pilot {entry.owner.pid} ({describe(entry)}) had restored the node but was still telling "
                f"the service after {term_timeout:g} s: killed it with SIGKILL (nothing of the node's was left with it)"
            )
        else:
            report.line(
                f"pilot {entry.owner.pid} ({describe(entry)}) was stuck: {term_timeout:g} s after SIGTERM its "
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
                report.line(f"restored {describe(entry)} of pilot {entry.owner.pid}: {done}")
            for entry, why in replay.failed:
                report.problem(f"could not restore {describe(entry)} of pilot {entry.owner.pid}: {why}")
            _remove_partial_images(config, [entry for entry, _ in replay.undone], report)
            for entry in replay.live:
                report.problem(f"pilot {entry.owner.pid} ({describe(entry)}) still runs; its entry stays")
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


def preload_notifier(plan: Plan, config: PilotConfig, no_notify: bool):
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
            report.line(f"not telling {entry.contact} about {describe(entry)}: its journal entry holds no key")
            continue
        try:
            node_key = read_node_key(node_key_path(config.node_key_file, entry.host))
        except CredentialError as exc:
            report.line(f"not telling {entry.contact} about {describe(entry)}: {exc}")
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
        report.line(f"told {entry.contact} 'killed' for {describe(entry)}: {outcome.value if outcome else 'undelivered'}{detail}")


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
            report.problem(f"pilot {entry.owner.pid} ({describe(entry)}) still runs")
