"""A COBalD pool whose supply is nodes held by leases of one profile (docs/bursting.md).

COBalD's controllers set its ``demand`` (in nodes); its own thread, every
``interval`` seconds, lists its leases from the service (one request: the
leases, their pilots and VMs with their use), asks how much work waits
(:mod:`.waiting`), and acts:

- more demand than leases (held or coming): reserves leases of the profile
  (each a little shorter than the last, so their ends do not fall together);
- less: releases leases not yet held first, then held ones whose VMs are all
  idle, the longest idle first; never one with a busy VM;
- a held lease whose nodes run no VM of the profile: starts one on each node;
- a node whose VMs failed ``blackhole_failures`` times within
  ``blackhole_window_s`` gets no more VMs (a black-hole guard): it counts as
  idle, so the controller's lower demand gives its lease back first, and
  (``exclude_blackholed``, on Slurm and Grid Engine) later leases ask the
  batch system to keep their jobs off it.

Its leases are those of its service account (one pool per account): after a
restart it finds them again, and a reserve whose answer was lost is not
repeated until a later listing could show it (never a lease twice). While the
service cannot be reached it reports what it last knew and changes nothing.
"""

from __future__ import annotations

import logging
import math
import threading
import time

from cobald.daemon import service
from cobald.interfaces import Pool

from service_adapter.burst.profile import ProfileError, parse_profile
from service_adapter.burst.view import LeaseLook, PoolNumbers, look_at, numbers, to_release
from service_adapter.burst.waiting import waiting_from
from service_adapter.client import ClientError, LeaseClient

log = logging.getLogger("service_adapter.burst")

#: Lease states the pool counts as its own open leases.
OPEN_STATES = ("scheduled", "pending", "reserving", "ready", "running")


