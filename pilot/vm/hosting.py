"""One slot's VM hosting on this node, as the pilot's lifecycle sees it: start, wait for VMs to go, tear down.

It joins the command poller (the channel and heartbeat), the VM worker
(runs the commands, reports outcomes) and the node journal (that VMs may
exist is journalled before the first is created, and cleared only once
every VM tagged with the slot is destroyed). libvirt and the VM modules
are imported on the first ``start-vm``, never at the pilot's start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from pilot.config import PilotConfig
from workspace_common.route import address_towards
from pilot.vm.worker import VmWorker

log = logging.getLogger(__name__)
_UNSET = object()


class VmHosting:
    """The command channel and the VMs of one slot; ``on_stop(reason, kind)`` is the pilot's stop request,
    ``on_extend(duration_s)`` its deadline move (see :class:`VmWorker`), ``warning()`` the lease channel's
    line once the pilot has warned the VMs (a VM started later is told at its start), ``lease_end()`` when the
    VMs will be stopped (a :class:`pilot.vm.features.LeaseEnd`, for their Machine/Job Features).

    ``kind`` is ``release`` (the service's release command) or ``gone`` (a
    404 on the poll: the service no longer knows the slot).
    """

    def __init__(self, config: PilotConfig, notifier, memory, *, slot: str, host: str, lease: str,
                 on_stop: Callable[[str, str], None], peer_key: str | None = None, on_extend=None,
                 warning: Callable[[], str | None] | None = None, lease_end: Callable[[], object] | None = None):
        self.config = config
        self.notifier = notifier
        self.memory = memory
        self.slot = slot
        self.host = host
        self.lease = lease
        self.peer_key = peer_key  # the lease's nodes' shared key (from the slot secret): image chunks between them
        self.warning = warning or (lambda: None)  # the lease channel's line once the VMs were warned
        self.lease_end = lease_end or (lambda: None)  # when the VMs will be stopped (their Machine/Job Features)
        self.images = None
        self.networks = None  # a pilot.net.nodenets.NodeNetworks, made with the VM host
        self._node_address: str | None | object = _UNSET
        self.uri = config.vm_uri
        held = lambda: memory.held.memory_mb if memory.held else 0  # noqa: E731
        self.worker = VmWorker(
            self._make_host if self.uri else None, notifier, held, lambda reason: on_stop(reason, "release"),
            on_extend=on_extend, shutdown_timeout_s=config.shutdown_timeout_s,
            no_vms_reason="this node hosts no VMs: its pilot config sets [libvirt] uri empty",
            usage_every_s=config.usage_interval_s, busy_cpu_percent=config.busy_cpu_percent,
        )
        self._on_stop = on_stop
        self.poller = None  # made by start(): it needs the notifier's HTTP session (requests), not at the pilot's start
        self._started = False

    def _make_host(self):
        from pilot.vm.check import VmPolicy
        from pilot.vm.host import VmHost
        from pilot.vm.seed import seed_dir_of

        config = self.config
        policy = VmPolicy(
            image_dir=config.image_dir, console_dir=config.console_dir, overhead_mb=config.vm_overhead_mb,
            networks=tuple(config.networks or ()),
            hugepage_kb=config.hugepage_kb if config.backend == "hugepages" else None,
            image_cache_dir=config.image_cache_dir, seed_dir=seed_dir_of(config.journal_dir),
            disks=config.disk_budget,
        )
        held = self.memory.held
        return VmHost(
            _connector(self.uri), slot=self.slot, lease=self.lease, pilot_pid=os.getpid(), policy=policy,
            reserved_mb=held.memory_mb if held else 0, virt_type=config.virt_type,
            before_first_vm=self.memory.note_vms, uri=self.uri, images=self._node_images(), warning=self.warning,
            networks=self._node_networks(), lease_end=self.lease_end,
        )

    def _node_networks(self):
        from pilot.net.nodenets import NodeNetworks

        config = self.config
        address = self.node_address()
        self.networks = NodeNetworks(
            own_address=address, forward_address=(config.forward_address or address) if config.forwards else None,
            run_root=config.net_run_dir, before_first=lambda names: self.memory.note_nets(names, config.net_run_dir))
        return self.networks

    def _node_images(self):
        from pilot.images.cache import ImageCache
        from pilot.images.fetch import ImageSource, NodeImages

        config = self.config
        source = ImageSource(self.notifier.session, config.contact, self.slot, self.host, mirror=config.image_mirror,
                             timeout_s=config.image_fetch_timeout_s, peer_key=self.peer_key)
        cache = ImageCache(config.image_cache_dir, config.image_cache_mb * 1024 * 1024)
        address = config.peer_address or address_towards(config.contact)
        self.images = NodeImages(cache, source, note_fetching=self.memory.note_fetching, key=self.notifier.key,
                                 peers=config.image_peers and self.peer_key is not None, peer_bind=address,
                                 peer_port=config.peer_port, peer_advertise=address)
        return self.images

    def node_address(self) -> str | None:
        """The node's address for its lease networks' overlay and forwards (told to the service with
        ``reserved``), or None when it has none or hosts no VMs; looked up once."""
        if self._node_address is _UNSET:
            self._node_address = self.config.node_address() if self.uri else None
        return self._node_address

    def start(self) -> None:
        """Start running commands and polling for them (once the service has accepted ``reserved``)."""
        from pilot.poller import CommandPoller

        config, notifier = self.config, self.notifier
        self.poller = CommandPoller(
            notifier.session, config.contact, notifier.key, self.slot, self.host,
            on_commands=self.worker.submit, on_gone=lambda reason: self._on_stop(reason, "gone"),
            wait_s=config.poll_wait_s,
            request_timeout_s=config.request_timeout_s, reach=notifier.reach,
        )
        self.worker.start()
        self.poller.start()
        self._started = True
        log.info("polling %s for commands (wait %g s); VMs at %s", self.poller.base + self.poller.path,
                 self.config.poll_wait_s, self.uri or "nowhere (no libvirt)")

    def warn(self, line: str) -> None:
        """Write ``line`` to every VM's lease channel (on the worker thread, soon; a no-op before :meth:`start`)."""
        if self._started:
            self.worker.warn(line)

    def tell_features(self) -> None:
        """Send every VM its Machine/Job Features as they are now (on the worker thread, soon; a no-op before
        :meth:`start`)."""
        if self._started:
            self.worker.tell_features()

    def wait_empty(self, until: float) -> list[str]:
        """Keep taking the service's stop-vm commands until this slot runs no VM or the monotonic ``until``.

        Returns the VMs still running then.
        """
        if not self._started:
            return []
        return self.worker.wait_empty(until)

    def teardown(self) -> list[str]:
        """Stop polling and working; destroy every VM tagged with this slot; clear the journal's VM note.

        Returns the names destroyed. Raises what destroying raises (libvirt
        unreachable): the journal then still says VMs may exist, for the
        next pilot or workspace-killall.
        """
        if self.poller is not None:
            self.poller.stop()
        if self.images is not None:
            self.images.close()  # no more chunks to the lease's other nodes
        destroyed = self.worker.teardown()
        if self.networks is not None:
            # After the VMs: nothing is on the bridges any more.
            from pilot.net.commands import NetError
            from pilot.vm.cleanup import VmCleanupError

            try:
                removed = self.networks.teardown()
            except NetError as exc:
                raise VmCleanupError(f"the lease networks could not all be removed: {exc}") from None
            if removed:
                log.info("removed lease network(s) %s", ", ".join(removed))
        if self.memory.entry.vm_uri:
            self.memory.note_vms(None)
        return destroyed


def _connector(uri: str) -> Callable[[], object]:
    def connect():
        from pilot.libvirtconn import open_connection

        return open_connection(uri)

    return connect
