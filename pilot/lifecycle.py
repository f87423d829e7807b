"""The pilot's lifecycle for one lease on one node, as one explicit state table.

Signal handlers only call :meth:`Pilot.request_stop`, which takes no lock
(a signal handler runs on the main thread between any two bytecodes, also
inside a lock that thread holds); all work happens in :meth:`Pilot.run` on
the main thread. The restore never waits for the
service: notifications are sent by the notifier thread with deadlines, and
the memory is given back whatever they answer. Every change to the node
goes through :class:`pilot.node.memory.NodeMemory`, journal first. The
states and where each may go are :data:`pilot.states.STATE_TABLE`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pilot.node.backends import BackendError
from pilot.deadline import Deadline, DeadlineError
from pilot.exitcodes import ExitCode
from pilot.faults import Checkpoints
from pilot.node.journal import JournalError
from pilot.moments import Moments
from pilot.node.lock import NodeLockError
from pilot.node.memory import NodeMemory, TakeAborted
from pilot.notifier import Delivery, Notifier, Outcome
from pilot.states import STATE_TABLE, LeaseRequest, State
from workspace_common.protocol import format_epoch
from pilot.vm.cleanup import VmCleanupError
from pilot.vmend import VmEnd
from pilot.wakeup import Wakeup

__all__ = ["LeaseRequest", "Pilot", "State"]  # the states live in pilot.states

log = logging.getLogger(__name__)


class Pilot:
    """Runs one lease on this node; :meth:`run` returns the process's :class:`ExitCode`."""

    def __init__(
        self,
        request: LeaseRequest,
        memory: NodeMemory,
        notifier: Notifier,
        deadline: Callable[[], Deadline],
        *,
        reserved_timeout_s: float,
        earlywaitratio: float = 0.5,
        pause_at: str | None = None,
        hosting=None,
        warn_before_s: float = 0.0,
        extend_deadline: Callable[[float, Deadline], Deadline] | None = None,
        shutdown_grace_s: float = 30.0,
    ):
        self.request = request
        self.memory = memory
        self.notifier = notifier
        self._compute_deadline = deadline
        self.deadline: Deadline | None = None
        self.reserved_timeout_s = reserved_timeout_s
        self.earlywaitratio = earlywaitratio
        #: The slot's command channel and VMs (:class:`pilot.vm.hosting.VmHosting`); None: no VM hosting.
        self.hosting = hosting
        #: How long before the deadline the VMs are warned on their lease channel (0: not warned).
        self.warn_before_s = warn_before_s
        #: ``extend_deadline(duration_s, current)``: the deadline for the lease's new duration (see extend()).
        self._extend_deadline = extend_deadline
        self._until: float | None = None  # the deadline on the monotonic clock, once holding (extend() moves it)
        #: When the VMs end and why, once known (the lease channel's warning, their features' end).
        self.vm_end = VmEnd(shutdown_grace_s)
        self.state = State.BEGIN
        self._state_since = time.monotonic()
        # Both are set by request_stop, which may run inside a signal handler: lock-free wake-ups, never
        # threading.Event (a handler that runs inside Event.wait on the main thread would wait on itself).
        self._wake = Wakeup()
        #: Set by every stop request: resumes a paused test checkpoint.
        self.signalled = Wakeup()
        self._stop_reason: str | None = None
        self._stop_kind: str | None = None  # the first stop request's kind (signal, release, gone)
        #: Where the time went, on this node's clock; sent as the notifications' ``timings``.
        self.moments = Moments()
        #: Fault-injection points (inert unless ``pause_at`` or the environment names one).
        self.checkpoint = Checkpoints(self.signalled, pause_at=pause_at)
        memory.checkpoint = self.checkpoint

    def request_stop(self, reason: str, kind: str = "signal") -> None:
        """Ask the pilot to unreserve now; safe from any thread and from a signal handler (it takes no lock).

        ``kind`` names the cause in the moments (``stop_<kind>``): ``signal``,
        ``release`` (the service's command) or ``gone`` (the service forgot the slot).
        """
        self.moments.mark(f"stop_{kind}")
        if self._stop_reason is None:
            self._stop_kind = kind
            self._stop_reason = reason
        self.signalled.set()
        self._wake.set()

    def _enter(self, state: State) -> None:
        if state not in STATE_TABLE[self.state].next:
            raise RuntimeError(f"illegal transition {self.state.value} -> {state.value}")
        now = time.monotonic()
        log.info(
            "state %s -> %s (%.1f ms in %s)",
            self.state.value, state.value, (now - self._state_since) * 1000, self.state.value,
        )
        self.state, self._state_since = state, now

    def _wait_until(self, deadline: float, done=lambda: False) -> None:
        """Block until ``done()``, a stop request, or the monotonic ``deadline``."""
        while True:
            self._wake.clear()
            if done() or self._stop_reason or time.monotonic() >= deadline:
                return
            self._wake.wait(deadline - time.monotonic())

    def run(self) -> ExitCode:
        """Reserve, report, hold until the deadline or a stop request, restore, report."""
        try:
            self.deadline = self._compute_deadline()
        except DeadlineError as exc:
            self._enter(State.BEGIN_ERROR)
            return self._tell_error(ExitCode.RESERVE_FAILED, str(exc))
        log.info("deadline %s (%s)", format_epoch(self.deadline.at), self.deadline.source)
        if self._stop_reason:
            log.info("stop requested (%s) before reserving: nothing changed", self._stop_reason)
            self.notifier.close()
            return ExitCode.OK
        self._enter(State.RESERVING)
        self.moments.mark("memory_take")
        try:
            self.memory.take(self.request.memory_mb, should_stop=lambda: self._stop_reason is not None)
        except TakeAborted:
            log.info("stop requested (%s) before the balloon moved: nothing changed", self._stop_reason)
            self._enter(State.EARLY_UNRESERVING)
            self._enter(State.UNRESERVED)
            self.notifier.close()
            return ExitCode.OK
        except NodeLockError as exc:
            return self._fail_reserving(ExitCode.LOCK_TIMEOUT, str(exc))
        except JournalError as exc:
            return self._fail_reserving(ExitCode.JOURNAL, str(exc))
        except BackendError as exc:
            return self._fail_reserving(ExitCode.RESERVE_FAILED, str(exc))
        self.moments.mark("memory_taken")
        self.checkpoint("taken")
        try:
            return self._hold()
        except Exception:
            # Whatever went wrong, the node gets its memory back before the error surfaces.
            log.exception("unexpected error in state %s: giving the memory back first", self.state.value)
            return self._recover_from_bug()

    def _recover_from_bug(self) -> ExitCode:
        twin = STATE_TABLE[self.state].error
        if twin is None:
            return ExitCode.INTERNAL  # already past the restore
        self._enter(twin)
        if State.UNRESERVING in STATE_TABLE[twin].next:
            self._enter(State.UNRESERVING)
            if self._unreserve(early=False, notify=False) is ExitCode.RESTORE_FAILED:
                return ExitCode.RESTORE_FAILED
        self.notifier.close()
        return ExitCode.INTERNAL

    def _monotonic_deadline(self) -> float:
        return time.monotonic() + self.deadline.remaining()

    def _hold(self) -> ExitCode:
        """From memory taken to the end: report, hold, unreserve."""
        held = self.memory.held
        if self._stop_reason:
            log.warning("stop requested (%s) while reserving: giving the memory back", self._stop_reason)
            self._enter(State.EARLY_UNRESERVING)
            return self._unreserve(early=True)

        deadline = self._monotonic_deadline()
        expires_at = format_epoch(self.deadline.at)
        reserved = self.notifier.notify(
            "reserved", held.memory_mb, expires_at=expires_at, deliver_within=self.reserved_timeout_s,
            timings=self.moments.pick("process_start", "memory_take", "memory_taken"),
            address=self.hosting.node_address() if self.hosting is not None else None,
        )
        reserved.add_done_callback(lambda _: (self.moments.mark("reserved_answered"), self._wake.set()))
        self._wait_until(deadline, reserved.done)
        if not reserved.done():
            # A stop request or the deadline came first: the lease ends either way.
            early = self._stop_reason is not None
            self._enter(State.EARLY_UNRESERVING if early else State.UNRESERVING)
            return self._unreserve(early=early)
        if reserved.outcome is not Outcome.DELIVERED:
            return self._reserved_not_accepted(reserved)

        self._until = deadline
        self._enter(State.RESERVED)
        log.info("holding %d MB until %s (%s)", held.memory_mb, expires_at, self.deadline.source)
        if self.hosting is not None:
            self.hosting.start()
        self.checkpoint("holding")
        self._hold_until_deadline()
        early = self._stop_reason is not None
        if early:
            log.info("stop requested (%s) before the deadline: early unreserve", self._stop_reason)
        else:
            self.moments.mark("stop_deadline")
        self._enter(State.EARLY_UNRESERVING if early else State.UNRESERVING)
        return self._unreserve(early=early)

    def _hold_until_deadline(self) -> None:
        """Block until a stop request or the deadline (which :meth:`extend` may move), warning the VMs
        ``warn_before_s`` before it."""
        while True:
            self._wake.clear()
            if self._stop_reason:
                return
            left = self._until - time.monotonic()
            if left <= 0:
                return
            if self.warn_before_s and not self.vm_end.warned:
                if left <= self.warn_before_s:
                    self._warn_vms(self.deadline.at, "deadline")
                    continue
                left -= self.warn_before_s
            self._wake.wait(left)

    def _warn_vms(self, ends_at: float, why: str, *, line: bool = True) -> None:
        """Tell the VMs when they end and why: on their lease channel if ``line`` (a VM started later is told at its
        start), in their Machine/Job Features always."""
        self.vm_end.set(ends_at, why, line=line)
        if self.hosting is None:
            return
        text = self.vm_end.line()
        log.info("warning the VMs: %s", text or f"their features end at {format_epoch(ends_at)} ({why})")
        if text:
            self.hosting.warn(text)
        else:
            self.hosting.tell_features()

    def warning_line(self) -> str | None:
        """The lease channel's line once the VMs were warned (:meth:`pilot.vmend.VmEnd.line`); any thread."""
        return self.vm_end.line()

    def lease_end(self):
        """When the VMs will be stopped, for their features (:meth:`pilot.vmend.VmEnd.end`); any thread."""
        deadline = self.deadline
        return self.vm_end.end(deadline.at if deadline else None)

    def extend(self, duration_s: float) -> tuple[float | None, int, str]:
        """Move the deadline for the lease's new duration (the service's ``extend``; any thread).

        Only while holding, and only later: the new deadline is the earlier
        of the pilot's start plus ``duration_s`` and what the batch system
        now allows (asked again), never before the current one. Returns
        (the deadline now, 0 if it moved else 1, what happened in words).
        """
        current = self.deadline
        if self.state is not State.RESERVED or self._stop_reason or self._until is None:
            return (current.at if current else None), 1, f"not holding ({self.state.value}): the deadline stays"
        if self._extend_deadline is None:
            return current.at, 1, "this pilot cannot move its deadline"
        new = self._extend_deadline(duration_s, current)
        if new.at <= current.at:
            return current.at, 1, (f"the deadline stays at {format_epoch(current.at)}: the batch system's end "
                                   f"({new.source}) leaves no more")
        self.deadline = new
        self._until = time.monotonic() + new.remaining()
        self.vm_end.clear()  # the deadline warning comes again, before the new deadline
        self._wake.set()
        message = f"deadline moved from {format_epoch(current.at)} to {format_epoch(new.at)} ({new.source})"
        log.info("%s", message)
        return new.at, 0, message

    def _fail_reserving(self, code: ExitCode, reason: str) -> ExitCode:
        self._enter(State.RESERVING_ERROR)
        if self.memory.held is not None:
            # A failed take that could not return all it took: try once more, else the journal keeps it.
            self._enter(State.UNRESERVING)
            if self._unreserve(early=False, notify=False) is ExitCode.RESTORE_FAILED:
                code = ExitCode.RESTORE_FAILED
        return self._tell_error(code, reason)

    def _tell_error(self, code: ExitCode, reason: str) -> ExitCode:
        """Tell the service why this pilot ends without a lease (within the grace), then close."""
        log.error("%s", reason)
        grace = self.request.grace_s
        self.notifier.give_up_if_silent_before(time.monotonic())
        self.notifier.notify("error", 0, code=int(code), message=reason[:4000], deliver_within=grace).wait(grace)
        self.notifier.close()
        return code

    def _reserved_not_accepted(self, reserved: Delivery) -> ExitCode:
        if reserved.outcome is Outcome.REFUSED:
            log.error(
                "the service refused 'reserved' (HTTP %s %s): giving the memory back",
                reserved.status, reserved.detail,
            )
            code = ExitCode.SERVICE_REFUSED
        else:
            log.error(
                "'reserved' was not delivered within %g s: giving the memory back", self.reserved_timeout_s
            )
            code = ExitCode.SERVICE_UNREACHABLE
        self._enter(State.RESERVING_ERROR)
        self._enter(State.UNRESERVING)
        # The service does not know this slot is reserved: telling it more is pointless.
        result = self._unreserve(early=False, notify=False)
        return result if result is ExitCode.RESTORE_FAILED else code

    def _unreserve(self, *, early: bool, notify: bool = True) -> ExitCode:
        """Tear down this slot's VMs, give the memory back, then tell the service, all within the grace.

        On an early unreserve the service gets ``grace x earlywaitratio`` of
        the grace to stop this slot's VMs (it is told ``earlyunreserving``
        and its stop-vm commands still run); whatever still runs then is
        destroyed. At the deadline the VMs are destroyed at once: the grace
        is the restore's. VMs go before the memory: it is theirs.
        """
        req = self.request
        started = time.monotonic()
        exit_by = started + req.grace_s
        held = self.memory.held
        held_mb = held.memory_mb if held else 0
        # A service silent since before this stop began will not hear us now: try each message
        # once, not for the whole grace (one that answers again still gets every retry).
        self.notifier.give_up_if_silent_before(started)
        if notify:
            self.notifier.notify(
                "earlyunreserving" if early else "unreserving", held_mb, deliver_within=req.grace_s,
            )
        vms_left = None
        try:
            self._tear_down_vms(early, started)
        except VmCleanupError as exc:
            # The host's own memory still comes first; the journal keeps the VMs for workspace-killall.
            log.critical("this slot's VMs could not all be destroyed: %s", exc)
            vms_left = exc
        self.moments.mark("vms_destroyed")  # also where the restore starts
        try:
            self.memory.give_back()
            if vms_left is not None:
                raise vms_left
        except (NodeLockError, JournalError, BackendError, VmCleanupError) as exc:
            log.critical("RESTORE FAILED, the journal keeps what is left for workspace-killall: %s", exc)
            self._enter(STATE_TABLE[self.state].error)
            if notify:
                self.notifier.notify(
                    "error", held_mb, code=int(ExitCode.RESTORE_FAILED),
                    message=str(exc)[:4000], deliver_within=max(exit_by - time.monotonic(), 0.1),
                ).wait(max(exit_by - time.monotonic(), 0))
            self.notifier.close()
            return ExitCode.RESTORE_FAILED
        self.moments.mark("memory_restored")
        self._enter(State.UNRESERVED)
        if not notify:
            self.notifier.close()
            return ExitCode.OK
        unreserved = self.notifier.notify(
            "unreserved", 0, deliver_within=max(exit_by - time.monotonic(), 0.1),
            timings=self.moments.pick("reserved_answered", "vms_destroyed", "memory_restored", prefix="stop_"),
        )
        outcome = unreserved.wait(max(exit_by - time.monotonic(), 0))
        why = unreserved.detail if outcome else "no answer within the grace"
        self.notifier.close()
        if outcome is Outcome.DELIVERED:
            return ExitCode.OK
        log.error("the service was not told 'unreserved' (%s); the node is restored", why)
        return ExitCode.UNDELIVERED

    def _tear_down_vms(self, early: bool, started: float) -> None:
        """Let the service stop its VMs (early unreserve only), then destroy what is left of this slot's."""
        if self.hosting is None:
            return
        if early and self.notifier.reach.silent_before(started):
            log.warning(
                "early unreserve: %s, since before the stop: not waiting for its stop-vm commands",
                self.notifier.reach.describe(),
            )
        elif early:
            wait = self.request.grace_s * self.earlywaitratio
            # The line only where the site wants VMs warned; their features say the new end anyway.
            self._warn_vms(time.time() + wait, "release" if self._stop_kind == "release" else "stop",
                           line=bool(self.warn_before_s))
            left = self.hosting.wait_empty(started + wait)
            log.info(
                "early unreserve: %s after %.0f ms (the service had up to %.1f s = grace x earlywaitratio)",
                f"VM(s) {', '.join(left)} still running" if left else "no VM running",
                (time.monotonic() - started) * 1000, wait,
            )
        t0 = time.monotonic()
        destroyed = self.hosting.teardown()
        if destroyed:
            log.info("destroyed VM(s) %s in %.1f ms", ", ".join(destroyed), (time.monotonic() - t0) * 1000)

