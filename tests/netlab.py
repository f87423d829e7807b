"""Nodes as network namespaces, for the lease network tests: an underlay of their own, a hypervisor daemon each.

``NetLab`` makes a hub namespace (a bridge, 192.0.2.0/24, the service's
side at .254), one namespace per node (.1, .2, ...) and the owner's side
(.100), each joined to the hub by a veth; ``close()`` kills what still
runs in them (by pid) and deletes them. Nothing of it is in the machine's
own network namespace: the lease networks' VXLAN, DHCP and forwards stay
inside.

``NodeLibvirtd`` runs virtlogd and libvirtd in a node's namespace, as a
real node runs its own: in a private mount namespace whose /run/libvirt,
/var/lib/libvirt and /var/cache/libvirt are the node's own directories,
its socket in a directory the tests reach (the URI's ``?socket=``).

``in_netns(name)`` runs the calling thread in a namespace for a while:
threads started meanwhile (a receiver's, a manager's) stay there.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time

_LIBC = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
HUB_ADDRESS = "192.0.2.254"
OWNER_ADDRESS = "192.0.2.100"


def sh(*argv: str, ns: str | None = None, check: bool = True, timeout: float = 30, **kwargs):
    """Run ``argv`` (in namespace ``ns``); AssertionError with its stderr unless it succeeds (``check``)."""
    full = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    result = subprocess.run(full, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(full)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


@contextlib.contextmanager
def in_netns(name: str):
    """Run the calling thread in network namespace ``name`` until the block ends."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _LIBC.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
        try:
            yield
        finally:
            if _LIBC.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)


def kill_all_in(ns: str) -> None:
    """SIGKILL every process in namespace ``ns`` (by the pids ``ip netns pids`` lists)."""
    for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


class NetLab:
    """The hub, ``nodes`` (name -> address) and the owner's side, all namespaces named ``<prefix>-<name>``."""

    def __init__(self, prefix: str, nodes: dict[str, str]):
        self.prefix = prefix
        self.nodes = dict(nodes)
        self.hub = f"{prefix}-lan"
        self.owner = f"{prefix}-owner"
        self.spaces: list[str] = []

    def ns(self, node: str) -> str:
        """A node's namespace."""
        return f"{self.prefix}-{node}"

    def open(self) -> "NetLab":
        sh("ip", "netns", "add", self.hub)
        self.spaces.append(self.hub)
        sh("ip", "-n", self.hub, "link", "set", "lo", "up")
        sh("ip", "-n", self.hub, "link", "add", "hub", "type", "bridge")
        sh("ip", "-n", self.hub, "addr", "add", f"{HUB_ADDRESS}/24", "dev", "hub")
        sh("ip", "-n", self.hub, "link", "set", "hub", "up")
        members = [(self.ns(node), address) for node, address in self.nodes.items()] + [(self.owner, OWNER_ADDRESS)]
        for index, (ns, address) in enumerate(members):
            sh("ip", "netns", "add", ns)
            self.spaces.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "link", "add", f"u{index}", "netns", self.hub, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", self.hub, "link", "set", f"u{index}", "master", "hub", "up")
            sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        return self

    def close(self) -> None:
        for ns in reversed(self.spaces):
            kill_all_in(ns)
            sh("ip", "netns", "del", ns, check=False)
        self.spaces.clear()

    def leftovers(self, node: str, *, ignore_pids=(), run_root: str | None = None) -> list[str]:
        """What of the pilot's networks is still on ``node``: devices, nft tables, processes (other than
        ``ignore_pids``), files under ``run_root``."""
        ns = self.ns(node)
        found = []
        for line in sh("ip", "-o", "link", ns=ns).stdout.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            if name.startswith(("wpb-", "wpx-", "wpt-")):
                found.append(name)
        found += [line for line in sh("nft", "list", "tables", ns=ns).stdout.splitlines() if "wpilot_" in line]
        pids = {int(p) for p in sh("ip", "netns", "pids", ns).stdout.split()} - set(ignore_pids)
        for pid in sorted(pids):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    argv = handle.read().split(b"\0")
                found.append(f"process {pid}: {' '.join(arg.decode() for arg in argv if arg)}")
            except OSError:
                pass
        if run_root is not None and os.path.isdir(run_root):
            found += [f"file {name}" for name in os.listdir(run_root)]
        return found


class NodeLibvirtd:
    """virtlogd and libvirtd in namespace ``ns``, with their own state under ``workdir``; ``uri`` reaches them."""

    def __init__(self, ns: str, workdir: str):
        self.ns = ns
        self.workdir = workdir
        for name in ("run", "lib", "cache", "sock"):
            os.makedirs(os.path.join(workdir, name), exist_ok=True)
        self.uri = f"qemu:///system?socket={workdir}/sock/libvirt-sock"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "NodeLibvirtd":
        w = self.workdir
        with open(os.path.join(w, "libvirtd.conf"), "w", encoding="utf-8") as handle:
            handle.write(f'unix_sock_dir = "{w}/sock"\nunix_sock_rw_perms = "0700"\nauth_unix_rw = "none"\n'
                         f'auth_unix_ro = "none"\nlog_outputs = "3:file:{w}/libvirtd.log"\n')
        script = (f"mount --bind {w}/run /run/libvirt && mount --bind {w}/lib /var/lib/libvirt && "
                  f"mount --bind {w}/cache /var/cache/libvirt && virtlogd -d -p {w}/virtlogd.pid && "
                  f"exec libvirtd --config {w}/libvirtd.conf --pid-file {w}/libvirtd.pid")
        with open(os.path.join(w, "daemons.out"), "ab") as out:
            self.process = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.ns}", "unshare", "--mount",
                                             "--propagation", "private", "sh", "-c", script], stdout=out, stderr=out)
        deadline = time.monotonic() + timeout
        delay = 0.05
        while sh("virsh", "-c", self.uri, "version", check=False).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"libvirtd in {self.ns} did not answer: {self._tail()}")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        return self

    def _tail(self) -> str:
        try:
            with open(os.path.join(self.workdir, "libvirtd.log"), encoding="utf-8", errors="replace") as handle:
                return handle.read()[-2000:]
        except OSError as exc:
            return str(exc)

    def pids(self) -> list[int]:
        """The daemons' pids (what a leftover check ignores)."""
        found = []
        for name in ("libvirtd.pid", "virtlogd.pid"):
            try:
                with open(os.path.join(self.workdir, name), encoding="ascii") as handle:
                    found.append(int(handle.read().strip()))
            except (OSError, ValueError):
                pass
        return found

    def stop(self) -> None:
        """Destroy what runs there, stop libvirtd and virtlogd by their pids."""
        sh("sh", "-c", f"for d in $(virsh -c '{self.uri}' list --name); do virsh -c '{self.uri}' destroy $d; done",
           check=False)
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self.process is not None:
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
