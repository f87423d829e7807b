"""The lease manager's watch: each tick reads the open leases, asks the provider about their jobs at once,
applies :func:`~service_adapter.lease.rules.decide` and acts (transitions, warnings, cancels, lost hosts).

:class:`LeaseWatch` is a base of :class:`service_adapter.lease.manager.LeaseManager`
(which takes the requests and holds the state); with its background
thread, woken by store commits or every ``status_interval_s``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from service_adapter.lease.rules import HOLDING, LEASE_STATES, decide
from service_adapter.providers.base import JobState
from service_adapter.store import LeaseRow, PilotRow, StoreClosed
from service_adapter.store.rows import earliest_expiry
from workspace_common.protocol import format_epoch

log = logging.getLogger("service_adapter.lease")

#: The longest rest between two ticks that the length of the last one imposes (see ``LeaseWatch._run``).
MAX_REST_S = 0.5
#: How much longer than a tick worked the manager rests after it (at most MAX_REST_S): it takes at most a
#: quarter of the time while commits keep coming (a burst of notifications or VM starts is the receiver's).
REST_PER_WORK = 3.0
#: The longest a tick reuses pilots an earlier tick read (see ``LeaseWatch._pilots_and_vms``).
REREAD_S = 30.0
#: How many times within lost_after_s the watch looks for hosts that went silent.
SILENCE_LOOKS = 10
#: How often a manager that does not lead (another receiver's does, on one PostgreSQL store) asks for the lead.
LEAD_LOOK_S = 1.0


class LeaseWatch:
    """The watching half of :class:`service_adapter.lease.manager.LeaseManager` (it holds no state of its own)."""

    # -- watching ------------------------------------------------------------------

    def tick(self) -> list[tuple[str, str, str, str]]:
        """Look at every open lease once; returns the transitions made as (lease id, old, new, reason)."""
        with self._lock:
            return self._tick(None)

    def _tick(self, only: list[str] | None) -> list[tuple[str, str, str, str]]:
        now = self.clock()
        rows = self._leases_to_watch()
        # Silence is looked for a tenth as often as lost_after: every host of every lease on every 2 s tick was a
        # fifth of the service's CPU with 10,000 parked pilots; a lost host is then given up at most 10 % late.
        due = (self._silence_looked_at is None or self.lost_after_s is None
               or not 0 <= now - self._silence_looked_at < self.lost_after_s / SILENCE_LOOKS)
        if due and only is None:
            self._silence_looked_at = now
        look_for_silence = due or only is not None  # a tick of a few leases (a request's) looks at theirs
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
                row = self._advance(row, job_state, now, changes, pilots.get(row.slot, []), running.get(row.id, 0),
                                    look_for_silence)
                self._warn_if_ending(row)
                self._release_if_idle(row, running.get(row.id, 0))
            if (row.cancel_requested_at is not None and row.cancelled_at is None and row.job_id
                    and not job_state.finished):
                self._cancel(row, now)
            elif (row.cancelled_at is not None and row.job_id and job_state is JobState.RUNNING
                  and now - row.cancelled_at > self.timing.release_grace_s and row.id not in self._forced):
                self._force_cancel(row)
        return changes

    def _leases_to_watch(self) -> list[LeaseRow]:
        """The open leases (:meth:`Store.leases_to_watch`), kept from an earlier tick while no commit that may change
        them came since (:attr:`Store.lease_version`; on PostgreSQL it counts the other receivers' commits too)
        and for at most :data:`REREAD_S` (another process's writes to a SQLite file leave no mark)."""
        version, now = self.store.lease_version, time.monotonic()  # before the read: a commit after it shows
        kept = self._kept_leases
        if kept is not None and kept[0] == version and 0 <= now - kept[1] < REREAD_S:
            return kept[2]
        rows = self.store.leases_to_watch()
        self._kept_leases = (version, now, rows)
        return rows

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
                 pilots: list[PilotRow], running: int, look_for_silence: bool = True) -> LeaseRow:
        """Apply decide() until the lease stays put (a restart may catch up several steps at once).

        ``pilots`` and ``running`` (its VMs that run) were read for this tick; ``look_for_silence``: give up
        the hosts silent for longer than lost_after first.
        """
        # A transition is stamped no earlier than its inputs were read: the tick's start can precede the
        # commit of a notification it then sees (the LRM query runs in between).
        now = max(now, self.clock())
        if row.state in HOLDING and look_for_silence and self._give_up_silent(row, pilots, now):
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

    def _release_if_idle(self, row: LeaseRow, running: int) -> None:
        """Release a held lease that asked for it (``release_when_idle_s``) once no VM has been on it that long:
        counted from when it was ready or its last VM ended, whichever came later."""
        if (row.release_when_idle_s is None or row.state not in HOLDING or row.release_requested_at is not None
                or row.ready_at is None or running):
            return
        active, last_ended = self.store.vm_activity(row.id)
        if active:
            return
        now = self.clock()
        idle = now - max(row.ready_at, last_ended or 0.0)
        if idle < row.release_when_idle_s:
            return
        why = (f"ending: no VM has been on the lease for {idle:.0f} s (it asked to be released after "
               f"{row.release_when_idle_s:g} s idle); the pilots give the nodes back now")
        if self.store.request_release(row.id, now, warn=True, why=why):
            log.info("lease %s: %s", row.id, why)

    def _give_up_silent(self, row: LeaseRow, pilots: list[PilotRow], now: float) -> bool:
        """Mark lost every holding host silent for longer than lost_after_s; whether any was marked."""
        if self.lost_after_s is None:
            return False
        marked = False
        holding = [((row.slot, p.host), p.reserved_at) for p in pilots
                   if p.reserved_at is not None and p.ended_by is None and p.lost_at is None]
        for (_slot, host), silent in self.board.silent_over(self.lost_after_s, holding):
            why = f"{host} has not polled for commands for {silent:.0f} s (limit {self.lost_after_s:g} s)"
            if self.store.mark_lost(row.slot, host, now=now, why=why):
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
        """Run :meth:`tick` in a background thread, after every commit or every status_interval_s.

        On a store shared by several receivers (PostgreSQL) only the one that
        holds the lead (:meth:`Store.new_lead`) ticks; the others ask for it
        every :data:`LEAD_LOOK_S` and take over when its process is gone.
        """
        if self.running:
            return
        self._lead = self.store.new_lead()
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
        if self._lead is not None:
            self._lead.release()

    def _run(self) -> None:
        while not self._stopping.is_set():
            if self._lead is not None and not self._lead.held():
                if self._stopping.wait(LEAD_LOOK_S):
                    return
                continue
            # Woken by the commits that may change a decision: a burst of VM starts (each its own commit) wakes
            # no tick; in bench_scale's fan-out to 10,000 hosts the ticks they woke were 15 % of the CPU.
            seen = self.store.lease_version
            started = time.monotonic()
            self._status_spent_s = 0.0
            try:
                self.tick()
            except Exception as exc:
                if self.store.closed or isinstance(exc, StoreClosed):
                    log.warning("the store is closed: the lease manager stops")
                    return
                log.exception("lease manager tick failed; trying again")
            # Rest three times as long as the tick worked before looking again: during a burst of notifications
            # or VM starts every commit would otherwise start the next tick at once, and a tick over a thousand
            # leases takes tens of ms of the GIL the receiver needs (at one rest per tick, bench_scale's ticks
            # were 17 % of the service's CPU in a fan-out). Waiting on the LRM's status command is not work (it
            # holds no GIL), so it does not count; with a few leases the rest is a few milliseconds.
            worked = time.monotonic() - started - self._status_spent_s
            if self._stopping.wait(min(max(worked, 0.0) * REST_PER_WORK, MAX_REST_S)):
                return
            self.store.wait_changed(seen, self.status_interval_s, leases=True)
