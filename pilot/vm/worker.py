"""Carries out the service's commands on this node, one at a time, and reports each outcome.

The poller hands commands over (:meth:`VmWorker.submit`); one worker
thread runs them in id order, so a ``stop-vm`` queued after its
``start-vm`` always finds the VM. Every start and stop is reported as a
notification that names the command (``vm-running``, ``vm-failed``,
``vm-stopped``); a VM that shut down from inside the guest is noticed
between commands and reported ``vm-stopped`` without one; every
``usage_every_s`` the worker looks at how busy each VM is
(:mod:`pilot.vm.usage`) and reports ``vm-usage`` for those that changed
(busy or idle, or their CPU use by :data:`USAGE_CPU_STEP` points), and for all
every :data:`USAGE_ALL_EVERY` looks. ``release``
asks the pilot to give the node back (its early-unreserve path);
``prefetch`` puts a lease's images in the node's image cache on a thread
of its own, reporting ``fetching`` as it goes.

The pilot's teardown (:meth:`VmWorker.teardown`) stops the worker, then
destroys every domain tagged with this slot, whatever the worker's books
say, and reports them stopped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from workspace_common.protocol.wire import format_epoch

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing on the pilot's start path
if TYPE_CHECKING:  # the command module loads with the first poll answer, not at the pilot's start
    from workspace_common.protocol.commands import Command

log = logging.getLogger(__name__)

#: How long a command's outcome is retried towards the service.
REPORT_WITHIN_S = 60.0
#: How often a start that downloads its image reports how far along it is, and how long each report is tried.
PROGRESS_EVERY_S = 2.0
PROGRESS_WITHIN_S = 5.0
#: Exit-code-like codes of vm-failed notifications.
CODE_REFUSED = 1
CODE_NO_VMS = 2
#: A change of a VM's CPU use worth a vm-usage report (percentage points); busy to idle always is.
USAGE_CPU_STEP = 25
#: Every this many looks every VM's use is reported (a report lost on the way is made good).
USAGE_ALL_EVERY = 10


class VmWorker:
    """Runs the service's commands for one slot on this node (VM start, stop, suspend, resume; release; prefetch;
    extend) and the pilot's warnings to the VMs.

    ``make_host()`` builds the :class:`pilot.vm.host.VmHost` on the first
    start (None: this node hosts no VMs, every start is refused with
    ``no_vms_reason``). ``held_mb()`` is the memory the pilot holds (for
    the notifications' ``memory_mb``). ``on_release(reason)`` is the
    pilot's stop request; ``on_extend(duration_s)`` moves the pilot's
    deadline for the lease's new duration and returns (its deadline in
    epoch seconds or None, 0 if it moved else 1, what happened in words).
    """

    def __init__(
        self,
        make_host: Callable[[], object] | None,
        notifier,
        held_mb: Callable[[], int],
        on_release: Callable[[str], None],
        *,
        on_extend: Callable[[float], tuple[float | None, int, str]] | None = None,
        shutdown_timeout_s: float = 30.0,
        check_every_s: float = 5.0,
        no_vms_reason: str = "this node hosts no VMs",
        usage_every_s: float | None = None,
        busy_cpu_percent: int = 10,
    ):
        self._make_host = make_host
        self.host = None
        self.notifier = notifier
        self.held_mb = held_mb
        self.on_release = on_release
        self.on_extend = on_extend
        self.shutdown_timeout_s = shutdown_timeout_s
        self.check_every_s = check_every_s
        self.no_vms_reason = no_vms_reason
        self.usage_every_s = usage_every_s  # None: the VMs' use is not looked at
        self.busy_cpu_percent = busy_cpu_percent
        self._next_look = 0.0  # monotonic
        self._looks = 0
        self._told_usage: dict[str, dict] = {}  # what the service was last told of each VM
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._seen: dict[int, float] = {}  # command id -> when its poll answer arrived (for the timings)
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vm-worker", daemon=True)

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def submit(self, commands: list[Command]) -> None:
        """Queue commands (from the poller thread) to run in order."""
        now = time.time()
        for command in commands:
            self._seen[command.id] = now
            self._queue.put(command)

    def warn(self, line: str) -> None:
        """Queue ``line`` for every VM's lease channel (written by the worker thread, in order with the commands)."""
        self._queue.put(("warn", line))

    def tell_features(self) -> None:
        """Queue a new telling of every VM's features (the worker thread sends them, in order with the commands)."""
        self._queue.put(("features", None))

    # -- the worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            wait = self.check_every_s
            if self.usage_every_s is not None and self.host is not None:
                wait = max(0.0, min(wait, self._next_look - time.monotonic()))
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = None
            if self._stopping.is_set() or item is False:
                return
            if isinstance(item, tuple):  # a warning for the VMs, or their features
                if self.host is not None:
                    reached = self.host.warn(item[1]) if item[0] == "warn" else self.host.tell_features()
                    log.info("lease channel: %s written to %d VM(s)%s", repr(item[1]) if item[1] else "features",
                             len(reached), f" ({', '.join(reached)})" if reached else "")
                item = None
            if item is not None:  # a Command (None only wakes the worker; False stops it, above)
                try:
                    self._carry_out(item)
                except Exception:  # the worker must outlive any one command
                    log.exception("command %d failed unexpectedly", item.id)
                    if item.op != "release":
                        self._report(item, "vm-failed", CODE_REFUSED, "internal error in the pilot (see its log)")
            try:
                self._report_gone()
            except Exception:  # libvirt trouble: the next check tries again; no command's outcome is touched
                log.exception("checking for VMs that shut down failed")
            try:
                self._look_at_usage()
            except Exception:  # the next look tries again
                log.exception("looking at the VMs' use failed")
            with self._changed:
                self._changed.notify_all()

    def _carry_out(self, command: Command) -> None:
        seen = self._seen.pop(command.id, None)
        if command.op == "release":
            log.info("command %d: release: giving the node back", command.id)
            self.on_release(f"release command {command.id} from the service")
            return
        if command.op == "prefetch":
            host = self._host()
            if host is None or host.images is None:
                log.info("command %d: prefetch ignored: %s", command.id, self.no_vms_reason)
                return
            # On its own thread: a download must not hold up the starts and stops queued behind it (a start
            # that needs the same image waits for this download on the cache's lock instead of fetching twice).
            threading.Thread(target=self._prefetch, args=(host, command), name=f"prefetch-{command.id}",
                             daemon=True).start()
            return
        if command.op == "extend":
            self._extend(command)
            return
        if command.op == "network":
            # No outcome to report: the next start-vm carries the network's state again anyway.
            host = self.host
            if host is None:  # the service sends it only to nodes that run the lease's VMs
                log.info("command %d: network %s ignored: no VM has started here", command.id, command.net.name)
                return
            from pilot.net.commands import NetError

            try:
                log.info("command %d: %s", command.id, host.apply_network(command.net))
            except NetError as exc:
                log.error("command %d: network %s could not be updated: %s", command.id, command.net.name, exc)
            return
        if command.op in ("suspend-vm", "resume-vm"):
            resume = command.op == "resume-vm"
            if self.host is None:
                self._report(command, "vm-failed", CODE_NO_VMS, f"no VM {command.name} on this node")
                return
            outcome = self.host.pause(command.name, resume=resume)
            if outcome.ok:
                self._report(command, "vm-running" if resume else "vm-paused", 0, outcome.reason)
            else:
                log.warning("command %d: %s of VM %s failed: %s", command.id, command.op, command.name, outcome.reason)
                self._report(command, "vm-failed", CODE_REFUSED, outcome.reason)
            return
        if command.op == "start-vm":
            create = time.time()  # the first start-vm also imports libvirt and connects: that is create's too
            host = self._host()
            if host is None:
                self._report(command, "vm-failed", CODE_NO_VMS, self.no_vms_reason)
                return
            t0 = time.monotonic()
            outcome = host.start(command.vm, on_fetch=self._fetch_reporter(command))
            took = (time.monotonic() - t0) * 1000
            if outcome.ok:
                log.info("command %d: VM %s running (%.1f ms)", command.id, command.vm.name, took)
                moments = {"domain_create": format_epoch(create), "domain_created": format_epoch(time.time())}
                if seen is not None:
                    moments["command_seen"] = format_epoch(seen)
                self._report(command, "vm-running", 0, f"started in {took:.0f} ms", timings=moments)
            else:
                log.warning("command %d: VM %s refused: %s", command.id, command.vm.name, outcome.reason)
                self._report(command, "vm-failed", CODE_REFUSED, outcome.reason)
            return
        host = self.host
        if host is None:
            self._report(command, "vm-failed", CODE_NO_VMS, f"no VM {command.name} on this node")
            return
        t0 = time.monotonic()
        outcome = host.stop(command.name, force=command.force, timeout_s=self.shutdown_timeout_s)
        took = (time.monotonic() - t0) * 1000
        if outcome.ok:
            log.info("command %d: VM %s stopped (%.1f ms)", command.id, command.name, took)
            self._report(command, "vm-stopped", 0, outcome.reason or f"stopped in {took:.0f} ms")
        else:
            log.warning("command %d: stop of VM %s failed: %s", command.id, command.name, outcome.reason)
            self._report(command, "vm-failed", CODE_REFUSED, outcome.reason)

    def _look_at_usage(self) -> None:
        """Every ``usage_every_s``: how busy each VM is; report those the service should hear of (vm-usage)."""
        now = time.monotonic()
        if self.usage_every_s is None or self.host is None or now < self._next_look:
            return
        self._next_look = now + self.usage_every_s
        self._looks += 1
        looks = {name: {"busy": look.busy, "cpu": look.cpu}
                 for name, look in self.host.usage(self.busy_cpu_percent).items()}
        everyone = self._looks % USAGE_ALL_EVERY == 0
        news = {name: look for name, look in looks.items() if everyone or _worth_telling(self._told_usage.get(name), look)}
        self._told_usage = {name: self._told_usage.get(name) for name in looks}
        if news:
            self.notifier.notify("vm-usage", self.held_mb(), usage=news, deliver_within=self.usage_every_s)
            self._told_usage.update(news)

    def _extend(self, command: Command) -> None:
        """Move the pilot's deadline for the lease's new duration; report ``extended`` with where it is now."""
        if self.on_extend is None:
            at, code, message = None, CODE_REFUSED, "this pilot cannot move its deadline"
        else:
            at, code, message = self.on_extend(command.duration_s)
        if code == 0 and self.host is not None:
            told = self.host.tell_features()
            log.info("VM(s) told their new features: %s", ", ".join(told) or "none reached")
        log.info("command %d: extend to %g s: %s", command.id, command.duration_s, message)
        self.notifier.notify(
            "extended", self.held_mb(), code=code, command=command.id, message=message[:4000] or None,
            expires_at=format_epoch(at) if at is not None else None, deliver_within=REPORT_WITHIN_S,
        )

    def _prefetch(self, host, command: Command) -> None:
        from pilot.images.cache import CacheError

        for image in command.images:
            t0 = time.monotonic()
            try:
                host.prefetch(image, on_fetch=self._fetch_reporter(command))
            except CacheError as exc:
                log.warning("command %d: prefetch of %s failed: %s", command.id, image.label, exc)
                self._progress(command, f"prefetch of {image.label} failed: {exc}", code=CODE_REFUSED)
                continue
            took = time.monotonic() - t0
            log.info("command %d: %s is in the image cache (%.1f s)", command.id, image.label, took)
            self._progress(command, f"{image.label} is in the node's image cache ({took:.1f} s)")

    def _progress(self, command: Command, message: str, code: int = 0) -> None:
        self.notifier.notify("fetching", self.held_mb(), code=code, command=command.id,
                             vms=[command.vm_name] if command.vm_name else None, message=message[:4000],
                             deliver_within=PROGRESS_WITHIN_S)

    def _fetch_reporter(self, command: Command) -> Callable[[str, int, int], None]:
        """``on_fetch(label, done, size)`` for a start: a ``fetching`` notification at the first byte, then at
        most one every :data:`PROGRESS_EVERY_S` (the service shows it as the starting VM's reason)."""
        last = 0.0

        def report(label: str, done: int, size: int) -> None:
            nonlocal last
            now = time.monotonic()
            if last and now - last < PROGRESS_EVERY_S and done < size:
                return
            last = now
            mib = 1024 * 1024
            self._progress(command, f"fetching {label}: {done * 100 // size}% ({done / mib:.1f} of {size / mib:.1f} MiB)")

        return report

    def _host(self):
        if self.host is None and self._make_host is not None:
            self.host = self._make_host()
        return self.host

    def _report(self, command: Command, state: str, code: int, message: str,
                timings: dict[str, str] | None = None) -> None:
        self.notifier.notify(
            state, self.held_mb(), code=code, command=command.id, vms=[command.vm_name],
            message=(message or "")[:4000] or None, deliver_within=REPORT_WITHIN_S, timings=timings,
        )

    def _report_gone(self) -> None:
        if self.host is None:
            return
        gone = self.host.gone()
        if gone:
            log.info("VM(s) %s shut down from inside the guest", ", ".join(gone))
            self.notifier.notify(
                "vm-stopped", self.held_mb(), vms=sorted(gone), message="shut down from inside the guest",
                deliver_within=REPORT_WITHIN_S,
            )

    # -- the pilot's main thread ---------------------------------------------------------------

    def running_vms(self) -> list[str]:
        """Names of the VMs this worker started that still run."""
        if self.host is None:
            return []
        return [vm.name for vm in self.host.vms() if vm.state == "running"]

    def wait_empty(self, until: float, interrupted: Callable[[], bool] = lambda: False) -> list[str]:
        """Wait until this slot's VMs are all stopped or the monotonic ``until``; returns those left running.

        Meanwhile the worker keeps running the service's stop-vm commands
        (and notices guests that shut down by themselves, checking often).
        """
        self.check_every_s = min(self.check_every_s, 0.5)
        self._queue.put(None)  # wake the worker now, so the shorter check interval applies at once
        with self._changed:
            while True:
                left = self.running_vms()
                remaining = until - time.monotonic()
                if not left or remaining <= 0 or interrupted():
                    return left
                self._changed.wait(remaining)

    def teardown(self) -> list[str]:
        """Stop the worker, then destroy every domain tagged with this slot; report and return their names.

        Raises what the host's teardown raises (libvirt unreachable): the
        journal then keeps the record that VMs may exist.
        """
        self._stopping.set()
        self._queue.put(False)
        if self.host is None:
            return []
        self.host.interrupt()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        destroyed = self.host.teardown()
        if destroyed:
            self.notifier.notify(
                "vm-stopped", self.held_mb(), vms=sorted(destroyed)[:256],
                message="destroyed by the pilot's teardown", deliver_within=REPORT_WITHIN_S,
            )
        return destroyed


def _worth_telling(told: dict | None, look: dict) -> bool:
    """Whether the service should hear of ``look``: a VM it was not told of, busy to idle or back, a first CPU
    reading, or a CPU use :data:`USAGE_CPU_STEP` points from the one it was told."""
    if told is None or told["busy"] != look["busy"]:
        return True
    if (told["cpu"] is None) != (look["cpu"] is None):
        return True
    return told["cpu"] is not None and abs(told["cpu"] - look["cpu"]) >= USAGE_CPU_STEP
