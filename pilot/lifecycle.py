"""The pilot's lifecycle for one lease on one node: reserve, report, hold, restore, report.

Signal handlers only call :meth:`Pilot.request_stop`; all work happens in
:meth:`Pilot.run` on the main thread. The restore never waits for the
service: notifications are sent by the notifier thread with deadlines, and
the memory is given back whatever they answer.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
from datetime import timedelta

from pilot.backends import BackendError, BalloonBackend, Taken
from pilot.config import PilotConfig
from pilot.exitcodes import ExitCode
from pilot.nodelock import NodeLock, NodeLockError
from pilot.notifier import Delivery, Notifier, Outcome
from pilot.protocol import format_time, utc_now

log = logging.getLogger(__name__)


class State(enum.Enum):
    """The pilot's states; an ``_ERROR`` twin is where a failed step of that state ends."""

    BEGIN = "begin"
    RESERVING = "reserving"
    RESERVING_ERROR = "reserving-error"
    RESERVED = "reserved"
    EARLY_UNRESERVING = "earlyunreserving"
    UNRESERVING = "unreserving"
    UNRESERVING_ERROR = "unreserving-error"
    UNRESERVED = "unreserved"


#: Allowed transitions. A stop request (SIGTERM/SIGINT) in RESERVING or
#: RESERVED leads to EARLY_UNRESERVING; in the unreserving states it changes
#: nothing (the restore is already under way).
TRANSITIONS = {
    State.BEGIN: {State.RESERVING},
    State.RESERVING: {State.RESERVED, State.RESERVING_ERROR, State.EARLY_UNRESERVING, State.UNRESERVING},
    State.RESERVING_ERROR: {State.UNRESERVING},
    State.RESERVED: {State.EARLY_UNRESERVING, State.UNRESERVING},
    State.EARLY_UNRESERVING: {State.UNRESERVED, State.UNRESERVING_ERROR},
    State.UNRESERVING: {State.UNRESERVED, State.UNRESERVING_ERROR},
    State.UNRESERVING_ERROR: set(),
    State.UNRESERVED: set(),
}


@dataclasses.dataclass(frozen=True)
class LeaseRequest:
    """What the job asked this pilot for."""

    slot: str
    host: str
    memory_mb: int
    duration_s: float
    grace_s: float


