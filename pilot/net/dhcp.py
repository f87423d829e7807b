"""The DHCP and DNS server of a lease network on one node: a dnsmasq that answers this node's VMs only.

One dnsmasq per lease network and node, bound to the network's bridge
(the gateway address), started as root and running as ``nobody``. It
hands each of this node's VMs its fixed address (``hosts``: MAC, address,
name; an unknown MAC gets no answer) and answers the lease's names
(``names``: every VM of the lease, whichever node it runs on) under the
network's domain, and nothing else: no upstream, no router, so a VM waits
on no other node and no site server. The files are rewritten and dnsmasq
told (SIGHUP) whenever a VM comes or goes or the lease's names change.

The process is found again by its pid file and recognised by its command
line (its own configuration file) before it is signalled, so a reused pid
is never killed.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import signal
import subprocess

from workspace_common import nodenames as names
from pilot.net.commands import DNSMASQ, NetError

#: How long a lease the VMs get (they renew at half of it; the address never changes).
LEASE_TIME = "12h"
#: How long dnsmasq may take to end after SIGTERM before it is killed.
STOP_TIMEOUT_S = 5.0
USER, GROUP = "nobody", "nogroup"


def _write(path: str, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` atomically (dnsmasq, rereading it on SIGHUP, sees the old file or the new one)."""
    temporary = path + ".new"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(text)
    os.replace(temporary, path)


def _check_reachable(directory: str) -> None:
    """Raise NetError unless dnsmasq, once it runs as :data:`USER`, can reach its files (every directory above
    them searchable by others): it reads them again on every SIGHUP."""
    path = os.path.realpath(directory)
    while True:
        if not os.stat(path).st_mode & 0o001:
            raise NetError(f"[networks] run_dir: dnsmasq runs as {USER} and cannot reach {directory}: {path} is not "
                           "searchable by others (choose a run_dir whose parents are, e.g. /run/workspace-pilot/net)")
        if path == "/":
            return
        path = os.path.dirname(path)


class DhcpServer:
    """The dnsmasq of network ``name`` on bridge ``bridge`` (address ``gateway`` of ``subnet``), files in
    ``directory``; ``mtu`` is told to the VMs (the overlay's, smaller than the underlay's)."""

    def __init__(self, name: str, directory: str, *, bridge: str, subnet: str, gateway: str, domain: str,
                 mtu: int | None = None):
        self.name = name
        self.directory = directory
        self.bridge = bridge
        self.network = ipaddress.IPv4Network(subnet)
        self.gateway = gateway
        self.domain = domain
        self.mtu = mtu

    @property
    def conf(self) -> str:
        """Its configuration file (what its command line names)."""
        return os.path.join(self.directory, "dnsmasq.conf")

    @property
    def pid_file(self) -> str:
        return os.path.join(self.directory, "dnsmasq.pid")

    def _config(self) -> str:
        d = self.directory
        lines = [
            f"# workspace-pilot: DHCP and DNS of lease network {self.name} on this node",
            f"interface={self.bridge}", "bind-interfaces", "except-interface=lo",
            "no-resolv", "no-hosts", "no-poll", "domain-needed", "bogus-priv",
            f"domain={self.domain}", f"local=/{self.domain}/", "expand-hosts",
            f"addn-hosts={d}/names",
            f"dhcp-range={self.network.network_address},static,{self.network.netmask},{LEASE_TIME}",
            f"dhcp-hostsfile={d}/hosts", "dhcp-authoritative",
            "dhcp-option=option:router",  # none: the lease network leads nowhere else
            f"dhcp-option=option:dns-server,{self.gateway}",
            f"dhcp-option=option:domain-search,{self.domain}",
            f"dhcp-leasefile={d}/leases", f"pid-file={self.pid_file}", f"log-facility={d}/dnsmasq.log",
            "log-dhcp", f"user={USER}", f"group={GROUP}",
        ]
        if self.mtu is not None:
            lines.append(f"dhcp-option=option:mtu,{self.mtu}")
        return "\n".join(lines) + "\n"

    def write_hosts(self, vms: list[tuple[str, str, str]], lease_names: list[tuple[str, str]]) -> None:
        """This node's VMs (MAC, address, name) for DHCP, and every VM of the lease (name, address) for DNS."""
        _write(os.path.join(self.directory, "hosts"), "".join(f"{mac},{ip},{name}\n" for mac, ip, name in vms))
        _write(os.path.join(self.directory, "names"),
               "".join(f"{ip} {name}\n" for name, ip in lease_names))

    def start(self, vms, lease_names) -> int:
        """Write its files and start it; its pid. Raises NetError with what dnsmasq said (it exits at once when its
        configuration cannot work, e.g. the bridge has no address)."""
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        _check_reachable(self.directory)
        _write(self.conf, self._config())
        self.write_hosts(vms, lease_names)
        # dnsmasq forks and its first process returns once the server is up, or with why it is not.
        try:
            result = subprocess.run([DNSMASQ, f"--conf-file={self.conf}"], capture_output=True, text=True,
                                    timeout=10, env={"PATH": "/usr/sbin:/usr/bin", "LC_ALL": "C"})
        except FileNotFoundError:
            raise NetError(f"{DNSMASQ} is not installed (the node needs dnsmasq-base)") from None
        except subprocess.TimeoutExpired:
            raise NetError(f"dnsmasq of network {self.name} did not start in 10 s") from None
        if result.returncode != 0:
            said = " ".join((result.stderr or result.stdout).split())[:300]
            raise NetError(f"dnsmasq of network {self.name} did not start: {said or f'exit {result.returncode}'}")
        pid = running_pid(self.directory)
        if pid is None:
            raise NetError(f"dnsmasq of network {self.name} started but left no pid file")
        return pid

    def reload(self, vms, lease_names) -> None:
        """Rewrite its files and have it read them again. Raises NetError if it no longer runs."""
        self.write_hosts(vms, lease_names)
        pid = running_pid(self.directory)
        if pid is None:
            raise NetError(f"dnsmasq of network {self.name} no longer runs")
        os.kill(pid, signal.SIGHUP)


def running_pid(directory: str) -> int | None:
    """The pid of the dnsmasq whose files are in ``directory``, if it runs (its command line names its own
    configuration file there); None else."""
    try:
        with open(os.path.join(directory, "dnsmasq.pid"), encoding="ascii") as handle:
            pid = int(handle.read().strip() or 0)
    except (OSError, ValueError):
        return None
    if pid <= 1:
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except OSError:
        return None
    wanted = f"--conf-file={os.path.join(directory, 'dnsmasq.conf')}".encode()
    return pid if wanted in argv else None


def stop(directory: str) -> bool:
    """Stop the dnsmasq whose files are in ``directory`` (SIGTERM, SIGKILL after a while); whether one ran."""
    pid = running_pid(directory)
    if pid is None:
        return False
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        # Checked again now that the pidfd holds the process: a pid reused in between is never signalled.
        if running_pid(directory) != pid:
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        # The pidfd becomes readable when the process ends: no polling.
        if not select.select([pidfd], [], [], STOP_TIMEOUT_S)[0]:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            select.select([pidfd], [], [], STOP_TIMEOUT_S)
    except ProcessLookupError:
        pass
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise NetError(f"cannot stop dnsmasq {pid}: {exc.strerror}") from None
    finally:
        os.close(pidfd)
    return True


def remove_files(root: str, name: str) -> None:
    """Remove network ``name``'s directory under ``root`` (after its dnsmasq stopped)."""
    import shutil

    shutil.rmtree(names.run_dir(root, name), ignore_errors=True)
