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

``LeaseLab`` puts it together for leases: the service in the hub, each
node's pilot started in its network namespace and its libvirtd's mount
namespace (``nsenter``: ``ip netns exec`` would mount a /sys without the
cgroups) with the node's own config.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

from service_adapter.lease import vm_json
from service_adapter.local_site import LocalSite, write_pilot_config
from service_adapter.localvirt import reaper_argv
from service_adapter.networks import NetworkPlan
from service_adapter.providers.local import LocalProvider
from service_adapter.vms import parse_vm_request
from tests.support.libvirt_daemon import GUEST_DIR, wait_for_line

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
            # Under tini, as the embedded site's libvirtd (service_adapter/localvirt.py: this container's PID 1 reaps
            # QEMU's orphans late, and libvirtd waits for them: 7.9 -> 1.3 s a start).
            self.process = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.ns}", *reaper_argv(), "unshare",
                                             "--mount", "--propagation", "private", "sh", "-c", script],
                                            stdout=out, stderr=out)
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

    def mount_namespace(self) -> str:
        """The mount namespace libvirtd runs in (its /proc entry), for what must see its sockets and files."""
        with open(os.path.join(self.workdir, "libvirtd.pid"), encoding="ascii") as handle:
            return f"/proc/{int(handle.read().strip())}/ns/mnt"

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


# -- leases on the lab's nodes: the service in the hub, real pilots, libvirtd and QEMU on each node ----------

VM_MB = 96
LEASE_MB = 2 * (VM_MB + 64)
CGROUP_ROOT = "/sys/fs/cgroup/memory"
GUEST_ADDRESS = "workspace-pilot test guest address"
ADDRESS_LINE = re.compile(r"workspace-pilot test guest address (\S+) (\S+)")


def guest_spec(name: str, host: str | None = None) -> dict:
    """The test guest as a VM spec (direct kernel boot, its console to ``NAME.log``), pinned to ``host``."""
    from tests.support.libvirt_daemon import guest_files

    files = guest_files()
    spec = {"name": name, "memory_mb": VM_MB,
            "boot": {"kernel": {"path": "vmlinuz", "sha256": files.kernel_sha256},
                     "initrd": {"path": "initrd.img", "sha256": files.initrd_sha256},
                     "cmdline": "console=ttyS0 panic=-1 quiet"},
            "console_log": f"{name}.log"}
    return dict(spec, host=host) if host else spec


