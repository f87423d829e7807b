"""A real cloud image end to end: from a lease request to an SSH session in a cluster that configured itself.

The image is Debian 12 with cloud-init and openssh-server, built from Debian's packages by
``scripts/build-cloud-image.sh`` (``scripts/bootstrap.sh --cloud-image``, which the test command runs).
An endorser signs a list of its disk, kernel and initrd; the site trusts the key, subscribes and approves
through the same catalogue a site uses (the files fetched from a local HTTP server). Two nodes
(``tests.support.netlab``: namespaces with their own libvirtd, the real service, real pilots on a private lease
network) each boot one VM of it; the pilots fetch the images from the service into their caches.
cloud-init reads the seed the pilot wrote: host name, the owner's key, the user-data, the network from
network-config. The owner, outside both nodes, logs in with ssh through what ``vm list`` prints.
One lease is shared by the tests (a boot under emulation takes about a minute).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from workspace_common.protocol import parse_time
from service_adapter.cloudimage import cloud_vm_spec, endorse_cloud_image
from service_adapter.lease import vm_json
from service_adapter.vms import parse_vm_request
from tests.support.imagesource import ImageServer
from tests.support.libvirt_daemon import missing_commands, wait_for_line
from tests.support.netlab import LeaseLab, sh

pytestmark = [pytest.mark.hypervisor,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, libvirtd, nftables)")]

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLOUD_DIR = os.path.join(TOP, ".cache", "cloud-image")
PREFIX = f"wpc{os.getpid() % 100000}"
NODES = {"node1": "192.0.2.1", "node2": "192.0.2.2"}
VM_MB = 512
#: What the user-data does: a mark the owner finds after logging in. (The lease channel is the guest agent's, which
#: the seed's vendor-data starts: it keeps the pilot's before-end warning in /run/workspace-pilot/lease-channel.)
USER_DATA = """#cloud-config
runcmd:
  - [sh, -c, 'echo "user-data ran on $(hostname)" > /run/user-data-effect']
