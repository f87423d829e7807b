"""The names of what a pilot makes on a node, all derived from what the service chose: its VMs' domains from the
slot, a lease network's devices, tables and directories from the network and its VMs' addresses.

Derived, not chosen: whoever undoes a dead pilot's entry finds the
devices, tables and directories from the journalled network name alone.
Interface names stay within Linux's 15 characters.
"""

from __future__ import annotations

import ipaddress
import os
import re

#: A journalled network name: ``l<VXLAN id>`` for a lease network, ``s<8 of the lease id>`` for a site one.
NET_NAME_RE = re.compile(r"^(l[0-9]{1,8}|s[a-z0-9-]{1,31})$")


def slot_domain_prefix(slot: str) -> str:
    """The start of the libvirt domain name of every VM of ``slot`` (``wp-<first 8 of the slot>-``)."""
    return f"wp-{slot[:8]}-"


def check_net_name(name: str) -> str:
    """``name`` if it is a network name the pilot makes; ValueError else (a journal entry is never trusted)."""
    if not isinstance(name, str) or not NET_NAME_RE.fullmatch(name):
        raise ValueError(f"not a lease network name: {name!r}")
    return name


def vni_of(name: str) -> int | None:
    """The VXLAN id of a lease network's name (None for a site network)."""
    return int(name[1:]) if name.startswith("l") else None


def bridge_name(name: str) -> str:
    """The bridge of lease network ``name`` (a site network's bridge is the site's, not named here)."""
    return f"wpb-{vni_of(name):06x}"


def vxlan_name(name: str) -> str:
    """The VXLAN interface of lease network ``name``."""
    return f"wpx-{vni_of(name):06x}"


def tap_name(ip: str) -> str:
    """The tap of the VM holding ``ip`` (unique on the node: addresses are unique among held ones)."""
    return f"wpt-{int(ipaddress.IPv4Address(ip)):08x}"


def table_name(name: str) -> str:
    """The nftables table (bridge and ip families) of network ``name``."""
    return "wpilot_" + name.replace("-", "_")


def run_dir(root: str, name: str) -> str:
    """The network's directory under the pilot's network run root (its DHCP server's files)."""
    return os.path.join(root, check_net_name(name))
