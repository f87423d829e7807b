"""The network a VM joins, as the service hands it to the pilots: its address and the lease network's state.

Part of the wire protocol (:mod:`workspace_common.protocol`): standard library only.
The service allocates every address (docs/networks.md); a pilot builds
what a :class:`NetState` describes on its node and gives each VM exactly
the :class:`Nic` it was sent, nothing else.

A ``lease`` network is one subnet per lease, carried between the lease's
nodes by a VXLAN (``vni``, UDP ``port``) over the nodes' own addresses
(``nodes``); every node answers the gateway address itself. A ``site``
network is a bridge the site made on each node (``bridge``), on the site's
subnet and gateway. ``hosts`` are the lease's VMs with their addresses
(every node answers their names); ``generation`` grows with every change,
so a pilot never lets an older state replace a newer one.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re

from workspace_common.protocol.wire import ProtocolError, _check_int, _check_str, _no_unknown, check_node_address

KINDS = ("lease", "site")
#: The most VMs (names and addresses) one network state lists, and the most nodes it spans.
MAX_NET_HOSTS = 256
MAX_NET_NODES = 256
MAX_VNI = 2**24 - 1
MAX_GENERATION = 2**63 - 1
#: Host names the lease's VMs answer to: one DNS label.
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_NET_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
#: A DNS domain the VMs' names live under, and a Linux interface name (a site's bridge).
DOMAIN_RE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
BRIDGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
_MAC_RE = re.compile(r"^52:54(:[0-9a-f]{2}){4}$")


def mac_for(ip: str) -> str:
    """The MAC of the VM that holds ``ip``: ``52:54`` and the address's four bytes.

    Locally administered and unicast; as unique as the address is, and the
    same whenever the address comes back, so a peer's ARP cache is never
    wrong about it.
    """
    return "52:54:" + ":".join(f"{byte:02x}" for byte in ipaddress.IPv4Address(ip).packed)


def _ipv4(field: str, value) -> ipaddress.IPv4Address:
    if not isinstance(value, str) or len(value) > 15:
        raise ProtocolError(f"{field}: must be an IPv4 address")
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise ProtocolError(f"{field}: {value!r} is not an IPv4 address") from None


@dataclasses.dataclass(frozen=True)
class NetState:
    """One lease's network as the service knows it now; :meth:`from_dict` validates every field."""

    name: str
    kind: str
    subnet: str
    gateway: str
    domain: str
    generation: int
    vni: int | None = None
    port: int | None = None
    bridge: str | None = None
    nodes: tuple[str, ...] = ()
    hosts: tuple[tuple[str, str], ...] = ()

    _FIELDS = frozenset({"name", "kind", "subnet", "gateway", "domain", "generation", "vni", "port", "bridge",
                         "nodes", "hosts"})

    @property
    def network(self) -> ipaddress.IPv4Network:
        """The subnet as an address object."""
        return ipaddress.IPv4Network(self.subnet)

    @classmethod
    def from_dict(cls, field: str, data) -> "NetState":
        """Parse ``data``; ProtocolError names ``field`` and what is wrong."""
        if not isinstance(data, dict):
            raise ProtocolError(f"{field}: must be an object")
        _no_unknown(field, data, cls._FIELDS)
        _check_str(f"{field}.name", data.get("name"), 32, _NET_NAME_RE)
        kind = data.get("kind")
        if kind not in KINDS:
            raise ProtocolError(f"{field}.kind: must be one of {', '.join(KINDS)}")
        subnet = data.get("subnet")
        try:
            network = ipaddress.IPv4Network(subnet) if isinstance(subnet, str) and len(subnet) <= 18 else None
        except ValueError:
            network = None
        if network is None or network.prefixlen > 30 or network.prefixlen < 8:
            raise ProtocolError(f"{field}.subnet: must be an IPv4 network from /8 to /30 (e.g. 10.213.5.0/24)")
        gateway = _ipv4(f"{field}.gateway", data.get("gateway"))
        if gateway not in network or gateway in (network.network_address, network.broadcast_address):
            raise ProtocolError(f"{field}.gateway: {gateway} is not a host address of {network}")
        _check_str(f"{field}.domain", data.get("domain"), 200, DOMAIN_RE)
        _check_int(f"{field}.generation", data.get("generation"), 0, MAX_GENERATION)
        vni = port = bridge = None
        nodes: tuple[str, ...] = ()
        if kind == "lease":
            _check_int(f"{field}.vni", data.get("vni"), 1, MAX_VNI)
            _check_int(f"{field}.port", data.get("port"), 1, 65535)
            vni, port = data["vni"], data["port"]
            raw_nodes = data.get("nodes", [])
            if not isinstance(raw_nodes, list) or len(raw_nodes) > MAX_NET_NODES:
                raise ProtocolError(f"{field}.nodes: must be a list of at most {MAX_NET_NODES} node addresses")
            nodes = tuple(check_node_address(f"{field}.nodes[]", node) for node in raw_nodes)
            if data.get("bridge") is not None:
                raise ProtocolError(f"{field}.bridge: only a site network names a bridge")
        else:
            bridge = data.get("bridge")
            _check_str(f"{field}.bridge", bridge, 15, BRIDGE_RE)
            for name in ("vni", "port"):
                if data.get(name) is not None:
                    raise ProtocolError(f"{field}.{name}: only a lease network has one")
            if data.get("nodes"):
                raise ProtocolError(f"{field}.nodes: only a lease network spans nodes")
        raw_hosts = data.get("hosts", [])
        if not isinstance(raw_hosts, list) or len(raw_hosts) > MAX_NET_HOSTS:
            raise ProtocolError(f"{field}.hosts: must be a list of at most {MAX_NET_HOSTS} VMs")
        hosts = []
        for item in raw_hosts:
            if not isinstance(item, dict) or set(item) != {"name", "ip"}:
                raise ProtocolError(f'{field}.hosts[]: must be {{"name", "ip"}}')
            _check_str(f"{field}.hosts[].name", item["name"], 63, HOSTNAME_RE)
            if _ipv4(f"{field}.hosts[].ip", item["ip"]) not in network:
                raise ProtocolError(f"{field}.hosts[].ip: {item['ip']} is not in {network}")
            hosts.append((item["name"], item["ip"]))
        return cls(data["name"], kind, str(network), str(gateway), data["domain"], data["generation"], vni, port,
                   bridge, nodes, tuple(hosts))

    def to_dict(self) -> dict:
        """The JSON object (the inverse of :meth:`from_dict`)."""
        out: dict = {"name": self.name, "kind": self.kind, "subnet": self.subnet, "gateway": self.gateway,
                     "domain": self.domain, "generation": self.generation}
        if self.kind == "lease":
            out.update(vni=self.vni, port=self.port, nodes=list(self.nodes))
        else:
            out["bridge"] = self.bridge
        out["hosts"] = [{"name": name, "ip": ip} for name, ip in self.hosts]
        return out


