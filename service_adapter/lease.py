"""Leases: reserve N nodes x M MB for D seconds through a provider, watch them through the store."""

from __future__ import annotations

import dataclasses
import uuid

from service_adapter.providers.base import PilotJob, Provider
from service_adapter.store import PilotRow, Store


class LeaseFailed(Exception):
    """A pilot of the lease reported an error before the lease was ready."""


@dataclasses.dataclass
class Lease:
    """One lease: a slot (one pilot job) of ``nodes`` nodes, and the means to watch and end it."""

    id: str
    slot: str
    nodes: int
    memory_mb: int
    duration_s: float
    job_id: str
    store: Store
    provider: Provider

    def pilots(self) -> list[PilotRow]:
        """The pilots that have reported, with their latest state."""
        return self.store.pilots(self.slot)

    def count(self, state: str) -> int:
        """How many of the lease's pilots last reported ``state``."""
        return sum(1 for p in self.pilots() if p.state == state)

    def wait_reserved(self, timeout: float) -> bool:
        """Block until every node's pilot has reported ``reserved``; False on timeout.

        Raises :class:`LeaseFailed` as soon as a pilot reports ``error`` or
        ends before the lease was ready.
        """
        failed: list[PilotRow] = []

        def ready() -> bool:
            pilots = self.pilots()
            failed[:] = [p for p in pilots if p.state in ("error", "unreserved", "killed")]
            return bool(failed) or sum(p.state == "reserved" for p in pilots) == self.nodes

        reached = self.store.wait_for(ready, timeout)
        if failed:
            desc = ", ".join(f"{p.host}: {p.state} (code {p.code})" for p in failed)
            raise LeaseFailed(f"lease {self.id} failed before it was ready: {desc}")
        return reached

    def release(self) -> None:
        """Cancel the pilot job: the pilots take their early-unreserve path."""
        self.provider.cancel(self.job_id)

    def wait_unreserved(self, timeout: float) -> bool:
        """Block until every node's pilot has reported ``unreserved``; False on timeout."""
        return self.store.wait_for(lambda: self.count("unreserved") == self.nodes, timeout)


class LeaseManager:
    """Creates leases: records the lease and its slot, then submits the pilot job.

    The slot is in the store before the job exists, so a pilot's first
    notification always finds it.
    """

    def __init__(self, store: Store, provider: Provider, contact: str, pilot_config: str, grace_s: float = 10.0):
        self.store = store
        self.provider = provider
        self.contact = contact
        self.pilot_config = pilot_config
        self.grace_s = grace_s

    def reserve(self, nodes: int, memory_mb: int, duration_s: float) -> Lease:
        """Start a lease of ``nodes`` nodes with ``memory_mb`` each for ``duration_s`` seconds."""
        if nodes < 1 or memory_mb < 1 or duration_s <= 0:
            raise ValueError("nodes, memory_mb and duration_s must be above 0")
        lease_id, slot = str(uuid.uuid4()), str(uuid.uuid4())
        self.store.add_lease(lease_id, nodes, memory_mb, int(duration_s))
        self.store.add_slot(slot, lease_id, nodes, memory_mb)
        job = PilotJob(slot, nodes, memory_mb, duration_s, self.grace_s, self.contact, self.pilot_config)
        job_id = self.provider.submit(job)
        self.store.set_job_id(slot, job_id)
        return Lease(lease_id, slot, nodes, memory_mb, duration_s, job_id, self.store, self.provider)
