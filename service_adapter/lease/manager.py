"""The lease manager, what a service embeds: reserve, release, and the watch that applies the rules.

``reserve`` records the lease and its slot, then submits the job;
``release`` cancels it; ``tick`` reads every lease still open from the
store (so a restarted service simply resumes), asks the provider about all
their jobs in one call, applies :func:`~service_adapter.lease.rules.decide`,
writes each transition as a compare-and-set on the old state, and cancels
jobs where told (:mod:`.watch`). ``start`` runs ``tick`` in a thread woken
by store commits (a pilot's notification) or every ``status_interval_s``. No HTTP here: the
operator API (``api.py``) wraps it.
"""

from __future__ import annotations

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
from service_adapter.providers.jobscript import MAX_EXCLUDED_NODES, NODE_NAME_RE
from service_adapter.lease.watch import LeaseWatch
from service_adapter.store import LeaseEvent, LeaseRow, PilotRow, Store

log = logging.getLogger("service_adapter.lease")

#: How far ahead a lease may be asked to start.
MAX_START_AHEAD_S = 366 * 86400
#: The most one extension may add.
MAX_EXTENSION_S = 10**8
#: The states in which a lease may be extended (its job is queued or its hosts hold it).
EXTENDABLE = ("scheduled", "pending", "reserving", "ready", "running")


class LeaseManager(LeaseWatch):
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
        self._kept_leases: tuple[int, float, list[LeaseRow]] | None = None  # (store version, monotonic, rows)
        self._silence_looked_at: float | None = None  # when the last tick looked for silent hosts (clock)
        self._thread: threading.Thread | None = None
        self._lead = None  # on a store shared by several receivers: whether this one's ticks act (start())
        self._stopping = threading.Event()

    # -- requests ------------------------------------------------------------------

    def reserve(self, nodes: int, memory_mb: int, duration_s: float, owner: str = "operator",
                images: list[dict] | None = None, start_at: float | None = None,
                release_when_idle_s: float | None = None, exclude_nodes=()) -> LeaseInfo:
        """Record a lease of ``nodes`` x ``memory_mb`` MB for ``duration_s`` s, then submit its pilot job.

        ``images`` (listed images, already resolved by the image catalogue)
        are prefetched by each host as soon as it has reserved. With
        ``start_at`` (epoch seconds, in the future) the job is submitted at
        once with that begin time, so the batch system plans the nodes in
        advance; the lease is ``scheduled`` until then. With
        ``release_when_idle_s`` a held lease is released once no VM has been
        on it for that long (from when it was ready or its last VM ended).
        ``exclude_nodes``: nodes the batch system must not give its job (a
        pool's black-holed nodes; not every batch system can).

        The lease and its slot are committed before the job is submitted, so
        a pilot's first notification finds them. Raises
        :class:`InvalidLease` (also a ValueError) for bad values, nothing
        recorded; :class:`LeaseError` if the LRM refuses the job (the lease
        is then recorded as failed with the LRM's message).
        """
        _check_request(nodes, memory_mb, duration_s, owner)
        now = self.clock()
        _check_start(start_at, now)
        _check_idle(release_when_idle_s)
        exclude_nodes = self._check_exclude(exclude_nodes)
        lease_id, slot = str(uuid.uuid4()), str(uuid.uuid4())
        self.store.create_lease(
            lease_id, slot, owner=owner, nodes=nodes, memory_mb=memory_mb, duration_s=duration_s, now=now,
            images=images, start_at=start_at, release_when_idle_s=release_when_idle_s, exclude_nodes=exclude_nodes,
        )
        log.info("lease %s created for %s: %d x %d MB for %g s%s (slot %s)", lease_id, owner, nodes, memory_mb,
                 duration_s, "" if start_at is None else f" from {format_epoch(start_at)}", slot)
        job = PilotJob(slot, nodes, memory_mb, duration_s, self.grace_s, self.contact, self.pilot_config,
                       lease=lease_id, slot_secret=self.store.slot_secret(slot), begin_at=start_at,
                       warn_before_s=self.warn_before_s, exclude_nodes=exclude_nodes)
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

    def check(self, nodes: int, memory_mb: int, duration_s: float, owner: str = "operator",
              start_at: float | None = None, release_when_idle_s: float | None = None, exclude_nodes=()) -> None:
        """Whether :meth:`reserve` would take these values (a dry run: nothing recorded, nothing submitted);
        raises :class:`InvalidLease` saying why not. The batch system is not asked."""
        _check_request(nodes, memory_mb, duration_s, owner)
        _check_start(start_at, self.clock())
        _check_idle(release_when_idle_s)
        self._check_exclude(exclude_nodes)

    def _check_exclude(self, exclude_nodes) -> tuple[str, ...]:
        exclude_nodes = check_exclude(exclude_nodes)
        if exclude_nodes and not self.provider.excludes_nodes:
            raise InvalidLease(f"the {self.provider.name} provider cannot keep a job off named nodes: reserve "
                               "without exclude_nodes")
        return exclude_nodes

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


def _check_idle(release_when_idle_s) -> None:
    if release_when_idle_s is None:
        return
    if (not isinstance(release_when_idle_s, (int, float)) or isinstance(release_when_idle_s, bool)
            or not math.isfinite(release_when_idle_s) or not 0 < release_when_idle_s <= MAX_EXTENSION_S):
        raise InvalidLease(f"release_when_idle_s must be a number of seconds above 0, at most {MAX_EXTENSION_S:g}, "
                           f"got {release_when_idle_s!r}")


def check_exclude(exclude_nodes) -> tuple[str, ...]:
    """``exclude_nodes`` as a tuple of distinct node names; :class:`InvalidLease` naming the first bad one."""
    if not isinstance(exclude_nodes, (list, tuple)) or len(exclude_nodes) > MAX_EXCLUDED_NODES:
        raise InvalidLease(f"exclude_nodes must be a list of at most {MAX_EXCLUDED_NODES} node names")
    for node in exclude_nodes:
        if not isinstance(node, str) or not NODE_NAME_RE.fullmatch(node):
            raise InvalidLease(f"exclude_nodes: {str(node)[:64]!r} is not a node name (letters, digits, . _ -; "
                               "at most 128)")
    return tuple(dict.fromkeys(exclude_nodes))


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
