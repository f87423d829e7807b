"""``workspace-lease demo --vm``: the demo's lease boots a VM of a real cloud image, and the person logs in.

The path is a site's: an endorser key signs a list of the image's files
(disk, kernel, initrd; ``scripts/build-cloud-image.sh`` builds them), the
site trusts the key, subscribes to the list and approves the images (fetched
from ``file://`` URLs into its image store); the pilot fetches them from the
service into its cache, builds the lease's network on this machine (a bridge,
a DHCP server, a port forward to the VM's SSH) and boots the VM through
libvirt. cloud-init in the guest reads the seed the pilot wrote (host name,
the owner's key, user-data, network-config). The demo logs in with ``ssh``
as the owner would, shows what the guest says, prints the command for the
person to log in too, and at the lease's end checks that the VM and its
network are gone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from service_adapter.cloudimage import IMAGE_FILES, USER, cloud_vm_spec, endorse_cloud_image
from service_adapter.localvirt import (
    INSTALL_HINT, LocalLibvirtd, missing_commands, system_command, system_env, wait_for_line,
)

VM_NAME = "demo-vm"
MIN_VM_MB = 256
BOOT_TIMEOUT_S = 600  # a guest under software emulation on a busy machine
USER_DATA = """#cloud-config
runcmd:
  - [sh, -c, 'echo "user-data ran at $(date -u +%H:%M:%S) UTC" > /run/demo-user-data']
"""
#: What the demo asks the guest once logged in.
GUEST_COMMAND = ("hostname; . /etc/os-release; echo \"$PRETTY_NAME, kernel $(uname -r)\"; cat /run/demo-user-data; "
                 "ip -4 -o addr show dev eth0 | awk '{print \"eth0 \" $4}'; cloud-init status")


def vm_unavailable(image_dir: str) -> str | None:
    """Why no VM can be booted here, with what to install or build; None when everything is in place."""
    missing = missing_commands() + [name for name in ("ssh", "ssh-keygen") if shutil.which(name) is None]
    if missing:
        return f"no hypervisor here (missing {', '.join(missing)}): install it with {INSTALL_HINT}, openssh-client"
    absent = [name for _, name in IMAGE_FILES if not os.path.isfile(os.path.join(image_dir, name))]
    if absent:
        return (f"no cloud image in {image_dir} ({', '.join(absent)} missing): build it with "
                "scripts/build-cloud-image.sh (./scripts/bootstrap.sh --cloud-image)")
    return None


def lease_network_address() -> str | None:
    """This machine's IPv4 address for the lease network and the SSH forward (its way out); None without one."""
    from workspace_common.route import address_towards
    from workspace_common.protocol.wire import ProtocolError, check_node_address

    try:  # a documentation address (RFC 5737): only the route is looked up, nothing is sent
        return check_node_address("address", address_towards("http://198.51.100.1:80"))
    except ProtocolError:
        return None


