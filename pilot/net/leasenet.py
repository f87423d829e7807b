"""One network of a lease on this node, built from the state the service sent, changed as VMs come and go.

A lease network (``kind`` lease): a bridge holding the gateway address,
a VXLAN to the lease's other nodes (unicast: one forwarding entry per node,
no multicast, no learning of where to flood), its filters
(:mod:`pilot.net.filters`) and its DHCP and DNS server
(:mod:`pilot.net.dhcp`). A site network (``kind`` site): the site's own
bridge, which the pilot only filters (its VMs' taps) and never changes.

The caller journals the network's name before :meth:`LeaseNet.build`
makes anything; :func:`pilot.net.cleanup.remove_network` undoes it from
the name alone.
"""

from __future__ import annotations

import logging
import os

from pilot.net import dhcp, filters
from workspace_common import nodenames as names
from pilot.net.commands import BRIDGE, IP, NetError, link_exists, link_mtu, run, run_batch
from workspace_common.protocol.network import NetState, Nic

log = logging.getLogger(__name__)

#: What the VXLAN encapsulation costs of the underlay's MTU (IPv4 outer header).
VXLAN_OVERHEAD = 50


def _underlay_mtu(address: str) -> int:
    """The MTU of the interface that holds ``address`` (1500 if it cannot be told)."""
    holders = [line.split()[1] for line in run([IP, "-o", "-4", "addr", "show"], what="listing the node's addresses")
               .splitlines() if f" inet {address}/" in line]
    try:
        return link_mtu(holders[0]) if holders else 1500
    except OSError:
        return 1500


