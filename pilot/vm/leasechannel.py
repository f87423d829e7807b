"""A VM's lease channel: the virtio-serial port through which its pilot tells the guest when the lease ends.

The port is named :data:`pilot.vm.domainxml.LEASE_CHANNEL`
(``/dev/virtio-ports/org.workspace-pilot.lease.0`` in a guest with udev);
libvirt gives it a unix socket, which the pilot connects to when it starts
the VM and keeps open for the VM's life.
"""

from __future__ import annotations

from pilot.vm.domainxml import LEASE_CHANNEL

#: How long one write to a VM's lease channel may block (a guest that does not read fills it).
CHANNEL_TIMEOUT_S = 1.0


def warning_of(line: str) -> tuple[str, ...]:
    """What a lease channel line says, without the seconds left (``ending TIME SECONDS WHY``: TIME and WHY)."""
    words = line.split()
    return (words[1], words[3]) if len(words) == 4 and words[0] == "ending" else tuple(words)


def open_channel(domain):
    """A connected socket to the domain's lease channel (its unix socket, from the live XML); OSError or
    ValueError (no such channel) when there is none to reach."""
    import socket
    import xml.etree.ElementTree as ET

    root = ET.fromstring(domain.XMLDesc(0))
    for channel in root.iterfind("./devices/channel"):
        target, source = channel.find("target"), channel.find("source")
        if target is not None and target.get("name") == LEASE_CHANNEL and source is not None and source.get("path"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(CHANNEL_TIMEOUT_S)
            try:
                sock.connect(source.get("path"))
            except OSError:
                sock.close()
                raise
            return sock
    raise ValueError(f"domain {domain.name()} has no {LEASE_CHANNEL} channel with a socket")
