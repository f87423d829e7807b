"""``workspace-lease demo --vm``: what a newcomer runs to see a VM, on this machine's real parts.

The demo leases this machine (the local provider), the site approves the
cloud image (``scripts/build-cloud-image.sh``) through its signed-list
catalogue, the pilot boots a VM of it on a lease network in this machine's
own network namespace, and the demo logs in with ssh. The test then logs in
with the command the demo printed, as a person would, and ends the demo
with a signal: the VM, its network and the hugepages must be gone.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys

import pytest

from tests.support.pilots import read_until
from tests.support.pool import pool_pages

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLOUD_DIR = os.path.join(TOP, ".cache", "cloud-image")


def demo(tmp_path, *args: str) -> list[str]:
    """The demo's command line, its work directory and journal under the test's own directory."""
    return [sys.executable, "-m", "service_adapter", "demo", *args, "--workdir", str(tmp_path / "demo"),
            "--journal-dir", str(tmp_path / "journal")]


def test_the_vm_demo_boots_the_cloud_image_and_a_person_logs_in_with_the_command_it_prints(
        guest_reachable, hugepages, libvirt_qemu):
    tmp_path = guest_reachable  # the lease network's DHCP server (as nobody) finds its files below it
    if not os.path.isfile(os.path.join(CLOUD_DIR, "SHA256SUMS")):
        pytest.skip(f"no cloud image in {CLOUD_DIR}: run scripts/bootstrap.sh --cloud-image")
    process = subprocess.Popen(demo(tmp_path, "--vm", "--vm-image", CLOUD_DIR, "--grace", "10"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        # A hang detector: the guest boots under software emulation in about a minute.
        marker = "log in yourself while the lease holds: "
        shown = read_until(process, marker, timeout=600)
        if "\n" not in shown.split(marker, 1)[1]:
            shown += read_until(process, "\n", timeout=5)
        command = shown.split(marker, 1)[1].splitlines()[0]
        person = subprocess.run(shlex.split(command) + ["-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                                                        "hostname; sudo -n true && echo sudo works"],
                                capture_output=True, text=True, timeout=60)
        assert pool_pages() == hugepages + 288  # the lease's 576 MB of 2 MiB pages, the VM's memory in them
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:  # the test failed early: the demo still gives the node back
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    text = shown + rest.decode()
    assert "Traceback" not in text
    assert person.returncode == 0, person.stderr
    assert person.stdout.splitlines() == ["demo-vm", "sudo works"]  # the owner's key, the image's user
    guest = text.split("the guest says:\n", 1)[1].splitlines()
    said = [line.split("]   ", 1)[1] for line in guest[:5]]
    assert said[0] == "demo-vm"  # cloud-init set the host name from the seed
    assert said[1].startswith("Debian GNU/Linux 12 (bookworm), kernel ") and said[1].endswith("-cloud-amd64")
    assert said[2].startswith("user-data ran at ")  # the user-data's runcmd
    assert said[3] == "eth0 10.213.0.2/24"  # network-config: the address the service allocated
    assert said[4] == "status: done"  # every cloud-init module succeeded
    assert process.returncode == 128 + signal.SIGTERM, text
    assert "interrupted (SIGTERM): releasing the lease" in text and "the node is as it was" in text
    assert "FAILED" not in text
    assert pool_pages() == hugepages
    assert not list((tmp_path / "journal").glob("*.json"))  # the pilot's entry is closed
    domains = subprocess.run(["virsh", "-c", libvirt_qemu.uri, "list", "--all", "--name"], capture_output=True,
                             text=True, timeout=30).stdout.split()
    assert not [name for name in domains if name.endswith("-demo-vm")]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=30).stdout
    assert "wpb-" not in links and "wpx-" not in links and "wpt-" not in links
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=30).stdout
    assert "wpilot_" not in tables
    assert not os.path.exists(tmp_path / "demo" / "image-cache")  # the demo's copies of the image are dropped


def test_without_the_cloud_image_the_demo_says_how_to_build_it_and_runs_the_memory_only_lease(tmp_path, hugepages):
    empty = tmp_path / "no-image"
    empty.mkdir()
    result = subprocess.run(demo(tmp_path, "--vm", "--vm-image", str(empty), "--memory", "8", "--duration", "2",
                                 "--grace", "5"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    first = result.stdout.splitlines()[0]
    assert f"no cloud image in {empty} (disk.qcow2, vmlinuz, initrd.img missing)" in first
    assert "build it with scripts/build-cloud-image.sh" in first and first.endswith("running the memory-only lease instead")
    assert result.stdout.count(": reserved [seq 1]") == 2  # the memory-only default: two nodes
    assert "back where they started" in result.stdout
    assert pool_pages() == hugepages


def test_a_vm_demo_of_two_nodes_is_refused_with_one_line_and_nothing_leased(tmp_path, hugepages):
    if not os.path.isfile(os.path.join(CLOUD_DIR, "SHA256SUMS")):
        pytest.skip(f"no cloud image in {CLOUD_DIR}: run scripts/bootstrap.sh --cloud-image")
    result = subprocess.run(demo(tmp_path, "--vm", "--vm-image", CLOUD_DIR, "--nodes", "2"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "workspace-lease: --vm leases one node: this machine (a second pilot here would build the same network)"]
    assert result.stdout == ""
    assert not (tmp_path / "demo").exists()
