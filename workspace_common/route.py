"""This host's address on the way to somewhere: what the kernel's routing table would use as the source."""

from __future__ import annotations


def address_towards(contact: str) -> str:
    """This node's IP address on the way to the service (what the lease's other nodes most likely reach)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(contact)
    family = socket.AF_INET6 if ":" in (parts.hostname or "") else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((parts.hostname, parts.port or 80))  # UDP: no packet is sent
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"