@service(flavour=threading)
class LeasePool(Pool):
    """Nodes of leases of one profile as a COBalD pool (see the module's docstring).

    Connection: ``service`` (the API's URL), ``user`` and ``secret_file`` (an
    operator account of its own), ``ca_file``. Profile: ``nodes`` per lease,
    ``memory_mb``, ``duration_s``, ``vm``, ``images``, ``stagger``,
    ``release_when_idle_s`` (:class:`~.profile.LeaseProfile`). Behaviour:
    ``waiting`` (:mod:`.waiting`), ``max_leases``, ``interval``,
    ``blackhole_failures``, ``blackhole_window_s`` and ``exclude_blackholed``. The profile is checked
    by the service (a dry run) before the pool exists: a profile it would
    refuse stops COBalD's start with the service's reason.
    """

    def __init__(self, service: str, user: str, secret_file: str, *, memory_mb=None, duration_s=None, nodes=1,
                 vm=None, images=(), stagger=0.2, release_when_idle_s=None, waiting=None, max_leases=16,
                 interval=10.0, ca_file=None, request_timeout=20.0, blackhole_failures=3, blackhole_window_s=600.0,
                 exclude_blackholed=True):
        self.profile = parse_profile(nodes=nodes, memory_mb=memory_mb, duration_s=duration_s, vm=vm, images=images,
                                     stagger=stagger, release_when_idle_s=release_when_idle_s)
        if not isinstance(max_leases, int) or isinstance(max_leases, bool) or max_leases < 1:
            raise ProfileError(f"max_leases must be a whole number from 1, got {max_leases!r}")
        if not isinstance(interval, (int, float)) or not 0 < interval <= 3600:
            raise ProfileError(f"interval must be a number of seconds above 0, at most 3600, got {interval!r}")
        self.waiting = waiting_from(waiting)
        self.max_leases = max_leases
        self.interval = float(interval)
        self.blackhole_failures = int(blackhole_failures)
        self.blackhole_window_s = float(blackhole_window_s)
        if not isinstance(exclude_blackholed, bool):
            raise ProfileError(f"exclude_blackholed must be true or false, got {exclude_blackholed!r}")
        self.exclude_blackholed = exclude_blackholed
        with open(secret_file, encoding="utf-8") as handle:
            secret = handle.read().strip()
        self.client = LeaseClient(service, user, secret, timeout_s=float(request_timeout),
                                  verify_tls=ca_file or True)
        self.user = user
        self._check_with_the_service()
        self._demand = 0.0
        self._numbers = PoolNumbers(0.0, 0.0, 0.0, 0, 0, 0.0)
        self._waiting = 0.0
        self._serial = 0
        self._in_doubt_until = 0.0  # a reserve whose answer was lost: no other until a listing after this
        self._failures: dict[str, list[float]] = {}  # node -> when its VMs failed
        self._seen_failed: set[tuple[str, str, str]] = set()  # (lease, VM, its creation): each failure once
        self.blackholed: set[str] = set()
        self.stopping = threading.Event()

    def _check_with_the_service(self) -> None:
        """Ask the service whether it would take this profile (and its VM on each node); ProfileError if not."""
        p = self.profile
        vm = dict(p.vm) if p.vm is not None else None
        try:
            # With exclude_blackholed, whether the batch system can keep a job off a node is asked too.
            self.client.check(p.nodes, p.memory_mb, p.duration_s, vm=vm, images=list(p.images) or None,
                              release_when_idle_s=p.release_when_idle_s,
                              exclude_nodes=["workspace-pilot-check"] if self.exclude_blackholed else None)
        except ClientError as exc:
            raise ProfileError(f"the service refuses this pool's leases: {exc.message}") from None

    # -- what COBalD reads and sets --------------------------------------------------------

    @property
    def supply(self) -> float:
        """Nodes held by the pool's leases (ready or running)."""
        return self._numbers.supply

    @property
    def demand(self) -> float:
        """Nodes wanted, as COBalD's controller last set it (0 to max_leases x nodes)."""
        return self._demand

    @demand.setter
    def demand(self, value: float) -> None:
        self._demand = min(max(float(value), 0.0), float(self.max_leases * self.profile.nodes))

    @property
    def utilisation(self) -> float:
        """Share of the pool's nodes in use (busy, not yet known, or coming): see :mod:`.view`."""
        return self._numbers.utilisation

    @property
    def allocation(self) -> float:
        """Busy nodes and waiting work over the pool's nodes; above 1 while work waits: see :mod:`.view`."""
        return self._numbers.allocation

    # -- the pool's own thread ---------------------------------------------------------------

    def run(self) -> None:
        """COBalD's service entry: look and act every ``interval`` until stopped."""
        log.info("lease pool for %s: %d node(s) x %d MB for %g s per lease, at most %d leases, every %g s",
                 self.user, self.profile.nodes, self.profile.memory_mb, self.profile.duration_s, self.max_leases,
                 self.interval)
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                self.step()
            except Exception:  # one bad round must not end the pool
                log.exception("lease pool round failed; trying again")
            self.stopping.wait(max(self.interval - (time.monotonic() - started), 0.0))

    def step(self) -> None:
        """One round: list, count, act (what the thread does every interval)."""
        listed_at = time.time()
        try:
            listing = self.client.list(states=list(OPEN_STATES), owner=self.user)["leases"]
        except ClientError as exc:
            log.warning("lease pool: the service did not answer (%s): keeping what was last known", exc.message)
            return
        leases = [look_at(lease) for lease in listing]
        if self.waiting is not None:
            waiting = self.waiting.nodes()
            if waiting is not None:
                self._waiting = waiting
        self._note_failures(leases)
        seen = self._numbers_of(leases)
        log.info("lease pool: demand %.2f, supply %g, %d node(s) (%d busy), waiting %g: utilisation %.2f, "
                 "allocation %.2f", self._demand, seen.supply, seen.nodes, seen.busy, self._waiting, seen.utilisation,
                 seen.allocation)
        self._start_vms(leases)
        # What COBalD reads counts what was just reserved and released: until the next listing (or while the
        # service cannot be reached) its controller must not ask again for what is on its way.
        self._numbers = self._numbers_of(self._adjust(leases, listed_at))

    def _numbers_of(self, leases: list[LeaseLook]) -> PoolNumbers:
        return numbers(leases, self._waiting, self.profile.vm is not None, frozenset(self.blackholed))

    def _adjust(self, leases: list[LeaseLook], listed_at: float) -> list[LeaseLook]:
        """Reserve or release for the demand; the pool's open leases as they are afterwards."""
        wanted = min(math.floor(self._demand / self.profile.nodes + 0.5), self.max_leases)
        if wanted > len(leases):
            if listed_at < self._in_doubt_until:
                log.info("lease pool: a reserve's answer was lost; waiting for a later listing before another")
                return leases
            for _ in range(wanted - len(leases)):
                made = self._reserve()
                if made is None:
                    break
                leases = leases + [look_at(made)]
        elif wanted < len(leases):
            for lease in to_release(leases, len(leases) - wanted, self.profile.vm is not None,
                                    frozenset(self.blackholed)):
                if self._release(lease, f"demand {self._demand:.2f} wants {wanted} lease(s)"):
                    leases = [other for other in leases if other is not lease]
        return leases

    def _reserve(self) -> dict | None:
        p = self.profile
        self._serial += 1
        duration = p.duration_of(self._serial)
        sent = time.time()
        try:
            lease = self.client.reserve(p.nodes, p.memory_mb, duration, images=list(p.images) or None,
                                        release_when_idle_s=p.release_when_idle_s,
                                        exclude_nodes=sorted(self.blackholed) if self.exclude_blackholed else None)
        except ClientError as exc:
            if exc.status is None:  # it may have been made: count it from a later listing, never reserve twice
                self._in_doubt_until = sent + self.client.timeout_s
            log.warning("lease pool: reserve failed: %s", exc.message)
            return None
        log.info("lease pool: reserved lease %s (%d x %d MB for %g s)", lease["id"], p.nodes, p.memory_mb, duration)
        return lease

    def _release(self, lease: LeaseLook, why: str) -> bool:
        try:
            self.client.release(lease.id)
        except ClientError as exc:
            log.warning("lease pool: release of %s failed: %s", lease.id, exc.message)
            return False
        log.info("lease pool: released lease %s (%s): %s", lease.id, lease.state, why)
        return True

    def _start_vms(self, leases: list[LeaseLook]) -> None:
        """Each held lease gets the profile's VM on each node that has none on it (and is not black-holed)."""
        if self.profile.vm is None:
            return
        for lease in leases:
            if not lease.held:
                continue
            names = {vm.get("name") for vm in lease.vms if vm.get("state") in ("starting", "running", "paused")}
            specs = [self.profile.vm_for(host, lease.id) for host in lease.hosts if host not in self.blackholed]
            specs = [spec for spec in specs if spec["name"] not in names]
            if not specs:
                continue
            try:
                self.client.start_vms(lease.id, specs)
            except ClientError as exc:
                log.warning("lease pool: starting VMs on lease %s failed: %s", lease.id, exc.message)
                continue
            log.info("lease pool: lease %s: started %s", lease.id, ", ".join(spec["name"] for spec in specs))

    def _note_failures(self, leases: list[LeaseLook]) -> None:
        """Count each failed VM once against its node; a node past the guard's count gets no more VMs."""
        now = time.time()
        open_ids = {lease.id for lease in leases}
        self._seen_failed = {key for key in self._seen_failed if key[0] in open_ids}  # those of ended leases go
        for lease in leases:
            for vm in lease.vms:
                key = (lease.id, str(vm.get("name")), str(vm.get("created_at")))
                if vm.get("state") == "failed" and key not in self._seen_failed and vm.get("host"):
                    self._seen_failed.add(key)
                    times = [t for t in self._failures.get(vm["host"], []) if now - t <= self.blackhole_window_s]
                    times.append(now)
                    self._failures[vm["host"]] = times
                    if len(times) >= self.blackhole_failures and vm["host"] not in self.blackholed:
                        self.blackholed.add(vm["host"])
                        log.warning("lease pool: node %s: %d VM(s) failed within %g s: it gets no more VMs",
                                    vm["host"], len(times), self.blackhole_window_s)
