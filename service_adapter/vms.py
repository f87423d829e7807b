"""The leases' VMs as the service handles them: start, stop, list, wait.

Starting VMs places them over the lease's hosts (each host's reserved
memory respected, with a per-VM overhead that should match the pilots')
and queues one ``start-vm`` per VM, all in one transaction; the pilots
pull them over their long-poll and report ``vm-running`` or ``vm-failed``.
Nothing here talks to a node: the store is the whole interface.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

from workspace_common.protocol import ProtocolError, VmSpec
from service_adapter.networks import NetworkPlan
from service_adapter.store import Store
from service_adapter.store.vms import VmRequestError, VmRow

log = logging.getLogger(__name__)

__all__ = ["VmManager", "VmRequestError", "parse_vm_request"]

#: The most VMs one request may start.
MAX_VMS_PER_REQUEST = 256


def parse_vm_request(item) -> tuple[VmSpec, str | None]:
    """One element of a start request: a VM spec object, optionally with ``"host"`` to pin it; VmRequestError (400)."""
    if not isinstance(item, dict):
        raise VmRequestError("each VM must be a JSON object (a VM spec)", 400)
    host = item.get("host")
    if host is not None and not isinstance(host, str):
        raise VmRequestError("'host' must be a host name", 400)
    try:
        spec = VmSpec.from_dict({k: v for k, v in item.items() if k != "host"})
    except ProtocolError as exc:
        raise VmRequestError(str(exc), 400) from None
    return spec, host


def _no_catalog(conn, spec: VmSpec) -> VmSpec:
    for image in (spec.disk, spec.kernel, spec.initrd):
        if image is not None and image.named:
            raise VmRequestError(f"VM {spec.name}: {image.label}: this service has no image catalogue; give a "
                                 "path and sha256")
    return spec


class VmManager:
    """Starts, stops and lists the VMs of leases through the store; ``overhead_mb`` is counted per VM.

    ``catalog`` (an :class:`service_adapter.images.catalog.ImageCatalog`)
    resolves the images a spec names by list identifier; without one such
    a spec is refused. ``network_plan`` (a
    :class:`~service_adapter.networks.NetworkPlan`) gives each VM an
    address; without one (or with mode none) VMs get none from the service.
    """

    def __init__(self, store: Store, *, overhead_mb: int = 64, clock: Callable[[], float] = time.time,
                 catalog=None, network_plan: NetworkPlan | None = None):
        if not isinstance(overhead_mb, int) or overhead_mb < 0:
            raise ValueError(f"overhead_mb must be a whole number of MB, 0 or more, got {overhead_mb!r}")
        self.store = store
        self.overhead_mb = overhead_mb
        self.clock = clock
        self.catalog = catalog
        self.network_plan = network_plan

    def start(self, lease_id: str, requests: list[tuple[VmSpec, str | None]]) -> list[VmRow]:
        """Queue the VMs' start; returns their rows (state ``starting``, with their hosts), in the request's order.

        All or nothing: raises :class:`VmRequestError` (404 no such lease;
        409 the lease is not ready or running, a name is in use, or they do
        not fit; 400 a malformed request) and queues nothing.
        """
        if not requests:
            raise VmRequestError("no VMs given", 400)
        if len(requests) > MAX_VMS_PER_REQUEST:
            raise VmRequestError(f"at most {MAX_VMS_PER_REQUEST} VMs per request", 400)
        resolve = self.catalog.resolver() if self.catalog is not None else _no_catalog
        if any(spec.nic is not None for spec, _ in requests):
            raise VmRequestError("vm.nic: the service gives each VM its address; leave out 'nic'", 400)
        queued = self.store.start_vms(lease_id, requests, overhead_mb=self.overhead_mb, now=self.clock(),
                                      resolve=resolve, plan=self.network_plan)
        # One line per request, not per VM: a start over a thousand hosts logged a line each at ~10 us of the
        # service's GIL apiece (bench_scale's fan-out).
        log.info("lease %s: %d VM(s) queued to start: %s", lease_id, len(queued), ", ".join(
            f"{spec.name} ({spec.memory_mb} MB, {spec.vcpus} vCPU) on {host}"
            + (f" as {spec.nic.ip} ({spec.nic.mac})" if spec.nic is not None else "") for spec, host in queued))
        by_name = {vm.name: vm for vm in self.store.vms(lease_id)}
        return [by_name[spec.name] for spec, _ in requests]  # in the request's order

    def check(self, item, node_memory_mb: int) -> VmSpec:
        """Whether a VM of this spec (an element of a start request) could start on a node of a lease of
        ``node_memory_mb``: well formed, its images allowed here, and it fits with its overhead; the spec as it
        would be queued. Raises :class:`VmRequestError` (400, 409) saying why not; nothing is recorded."""
        spec, _ = parse_vm_request(item)
        if spec.nic is not None:
            raise VmRequestError("vm.nic: the service gives each VM its address; leave out 'nic'", 400)
        if spec.memory_mb + self.overhead_mb > node_memory_mb:
            raise VmRequestError(f"VM {spec.name}: its {spec.memory_mb} MB and the service's {self.overhead_mb} MB "
                                 f"overhead per VM do not fit a node's {node_memory_mb} MB")
        resolve = self.catalog.resolver() if self.catalog is not None else _no_catalog
        return self.store.read(lambda conn: resolve(conn, spec))

    def stop(self, lease_id: str, name: str, *, force: bool = False) -> VmRow:
        """Queue the VM's stop (graceful, or at once with ``force``); returns it (state ``stopping``).

        Raises :class:`VmRequestError`: 404 no such lease or VM, 409 it has ended already.
        """
        self.store.stop_vm(lease_id, name, force=force, now=self.clock())
        log.info("lease %s: VM %s queued to stop%s", lease_id, name, " (forced)" if force else "")
        return self.get(lease_id, name)

    def suspend(self, lease_id: str, name: str) -> VmRow:
        """Queue a running VM's suspend (its pilot pauses it: no CPU, memory kept); returns it.

        Raises :class:`VmRequestError`: 404 no such lease or VM, 409 it is not running.
        """
        self.store.pause_vm(lease_id, name, resume=False, now=self.clock())
        log.info("lease %s: VM %s queued to suspend", lease_id, name)
        return self.get(lease_id, name)

    def resume(self, lease_id: str, name: str) -> VmRow:
        """Queue a paused VM's resume; returns it. Raises :class:`VmRequestError`: 404, or 409 it is not paused."""
        self.store.pause_vm(lease_id, name, resume=True, now=self.clock())
        log.info("lease %s: VM %s queued to resume", lease_id, name)
        return self.get(lease_id, name)

    def list(self, lease_id: str) -> list[VmRow]:
        """The lease's VMs, oldest first (ended ones included); VmRequestError 404 for an unknown lease."""
        if self.store.get_lease(lease_id) is None:
            raise VmRequestError(f"no lease {lease_id!r}", 404)
        return self.store.vms(lease_id)

    def get(self, lease_id: str, name: str) -> VmRow:
        """One VM of a lease; VmRequestError 404 if there is none of that name."""
        for vm in self.list(lease_id):
            if vm.name == name:
                return vm
        raise VmRequestError(f"lease {lease_id} has no VM named {name!r}", 404)

    def wait(self, lease_id: str, name: str, states: Iterable[str], timeout: float) -> VmRow | None:
        """Block until the VM is in one of ``states`` (woken by commits); None on timeout."""
        wanted = {states} if isinstance(states, str) else set(states)
        found: list[VmRow] = []

        def reached() -> bool:
            vm = self.get(lease_id, name)
            if vm.state in wanted:
                found.append(vm)
                return True
            return False

        return found[-1] if self.store.wait_for(reached, timeout) else None