class NetnsProvider(LocalProvider):
    """The local provider, each pilot started in its node's namespace with its node's own config."""

    def __init__(self, output_dir: str, lab: NetLab):
        super().__init__(output_dir, fixed_hosts=tuple(lab.nodes))
        self.lab = lab
        self.configs: dict[str, str] = {}
        self.mounts: dict[str, str] = {}  # host -> its libvirtd's mount namespace

    def pilot_argv(self, job, host):
        argv = super().pilot_argv(job, host)
        if self.configs:
            argv[argv.index("--config") + 1] = self.configs[host]
        return self.on_node(host, argv)

    def on_node(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` as it runs on ``host``: in its network namespace and its libvirtd's mount namespace (where that
        daemon's /run/libvirt and /var/lib/libvirt are, the VMs' lease channel sockets among them). nsenter, not
        ip netns exec: that mounts a /sys of the namespace, without the cgroups under it."""
        return ["nsenter", f"--net=/run/netns/{self.lab.ns(host)}", f"--mount={self.mounts[host]}", *argv]


class LeaseLab:
    """Leases on ``nodes`` (name -> address): the lab's namespaces, a libvirtd and a host cgroup per node, and the
    service (a LocalSite with private lease networks) in the hub; every name starts with ``prefix``.

    ``open()`` makes it all, ``close()`` removes it all. ``lease(n)`` reserves
    a ready lease of ``n`` nodes, ``start_vm`` boots the test guest on one,
    ``login`` reaches it from the owner's side through what ``vm list``
    prints; ``leftovers`` and ``journal`` say what of a VM's network or a
    slot is still on a node.
    """

    def __init__(self, prefix: str, nodes: dict[str, str], *, network_mode: str = "private", images: bool = False,
                 warn_before_s: float = 0.0):
        self.network_mode = network_mode
        self.images = images  # the service has an image catalogue; each node an image cache
        self.warn_before_s = warn_before_s
        self.prefix, self.nodes = prefix, dict(nodes)
        self.workdir = tempfile.mkdtemp(prefix=f"{prefix}-")
        os.chmod(self.workdir, 0o755)  # the guests' user and dnsmasq's find their way down
        self.net = NetLab(prefix, nodes)
        self.daemons: dict[str, NodeLibvirtd] = {}
        self.cgroups: dict[str, str] = {}
        self.site: LocalSite | None = None

    def node_dir(self, host: str, *parts: str) -> str:
        return os.path.join(self.workdir, host, *parts)

    def open(self) -> "LeaseLab":
        self.net.open()
        for host in self.nodes:
            self.daemons[host] = NodeLibvirtd(self.net.ns(host), self.node_dir(host, "libvirt")).start()
            self.cgroups[host] = os.path.join(CGROUP_ROOT, f"{self.prefix}-{host}")
            os.makedirs(self.cgroups[host])
        provider = NetnsProvider(os.path.join(self.workdir, "site", "jobs"), self.net)
        plan = NetworkPlan(mode=self.network_mode, lease_range=ipaddress.IPv4Network("10.213.0.0/16"), lease_prefix=24)
        with in_netns(self.net.hub):  # the receiver's and the manager's threads live there
            self.site = LocalSite(os.path.join(self.workdir, "site"), listen_host=HUB_ADDRESS, provider=provider,
                                  network_plan=plan, grace_s=8, status_interval_s=0.3, images=self.images,
                                  warn_before_s=self.warn_before_s)
        for host in self.nodes:
            provider.configs[host] = self.write_config(host)
            provider.mounts[host] = self.daemons[host].mount_namespace()
        return self

    def write_config(self, host: str) -> str:
        path = self.node_dir(host, "pilot.conf")
        write_pilot_config(
            path, contact=self.site.contact, node_key_file=os.path.join(self.site.node_key_dir, "{host}.key"),
            log_dir=self.node_dir(host, "logs"), journal_dir=self.node_dir(host, "journal"),
            sections={
                "memory": {"backend": "cgroup", "cgroup": self.cgroups[host], "minmem": 64},
                "libvirt": {"uri": self.daemons[host].uri},
                "vms": {"image_dir": GUEST_DIR, "console_dir": self.node_dir(host, "consoles"), "poll_wait": 5,
                        "shutdown_timeout": 2},
                "networks": {"run_dir": self.node_dir(host, "net")},
                "images": {"cache_dir": self.node_dir(host, "image-cache")},
            })
        return path

    def close(self) -> None:
        try:
            if self.site is not None:
                self.site.close()
        finally:
            for daemon in self.daemons.values():
                daemon.stop()
            self.net.close()
            for cgroup in self.cgroups.values():
                os.rmdir(cgroup)
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- leases and VMs ---------------------------------------------------------------------------

    def lease(self, nodes: int, memory_mb: int = LEASE_MB, duration_s: float = 600):
        lease = self.site.leases.reserve(nodes=nodes, memory_mb=memory_mb, duration_s=duration_s)
        ready = self.site.leases.wait(lease.id, {"ready", "failed", "expired", "released"}, 60)
        assert ready is not None and ready.state == "ready", ready
        return lease

    def start_vm(self, lease, name: str, host: str) -> dict:
        """Start the test guest ``name`` on ``host``; once it printed its address: the VM as ``vm list`` shows it
        to the owner, with ``console`` (what the guest said its address and name were)."""
        self.site.vms.start(lease.id, [parse_vm_request(guest_spec(name, host))])
        vm = self.site.vms.wait(lease.id, name, {"running", "failed"}, 60)
        assert vm is not None and vm.state == "running", self.site.vms.get(lease.id, name)
        console = self.console(host, name)
        assert wait_for_line(console, GUEST_ADDRESS, 120), open(console).read()[-2000:]
        shown = vm_json(self.site.vms.get(lease.id, name), owner=True)
        shown["console"] = ADDRESS_LINE.search(open(console).read()).groups()
        return shown

    def console(self, host: str, name: str) -> str:
        """The console log of VM ``name`` on ``host``."""
        return self.node_dir(host, "consoles", f"{name}.log")

    def login(self, vm: dict, line: str) -> str:
        """From the owner's side, through what ``vm list`` told the owner: the guest's greeting and ``line``'s output."""
        host, port = vm["login"]["host"], vm["login"]["port"]
        return sh("busybox", "nc", "-w", "20", host, str(port), ns=self.net.owner, input=line + "\n",
                  timeout=40).stdout

    def leftovers(self, host: str, vm: dict) -> list[str]:
        """What of ``vm``'s lease network (and the VM itself) is still on ``host``: devices, tables, its DHCP
        server, files, the domain."""
        net = vm["spec"]["nic"]["net"]["name"]
        tag = f"{int(net[1:]):06x}"
        ours = (f"wpb-{tag}", f"wpx-{tag}", f"wpt-{int(ipaddress.IPv4Address(vm['ip'])):08x}", f"wpilot_{net}",
                os.path.join(self.node_dir(host, "net"), net))
        found = [item for item in self.net.leftovers(host, ignore_pids=self.daemons[host].pids(),
                                                     run_root=self.node_dir(host, "net"))
                 if any(mark in item for mark in ours) or item == f"file {net}"]
        domains = sh("virsh", "-c", self.daemons[host].uri, "list", "--name").stdout.split()
        found += [f"domain {d}" for d in domains if d.endswith(f"-{vm['name']}")]
        return found

    def journal(self, host: str, slot: str) -> list[str]:
        """The slot's entries in ``host``'s journal."""
        directory = self.node_dir(host, "journal")
        return [name for name in os.listdir(directory) if name.startswith(slot + ".")]