"""
#: The pilots warn the VMs this long before the lease's end: while the guests still boot, so the line waits in the
#: port until the guest agent opens it.
WARN_BEFORE_S = 560
DURATION_S = 600


@pytest.fixture(scope="module")
def cloud(libvirt_qemu):
    # libvirt_qemu: each node's libvirtd reads this machine's qemu.conf, whose hugetlbfs mount (/dev/hugepages)
    # the session's libvirtd makes; without it their QEMU driver does not load.
    if missing_commands():
        pytest.skip(f"libvirt/QEMU not installed ({', '.join(missing_commands())}): run scripts/bootstrap.sh --vm")
    if not os.path.isfile(os.path.join(CLOUD_DIR, "SHA256SUMS")):
        pytest.skip(f"no cloud image in {CLOUD_DIR}: run scripts/bootstrap.sh --cloud-image")
    lab = LeaseLab(PREFIX, NODES, images=True, warn_before_s=WARN_BEFORE_S)
    try:
        lab.open()
        key = os.path.join(lab.workdir, "owner_key")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True, timeout=30)
        # The site's path: an endorser's signed list, the site's trust, subscription and approvals (over HTTP).
        server = ImageServer(CLOUD_DIR)
        try:
            endorse_cloud_image(lab.site.catalog, CLOUD_DIR, os.path.join(lab.workdir, "endorser"), "operator",
                                url_for=lambda name: f"{server.url}/{name}")
        finally:
            server.close()
        lease = lab.lease(2, memory_mb=VM_MB + 64, duration_s=DURATION_S)
        with open(key + ".pub", encoding="utf-8") as handle:
            public = handle.read().strip()
        lab.site.vms.start(lease.id, [parse_vm_request(cloud_vm_spec(name, host, VM_MB, public, USER_DATA))
                                      for name, host in (("web", "node1"), ("db", "node2"))])
        vms = {}
        for name in ("web", "db"):
            vm = lab.site.vms.wait(lease.id, name, {"running", "failed"}, 300)
            assert vm is not None and vm.state == "running", lab.site.vms.get(lease.id, name)
            vms[name] = vm_json(vm)
        for name, host in (("web", "node1"), ("db", "node2")):
            console = lab.console(host, name)
            assert wait_for_line(console, "Cloud-init v. ", 300) and wait_for_line(console, " finished at ", 300), \
                open(console, errors="replace").read()[-3000:]
        yield lab, lease, vms, key
        lab.site.leases.release(lease.id)
        lab.site.leases.wait(lease.id, {"released", "expired", "failed"}, 90)
    finally:
        lab.close()


def ssh(lab: LeaseLab, vm: dict, key: str, command: str) -> subprocess.CompletedProcess:
    """``ssh`` as the image's user from the owner's side, to what ``vm list`` told the owner."""
    login = vm["login"]
    return sh("ssh", "-i", key, "-p", str(login["port"]), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
              "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=20", "-o", "LogLevel=ERROR",
              f"debian@{login['host']}", command, ns=lab.net.owner, check=False, timeout=60)


def test_the_owner_logs_in_with_ssh_and_finds_the_host_name_the_user_datas_effect_and_cloud_init_done(cloud):
    lab, _, vms, key = cloud
    for name in ("web", "db"):
        said = ssh(lab, vms[name], key, "hostname; cat /run/user-data-effect; cloud-init status")
        assert said.returncode == 0, said.stdout + said.stderr
        assert said.stdout.splitlines() == [name, f"user-data ran on {name}", "status: done"]  # no module failed


def test_the_network_comes_from_the_seed_and_the_other_vm_is_reached_by_name(cloud):
    lab, _, vms, key = cloud
    said = ssh(lab, vms["web"], key, "ip -4 -o addr show dev eth0; getent hosts db; ping -c 1 -W 3 db >/dev/null"
                                     " && echo reached db")
    assert said.returncode == 0, said.stderr
    assert f"inet {vms['web']['ip']}/24" in said.stdout  # the address the service allocated, from network-config
    assert f"{vms['db']['ip']}" in said.stdout.splitlines()[1]
    assert said.stdout.splitlines()[-1] == "reached db"



def test_the_pilots_before_end_warning_reaches_a_process_in_the_guest(cloud):
    lab, lease, vms, key = cloud
    said = ssh(lab, vms["db"], key, "cat /run/workspace-pilot/lease-channel")
    assert said.returncode == 0, said.stderr
    ends = lab.site.leases.get(lease.id).row.expires_at
    (line,) = said.stdout.splitlines()  # written once, while the guest booted; read when its reader opened the port
    word, at, _, why = line.split()
    assert (word, why) == ("ending", "deadline")
    assert abs(parse_time(at).timestamp() - ends) < 5  # the pilot's own deadline, the lease's end


def test_the_guest_agent_runs_and_a_login_finds_the_machine_job_features_with_the_pilots_deadline(cloud):
    lab, lease, vms, key = cloud
    said = ssh(lab, vms["web"], key, "systemctl is-active workspace-pilot-agent; echo $MACHINEFEATURES $JOBFEATURES;"
                                     " cat $MACHINEFEATURES/shutdowntime $MACHINEFEATURES/total_cpu"
                                     " $JOBFEATURES/mem_limit_bytes $JOBFEATURES/wall_limit_secs")
    assert said.returncode == 0, said.stderr
    active, variables, shutdown, cpus, memory, wall = said.stdout.splitlines()
    assert active == "active"  # installed and started by the seed's vendor-data (a cloud-init boothook)
    assert variables == "/run/machinefeatures /run/jobfeatures"  # set for a login (PAM's /etc/environment)
    (pilot,) = [p for p in lab.site.leases.get(lease.id).pilots if p.host == vms["web"]["host"]]
    assert int(shutdown) == int(parse_time(pilot.expires_at).timestamp())  # the pilot's own deadline
    assert (int(cpus), int(memory)) == (1, VM_MB * 2**20)
    assert 0 < int(wall) <= DURATION_S