@dataclasses.dataclass(frozen=True)
class Nic:
    """A VM's interface on its lease's network: its MAC, address and host name, the port its node forwards to
    its SSH (``forward_port``, lease networks only; None for none) and the network (:class:`NetState`)."""

    mac: str
    ip: str
    hostname: str
    net: NetState
    forward_port: int | None = None

    @classmethod
    def from_dict(cls, field: str, data) -> "Nic":
        """Parse ``data``; the MAC must be the address's (:func:`mac_for`) and the address a host of the subnet."""
        if not isinstance(data, dict):
            raise ProtocolError(f"{field}: must be an object")
        _no_unknown(field, data, {"mac", "ip", "hostname", "net", "forward_port"})
        net = NetState.from_dict(f"{field}.net", data.get("net"))
        ip = _ipv4(f"{field}.ip", data.get("ip"))
        network = net.network
        if ip not in network or ip in (network.network_address, network.broadcast_address) or str(ip) == net.gateway:
            raise ProtocolError(f"{field}.ip: {ip} is not a VM address of {network}")
        mac = data.get("mac")
        if not isinstance(mac, str) or not _MAC_RE.fullmatch(mac) or mac != mac_for(str(ip)):
            raise ProtocolError(f"{field}.mac: must be {mac_for(str(ip))} (the address's own)")
        _check_str(f"{field}.hostname", data.get("hostname"), 63, HOSTNAME_RE)
        port = data.get("forward_port")
        if port is not None:
            # Never a privileged port: a forward must not stand in for one of the node's own services.
            _check_int(f"{field}.forward_port", port, 1024, 65535)
            if net.kind != "lease":
                raise ProtocolError(f"{field}.forward_port: only a VM on a lease network is reached by a forward")
        return cls(mac, str(ip), data["hostname"], net, port)

    def to_dict(self) -> dict:
        """The JSON object."""
        out = {"mac": self.mac, "ip": self.ip, "hostname": self.hostname, "net": self.net.to_dict()}
        if self.forward_port is not None:
            out["forward_port"] = self.forward_port
        return out

