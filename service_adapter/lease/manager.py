"""The lease manager, what a service embeds: reserve, release, and the watch that applies the rules.

``reserve`` records the lease and its slot, then submits the job;
``release`` cancels it; ``tick`` reads every lease still open from the
store (so a restarted service simply resumes), asks the provider about all
their jobs in one call, applies :func:`~service_adapter.lease.rules.decide`,
writes each transition as a compare-and-set on the old state, and cancels
jobs where told. ``start`` runs ``tick`` in a thread woken by store commits
(a pilot's notification) or every ``status_interval_s``. No HTTP here: the
operator API (``api.py``) wraps it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
import uuid
from typing import Callable, Iterable

from workspace_common.protocol import format_epoch
from workspace_common.errors import first_line
from service_adapter.commandboard import CommandBoard
from service_adapter.lease.rules import (
    HOLDING, LEASE_STATES, ExtensionRefused, InvalidLease, LeaseError, Timing, UnknownLease, decide,
)
from service_adapter.lease.views import LeaseInfo, Usage
from service_adapter.providers.base import JobState, PilotJob, Provider, ProviderError
from service_adapter.store import LeaseEvent, LeaseRow, PilotRow, Store, StoreClosed
from service_adapter.store.rows import earliest_expiry

log = logging.getLogger("service_adapter.lease")

#: The longest rest between two ticks that the length of the last one imposes (see ``_run``).
MAX_REST_S = 0.5
#: The longest a tick reuses pilots an earlier tick read (see ``_pilots_and_vms``).
REREAD_S = 30.0
#: How far ahead a lease may be asked to start.
MAX_START_AHEAD_S = 366 * 86400
#: The most one extension may add.
MAX_EXTENSION_S = 10**8
#: The states in which a lease may be extended (its job is queued or its hosts hold it).
EXTENDABLE = ("scheduled", "pending", "reserving", "ready", "running")


class LeaseManager:
    """Makes, watches and ends leases through one provider; all state is in the store.

    ``grace_s`` is the pilots' grace (their time to restore and report once
    stopped); ``queue_timeout_s`` and ``release_grace_s`` are :class:`Timing`;
    ``status_interval_s`` bounds how often the provider is asked about jobs
    (and how long the background thread sleeps without a commit). With a
    ``board`` (the receiver's :class:`CommandBoard`) and ``lost_after_s``, a
    host that holds memory but has not polled for commands for that long
    is given up as lost (its VMs with it) and the lease fails. Several
    managers over one store file do not double-apply a transition
    (compare-and-set), though each would cancel on its own.
    """

    def __init__(
        self, store: Store, provider: Provider, *, contact: str, pilot_config: str, grace_s: float = 10.0,
        queue_timeout_s: float = 300.0, release_grace_s: float = 30.0, status_interval_s: float = 2.0,
        clock: Callable[[], float] = time.time, board: CommandBoard | None = None,
        lost_after_s: float | None = None, warn_before_s: float = 0.0,
    ):
        checked = [("grace_s", grace_s), ("queue_timeout_s", queue_timeout_s),
                   ("release_grace_s", release_grace_s), ("status_interval_s", status_interval_s)]
        if lost_after_s is not None:
            checked.append(("lost_after_s", lost_after_s))
        for name, value in checked:
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a number above 0, got {value!r}")
        if not (isinstance(warn_before_s, (int, float)) and math.isfinite(warn_before_s) and warn_before_s >= 0):
            raise ValueError(f"warn_before_s must be a number, 0 or more, got {warn_before_s!r}")
        self.warn_before_s = warn_before_s
        self.store = store
        self.provider = provider
        self.contact = contact
        self.pilot_config = pilot_config
        self.grace_s = grace_s
        self.timing = Timing(queue_timeout_s, release_grace_s)
        self.status_interval_s = status_interval_s
        self.clock = clock
        self.board = board
        self.lost_after_s = lost_after_s if board is not None else None
        self._lock = threading.RLock()  # one tick at a time (release and wait tick too)
        # One extension at a time, apart from the ticks: its batch system commands may take a while.
        self._extend_lock = threading.Lock()
        self._status: dict[str, JobState] = {}
        self._status_at: float | None = None
        self._status_spent_s = 0.0  # how long this tick's status call took (0: the last answer was reused)
        self._cancel_tried: dict[str, float] = {}
        self._forced: set[str] = set()  # leases whose job got the forced cancel (once per process)
        self._kept_pilots: dict[str, tuple[int, list[PilotRow]]] = {}  # slot -> (its pilot mark, its pilots)
        self._kept_since = 0.0  # when _kept_pilots was last emptied (monotonic)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- requests ------------------------------------------------------------------

    def reserve(self, nodes: int, memory_mb: int, duration_s: float, owner: str = "operator",
                images: list[dict] | None = None, start_at: float | None = None) -> LeaseInfo:
        """Record a lease of ``nodes`` x ``memory_mb`` MB for ``duration_s`` s, then submit its pilot job.

        ``images`` (listed images, already resolved by the image catalogue)
        are prefetched by each host as soon as it has reserved. With
        ``start_at`` (epoch seconds, in the future) the job is submitted at
        once with that begin time, so the batch system plans the nodes in
        advance; the lease is ``scheduled`` until then.

        The lease and its slot are committed before the job is submitted, so
        a pilot's first notification finds them. Raises
        :class:`InvalidLease` (also a ValueError) for bad values, nothing
        recorded; :class:`LeaseError` if the LRM refuses the job (the lease
        is then recorded as failed with the LRM's message).
        """
        _check_request(nodes, memory_mb, duration_s, owner)
        now = self.clock()
        _check_start(start_at, now)
        lease_id, slot = str(uuid.uuid4()), str(uuid.uuid4())
        self.store.create_lease(
            lease_id, slot, owner=owner, nodes=nodes, memory_mb=memory_mb, duration_s=duration_s, now=now,
            images=images, start_at=start_at,
        )
        log.info("lease %s created for %s: %d x %d MB for %g s%s (slot %s)", lease_id, owner, nodes, memory_mb,
                 duration_s, "" if start_at is None else f" from {format_epoch(start_at)}", slot)
        job = PilotJob(slot, nodes, memory_mb, duration_s, self.grace_s, self.contact, self.pilot_config,
                       lease=lease_id, slot_secret=self.store.slot_secret(slot), begin_at=start_at,
                       warn_before_s=self.warn_before_s)
        submit_started = self.clock()
        try:
            job_id = self.provider.submit(job)
        except Exception as exc:
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            reason = f"the LRM refused the pilot job: {message}"
            first = "pending" if start_at is None else "scheduled"
            if self.store.transition_lease(lease_id, first, "failed", reason, now=self.clock(), ended=True):
                log.info("lease %s: %s -> failed: %s", lease_id, first, reason)
            if isinstance(exc, ProviderError):
                raise LeaseError(reason, lease_id) from exc
            raise
        self.store.set_job_id(slot, job_id, reason=f"job {job_id} submitted; waiting for {nodes} pilots",
                              submitted=(submit_started, self.clock()))
        log.info("lease %s: job %s submitted", lease_id, job_id)
        return self.get(lease_id)

    def release(self, lease_id: str) -> LeaseInfo:
        """End a lease early: cancel its job now (pilots take their early-unreserve path). Idempotent.

        An ended lease is returned as it is. A cancel the LRM refuses is
        logged and retried by the next ticks. Raises :class:`UnknownLease`.
        """
        row = self._row(lease_id)
        if LEASE_STATES[row.state].terminal:
            return self.get(lease_id)
        with self._lock:
            # A held lease's release is its before-end event (its hosts hold memory, maybe VMs).
            warn = self.warn_before_s > 0 and row.state in HOLDING
            if self.store.request_release(lease_id, self.clock(), warn=warn):
                log.info("lease %s: release requested (state %s)", lease_id, row.state)
            self._tick([lease_id])
        return self.get(lease_id)

    def get(self, lease_id: str) -> LeaseInfo:
        """The lease now; raises :class:`UnknownLease`."""
        return self._info(self._row(lease_id))

    def list(self, states: Iterable[str] | None = None, owner: str | None = None) -> list[LeaseInfo]:
        """Leases, newest first; only those in ``states`` and of ``owner`` if given (ValueError: unknown state)."""
        if states is not None:
            states = [states] if isinstance(states, str) else list(states)
            unknown = sorted(set(states) - set(LEASE_STATES))
            if unknown:
                raise ValueError(f"unknown lease state(s) {', '.join(unknown)}: use {', '.join(LEASE_STATES)}")
        return [self._info(row) for row in self.store.list_leases(states, owner)]

    def usage(self, lease_id: str | None = None, owner: str | None = None) -> Usage:
        """Summed usage of ended holds: of one lease, of one owner, or of all; raises UnknownLease for an unknown id."""
        if lease_id is not None:
            self._row(lease_id)
        return Usage(*self.store.usage_totals(lease_id=lease_id, owner=owner))

    def history(self, lease_id: str, after: int = 0) -> list[LeaseEvent]:
        """The lease's creation, its transitions and events (``ending``, ``extended``), in order; only those
        numbered above ``after`` (a poller's cursor) if given. Raises UnknownLease."""
        self._row(lease_id)
        return self.store.lease_events(lease_id, after)

    def extend(self, lease_id: str, by_s: float) -> LeaseInfo:
        """Lengthen a lease by ``by_s`` seconds: the batch system first, then the lease, then its pilots.

        The provider asks the batch system for the job's longer time limit
        (its policy and the partition's limit decide); only when that
        succeeded is the lease's duration and end moved, and each host that
        holds the lease told its new duration over the command channel (the
        pilot moves its own deadline, never past what the batch system now
        allows, and reports its new ``expires_at``). Raises
        :class:`UnknownLease`; :class:`InvalidLease` for a bad ``by_s``;
        :class:`ExtensionRefused` (nothing changed) when the lease cannot be
        extended as it stands or the batch system said no.
        """
        if (not isinstance(by_s, (int, float)) or isinstance(by_s, bool) or not math.isfinite(by_s)
                or not 0 < by_s <= MAX_EXTENSION_S):
            raise InvalidLease(f"by_s must be a number of seconds above 0 and at most {MAX_EXTENSION_S}, "
                               f"got {by_s!r}")
        with self._extend_lock:
            row = self._row(lease_id)
            if row.state not in EXTENDABLE or row.release_requested_at is not None:
                why = f"it is {row.state}" if row.state not in EXTENDABLE else "a release was asked"
                raise ExtensionRefused(f"lease {lease_id} cannot be extended: {why}", lease_id)
            if row.job_id is None:
                raise ExtensionRefused(f"lease {lease_id} cannot be extended: its job is not submitted yet", lease_id)
            pilots = self.store.pilots(row.slot)
            leaving = [p.host for p in pilots if p.ended_by is not None or p.lost_at is not None]
            if leaving:
                raise ExtensionRefused(f"lease {lease_id} cannot be extended: {', '.join(leaving)} already "
                                       "ended its hold", lease_id)
            duration = row.duration_s + by_s
            try:
                self.provider.extend(row.job_id, duration)
            except ProviderError as exc:
                raise ExtensionRefused(f"lease {lease_id} cannot be extended by {by_s:g} s: "
                                       f"{first_line(exc)}", lease_id) from exc
            reason = f"extended by {by_s:g} s to {duration:g} s: the batch system's time limit is raised"
            told = self.store.extend_lease(lease_id, row.duration_s, by_s, reason, self.clock())
            if told is None:
                # Changed under us (another manager's extension, or it ended): the LRM's limit is only longer.
                raise ExtensionRefused(f"lease {lease_id} changed while it was being extended: look again",
                                       lease_id)
            reason += f"; {told} host(s) told"
            log.info("lease %s: %s", lease_id, reason)
        return self.get(lease_id)

    def wait(self, lease_id: str, states: Iterable[str], timeout: float) -> LeaseInfo | None:
        """Block until the lease is in one of ``states`` (woken by commits); None on timeout.

        Without the background thread (:meth:`start`), the waiting caller
        ticks itself.
        """
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while True:
            seen = self.store.version
            if not self.running:
                self.tick()
            info = self.get(lease_id)
            if info.state in states:
                return info
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.store.wait_changed(seen, remaining if self.running else min(remaining, self.status_interval_s))

    # -- watching ------------------------------------------------------------------

    def tick(self) -> list[tuple[str, str, str, str]]:
        """Look at every open lease once; returns the transitions made as (lease id, old, new, reason)."""
        with self._lock:
            return self._tick(None)

    def _tick(self, only: list[str] | None) -> list[tuple[str, str, str, str]]:
        now = self.clock()
        rows = self.store.leases_to_watch()
        if only is not None:
            rows = [r for r in rows if r.id in only]
        jobs = self._job_states([r.job_id for r in rows if r.job_id], now)
        pilots, running = self._pilots_and_vms(rows)
        changes = []
        for row in rows:
            job_state = jobs.get(row.job_id, JobState.UNKNOWN) if row.job_id else JobState.UNKNOWN
            if job_state.finished and row.job_finished_at is None:
                self.store.mark_job_finished(row.id, now)
                row = dataclasses.replace(
                    row, job_finished_at=now,
                    cancelled_at=now if row.cancel_requested_at is not None and row.cancelled_at is None
                    else row.cancelled_at,
                )
            if not LEASE_STATES[row.state].terminal:
                row = self._advance(row, job_state, now, changes, pilots.get(row.slot, []), running.get(row.id, 0))
                self._warn_if_ending(row)
            if (row.cancel_requested_at is not None and row.cancelled_at is None and row.job_id
                    and not job_state.finished):
                self._cancel(row, now)
            elif (row.cancelled_at is not None and row.job_id and job_state is JobState.RUNNING
                  and now - row.cancelled_at > self.timing.release_grace_s and row.id not in self._forced):
                self._force_cancel(row)
        return changes

    def _pilots_and_vms(self, rows: list[LeaseRow]) -> tuple[dict[str, list[PilotRow]], dict[str, int]]:
        """Each open lease's pilots (by slot) and running VMs (by lease), read for all of them at once.

        With a thousand leases, two queries per lease per tick were most of the tick, and reading
        every pilot again still took tens of ms; so a slot's pilots are kept from an earlier tick
        while the store says no commit changed them since (:meth:`Store.pilot_marks`), and all are
        read again at least every :data:`REREAD_S` seconds (another process's writes leave no mark).
        """
        open_rows = [r for r in rows if not LEASE_STATES[r.state].terminal]
        slots = [r.slot for r in open_rows if r.slot]
        now = time.monotonic()
        if now - self._kept_since >= REREAD_S:
            self._kept_pilots, self._kept_since = {}, now
        marks = self.store.pilot_marks(slots)  # before the read: a commit after it shows at the next tick
        kept = self._kept_pilots
        stale = [slot for slot in slots if slot not in kept or kept[slot][0] != marks[slot]]
        if stale:
            for slot, found in self.store.pilots_by_slot(stale).items():
                kept[slot] = (marks[slot], found)
        watched = set(slots)
        for slot in [slot for slot in kept if slot not in watched]:
            del kept[slot]
        running = self.store.running_vm_counts([r.id for r in open_rows if r.state in HOLDING])
        return {slot: kept[slot][1] for slot in slots}, running

    def _force_cancel(self, row: LeaseRow) -> None:
        """The gentle cancel has not ended the job within the release grace: the LRM's outright cancel, once."""
        try:
            self.provider.cancel(row.job_id, force=True)
        except Exception as exc:  # retried on a later tick
            log.warning("lease %s: forced cancel of job %s failed: %s", row.id, row.job_id, exc)
            return
        self._forced.add(row.id)
        log.warning("lease %s: job %s still ran %g s after its cancel: cancelled outright",
                    row.id, row.job_id, self.timing.release_grace_s)

    def _advance(self, row: LeaseRow, job_state: JobState, now: float, changes: list,
                 pilots: list[PilotRow], running: int) -> LeaseRow:
        """Apply decide() until the lease stays put (a restart may catch up several steps at once).

        ``pilots`` and ``running`` (its VMs that run) were read for this tick.
        """
        # A transition is stamped no earlier than its inputs were read: the tick's start can precede the
        # commit of a notification it then sees (the LRM query runs in between).
        now = max(now, self.clock())
        if row.state in HOLDING and self._give_up_silent(row, pilots, now):
            pilots = self.store.pilots(row.slot)
        for _ in range(len(LEASE_STATES)):
            decision = decide(row, pilots, job_state, now, self.timing, vms_running=running)
            if decision.state == row.state:
                break
            if decision.state not in LEASE_STATES[row.state].next:  # a bug in decide: refuse, loudly
                log.error("lease %s: decide() asked for %s -> %s, which LEASE_STATES does not allow",
                          row.id, row.state, decision.state)
                break
            ended = LEASE_STATES[decision.state].terminal
            ready_at = expires_at = None
            if decision.state == "ready" and row.ready_at is None:
                ready_at = max((p.reserved_at for p in pilots if p.reserved_at is not None), default=now)
                expires_at = earliest_expiry(p.expires_at for p in pilots)
            if not self.store.transition_lease(row.id, row.state, decision.state, decision.reason, now=now,
                                               ended=ended, ready_at=ready_at, cancel=decision.cancel,
                                               expires_at=expires_at):
                log.info("lease %s: no longer %s (changed elsewhere); looking again next tick", row.id, row.state)
                break
            log.info("lease %s: %s -> %s: %s", row.id, row.state, decision.state, decision.reason)
            changes.append((row.id, row.state, decision.state, decision.reason))
            row = dataclasses.replace(
                row, state=decision.state, reason=decision.reason, updated_at=now,
                ready_at=row.ready_at if row.ready_at is not None else ready_at,
                expires_at=expires_at if expires_at is not None else row.expires_at,
                ended_at=(row.ended_at or now) if ended else row.ended_at,
                cancel_requested_at=(row.cancel_requested_at or now) if decision.cancel else row.cancel_requested_at,
            )
        return row

    def _warn_if_ending(self, row: LeaseRow) -> None:
        """Record the before-end event of a held lease once its end is within warn_before_s."""
        if (not self.warn_before_s or row.state not in HOLDING or row.warned_at is not None
                or row.expires_at is None):
            return
        now = self.clock()
        left = row.expires_at - now
        if left > self.warn_before_s:
            return
        reason = (f"ending: the lease ends at its deadline, {format_epoch(row.expires_at)} (in {max(left, 0):.0f} s); "
                  "its pilots warn their VMs, then stop them")
        if self.store.mark_warned(row.id, reason, now):
            log.info("lease %s: %s", row.id, reason)

    def _give_up_silent(self, row: LeaseRow, pilots: list[PilotRow], now: float) -> bool:
        """Mark lost every holding host silent for longer than lost_after_s; whether any was marked."""
        if self.lost_after_s is None:
            return False
        marked = False
        for p in pilots:
            if p.reserved_at is None or p.ended_by is not None or p.lost_at is not None:
                continue
            silent = self.board.silent_for((row.slot, p.host), since=p.reserved_at)
            if silent > self.lost_after_s:
                why = f"{p.host} has not polled for commands for {silent:.0f} s (limit {self.lost_after_s:g} s)"
                if self.store.mark_lost(row.slot, p.host, now=now, why=why):
                    log.warning("lease %s: %s: lost", row.id, why)
                    marked = True
        return marked

    def _job_states(self, job_ids: list[str], now: float) -> dict[str, JobState]:
        """The LRM's states of ``job_ids``: one status call at most every status_interval_s, else the last answer."""
        if not job_ids:
            return {}
        fresh = self._status_at is not None and 0 <= now - self._status_at < self.status_interval_s
        if not fresh:
            asked = sorted(set(job_ids))
            started = time.monotonic()
            try:
                self._status = dict(self.provider.status(asked))
            except Exception:  # the contract says status never raises; a bug must not stop the watch
                log.exception("provider status failed; every job counts as unknown")
                self._status = {}
            self._status_spent_s = time.monotonic() - started
            log.debug("status of %d job(s) in %.1f ms", len(asked), self._status_spent_s * 1000)
            self._status_at = now
        return self._status

    def _cancel(self, row: LeaseRow, now: float) -> None:
        last = self._cancel_tried.get(row.id)
        if last is not None and 0 <= now - last < self.status_interval_s:
            return
        self._cancel_tried[row.id] = now
        try:
            self.provider.cancel(row.job_id)
        except Exception as exc:  # ProviderError by contract; anything else is retried the same way
            log.warning("lease %s: cancel of job %s failed (retrying every %g s): %s",
                        row.id, row.job_id, self.status_interval_s, exc)
            return
        self.store.mark_cancelled(row.id, self.clock())
        self._cancel_tried.pop(row.id, None)
        log.info("lease %s: job %s cancelled", row.id, row.job_id)

    # -- the background thread --------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the background thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Run :meth:`tick` in a background thread, after every commit or every status_interval_s."""
        if self.running:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="lease-manager", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the background thread (the leases and their jobs go on); safe to call twice."""
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        self.store.wake()
        thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while not self._stopping.is_set():
            seen = self.store.version
            started = time.monotonic()
            self._status_spent_s = 0.0
            try:
                self.tick()
            except Exception as exc:
                if self.store.closed or isinstance(exc, StoreClosed):
                    log.warning("the store is closed: the lease manager stops")
                    return
                log.exception("lease manager tick failed; trying again")
            # Rest as long as the tick worked before looking again: during a burst of notifications every
            # commit would otherwise start the next tick at once, and a tick over a thousand leases takes
            # tens of ms of the GIL the receiver needs. Waiting on the LRM's status command is not work
            # (it holds no GIL), so it does not count; with a few leases the rest is a millisecond or two.
            worked = time.monotonic() - started - self._status_spent_s
            if self._stopping.wait(min(max(worked, 0.0), MAX_REST_S)):
                return
            self.store.wait_changed(seen, self.status_interval_s)

    # -- helpers ------------------------------------------------------------------------

    def _row(self, lease_id: str) -> LeaseRow:
        row = self.store.get_lease(lease_id) if isinstance(lease_id, str) else None
        if row is None:
            raise UnknownLease(lease_id)
        return row

    def _info(self, row: LeaseRow) -> LeaseInfo:
        return LeaseInfo(
            row, pilots=self.store.pilots(row.slot) if row.slot else [],
            usage=Usage(*self.store.usage_totals(lease_id=row.id)), vms=self.store.vms(row.id),
        )


def _check_start(start_at, now: float) -> None:
    if start_at is None:
        return
    if not isinstance(start_at, (int, float)) or isinstance(start_at, bool) or not math.isfinite(start_at):
        raise InvalidLease(f"start_at must be a time, got {start_at!r}")
    if start_at <= now:
        raise InvalidLease(f"start_at {format_epoch(start_at)} is not in the future (now {format_epoch(now)}): "
                           "leave it out to start at once")
    if start_at - now > MAX_START_AHEAD_S:
        raise InvalidLease(f"start_at {format_epoch(start_at)} is more than {MAX_START_AHEAD_S // 86400} days ahead")


def _check_request(nodes, memory_mb, duration_s, owner) -> None:
    def whole(name, value, high):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
            raise InvalidLease(f"{name} must be a whole number from 1 to {high}, got {value!r}")

    whole("nodes", nodes, 100_000)
    whole("memory_mb", memory_mb, 2**31 - 1)
    if (not isinstance(duration_s, (int, float)) or isinstance(duration_s, bool)
            or not math.isfinite(duration_s) or duration_s <= 0):
        raise InvalidLease(f"duration_s must be a number of seconds above 0, got {duration_s!r}")
    if not isinstance(owner, str) or not 1 <= len(owner) <= 128 or not owner.isprintable() or owner != owner.strip():
        raise InvalidLease(f"owner must be 1 to 128 printable characters without surrounding blanks, got {owner!r}")