class Pilot:
    """Runs one lease on this node; :meth:`run` returns the process's :class:`ExitCode`."""

    def __init__(
        self,
        request: LeaseRequest,
        config: PilotConfig,
        backend: BalloonBackend,
        notifier: Notifier,
    ):
        self.request = request
        self.config = config
        self.backend = backend
        self.notifier = notifier
        self.state = State.BEGIN
        self._state_since = time.monotonic()
        self._wake = threading.Event()
        self._stop_reason: str | None = None
        self._holding: Taken | None = None

    def request_stop(self, reason: str) -> None:
        """Ask the pilot to unreserve now (safe to call from a signal handler)."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self._wake.set()

    def _enter(self, state: State) -> None:
        if state not in TRANSITIONS[self.state]:
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

    def _lock(self) -> NodeLock:
        return NodeLock(self.config.lock_dir, self.config.lock_timeout_s)

    def run(self) -> ExitCode:
        """Reserve, report, hold until the deadline or a stop request, restore, report."""
        req = self.request
        started = time.monotonic()
        deadline = started + req.duration_s
        self._enter(State.RESERVING)
        try:
            with self._lock():
                t0 = time.monotonic()
                taken = self.backend.take(req.memory_mb)
                self._holding = taken
            log.info(
                "took %d MB from the host (%s, %d units) in %.1f ms",
                taken.memory_mb, taken.backend, taken.units, (time.monotonic() - t0) * 1000,
            )
        except (NodeLockError, BackendError) as exc:
            code = ExitCode.LOCK_TIMEOUT if isinstance(exc, NodeLockError) else ExitCode.RESERVE_FAILED
            return self._fail_reserving(code, str(exc))

        try:
            return self._hold(taken, deadline)
        except BaseException:
            # Whatever went wrong, the node gets its memory back before the error surfaces.
            if self._holding is not None:
                log.critical("unexpected error while holding: giving the memory back first")
                with self._lock():
                    self.backend.give_back(taken)
                self._holding = None
            raise

    def _hold(self, taken: Taken, deadline: float) -> ExitCode:
        """From memory taken to the end: report, hold, unreserve."""
        if self._stop_reason:
            log.warning("stop requested (%s) while reserving: giving the memory back", self._stop_reason)
            self._enter(State.EARLY_UNRESERVING)
            return self._unreserve(taken, early=True)

        expires_at = format_time(utc_now() + timedelta(seconds=max(deadline - time.monotonic(), 0)))
        reserved = self.notifier.notify(
            "reserved", taken.memory_mb, expires_at=expires_at,
            deliver_within=self.config.reserved_timeout_s,
        )
        reserved.add_done_callback(lambda _: self._wake.set())
        self._wait_until(deadline, reserved.done)
        if not reserved.done():
            # A stop request or the deadline came first: the lease ends either way.
            early = self._stop_reason is not None
            self._enter(State.EARLY_UNRESERVING if early else State.UNRESERVING)
            return self._unreserve(taken, early=early)
        if reserved.outcome is not Outcome.DELIVERED:
            return self._reserved_not_accepted(taken, reserved)

        self._enter(State.RESERVED)
        log.info("holding %d MB until %s", taken.memory_mb, expires_at)
        self._wait_until(deadline)
        early = self._stop_reason is not None
        if early:
            log.info("stop requested (%s) before the deadline: early unreserve", self._stop_reason)
        self._enter(State.EARLY_UNRESERVING if early else State.UNRESERVING)
        return self._unreserve(taken, early=early)

    def _fail_reserving(self, code: ExitCode, reason: str) -> ExitCode:
        log.error("reserve failed: %s", reason)
        self._enter(State.RESERVING_ERROR)
        delivery = self.notifier.notify(
            "error", 0, code=int(code), message=reason[:4000], deliver_within=self.request.grace_s
        )
        delivery.wait(self.request.grace_s)
        self.notifier.close()
        return code

    def _reserved_not_accepted(self, taken: Taken, reserved: Delivery) -> ExitCode:
        if reserved.outcome is Outcome.REFUSED:
            log.error(
                "the service refused 'reserved' (HTTP %s %s): giving the memory back",
                reserved.status, reserved.detail,
            )
            code = ExitCode.SERVICE_REFUSED
        else:
            log.error(
                "'reserved' was not delivered within %g s: giving the memory back",
                self.config.reserved_timeout_s,
            )
            code = ExitCode.SERVICE_UNREACHABLE
        self._enter(State.RESERVING_ERROR)
        self._enter(State.UNRESERVING)
        # The service does not know this slot is reserved: telling it more is pointless.
        result = self._unreserve(taken, early=False, notify=False)
        return result if result is ExitCode.RESTORE_FAILED else code

    def _unreserve(self, taken: Taken, *, early: bool, notify: bool = True) -> ExitCode:
        """Give the memory back first, then tell the service, all within the grace."""
        req = self.request
        exit_by = time.monotonic() + req.grace_s
        if notify:
            self.notifier.notify(
                "earlyunreserving" if early else "unreserving", taken.memory_mb,
                deliver_within=req.grace_s,
            )
        try:
            with self._lock():
                t0 = time.monotonic()
                self.backend.give_back(taken)
                self._holding = None
            log.info("gave %d MB back to the host in %.1f ms", taken.memory_mb, (time.monotonic() - t0) * 1000)
        except (NodeLockError, BackendError) as exc:
            log.critical("RESTORE FAILED, the node needs an administrator: %s", exc)
            self._enter(State.UNRESERVING_ERROR)
            if notify:
                self.notifier.notify(
                    "error", taken.memory_mb, code=int(ExitCode.RESTORE_FAILED),
                    message=str(exc)[:4000], deliver_within=max(exit_by - time.monotonic(), 0.1),
                ).wait(max(exit_by - time.monotonic(), 0))
            self.notifier.close()
            return ExitCode.RESTORE_FAILED
        self._enter(State.UNRESERVED)
        if not notify:
            self.notifier.close()
            return ExitCode.OK
        unreserved = self.notifier.notify(
            "unreserved", 0, deliver_within=max(exit_by - time.monotonic(), 0.1)
        )
        outcome = unreserved.wait(max(exit_by - time.monotonic(), 0))
        self.notifier.close()
        if outcome is Outcome.DELIVERED:
            return ExitCode.OK
        log.error("the service was not told 'unreserved' (%s); the node is restored", outcome)
        return ExitCode.UNDELIVERED
