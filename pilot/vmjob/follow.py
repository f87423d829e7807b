"""Following a VM job's guest: its output copied as it comes, its exit status, its end, a stop's shutdown.

:class:`GuestFollow` is a base of :class:`pilot.vmjob.runner.VmJob` (step
5 of its order); it holds no state of its own.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from pilot.vmjob.exitcodes import VmJobExit
from pilot.vmjob.output import GuestOutput
from pilot.vmjob.rundir import RunDirError, read_status

log = logging.getLogger("pilot.vmjob.runner")

#: How much of a failed guest's console its job is shown (the console goes with the run directory).
CONSOLE_TAIL_BYTES = 600

#: How often the wrapper looks at the guest's output, its status file and its domain.
POLL_S = 0.02
#: How often, of those looks, libvirt is asked whether the domain still runs.
DOMAIN_EVERY = 10


#: What the wrapper keeps of the batch system's KillWait for itself once the guest's wait is over: libvirt's destroy
#: of a QEMU guest (1.2 s here, 2.1 s with both cores busy), the restore, and room to spare.
RESTORE_RESERVE_S = 4.0


def guest_stop_wait(stop_timeout_s: float, kill_wait_s: float | None) -> float:
    """How long a stopping guest may take to power off: ``stop_timeout_s``, but never so long that the wrapper's
    destroy and restore would run into the batch system's SIGKILL (which leaves the node to the epilog)."""
    if kill_wait_s is None:
        return stop_timeout_s
    return max(0.0, min(stop_timeout_s, kill_wait_s - RESTORE_RESERVE_S))


class JobFailed(Exception):
    """The job could not run (or not to its end); ``code`` says which kind, ``str()`` is one line."""

    def __init__(self, code: VmJobExit, message: str):
        super().__init__(message)
        self.code = code


class GuestFollow:
    """Step 5 of :class:`pilot.vmjob.runner.VmJob`: follow the guest until its status, its end or a stop."""

    def _follow(self) -> int:
        """Copy output until the guest's status, the VM's end, or a stop; the status."""
        request = self.request
        control = self.run_dir.control
        output = GuestOutput(control, request.uid, limit=self.config.vmjob_output_limit_mb * 1024 * 1024)
        started_file = os.path.join(control, "started")
        status_file = os.path.join(control, "status")
        looks = 0
        try:
            while True:
                for daemon in self.daemons:
                    daemon.drain()
                # In the guest's order (started, output, status), so one look that sees all three marks them so.
                if "guest_started" not in self.moments and os.path.lexists(started_file):
                    self.mark("guest_started")
                if output.pump():
                    self.mark("first_output")
                try:
                    status = read_status(status_file, request.uid)
                except RunDirError as exc:
                    raise JobFailed(VmJobExit.VM_FAILED, str(exc)) from None
                if status is not None:
                    # The status comes last (the contract): the job is done; the destroy in _restore ends the
                    # VM without waiting for the guest's own power-off (its disk is read-only or thrown away).
                    self.mark("status")
                    return status
                if self.stop.is_set():
                    self._let_guest_end()
                    raise JobFailed(VmJobExit.STOPPED, "stopped by a signal: the VM was shut down")
                looks += 1
                if looks % DOMAIN_EVERY == 0 and not self._domain_active():
                    status = read_status(status_file, request.uid)  # written just before the guest ended
                    if status is not None:
                        self.mark("status")
                        return status
                    raise JobFailed(VmJobExit.VM_FAILED, "the VM ended without an exit status; the end of its "
                                    f"console: {console_tail(self.run_dir.console)}")
                self.stop.wait(POLL_S)
        finally:
            output.close()  # a last copy first: it may find the limit
            for problem in output.problems():
                log.warning("%s", problem)
                print(f"workspace-vmjob: {problem}", file=sys.stderr)

    def _domain_active(self) -> bool:
        import libvirt

        try:
            return bool(self.domain.isActive())
        except libvirt.libvirtError:
            return False  # a transient domain that ended is gone

    def _let_guest_end(self) -> None:
        """Ask the guest to power off and give it ``stop_timeout`` s; the destroy in :meth:`_restore` does the rest."""
        import libvirt

        timeout = guest_stop_wait(self.config.vmjob_stop_timeout_s, self.request.kill_wait_s)
        if timeout < self.config.vmjob_stop_timeout_s:
            log.info("the guest gets %g s to power off, not stop_timeout's %g: Slurm's KillWait is %g s and the "
                     "destroy and restore need %g", timeout, self.config.vmjob_stop_timeout_s,
                     self.request.kill_wait_s, RESTORE_RESERVE_S)
        if timeout > 0:
            try:
                self.domain.shutdown()
            except libvirt.libvirtError:
                return
        deadline = time.monotonic() + timeout
        while self._domain_active() and time.monotonic() < deadline:
            time.sleep(POLL_S)  # libvirt's lifecycle events would need an event loop thread for this one wait
        self.mark("guest_ended")


def console_tail(path: str) -> str:
    """The last lines of a console log (at most CONSOLE_TAIL_BYTES), on one line; what is printable only."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - CONSOLE_TAIL_BYTES))
            text = handle.read(CONSOLE_TAIL_BYTES).decode("utf-8", "replace")
    except OSError as exc:
        return f"(none: {exc.strerror})"
    lines = [line.strip() for line in text.splitlines() if line.strip().isprintable() and line.strip()]
    return " | ".join(lines[-5:]) or "(empty)"