class VmDemo:
    """The VM half of the demo, under ``workdir``: the hypervisor, the image's endorsement, the boot and the login."""

    def __init__(self, workdir: str, image_dir: str, say):
        self.workdir, self.image_dir, self.say = workdir, os.path.abspath(image_dir), say
        self.address = lease_network_address()
        self.hypervisor = LocalLibvirtd(os.path.join(workdir, "libvirtd"))
        self.key = os.path.join(workdir, "owner_key")
        self.consoles = os.path.join(workdir, "consoles")
        self.login: dict | None = None
        self.net: tuple[str, str] | None = None  # the VM's lease network's name and its address, once running

    # -- before the site ---------------------------------------------------------------------------

    def start_hypervisor(self) -> None:
        """Use the running libvirtd or start one (HypervisorError when it cannot run)."""
        self.hypervisor.start()
        self.say(f"libvirtd: {'started for the demo' if self.hypervisor.owned else 'the one already running'} "
                 f"({self.hypervisor.uri}, QEMU)")

    def network_plan(self):
        """Private lease networks when this machine has an address for them, else none (the VM has no network)."""
        from service_adapter.networks import NetworkPlan

        return NetworkPlan(mode="private" if self.address else "none")

    def pilot_sections(self) -> dict[str, dict[str, object]]:
        """What the demo's pilot needs beyond the memory demo's configuration."""
        # dnsmasq runs as nobody and must find its files below the work directory.
        os.makedirs(self.workdir, exist_ok=True)
        os.chmod(self.workdir, 0o711)
        sections: dict[str, dict[str, object]] = {
            "libvirt": {"uri": self.hypervisor.uri},
            "vms": {"console_dir": self.consoles},
            "images": {"cache_dir": os.path.join(self.workdir, "image-cache")},
        }
        if self.address:
            sections["networks"] = {"address": self.address, "run_dir": os.path.join(self.workdir, "net")}
        return sections

    # -- the site's part ---------------------------------------------------------------------------

    def endorse(self, site) -> None:
        """The site's path for the image: an endorser's signed list, trusted, subscribed, approved."""
        kid = endorse_cloud_image(site.catalog, self.image_dir, os.path.join(self.workdir, "endorser"), "demo")
        self.say(f"image list signed by key {kid}, subscribed; {', '.join(i for i, _ in IMAGE_FILES)} approved "
                 f"(fetched from {self.image_dir} into the site's image store)")

    # -- the VM --------------------------------------------------------------------------------------

    def boot(self, site, lease, host: str, memory_mb: int, tick=lambda: None) -> bool:
        """Start the VM on ``host``, wait for cloud-init, log in; True when the guest answered as the owner.

        ``tick`` is called about once a second while it waits (the demo tells the lease's news meanwhile).
        """
        from service_adapter.lease import vm_json
        from service_adapter.vms import VmRequestError, parse_vm_request

        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "demo-owner", "-f", self.key],
                       check=True, capture_output=True, timeout=30)
        with open(self.key + ".pub", encoding="utf-8") as handle:
            public = handle.read().strip()
        spec = cloud_vm_spec(VM_NAME, host, memory_mb, public, USER_DATA)
        try:
            site.vms.start(lease.id, [parse_vm_request(spec)])
        except VmRequestError as exc:
            self.say(f"FAILED: the VM was refused: {exc}")
            return False
        self.say(f"VM {VM_NAME} ({memory_mb} MB) starting on {host}: the pilot fetches the image from the service, "
                 "builds the lease network and boots it")
        vm = None
        for _ in range(BOOT_TIMEOUT_S):
            vm = site.vms.wait(lease.id, VM_NAME, {"running", "failed", "stopped", "lost"}, 1.0)
            tick()
            if vm is not None:
                break
        if vm is None or vm.state != "running":
            self.say(f"FAILED: VM {VM_NAME} is {vm.state if vm else 'not running'}"
                     + (f": {vm.reason}" if vm and vm.reason else ""))
            return False
        shown = vm_json(vm)
        self.login = shown["login"]
        nic = shown["spec"].get("nic")
        if nic and shown["ip"]:
            self.net = (nic["net"]["name"], shown["ip"])
        self.say(f"VM running: address {shown['ip'] or '(none)'}, mac {shown['mac'] or '-'}; the guest boots "
                 "(QEMU software emulation here: about a minute)")
        console = os.path.join(self.consoles, f"{VM_NAME}.log")
        if not _console_says(console, " finished at ", tick):
            self.say(f"FAILED: cloud-init did not finish within {BOOT_TIMEOUT_S} s; the guest's console: {console}")
            return False
        self.say(f"cloud-init finished in the guest (console log {console})")
        if self.login is None:
            self.say("the VM has no network here (no IPv4 address for a lease network on this machine): "
                     "its console shows it running")
            return True
        said = self._ssh(GUEST_COMMAND)
        if said.returncode == 255:  # ssh's own failure: no login
            self.say(f"FAILED: ssh to the guest: {said.stderr.strip() or 'exit 255'}")
            return False
        self.say(f"logged in as {USER} with ssh through the node's forward {self.login['host']}:{self.login['port']}; "
                 "the guest says:")
        for line in said.stdout.splitlines():
            self.say(f"  {line}")
        if said.returncode != 0:  # the last is cloud-init status: 1 when a module failed
            self.say(f"FAILED: the guest's commands ended with exit {said.returncode} {said.stderr.strip()}")
            return False
        return True

    def ssh_command(self) -> str:
        """The command a person types to log in to the VM."""
        return (f"ssh -i {self.key} -p {self.login['port']} -o StrictHostKeyChecking=no "
                f"-o UserKnownHostsFile=/dev/null {USER}@{self.login['host']}")

    def _ssh(self, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ssh", "-i", self.key, "-p", str(self.login["port"]), "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=20",
             "-o", "LogLevel=ERROR", f"{USER}@{self.login['host']}", command],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

    # -- after the lease ---------------------------------------------------------------------------

    def leftovers(self, slot: str) -> list[str]:
        """The demo VM's domain and its lease network's devices still on this machine (empty: all gone)."""
        from workspace_common import nodenames as names

        domain = names.slot_domain_prefix(slot) + VM_NAME
        listed = subprocess.run([system_command("virsh"), "-c", self.hypervisor.uri, "list", "--all", "--name"],
                                capture_output=True, text=True, timeout=30, env=system_env())
        found = [f"domain {domain}"] if domain in listed.stdout.split() else []
        if self.net is not None:
            net, ip = self.net
            devices = [names.bridge_name(net), names.vxlan_name(net), names.tap_name(ip)]
            links = subprocess.run([system_command("ip"), "-j", "link", "show"], capture_output=True, text=True,
                                   timeout=30, env=system_env())
            found += [f"link {link['ifname']}" for link in json.loads(links.stdout or "[]")
                      if link["ifname"] in devices]
        return found

    def close(self) -> None:
        """Stop the libvirtd the demo started; drop the image copies (the site's store and the node's cache)."""
        self.hypervisor.stop()
        for name in ("image-store", "image-cache"):
            shutil.rmtree(os.path.join(self.workdir, name), ignore_errors=True)


def _console_says(console: str, text: str, tick) -> bool:
    """Wait up to BOOT_TIMEOUT_S for ``text`` in the console log, calling ``tick`` each second meanwhile."""
    for _ in range(BOOT_TIMEOUT_S):
        if wait_for_line(console, text, 1.0):
            return True
        tick()
    return False
