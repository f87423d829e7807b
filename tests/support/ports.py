"""Loopback ports for the daemons the tests start, from below the kernel's ephemeral range.

Binding port 0 gives a port from the ephemeral range, which any outgoing connection may take as its own
source port before the daemon binds it: slurmd-node3 once failed to start so, right after a test that had
opened 1,100 client connections. A port below that range is taken only by a daemon that asks for it.
A port handed out once is not handed out again in this process (two daemons of one test never share one).
"""

from __future__ import annotations

import random
import socket

_handed: set[int] = set()


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that bind now, below the ephemeral range, none handed out before."""
    with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as handle:
        ephemeral_low = int(handle.read().split()[0])
    candidates = list(range(max(1024, ephemeral_low - 12000), ephemeral_low))
    random.shuffle(candidates)
    ports = []
    for port in candidates:
        if port in _handed:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed.add(port)
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"no {count} free ports below {ephemeral_low}")


def free_port() -> int:
    """One loopback port nothing listens on now (see :func:`free_ports`)."""
    return free_ports(1)[0]
