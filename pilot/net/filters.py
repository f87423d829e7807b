"""The nftables rules of a network on a node: no spoofing, DHCP and the gateway kept local, the node kept out.

Each network has its own tables (``bridge`` and ``ip`` families, named
by :func:`workspace_common.nodenames.table_name`), replaced whole in one ``nft``
transaction whenever a VM comes or goes, so the rules are never half
there, and deleted whole at teardown. Nothing outside them is touched.

Bridge family (frames, on the network's bridge):

- each VM's tap: only its own MAC as source, only IPv4 and ARP, ARP only
  for its own address (or 0.0.0.0, a probe), IPv4 only from its own
  address (0.0.0.0 only to ask DHCP);
- a lease network's VXLAN: no DHCP, no ARP or IP from or to the gateway
  address crosses it (every node answers the gateway and DHCP itself), and
  nothing from it reaches the node.

IP family (the node's own stack): from the network's bridge the node takes
DHCP, DNS, pings and the replies to its own connections (the forwards),
and routes nothing in or out of it (frames bridged between the network's
own ports pass: a node with ``br_netfilter`` shows them to these hooks).
"""

from __future__ import annotations

from workspace_common import nodenames as names
from pilot.net.commands import NFT, run


def _vm_chain(chain: str, mac: str, ip: str) -> str:
    return (f"  chain {chain} {{\n"
            f"    ether saddr != {mac} drop\n"
            "    ether type != { ip, arp } drop\n"
            f"    arp saddr ether != {mac} drop\n"
            f"    arp saddr ip != {{ {ip}, 0.0.0.0 }} drop\n"
            "    ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept\n"
            f"    ip saddr != {ip} drop\n"
            "  }\n")


def bridge_table(name: str, vms: list[tuple[str, str]], *, overlay: str | None, gateway: str | None) -> str:
    """The bridge-family table of network ``name``: ``vms`` are (MAC, IP) of this node's VMs on it."""
    table = names.table_name(name)
    jumps, chains = [], []
    for index, (mac, ip) in enumerate(sorted(vms, key=lambda vm: vm[1])):
        chain = f"vm{index}"
        jumps.append(f'    iifname "{names.tap_name(ip)}" jump {chain}\n')
        chains.append(_vm_chain(chain, mac, ip))
    local = ""
    if overlay is not None:
        local = (f'    oifname "{overlay}" udp dport {{ 67, 68 }} drop\n'
                 f'    iifname "{overlay}" udp dport {{ 67, 68 }} drop\n'
                 f'    oifname "{overlay}" arp daddr ip {gateway} drop\n'
                 f'    oifname "{overlay}" arp saddr ip {gateway} drop\n'
                 f'    iifname "{overlay}" arp daddr ip {gateway} drop\n'
                 f'    iifname "{overlay}" arp saddr ip {gateway} drop\n'
                 f'    oifname "{overlay}" ip saddr {gateway} drop\n'
                 f'    iifname "{overlay}" ip daddr {gateway} drop\n')
    keep_out = f'    iifname "{overlay}" drop\n' if overlay is not None else ""
    return (f"table bridge {table} {{\n"
            "  chain forward {\n"
            "    type filter hook forward priority -10; policy accept;\n"
            + "".join(jumps) + local +
            "  }\n"
            "  chain input {\n"
            "    type filter hook input priority -10; policy accept;\n"
            + keep_out + "".join(jumps) +
            "  }\n"
            + "".join(chains) +
            "}\n")


def ip_table(name: str, bridge: str) -> str:
    """The ip-family table of lease network ``name``: what the node takes from its bridge, and no routing."""
    return (f"table ip {names.table_name(name)} {{\n"
            "  chain input {\n"
            "    type filter hook input priority -10; policy accept;\n"
            f'    iifname "{bridge}" udp dport 67 accept\n'
            f'    iifname "{bridge}" meta l4proto {{ tcp, udp }} th dport 53 accept\n'
            f'    iifname "{bridge}" icmp type echo-request accept\n'
            f'    iifname "{bridge}" ct state established,related accept\n'
            f'    iifname "{bridge}" drop\n'
            "  }\n"
            "  chain forward {\n"
            "    type filter hook forward priority -10; policy accept;\n"
            # Bridged between the network's own ports (seen here when the node loads br_netfilter): theirs.
            f'    iifname "{bridge}" oifname "{bridge}" accept\n'
            f'    iifname "{bridge}" drop\n'
            f'    oifname "{bridge}" drop\n'
            "  }\n"
            "}\n")


def replace_tables(name: str, tables: list[tuple[str, str]]) -> None:
    """Put ``tables`` ((family, text) of network ``name``) in place of the old ones, in one transaction."""
    table = names.table_name(name)
    script = "".join(f"table {family} {table}\ndelete table {family} {table}\n{text}" for family, text in tables)
    run([NFT, "-f", "-"], stdin=script, what=f"nft rules of network {name}")


def delete_tables(name: str) -> list[str]:
    """Delete network ``name``'s tables, whichever exist; the families deleted. Raises NetError."""
    table = names.table_name(name)
    listed = run([NFT, "list", "tables"], what="listing nft tables").split("\n")
    present = [family for family in ("bridge", "ip") if f"table {family} {table}" in listed]
    if present:
        run([NFT, "-f", "-"], stdin="".join(f"delete table {family} {table}\n" for family in present),
            what=f"deleting nft tables of network {name}")
    return present
