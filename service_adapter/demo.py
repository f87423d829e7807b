"""``workspace-lease demo``: one lease through the embedded local site, narrated step by step."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time

from service_adapter.lease import TERMINAL_STATES, LeaseError
from service_adapter.local_site import LocalSite
from service_adapter.safetext import printable

HUGEPAGES_DIR = "/sys/kernel/mm/hugepages/hugepages-2048kB"
VM_OVERHEAD_MB = 64  # what the site adds to each VM's memory (QEMU's own)
#: (nodes, MB per node, seconds) when not given: the memory-only lease, and the lease of one VM of the cloud image.
DEFAULTS = (2, 64, 20.0)
VM_DEFAULTS = (1, 512 + VM_OVERHEAD_MB, 300.0)


class DemoError(Exception):
    """The demo cannot run here; the message says why and what to do."""


class DemoArgumentError(DemoError):
    """The demo's arguments do not go together; the message says which."""


#: Signals that end the demo early: ^C, ``timeout``/``kill``, a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: The longest the demo's main thread waits before it looks for a stop signal again: a handler cannot wake
#: a wait that has not begun, and Python runs it only once the main thread wakes (the kernel may deliver
#: the signal to another thread).
SIGNAL_LOOK_S = 0.5


class _Interrupted(Exception):
    """A stop signal arrived; raised on the main thread where the demo checks for one (:meth:`_StopSignals.check`)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopSignals:
    """The demo's stop signals, taken where the main thread looks for them, never where the signal lands.

    An exception raised from a signal handler lands between any two
    bytecodes: inside a lock's ``with`` before its ``try``, or in a SQLite
    read mid-statement (the traceback keeps that cursor alive, so the
    thread's later reads saw an old snapshot and the demo waited for a
    release it could not see). So the handler only notes the first signal;
    :meth:`check`, called in every wait loop (each wait at most
    :data:`SIGNAL_LOOK_S`), raises :class:`_Interrupted` once.
    """

    def __init__(self):
        self.signum: int | None = None
        self._raised = False

    def handler(self, signum, _frame) -> None:
        """The signal handler: notes the first stop signal (later ones change nothing)."""
        if self.signum is None:
            self.signum = signum

    def check(self) -> None:
        """Raise :class:`_Interrupted` if a stop signal came and has not been raised yet."""
        if self.signum is not None and not self._raised:
            self._raised = True
            raise _Interrupted(self.signum)


def _pool_pages() -> int:
    with open(os.path.join(HUGEPAGES_DIR, "nr_hugepages"), encoding="ascii") as handle:
        return int(handle.read())


class _Narrator:
    """Prints a lease's notifications and state transitions as the store commits them."""

    def __init__(self, site: LocalSite, lease_id: str, slot: str, say, stop: _StopSignals):
        self.site, self.lease_id, self.slot, self.say, self.stop = site, lease_id, slot, say, stop
        self.notes_seen = 0
        self.events_seen = 1  # the creation is told by the caller

    def report(self) -> None:
        rows = self.site.store.notifications(self.slot)
        for host, seq, state, code in rows[self.notes_seen:]:
            self.say(f"  {host}: {state}" + (f" (code {code})" if code else "") + f" [seq {seq}]")
        self.notes_seen = len(rows)
        events = self.site.store.lease_events(self.lease_id)
        for event in events[self.events_seen:]:
            if event.kind in ("ending", "extended"):
                self.say(f"lease {event.kind}: {event.reason}")
            else:
                self.say(f"lease {event.old_state} -> {event.new_state}: {event.reason}")
        self.events_seen = len(events)

    def until(self, states: set[str], timeout: float):
        """Narrate until the lease is in one of ``states`` (its LeaseInfo) or ``timeout`` passes (None).

        Raises :class:`_Interrupted` when a stop signal came (once: the wind-down narrates with this too).
        """
        store = self.site.store
        deadline = time.monotonic() + timeout
        while True:
            self.stop.check()
            seen = store.version
            self.report()
            info = self.site.leases.get(self.lease_id)
            if info.state in states:
                return info
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            store.wait_changed(seen, min(remaining, SIGNAL_LOOK_S))


