"""Running ``ip``, ``bridge`` and ``nft`` as root: fixed absolute paths, argument lists, one-line errors.

The programs are the node's own (``/usr/sbin``), never found on a PATH a
caller could set. Every failure is a :class:`NetError` naming what was
asked and what the program said.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import subprocess

IP = "/usr/sbin/ip"
BRIDGE = "/usr/sbin/bridge"
NFT = "/usr/sbin/nft"
DNSMASQ = "/usr/sbin/dnsmasq"
_SIOCGIFMTU = 0x8921
#: How long one of them may take (they answer in milliseconds; a hung one must not hang the pilot).
TIMEOUT_S = 10.0


class NetError(Exception):
    """A lease network could not be built, changed or removed; ``str()`` is one line saying what and why."""


def run(argv: list[str], *, stdin: str | None = None, what: str | None = None) -> str:
    """Run ``argv``; its stdout. Raises :class:`NetError` with ``what`` (default: the command) and its stderr."""
    try:
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=TIMEOUT_S,
                                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
    except FileNotFoundError:
        raise NetError(f"{argv[0]} is not installed (the node needs iproute2 and nftables)") from None
    except subprocess.TimeoutExpired:
        raise NetError(f"{what or ' '.join(argv)}: no answer in {TIMEOUT_S:g} s") from None
    if result.returncode != 0:
        said = " ".join(result.stderr.split())[:300] or f"exit {result.returncode}"
        raise NetError(f"{what or ' '.join(argv)}: {said}")
    return result.stdout


def run_batch(program: str, lines: list[str], *, what: str) -> None:
    """Run ``lines`` through ``program -batch -`` (``ip`` or ``bridge``): one process for many changes, stopping at
    the first that fails. Raises :class:`NetError`."""
    if lines:
        run([program, "-batch", "-"], stdin="\n".join(lines) + "\n", what=what)


def link_exists(name: str) -> bool:
    """Whether interface ``name`` exists in this network namespace (asked of the kernel, not of /sys, which shows
    the namespace it was mounted in)."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def link_mtu(name: str) -> int:
    """The MTU of interface ``name`` (SIOCGIFMTU, in this network namespace). Raises OSError."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        answer = fcntl.ioctl(probe.fileno(), _SIOCGIFMTU, struct.pack("16si12x", name.encode(), 0))
    return struct.unpack("16si12x", answer)[1]


def delete_link(name: str) -> bool:
    """Delete interface ``name`` if it exists; whether it did. Raises NetError if it stays."""
    try:
        run([IP, "link", "delete", "dev", name], what=f"deleting {name}")
    except NetError as exc:
        if "Cannot find device" in str(exc):
            return False
        raise
    return True