def _no_ipv6(interface: str) -> None:
    """Keep the node's own IPv6 off ``interface`` (the lease network is IPv4; no link-local chatter)."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{interface}/disable_ipv6", "w", encoding="ascii") as handle:
            handle.write("1")
    except OSError:
        pass  # a kernel without IPv6: nothing to keep off


class LeaseNet:
    """Network ``state`` on this node: ``own_address`` is where the overlay meets it, ``run_root`` where its DHCP
    server's files go. Not thread-safe: :class:`pilot.net.nodenets.NodeNetworks` serialises the calls."""

    def __init__(self, state: NetState, *, own_address: str | None, run_root: str):
        self.state = state
        self.name = names.check_net_name(state.name)
        self.own_address = own_address
        self.directory = names.run_dir(run_root, self.name)
        self.lease = state.kind == "lease"
        self.bridge = names.bridge_name(self.name) if self.lease else state.bridge
        self.overlay = names.vxlan_name(self.name) if self.lease else None
        self.vms: dict[str, Nic] = {}  # by address: this node's VMs on it
        self.mtu: int | None = None
        self._peers: set[str] = set()
        self._dhcp: dhcp.DhcpServer | None = None

    # -- build ------------------------------------------------------------------------------------

    def build(self) -> None:
        """Make the network on this node (the caller journalled its name). Raises NetError; what was made stays
        for :func:`pilot.net.cleanup.remove_network`."""
        if not self.lease:
            if not link_exists(self.bridge):
                raise NetError(f"site network: this node has no bridge {self.bridge} (the site makes it)")
            self._apply_filters()
            return
        if self.own_address is None:
            raise NetError("this node has no address for the lease network's overlay: set [networks] address")
        state = self.state
        self.mtu = _underlay_mtu(self.own_address) - VXLAN_OVERHEAD
        try:
            run_batch(IP, [f"link add {self.bridge} mtu {self.mtu} type bridge",
                           f"addr add {state.gateway}/{state.network.prefixlen} dev {self.bridge}",
                           f"link add {self.overlay} mtu {self.mtu} type vxlan id {state.vni} local {self.own_address}"
                           f" dstport {state.port} nolearning",
                           f"link set {self.overlay} master {self.bridge}"],
                      what=f"making {self.bridge} and {self.overlay}")
        except NetError as exc:
            if "File exists" in str(exc):
                raise NetError(f"{self.bridge} or {self.overlay} already exists on this node: another pilot's, or "
                               "left behind (workspace-killall removes a dead pilot's)") from None
            raise
        for device in (self.bridge, self.overlay):
            _no_ipv6(device)  # before they are up: no link-local address ever
        self._sync_peers(state.nodes)
        self._apply_filters()  # before they are up: no frame passes unfiltered
        run_batch(IP, [f"link set {self.overlay} up", f"link set {self.bridge} up"],
                  what=f"bringing {self.bridge} up")
        self._dhcp = dhcp.DhcpServer(self.name, self.directory, bridge=self.bridge, subnet=state.subnet,
                                     gateway=state.gateway, domain=state.domain, mtu=self.mtu)
        self._dhcp.start(self._dhcp_hosts(), list(state.hosts))
        log.info("lease network %s: %s on %s, %s to %s (VXLAN %d, MTU %d)", self.name, state.subnet, self.bridge,
                 self.overlay, ", ".join(sorted(self._peers)) or "no other node yet", state.vni, self.mtu)

    def _sync_peers(self, nodes) -> None:
        """One all-zero forwarding entry per other node of the lease: floods reach each, and only them."""
        wanted = {node for node in nodes if node != self.own_address}
        run_batch(BRIDGE, [f"fdb append 00:00:00:00:00:00 dev {self.overlay} dst {node}"
                           for node in sorted(wanted - self._peers)]
                  + [f"fdb del 00:00:00:00:00:00 dev {self.overlay} dst {node}" for node in sorted(self._peers - wanted)],
                  what=f"the lease's nodes on {self.overlay}")
        self._peers = wanted

    def _apply_filters(self) -> None:
        vms = [(nic.mac, nic.ip) for nic in self.vms.values()]
        tables = [("bridge", filters.bridge_table(self.name, vms, overlay=self.overlay,
                                                   gateway=self.state.gateway))]
        if self.lease:
            tables.append(("ip", filters.ip_table(self.name, self.bridge)))
        filters.replace_tables(self.name, tables)

    def _dhcp_hosts(self) -> list[tuple[str, str, str]]:
        return [(nic.mac, nic.ip, nic.hostname) for nic in self.vms.values()]

    def _reload_dhcp(self) -> None:
        if self._dhcp is not None:
            self._dhcp.reload(self._dhcp_hosts(), list(self.state.hosts))

    # -- changes ----------------------------------------------------------------------------------

    def update(self, state: NetState) -> bool:
        """Take a newer state of the network (its nodes, its names); whether it was newer. Raises NetError."""
        if not self._take(state):
            return False
        self._reload_dhcp()
        return True

    def _take(self, state: NetState) -> bool:
        """Keep ``state`` if it is newer (the overlay's nodes follow it; the DHCP server is the caller's)."""
        if state.generation <= self.state.generation:
            return False
        if (state.name, state.kind, state.subnet, state.gateway) != (self.name, self.state.kind, self.state.subnet,
                                                                     self.state.gateway):
            raise NetError(f"network {state.name}: a new state must keep its subnet and gateway")
        self.state = state
        if self.lease:
            self._sync_peers(state.nodes)
        return True

    def attach(self, nic: Nic) -> None:
        """Let a VM with ``nic`` onto the network: its filter (before its tap exists) and its DHCP entry (with the
        newer names its state may bring: one reload for both)."""
        self._take(nic.net)
        self.vms[nic.ip] = nic
        try:
            self._apply_filters()
            self._reload_dhcp()
        except NetError:
            self.vms.pop(nic.ip, None)
            raise

    def detach(self, ip: str) -> None:
        """The VM holding ``ip`` is gone: its filter and DHCP entry go."""
        if self.vms.pop(ip, None) is not None:
            self._apply_filters()
            self._reload_dhcp()

    # -- teardown -------------------------------------------------------------------------------

    def teardown(self) -> None:
        """Remove everything of this network from the node (raises NetError if something stays)."""
        from pilot.net.cleanup import remove_network

        remove_network(self.name, os.path.dirname(self.directory))


def interface_of(net: LeaseNet, nic: Nic) -> dict:
    """How the VM's domain joins the network: bridge, tap name, MAC and MTU (for :mod:`pilot.vm.domainxml`)."""
    return {"bridge": net.bridge, "tap": names.tap_name(nic.ip), "mac": nic.mac, "mtu": net.mtu}

