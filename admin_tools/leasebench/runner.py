"""The site under test and one measured round: a lease through the operator API, or a baseline job.

The site is the embedded service (:class:`service_adapter.local_site.LocalSite`:
store on disk, receiver, operator API, lease manager) over the chosen
provider; the harness is its client, calling the API over HTTP with the
real :class:`service_adapter.client.LeaseClient`, as an operator would.
What a round measured is read back from the store afterwards (nothing on
the measured path waits for the harness).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
import uuid

from service_adapter.client import LeaseClient
from service_adapter.lease import TERMINAL_STATES
from service_adapter.local_site import OPERATOR_USER, LocalSite
from service_adapter.nodekeys import new_slot_secret
from service_adapter.providers import ProviderSettings, make_provider
from service_adapter.providers.base import PilotJob

from admin_tools.leasebench.baseline import baseline_provider, run_baseline, wait_job_gone, write_payload
from admin_tools.leasebench.phases import LeaseRecord, Stage, baseline_stages, lease_stages

#: What the test driver "boots": libvirt's test driver runs no code, the pilot only checks the file's sha256.
TEST_KERNEL = b"lease-bench: libvirt's test driver boots anything\n" * 64
VM_MEMORY_MB = 32
VM_OVERHEAD_MB = 16


class RoundError(RuntimeError):
    """A round did not complete (a lease failed or timed out); the message says where it stopped."""


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """What to measure and how (from the command line)."""

    provider: str = "local"
    settings: ProviderSettings | None = None
    memory_mb: int = 64
    duration_s: float = 600.0
    grace_s: float = 10.0
    memory_backend: str = "hugepages"
    vm: str = "none"
    clocks: str = "auto"
    timeout_s: float = 120.0
    listen_host: str = "127.0.0.1"
    contact: str | None = None
    pilot_options: tuple[tuple[str, str, str], ...] = ()
    #: The batch system's nodes; each gets a node key in the site's key directory (which the
    #: nodes must share with this host, as the tests' one-host cluster does).
    cluster_nodes: tuple[str, ...] = ()


def pilot_sections(options: BenchOptions, workdir: str) -> dict[str, dict[str, object]]:
    """The pilots' config sections: memory backend, VM hosting (test driver or none), and the extra options."""
    sections: dict[str, dict[str, object]] = {"memory": {"backend": options.memory_backend}}
    if options.vm == "test":
        images = os.path.join(workdir, "images")
        os.makedirs(images, mode=0o755, exist_ok=True)
        with open(os.path.join(images, "vmlinuz"), "wb") as handle:
            handle.write(TEST_KERNEL)
        sections["libvirt"] = {"uri": "test:///default"}
        sections["vms"] = {"image_dir": images, "console_dir": os.path.join(workdir, "consoles"),
                           "overhead_mb": VM_OVERHEAD_MB, "poll_wait": 30}
    else:
        sections["libvirt"] = {"uri": ""}
    for section, key, value in options.pilot_options:
        sections.setdefault(section, {})[key] = value
    return sections


def open_site(options: BenchOptions, workdir: str) -> LocalSite:
    """The embedded service over the chosen provider, with the operator API, its journal in ``workdir``."""
    provider = None if options.settings is None or options.settings.name == "local" else make_provider(options.settings)
    journal = os.path.join(workdir, "journal")
    site = LocalSite(
        os.path.join(workdir, "service"), grace_s=options.grace_s, journal_dir=journal,
        queue_timeout_s=options.timeout_s, release_grace_s=options.grace_s, status_interval_s=0.5,
        vm_overhead_mb=VM_OVERHEAD_MB, pilot_sections=pilot_sections(options, workdir), provider=provider,
        listen_host=options.listen_host, contact=options.contact, operator_api=True,
    )
    for host in options.cluster_nodes:  # the local provider keys its simulated nodes itself
        site.provider.prepare_node(host)
    return site


def vm_specs(nodes: int) -> list[dict]:
    """One small VM per node (each lease host has room for exactly one), booting the test kernel."""
    digest = hashlib.sha256(TEST_KERNEL).hexdigest()
    return [{"name": f"bench-{i}", "memory_mb": VM_MEMORY_MB,
             "boot": {"kernel": {"path": "vmlinuz", "sha256": digest}, "cmdline": "console=ttyS0"}}
            for i in range(nodes)]


