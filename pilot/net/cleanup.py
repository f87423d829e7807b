"""Removing a network from a node by its journalled name: whoever undoes a pilot's entry (itself, the next
pilot, workspace-killall) calls :func:`remove_network`.

Idempotent: what is already gone is skipped, so a removal cut short is
finished by the next one. The order keeps the node safe meanwhile: the
DHCP server first, the filters next, the devices last (a bridge that
outlives its filters for a moment has no VM on it: they are destroyed
before this runs).
"""

from __future__ import annotations

from pilot.net import dhcp, filters
from workspace_common import nodenames as names
from pilot.net.commands import delete_link


def remove_network(name: str, run_root: str) -> list[str]:
    """Remove network ``name`` (its DHCP server, tables, VXLAN, bridge and files); what was removed.

    Raises :class:`pilot.net.commands.NetError` (or ValueError for a name
    the pilot never makes) when something stays: the journal entry must
    then stay too.
    """
    names.check_net_name(name)
    removed = []
    directory = names.run_dir(run_root, name)
    if dhcp.stop(directory):
        removed.append("dnsmasq")
    removed += [f"nft {family} table" for family in filters.delete_tables(name)]
    if names.vni_of(name) is not None:
        for device in (names.vxlan_name(name), names.bridge_name(name)):
            if delete_link(device):
                removed.append(device)
    dhcp.remove_files(run_root, name)
    return removed
