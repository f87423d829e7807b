"""The networks of one slot's VMs on this node: built at the first VM that joins, kept current, removed at the end.

:class:`NodeNetworks` is what the VM host calls: :meth:`~NodeNetworks.attach`
before a VM's domain is made (it builds the network the first time, after
``before_first(name)`` journalled it), :meth:`~NodeNetworks.detach` once the
VM is gone, :meth:`~NodeNetworks.apply` for a ``network`` command, and
:meth:`~NodeNetworks.teardown` at the slot's end (after its VMs are
destroyed). Every method is serialised by one lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from workspace_common import nodenames as names
from pilot.net.commands import NetError
from pilot.net.forward import ForwardError, Forwards
from pilot.net.leasenet import LeaseNet, interface_of
from workspace_common.protocol.network import NetState, Nic

log = logging.getLogger(__name__)


class NodeNetworks:
    """One slot's networks on this node.

    ``own_address``: where the lease networks' overlay meets this node
    (None: no lease network can be built here). ``forward_address``: where
    the forwards to the VMs' SSH listen (None: no forwards). ``run_root``:
    where the DHCP servers' files go. ``before_first(names)`` journals the
    networks that may exist (called before each is made; raises to stop it).
    """

    def __init__(self, *, own_address: str | None, forward_address: str | None, run_root: str,
                 before_first: Callable[[tuple[str, ...]], None]):
        self.own_address = own_address
        self.forward_address = forward_address
        self.run_root = run_root
        self._before_first = before_first
        self._nets: dict[str, LeaseNet] = {}
        self._latest: dict[str, NetState] = {}  # the newest state heard of a network not built here (yet)
        self._forwards = Forwards()
        self._journalled: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def interface(self, nic: Nic) -> dict:
        """How the VM's domain will join its network (bridge, tap, MAC; the MTU once it is built); makes nothing."""
        with self._lock:
            net = self._nets.get(nic.net.name)
        if net is not None:
            return interface_of(net, nic)
        bridge = names.bridge_name(nic.net.name) if nic.net.kind == "lease" else nic.net.bridge
        return {"bridge": bridge, "tap": names.tap_name(nic.ip), "mac": nic.mac, "mtu": None}

    def attach(self, nic: Nic) -> dict:
        """Have the VM's network on this node and let the VM onto it; how its domain joins (bridge, tap, MAC,
        MTU). Raises NetError (nothing of the VM's is left; a network built for it stays until teardown)."""
        with self._lock:
            net = self._nets.get(nic.net.name)
            if net is None:
                state = max((nic.net, self._latest.pop(nic.net.name, nic.net)), key=lambda s: s.generation)
                net = LeaseNet(state, own_address=self.own_address, run_root=self.run_root)
                if nic.net.name not in self._journalled:
                    journalled = self._journalled + (nic.net.name,)
                    try:
                        self._before_first(journalled)
                    except Exception as exc:
                        raise NetError(f"cannot record network {nic.net.name} in the journal: {exc}") from None
                    self._journalled = journalled
                self._nets[nic.net.name] = net
                try:
                    net.build()
                except NetError:
                    self._give_up(net)
                    raise
            net.attach(nic)
            if nic.forward_port is not None and self.forward_address is not None:
                try:
                    self._forwards.open(self.forward_address, nic.forward_port, nic.ip)
                except ForwardError as exc:
                    net.detach(nic.ip)
                    raise NetError(str(exc)) from None
            return interface_of(net, nic)

    def _give_up(self, net: LeaseNet) -> None:
        """A network that could not be built: remove what of it was made (and its journal note) at once. What cannot
        be removed stays journalled, for the teardown, the next pilot or workspace-killall."""
        try:
            net.teardown()
        except NetError as exc:
            log.error("network %s could not be built, and what was made of it stays until the slot ends: %s",
                      net.name, exc)
            return
        del self._nets[net.name]
        journalled = tuple(name for name in self._journalled if name != net.name)
        try:
            self._before_first(journalled)
            self._journalled = journalled
        except Exception as exc:  # the journal keeps the name: removing a network that is gone is harmless
            log.warning("network %s is gone but stays in the journal: %s", net.name, exc)

    def detach(self, nic: Nic) -> None:
        """The VM with ``nic`` is gone: its forward, filter and DHCP entry go (the network stays). Logs a failure."""
        with self._lock:
            if nic.forward_port is not None:
                self._forwards.close(nic.forward_port)
            net = self._nets.get(nic.net.name)
            if net is None:
                return
            try:
                net.detach(nic.ip)
            except NetError as exc:
                log.error("VM %s left network %s, but its filter stays: %s", nic.hostname, net.name, exc)

    def apply(self, state: NetState) -> str:
        """A ``network`` command: the network's newer state (its names, its nodes); what was done, one line.
        Raises NetError."""
        with self._lock:
            net = self._nets.get(state.name)
            if net is None:
                known = self._latest.get(state.name)
                if known is None or known.generation < state.generation:
                    self._latest[state.name] = state
                return f"network {state.name} is not on this node yet: kept for its first VM"
            if net.update(state):
                return f"network {state.name} now at generation {state.generation} ({len(state.hosts)} names)"
            return f"network {state.name} already at generation {net.state.generation}"

    def teardown(self) -> list[str]:
        """Remove every network of the slot from this node (its VMs are gone); the names removed. Raises NetError
        after trying them all; the journal keeps what stays."""
        with self._lock:
            self._forwards.close_all()
            problems, removed = [], []
            for name, net in list(self._nets.items()):
                try:
                    net.teardown()
                except NetError as exc:
                    problems.append(str(exc))
                    continue
                removed.append(name)
                del self._nets[name]
            if problems:
                raise NetError("; ".join(problems))
            if self._journalled:
                self._before_first(())
                self._journalled = ()
            return removed
