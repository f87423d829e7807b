"""The addresses of the leases' VMs: each lease's network, and each VM's MAC, IP, host name and forwarded port.

Runs inside the store's write transaction, like :mod:`.vms`. An address is
held by its VM's row (``holds_address``) and the database refuses a second
holder (unique partial indexes), so two starts can never get one address,
whatever order they commit in. A VM that stops or fails lets go of its
address in the same statement that ends it (a trigger: no path that ends a
VM can forget); a ``lost`` VM may still run on a node nobody hears from, so
it keeps its address until its lease ends, when the lease's network and
every address in it are let go.

A lease's network (``lease_networks``) is made at its first VM start with
an address: in private mode a subnet of the site's range and a VXLAN id,
unique among held ones; in site mode the site's subnet and bridge. Its
``generation`` grows with every VM start; the hosts that already run the
lease's VMs get the new state as a ``network`` command, so a VM started
later is known by name on every node.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import sqlite3

from workspace_common.protocol import VmSpec
from workspace_common.protocol.network import MAX_NET_HOSTS, MAX_NET_NODES, NetState, Nic, mac_for
from service_adapter.networks import NetworkPlan, vm_hostname
from service_adapter.store.errors import StoreError

SCHEMA = """
CREATE TABLE IF NOT EXISTS lease_networks (
    lease_id    TEXT PRIMARY KEY REFERENCES leases(id),
    kind        TEXT NOT NULL,
    subnet      TEXT NOT NULL,
    gateway     TEXT NOT NULL,
    vni         INTEGER,
    port        INTEGER,
    bridge      TEXT,
    domain      TEXT NOT NULL,
    generation  INTEGER NOT NULL,
    created_at  REAL NOT NULL,
    freed_at    REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS lease_subnets_held ON lease_networks(subnet)
    WHERE freed_at IS NULL AND kind = 'lease';
CREATE UNIQUE INDEX IF NOT EXISTS lease_vnis_held ON lease_networks(vni) WHERE freed_at IS NULL AND vni IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS vm_addresses_held ON vms(ip) WHERE holds_address = 1;
CREATE UNIQUE INDEX IF NOT EXISTS vm_forwards_held ON vms(host, forward_port)
    WHERE holds_address = 1 AND forward_port IS NOT NULL;
CREATE INDEX IF NOT EXISTS vm_addresses_by_lease ON vms(lease_id) WHERE holds_address = 1;
CREATE TRIGGER IF NOT EXISTS vm_address_freed AFTER UPDATE OF state ON vms
    FOR EACH ROW WHEN NEW.holds_address = 1 AND NEW.state IN ('stopped', 'failed')
    BEGIN UPDATE vms SET holds_address = 0 WHERE lease_id = NEW.lease_id AND name = NEW.name; END;
"""


class PoolExhausted(StoreError):
    """No address (or subnet, or forwarded port) is free in the pool named; nothing was allocated."""


def _network_row(conn: sqlite3.Connection, lease_id: str):
    return conn.execute(
        "SELECT kind, subnet, gateway, vni, port, bridge, domain, generation FROM lease_networks"
        " WHERE lease_id = ? AND freed_at IS NULL", (lease_id,)).fetchone()


def _new_network(conn: sqlite3.Connection, plan: NetworkPlan, lease_id: str, now: float) -> None:
    """Give the lease its network: a free subnet and VXLAN id (private), or the site's (site)."""
    if plan.mode == "site":
        conn.execute(
            "INSERT INTO lease_networks (lease_id, kind, subnet, gateway, bridge, domain, generation, created_at)"
            " VALUES (?, 'site', ?, ?, ?, ?, 0, ?)",
            (lease_id, str(plan.site_network), str(plan.site_gateway), plan.site_bridge, plan.domain, now))
        return
    held_subnets = {s for (s,) in conn.execute(
        "SELECT subnet FROM lease_networks WHERE freed_at IS NULL AND kind = 'lease'")}
    held_vnis = {v for (v,) in conn.execute(
        "SELECT vni FROM lease_networks WHERE freed_at IS NULL AND vni IS NOT NULL")}
    for index in range(plan.subnets):
        subnet = plan.lease_subnet(index)
        vni = plan.vni_base + index
        if str(subnet) in held_subnets or vni in held_vnis:
            continue
        conn.execute(
            "INSERT INTO lease_networks (lease_id, kind, subnet, gateway, vni, port, domain, generation, created_at)"
            " VALUES (?, 'lease', ?, ?, ?, ?, ?, 0, ?)",
            (lease_id, str(subnet), str(subnet.network_address + 1), vni, plan.vxlan_port, plan.domain, now))
        return
    raise PoolExhausted(f"{plan.pool_label()} is exhausted: all {plan.subnets} lease subnets are held")


def _free_ips(conn: sqlite3.Connection, plan: NetworkPlan, lease_id: str, subnet: ipaddress.IPv4Network,
              gateway: str):
    """The addresses a new VM of the lease may take, lowest first."""
    if plan.mode == "site" and subnet == plan.site_network:
        held = {ip for (ip,) in conn.execute("SELECT ip FROM vms WHERE holds_address = 1")}
        candidates = plan.site_addresses()
    else:
        held = {ip for (ip,) in conn.execute("SELECT ip FROM vms WHERE lease_id = ? AND holds_address = 1",
                                             (lease_id,))}
        held.add(gateway)
        candidates = subnet.hosts()
    return (str(ip) for ip in candidates if str(ip) not in held)


def _free_ports(conn: sqlite3.Connection, plan: NetworkPlan, host: str):
    if plan.forward_ports is None:
        return iter(())
    held = {port for (port,) in conn.execute(
        "SELECT forward_port FROM vms WHERE host = ? AND holds_address = 1 AND forward_port IS NOT NULL", (host,))}
    low, high = plan.forward_ports
    return (port for port in range(low, high + 1) if port not in held)


def assign(conn: sqlite3.Connection, plan: NetworkPlan, lease_id: str, slot: str,
           placed: list[tuple[VmSpec, str]], now: float) -> list[VmSpec]:
    """The specs of ``placed`` (spec, host) with their ``nic``s: addresses, MACs, host names and forwards.

    Makes the lease's network if it has none. Raises :class:`PoolExhausted`
    (nothing allocated: the caller's transaction rolls back) or
    ValueError for a VM whose name is no host name. The VM rows are written
    by the caller with :func:`hold_columns`.
    """
    if not plan.enabled:
        return [spec for spec, _ in placed]
    names = [vm_hostname(spec.name, spec.context.hostname if spec.context else None) for spec, _ in placed]
    for (spec, _), name in zip(placed, names):
        if name is None:
            raise ValueError(f"VM {spec.name}: its name must be a host name (letters, digits and hyphens, at most "
                             "63) when the site gives VMs addresses, or give context.hostname")
        if spec.network is not None:
            raise ValueError(f"VM {spec.name}: this site gives each VM its lease's network; leave out 'network'")
    if _network_row(conn, lease_id) is None:
        _new_network(conn, plan, lease_id, now)
    kind, subnet, gateway, *_ = _network_row(conn, lease_id)
    network = ipaddress.IPv4Network(subnet)
    ips = _free_ips(conn, plan, lease_id, network, gateway)
    ports: dict[str, object] = {}
    chosen: list[tuple[VmSpec, str, str, str, int | None]] = []
    for (spec, host), name in zip(placed, names):
        ip = next(ips, None)
        if ip is None:
            raise PoolExhausted(f"{plan.pool_label() if kind == 'site' else f'lease subnet {subnet}'} is exhausted: "
                                "every address is held by a VM")
        port = None
        if kind == "lease" and plan.forward_ports is not None:
            port = next(ports.setdefault(host, _free_ports(conn, plan, host)), None)
            if port is None:
                low, high = plan.forward_ports
                raise PoolExhausted(f"forward_ports {low}-{high} is exhausted on {host}: every port forwards to a VM")
        chosen.append((spec, host, ip, name, port))
    generation = _bump(conn, lease_id)
    state = net_state(conn, lease_id, extra=[(name, ip) for _, _, ip, name, _ in chosen], generation=generation)
    return [dataclasses.replace(spec, nic=Nic(mac_for(ip), ip, name, state, port))
            for spec, _, ip, name, port in chosen]


def hold_columns(spec: VmSpec) -> tuple:
    """(ip, mac, hostname, forward_port, holds_address) of a VM row for ``spec``."""
    nic = spec.nic
    if nic is None:
        return None, None, None, None, 0
    return nic.ip, nic.mac, nic.hostname, nic.forward_port, 1


def _bump(conn: sqlite3.Connection, lease_id: str) -> int:
    (generation,) = conn.execute(
        "UPDATE lease_networks SET generation = generation + 1 WHERE lease_id = ? AND freed_at IS NULL"
        " RETURNING generation", (lease_id,)).fetchone()
    return generation


def net_state(conn: sqlite3.Connection, lease_id: str, *, extra=(), generation: int | None = None) -> NetState | None:
    """The lease's network as its pilots get it: its nodes' addresses and its VMs' names (with ``extra``)."""
    row = _network_row(conn, lease_id)
    if row is None:
        return None
    kind, subnet, gateway, vni, port, bridge, domain, current = row
    hosts = [(name, ip) for name, ip in conn.execute(
        "SELECT hostname, ip FROM vms WHERE lease_id = ? AND holds_address = 1 ORDER BY ip", (lease_id,))]
    hosts += list(extra)
    nodes: list[str] = []
    if kind == "lease":
        nodes = [address for (address,) in conn.execute(
            "SELECT DISTINCT p.address FROM pilots p JOIN leases l ON l.slot = p.slot_id WHERE l.id = ?"
            " AND p.address IS NOT NULL AND p.reserved_at IS NOT NULL AND p.ended_by IS NULL AND p.lost_at IS NULL"
            " ORDER BY p.address", (lease_id,))]
    return NetState(f"l{vni}" if kind == "lease" else f"s{lease_id[-8:].lower()}", kind, subnet, gateway, domain,
                    current if generation is None else generation, vni, port, bridge,
                    tuple(nodes[:MAX_NET_NODES]), tuple(hosts[-MAX_NET_HOSTS:]))


def free_lease(conn: sqlite3.Connection, lease_id: str, now: float) -> None:
    """The lease has ended: its network and every address its VMs held (lost ones too) are free."""
    conn.execute("UPDATE vms SET holds_address = 0 WHERE lease_id = ? AND holds_address = 1", (lease_id,))
    conn.execute("UPDATE lease_networks SET freed_at = ? WHERE lease_id = ? AND freed_at IS NULL", (now, lease_id))