def run_demo(nodes: int | None, memory_mb: int | None, duration_s: float | None, grace_s: float,
             release_after_s: float | None, workdir: str | None, out=sys.stdout,
             journal_dir: str = "/var/lib/workspace-pilot", vm_image: str | None = None) -> int:
    """Run the demo; returns 0 when the lease ran and ended and the hugepage pool is back where it started.

    ``vm_image`` (a directory with the cloud image's files): the lease also
    boots a VM of it, logs in with ssh and shows what the guest says; when
    the hypervisor or the image is missing, the demo says what to install
    and runs the memory-only lease. ``nodes``, ``memory_mb`` and
    ``duration_s`` default (None) to :data:`DEFAULTS` or :data:`VM_DEFAULTS`.

    SIGINT, SIGTERM or SIGHUP release the lease at once, wait for the
    pilots to give the node back (a second signal does not cut that
    short), and return 128 + the signal's number; no traceback.
    """
    if os.geteuid() != 0:
        raise DemoError("the demo reserves real hugepages and must run as root")
    if not os.access(os.path.join(HUGEPAGES_DIR, "nr_hugepages"), os.W_OK):
        raise DemoError(f"{HUGEPAGES_DIR}/nr_hugepages is not writable (no 2 MiB hugepage support?)")
    t0 = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - t0:8.3f} s] {text}", file=out, flush=True)

    workdir = workdir or tempfile.mkdtemp(prefix="workspace-lease-demo-")
    vm = None
    if vm_image is not None:
        from service_adapter.demo_vm import MIN_VM_MB, VmDemo, vm_unavailable

        why = vm_unavailable(vm_image)
        if why:
            say(f"{why}; running the memory-only lease instead")
        else:
            vm = VmDemo(workdir, vm_image, say)
    defaults = VM_DEFAULTS if vm else DEFAULTS
    nodes, memory_mb, duration_s = (given if given is not None else default
                                    for given, default in zip((nodes, memory_mb, duration_s), defaults))
    if vm and nodes != 1:
        raise DemoArgumentError("--vm leases one node: this machine (a second pilot here would build the same network)")
    if vm and memory_mb - VM_OVERHEAD_MB < MIN_VM_MB:
        raise DemoArgumentError(f"--vm needs --memory of at least {MIN_VM_MB + VM_OVERHEAD_MB} MB (the VM gets it "
                                f"less the site's {VM_OVERHEAD_MB} MB overhead)")
    stop = _StopSignals()
    previous = {signum: signal.signal(signum, stop.handler) for signum in STOP_SIGNALS}
    try:
        return _run(nodes, memory_mb, duration_s, grace_s, release_after_s, workdir, journal_dir, say, vm, stop)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run(nodes, memory_mb, duration_s, grace_s, release_after_s, workdir, journal_dir, say, vm,
         stop: _StopSignals) -> int:
    before = _pool_pages()
    say(f"hugepage pool before: {before} pages of 2 MiB ({before * 2} MB)")
    try:
        site = _open_site(workdir, grace_s, journal_dir, vm)
        try:
            if stop.signum is not None:
                return 128 + stop.signum  # nothing leased yet
            if vm is not None and not _endorse(site, vm, say):
                return 1
            return _narrate(site, nodes, memory_mb, duration_s, grace_s, release_after_s, before, say, stop, vm)
        except _Interrupted as exc:
            return _wind_down(site, exc.signum, grace_s, before, say, stop, vm)
        finally:
            site.close()
    finally:
        if vm is not None:
            vm.close()


def _open_site(workdir: str, grace_s: float, journal_dir: str, vm) -> LocalSite:
    """The local site; with ``vm``: its hypervisor running first, an image catalogue, lease networks."""
    extra = {}
    if vm is not None:
        from service_adapter.localvirt import HypervisorError

        try:
            vm.start_hypervisor()
        except HypervisorError as exc:
            raise DemoError(f"libvirtd cannot run here: {exc}") from None
        extra = {"images": True, "network_plan": vm.network_plan(), "pilot_sections": vm.pilot_sections(),
                 "vm_overhead_mb": VM_OVERHEAD_MB}
    return LocalSite(workdir, grace_s=grace_s, journal_dir=journal_dir, queue_timeout_s=60,
                     release_grace_s=grace_s + 5, status_interval_s=0.5, **extra)


def _endorse(site: LocalSite, vm, say) -> bool:
    """The site approves the demo's image through its catalogue; False (said why) when it refuses."""
    from service_adapter.images.catalog import ImageRefused

    try:
        vm.endorse(site)
    except ImageRefused as exc:
        say(f"FAILED: the site refused the image: {exc}")
        return False
    return True


def _wind_down(site: LocalSite, signum: int, grace_s: float, before: int, say, stop: _StopSignals, vm=None) -> int:
    """After a stop signal: release every lease of this site, wait for the pilots, and say where the node stands."""
    say(f"interrupted ({signal.Signals(signum).name}): releasing the lease; the pilots give the node back")
    open_leases = [info for info in site.leases.list() if info.state not in TERMINAL_STATES]
    for info in open_leases:
        site.leases.release(info.id)
    for info in open_leases:
        narrator = _Narrator(site, info.id, info.slot, say, stop)
        narrator.events_seen = len(site.store.lease_events(info.id))
        narrator.notes_seen = len(site.store.notifications(info.slot))
        narrator.until(TERMINAL_STATES, grace_s + 30)
        if info.job_id:
            site.provider.wait(info.job_id, grace_s + 5)
    site.close()  # stops any pilot still running (SIGTERM, then SIGKILL after 10 s)
    after = _pool_pages()
    if after != before:
        say(f"FAILED: hugepage pool at {after} pages, was {before}; run workspace-killall")
        return 1
    left = [item for info in open_leases for item in (vm.leftovers(info.slot) if vm else [])]
    if left:
        say(f"FAILED: still on this machine: {', '.join(left)}; run workspace-killall")
        return 1
    say(f"hugepage pool after: {after} pages ({after * 2} MB): the node is as it was")
    return 128 + signum