class Bench:
    """A site, its client and the baseline's provider; :meth:`lease_round` and :meth:`baseline_round` measure."""

    def __init__(self, options: BenchOptions, workdir: str):
        self.options = options
        self.workdir = workdir
        self.site = open_site(options, workdir)
        try:
            self.client = LeaseClient(self.site.url, OPERATOR_USER, self.site.operator_secret,
                                      timeout_s=options.timeout_s)
            payload, self.stamps = write_payload(workdir)
            self.baseline = baseline_provider(options.settings, payload, os.path.join(workdir, "baseline"))
            self.client.list()  # the digest handshake, once: every measured request is then answered first time
        except BaseException:
            self.site.close()
            raise

    def close(self) -> None:
        """Stop the client, the site (and any pilot it still runs, by pid) and the baseline's jobs."""
        try:
            self.client.close()
            self.baseline.close()
        finally:
            self.site.close()

    def lease_round(self, nodes: int) -> dict[str, Stage]:
        """Reserve ``nodes`` nodes, start one VM on each (if VMs are measured), release; the round's stages."""
        opts, leases = self.options, self.site.leases
        requested = time.time()
        lease_id = self.client.reserve(nodes, opts.memory_mb, opts.duration_s)["id"]
        try:
            ready = leases.wait(lease_id, {"ready"} | TERMINAL_STATES, opts.timeout_s)
            if ready is None or ready.state != "ready":
                now = leases.get(lease_id)
                raise RoundError(f"lease {lease_id} of {nodes} nodes is {now.state}, not ready: {now.reason}")
            vm_asked = None
            if opts.vm != "none":
                vm_asked = time.time()
                self.client.start_vms(lease_id, vm_specs(nodes))
                self._wait_vms(lease_id, nodes)
            release_asked = time.time()
            self.client.release(lease_id)
            done = leases.wait(lease_id, TERMINAL_STATES, opts.timeout_s)
            if done is None or done.state != "released":
                now = leases.get(lease_id)
                raise RoundError(f"lease {lease_id} of {nodes} nodes is {now.state}, not released: {now.reason}")
        except BaseException:
            self._abandon(lease_id)
            raise
        wait_job_gone(self.site.provider, done.job_id, time.monotonic() + opts.timeout_s)
        return lease_stages(self._record(lease_id, nodes, requested, vm_asked, release_asked), opts.clocks)

    def _wait_vms(self, lease_id: str, nodes: int) -> None:
        for i in range(nodes):
            vm = self.site.vms.wait(lease_id, f"bench-{i}", {"running", "failed", "lost"}, self.options.timeout_s)
            if vm is None or vm.state != "running":
                raise RoundError(f"VM bench-{i} of lease {lease_id} is {vm.state if vm else 'not running'}"
                                 f"{': ' + vm.reason if vm and vm.reason else ''}")

    def _abandon(self, lease_id: str) -> None:
        """A failed round still releases its lease and waits for its end, so the next starts clean."""
        try:
            self.site.leases.release(lease_id)
            self.site.leases.wait(lease_id, TERMINAL_STATES, self.options.timeout_s)
        except Exception:  # the error that ended the round is the one to report
            pass

    def _record(self, lease_id: str, nodes: int, requested: float, vm_asked: float | None,
                release_asked: float) -> LeaseRecord:
        store = self.site.store
        row = store.get_lease(lease_id)
        events = {}
        for event in self.site.leases.history(lease_id):
            events.setdefault(event.new_state, event.at)
        started, submitted = store.submit_times(row.slot)
        commands = [(c.host, c.created_at) for c in store.commands(row.slot) if c.op == "start-vm"]
        return LeaseRecord(
            nodes=nodes, requested_at=requested, submit_started_at=started, submitted_at=submitted,
            ready_at=events["ready"], release_asked_at=release_asked,
            release_recorded_at=row.release_requested_at, released_at=events["released"],
            notifications=store.notification_bodies(row.slot), vm_asked_at=vm_asked, commands=commands,
            cancel_requested_at=row.cancel_requested_at,
        )

    def baseline_round(self, nodes: int) -> dict[str, Stage]:
        """Submit and cancel a do-nothing job of ``nodes`` nodes the way a lease's job is; its two stages."""
        opts = self.options
        job = PilotJob(str(uuid.uuid4()), nodes, opts.memory_mb, opts.duration_s, opts.grace_s,
                       self.site.contact, self.site.pilot_config, lease="baseline", slot_secret=new_slot_secret())
        return baseline_stages(run_baseline(self.baseline, job, self.stamps, opts.timeout_s))
