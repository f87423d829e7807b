"""The site's networks for leased VMs, as declared in the service config's ``[networks]`` (docs/networks.md).

A :class:`NetworkPlan` is what the store allocates from: in ``private``
mode each lease gets its own subnet of ``lease_range`` (one
``lease_prefix`` each) with its own VXLAN id, in ``site`` mode every VM
joins the site's bridge and takes an address from ``site_pool``; in
``none`` (the default) VMs get no address from the service. Building a plan
checks that the pools are well formed and do not overlap: a bad one is a
config error, never a lease that fails later.
"""

from __future__ import annotations

import dataclasses
import ipaddress

from workspace_common.protocol.network import BRIDGE_RE, DOMAIN_RE, HOSTNAME_RE, MAX_VNI

MODES = ("none", "private", "site")


def parse_network(text: str) -> ipaddress.IPv4Network:
    """An IPv4 network written with its prefix (``10.213.0.0/16``); ValueError says what is wrong."""
    try:
        network = ipaddress.IPv4Network(text.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an IPv4 network with its prefix, e.g. 10.213.0.0/16 ({exc})") from None
    if "/" not in text:
        raise ValueError(f"{text!r}: give the prefix length too, e.g. {text.strip()}/24")
    return network


def parse_ranges(text: str) -> tuple[tuple[ipaddress.IPv4Address, ipaddress.IPv4Address], ...]:
    """Address ranges ``FIRST-LAST`` separated by commas; ValueError for a malformed or backward range."""
    ranges = []
    for part in (p.strip() for p in text.split(",")):
        first, sep, last = part.partition("-")
        try:
            low = ipaddress.IPv4Address(first.strip())
            high = ipaddress.IPv4Address(last.strip()) if sep else low
        except ValueError:
            raise ValueError(f"{part!r} is not an address range: write FIRST-LAST, e.g. 192.0.2.100-192.0.2.199"
                             ) from None
        if high < low:
            raise ValueError(f"{part!r} runs backwards: write the lower address first")
        ranges.append((low, high))
    ordered = sorted(ranges)
    for (_, high), (low, _) in zip(ordered, ordered[1:]):
        if low <= high:
            raise ValueError(f"ranges overlap at {low}: give each address once")
    return tuple(ordered)


def parse_ports(text: str) -> tuple[int, int] | None:
    """``FIRST-LAST`` TCP ports (1024-65535), or None for an empty value (no forwards)."""
    if not text.strip():
        return None
    first, sep, last = text.partition("-")
    try:
        low, high = int(first), int(last if sep else first)
    except ValueError:
        raise ValueError(f"{text!r} is not a port range: write FIRST-LAST, e.g. 20000-20999") from None
    if not 1024 <= low <= high <= 65535:
        raise ValueError(f"{text!r}: ports must run upward within 1024-65535")
    return low, high


def check_bridge(text: str) -> str:
    """A Linux interface name (at most 15 characters)."""
    if not BRIDGE_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not an interface name (letters, digits, . _ -; at most 15 characters)")
    return text


def check_domain(text: str) -> str:
    """A DNS domain the VMs' names live under."""
    if len(text) > 200 or not DOMAIN_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not a DNS domain (labels of letters, digits and hyphens, e.g. vm.internal)")
    return text


@dataclasses.dataclass(frozen=True)
class NetworkPlan:
    """Where the VMs' addresses come from; :meth:`problems` lists what is wrong with it (empty: usable)."""

    mode: str = "none"
    lease_range: ipaddress.IPv4Network = ipaddress.IPv4Network("10.213.0.0/16")
    lease_prefix: int = 24
    vxlan_port: int = 4789
    vni_base: int = 100000
    site_network: ipaddress.IPv4Network | None = None
    site_gateway: ipaddress.IPv4Address | None = None
    site_pool: tuple[tuple[ipaddress.IPv4Address, ipaddress.IPv4Address], ...] = ()
    site_bridge: str | None = None
    domain: str = "vm.internal"
    forward_ports: tuple[int, int] | None = (20000, 20999)

    @property
    def enabled(self) -> bool:
        """Whether VMs get addresses from the service."""
        return self.mode != "none"

    @property
    def subnets(self) -> int:
        """How many lease subnets ``lease_range`` holds."""
        return 2 ** (self.lease_prefix - self.lease_range.prefixlen)

    def lease_subnet(self, index: int) -> ipaddress.IPv4Network:
        """The ``index``-th lease subnet (0-based) of the range."""
        size = 2 ** (32 - self.lease_prefix)
        return ipaddress.IPv4Network((int(self.lease_range.network_address) + index * size, self.lease_prefix))

    def problems(self) -> list[tuple[str, str]]:
        """(option, what is wrong) for each problem of the mode in use; empty when the plan can be used."""
        found: list[tuple[str, str]] = []
        if self.mode == "private":
            if not self.lease_range.prefixlen < self.lease_prefix <= 29:
                found.append(("lease_prefix", f"{self.lease_prefix} must be longer than lease_range's "
                              f"/{self.lease_range.prefixlen} and at most 29 (a lease needs room for VMs)"))
            elif self.vni_base + self.subnets - 1 > MAX_VNI:
                found.append(("vni_base", f"{self.vni_base} + {self.subnets} subnets passes the VXLAN limit "
                              f"{MAX_VNI}: lower it"))
            if not 1 <= self.vni_base <= MAX_VNI:
                found.append(("vni_base", f"{self.vni_base} is outside 1..{MAX_VNI}"))
            if not 1 <= self.vxlan_port <= 65535:
                found.append(("vxlan_port", f"{self.vxlan_port} is not a UDP port"))
            if self.site_network is not None and self.site_network.overlaps(self.lease_range):
                found.append(("lease_range", f"{self.lease_range} overlaps site_network {self.site_network}: a "
                              "lease's VM could take a site address"))
        if self.mode == "site":
            for option in ("site_network", "site_gateway", "site_bridge"):
                if getattr(self, option) is None:
                    found.append((option, "needed when mode = site"))
            if not self.site_pool:
                found.append(("site_pool", "needed when mode = site: the addresses VMs may take"))
            network, gateway = self.site_network, self.site_gateway
            if network is not None:
                if gateway is not None and (gateway not in network or gateway in (network.network_address,
                                                                                   network.broadcast_address)):
                    found.append(("site_gateway", f"{gateway} is not a host address of site_network {network}"))
                for low, high in self.site_pool:
                    if low not in network or high not in network:
                        found.append(("site_pool", f"{low}-{high} is not inside site_network {network}"))
                    elif low <= network.network_address or high >= network.broadcast_address:
                        found.append(("site_pool", f"{low}-{high} holds {network}'s network or broadcast address"))
                    elif gateway is not None and low <= gateway <= high:
                        found.append(("site_pool", f"{low}-{high} holds the gateway {gateway}"))
        return found

    def site_addresses(self):
        """Every address of the site pool, lowest first."""
        for low, high in self.site_pool:
            for value in range(int(low), int(high) + 1):
                yield ipaddress.IPv4Address(value)

    def pool_label(self) -> str:
        """How a refusal names the pool in use."""
        if self.mode == "site":
            return "site_pool " + ", ".join(f"{low}-{high}" for low, high in self.site_pool)
        return f"lease_range {self.lease_range} (/{self.lease_prefix} per lease)"


def vm_hostname(name: str, hostname: str | None) -> str | None:
    """The name a VM answers to on its network: its context's host name, else its own name if that is one label."""
    chosen = hostname or name
    return chosen if HOSTNAME_RE.fullmatch(chosen) else None