def _narrate(site: LocalSite, nodes, memory_mb, duration_s, grace_s, release_after_s, before: int, say,
             stop: _StopSignals, vm=None) -> int:
    """One lease from reserve to its end, told as it goes; 0 when it ended well and the pool is back.

    Raises :class:`_Interrupted` at its waits once a stop signal came.
    """
    say(f"store {site.store.path} (SQLite, WAL)")
    say(f"receiver listening on {site.url}/pilot/v2/notifications (digest SHA-256)")
    stop.check()
    try:
        lease = site.leases.reserve(nodes, memory_mb, duration_s, owner="demo")
    except LeaseError as exc:
        say(f"FAILED: {exc}")
        return 1
    say(f"lease {lease.id} ({lease.state}): {nodes} x {memory_mb} MB for {duration_s:g} s, slot {lease.slot}")
    say(f"local provider: job {lease.job_id}, pilots {', '.join(site.provider.hosts(lease.job_id))} "
        f"(pids {site.provider.pids(lease.job_id)})")
    narrator = _Narrator(site, lease.id, lease.slot, say, stop)
    ready = narrator.until({"ready"} | TERMINAL_STATES, timeout=60)
    if ready is None or ready.state != "ready":
        say("FAILED: " + (ready.reason if ready else "the pilots did not all report 'reserved' within 60 s"))
        _say_pilot_errors(site, lease.slot, say)
        return 1
    held = _pool_pages()
    say(f"lease ready: hugepage pool now {held} pages ({held * 2} MB, +{(held - before) * 2} MB)")
    booted = True
    if vm is not None:
        booted = vm.boot(site, lease, site.provider.hosts(lease.job_id)[0], memory_mb - VM_OVERHEAD_MB,
                         tick=lambda: (stop.check(), narrator.report()))
        narrator.report()
        if vm.login and booted:
            say(f"log in yourself while the lease holds: {vm.ssh_command()}")
    if not booted:
        say("releasing the lease: the VM did not come up")
        site.leases.release(lease.id)
    elif release_after_s is not None:
        if narrator.until(TERMINAL_STATES, release_after_s) is None:
            say(f"releasing the lease after {release_after_s:g} s (the job is cancelled: SIGTERM to each "
                "pilot, like qdel)")
            site.leases.release(lease.id)
    else:
        say(f"holding until the pilots' own deadline ({duration_s:g} s after they started; ^C ends it now)")
    ended = narrator.until(TERMINAL_STATES, duration_s + grace_s + 30)
    codes = site.provider.wait(lease.job_id, grace_s + 5)
    stop.check()
    narrator.report()
    after = _pool_pages()
    say(f"pilots exited with {codes}; logs in {site.log_dir}")
    if ended is not None:
        used = ended.usage
        say(f"usage: {used.node_seconds:.1f} node-seconds, {used.mb_seconds:.0f} MB-seconds")
    say(f"hugepage pool after: {after} pages ({after * 2} MB)")
    left = vm.leftovers(lease.slot) if vm is not None else []
    if vm is not None and not left:
        say("the VM and its lease network are gone from this machine")
    if (booted and not left and ended is not None and ended.state in ("released", "expired") and after == before
            and all(code == 0 for code in codes)):
        say(f"lease {ended.state}; the node's hugepages are back where they started")
        return 0
    if left:
        say(f"FAILED: still on this machine: {', '.join(left)}; run workspace-killall")
    elif not booted:
        say("FAILED: the VM did not come up (above: why)")
    elif after != before:
        say("FAILED: pool not restored")
    elif ended is None:
        say("FAILED: the lease did not end in time")
    else:
        say(f"FAILED: the lease ended {ended.state} ({ended.reason}); pilots exited with {codes}")
    _say_pilot_errors(site, lease.slot, say)
    return 1


def _say_pilot_errors(site: LocalSite, slot: str, say) -> None:
    """Each pilot's own reason for failing (its notification's message) and where its log is."""
    for host, state, _at, body in site.store.notification_bodies(slot):
        if body.get("code") and body.get("message"):
            log = os.path.join(site.log_dir, f"{slot}.{host}.log")
            say(f"  {host} ({state}, code {body['code']}): {printable(body['message'])} (log {log})")
