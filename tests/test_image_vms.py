"""A real guest boots from images the pilot fetched into its node cache: list, approval, pull, boot, clean end.

The real 4-node Slurm, a real pilot under sudo, real libvirtd and QEMU
(TCG). The endorser publishes the test guest's kernel and initrd on a
signed list over a real HTTP server; the site trusts the key, subscribes
and approves; a VM names them by identifier. The pilot fetches both from
the service's image endpoint (digest-authenticated as its node), verifies
them into its cache, and boots the guest from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import subprocess

import pytest

from workspace_common.protocol import ImageFile
from service_adapter.vms import parse_vm_request
from tests.support.imagesource import Endorser, ImageServer, image_entry
from tests.support.libvirt_daemon import GUEST_DIR, GUEST_UP, guest_files, wait_for_line
from tests.support.slurm_cluster import TERMINAL, ServiceOnCluster, close_sites
from tests.support.realvms import LEASE_MB, VM_MB, assert_node_clean

pytest.importorskip("libvirt")


@pytest.fixture
def image_site(guest_reachable, slurm_cluster, libvirt_qemu):
    tmp_path = guest_reachable  # the guests' user searches its way to the journal's VM files and seeds
    sites = []
    server = ImageServer(GUEST_DIR)
    sections = {
        "libvirt": {"uri": libvirt_qemu.uri},
        "vms": {"image_dir": str(tmp_path / "no-local-images"), "console_dir": str(tmp_path / "consoles"),
                "poll_wait": 5, "shutdown_timeout": 2},
        "images": {"cache_dir": str(tmp_path / "image-cache")},
        "timing": {"walltime_margin": 20, "earlywaitratio": 0.3},
    }
    site = ServiceOnCluster(str(tmp_path), slurm_cluster, "slurm", pilot_sections=sections, grace_s=8)
    sites.append(site)
    endorser = Endorser(str(tmp_path / "endorser"), name="guest-builders")
    endorser.trust_in(os.path.join(site.workdir, "endorsers"))
    files = guest_files()
    entries = [image_entry("test-kernel", "1", files.kernel, f"{server.url}/vmlinuz"),
               image_entry("test-initrd", "1", files.initrd, f"{server.url}/initrd.img")]
    list_path = str(tmp_path / "guest.list")
    endorser.publish(list_path, entries)
    site.catalog.subscribe(list_path, "alice")
    for identifier in ("test-kernel", "test-initrd"):
        site.catalog.approve(identifier, "1", "alice")
    yield site, server
    close_sites(sites, slurm_cluster)
    server.close()


def listed_guest(name: str, **extra) -> dict:
    """The test guest's spec with its kernel and initrd named by the list, its console in <name>.log."""
    return {"name": name, "memory_mb": VM_MB,
            "boot": {"kernel": {"image": "test-kernel"}, "initrd": {"image": "test-initrd"},
                     "cmdline": "console=ttyS0 panic=-1 quiet"},
            "console_log": f"{name}.log", **extra}


def test_a_guest_boots_from_images_its_pilot_fetched_into_the_node_cache(image_site, libvirt_qemu, tmp_path,
                                                                          hugepages):
    site, server = image_site
    lease = site.manager.reserve(nodes=1, memory_mb=LEASE_MB, duration_s=600)
    ready = site.wait(lease, {"ready"} | TERMINAL, 60)
    assert ready.state == "ready", ready.reason
    site.vms.start(lease.id, [parse_vm_request(listed_guest("guest1"))])
    vm = site.vms.wait(lease.id, "guest1", {"running", "failed"}, 90)
    assert vm is not None and vm.state == "running", site.vms.get(lease.id, "guest1")
    console = str(tmp_path / "consoles" / "guest1.log")
    assert wait_for_line(console, GUEST_UP, 90), f"the guest never printed {GUEST_UP!r}"
    files = guest_files()
    cache = tmp_path / "image-cache"
    cached = {name for name in os.listdir(cache) if len(name) == 64}
    assert cached == {files.kernel_sha256, files.initrd_sha256}
    assert not [name for name in os.listdir(cache) if name.endswith(".part")]
    # While it fetched, the pilot said how far along it was; the last word on each image is its whole size.
    progress = [body["message"] for _, state, _, body in site.store.notification_bodies(lease.slot)
                if state == "fetching"]
    for label in ("image test-kernel 1", "image test-initrd 1"):
        assert any(m.startswith(f"fetching {label}: 100% (") for m in progress), progress
    # The pilot fetched from the service, not from the endorser's server (which only the service used).
    assert [path for path, _ in server.requests] == ["/vmlinuz", "/initrd.img"]
    # A guest that escapes QEMU is libvirt-qemu: it boots from its own copies of the kernel and initrd, and can
    # neither read nor change the cached ones (for the next VM) nor look into the journal (whose entries hold
    # the slot's signing key). Its copies are all it has.
    [entry] = [n for n in os.listdir(site.journal_dir) if n.endswith(".json")]
    tries = {
        "read the kernel": f"open({str(cache / files.kernel_sha256)!r}, 'rb').read(1)",
        "write the kernel": f"open({str(cache / files.kernel_sha256)!r}, 'ab')",
        "make the kernel writable": f"os.chmod({str(cache / files.kernel_sha256)!r}, 0o644)",
        "replace the kernel": f"os.rename({str(cache / files.kernel_sha256)!r}, '/tmp/x')",
        "list the cache": f"os.listdir({str(cache)!r})",
        "list the journal": f"os.listdir({site.journal_dir!r})",
        "read a journal entry": f"open({os.path.join(site.journal_dir, entry)!r}).read()",
    }
    copies = os.path.join(site.journal_dir, "vm-files")
    [kernel_copy] = [os.path.join(copies, n) for n in os.listdir(copies) if n.endswith(".kernel")]
    tries["read its own kernel"] = f"open({kernel_copy!r}, 'rb').read(1)"
    assert as_guest_user(tries) == {what: what == "read its own kernel" for what in tries}
    assert {n for n in os.listdir(cache) if len(n) == 64} == cached
    assert hashlib.sha256((cache / files.kernel_sha256).read_bytes()).hexdigest() == files.kernel_sha256
    site.manager.release(lease.id)
    site.wait(lease, TERMINAL, 60)
    assert_node_clean(site, libvirt_qemu, lease, hugepages)
    # The cache outlives the lease: the next VM from these images starts without a download.
    assert {name for name in os.listdir(cache) if len(name) == 64} == cached


def test_a_lease_that_names_its_images_has_them_prefetched_so_the_vm_start_downloads_nothing(
        image_site, libvirt_qemu, tmp_path, hugepages):
    site, _server = image_site
    images = site.catalog.resolve_images([ImageFile.from_dict("i", {"image": "test-kernel"}),
                                          ImageFile.from_dict("i", {"image": "test-initrd"})])
    lease = site.manager.reserve(nodes=1, memory_mb=LEASE_MB, duration_s=600,
                                 images=[image.to_dict() for image in images])
    ready = site.wait(lease, {"ready"} | TERMINAL, 60)
    assert ready.state == "ready", ready.reason
    # The host was told to prefetch as soon as it reserved; its reports say when each image is in.
    def prefetched() -> list[str]:
        return [body["message"] for _, state, _, body in site.store.notification_bodies(lease.slot)
                if state == "fetching" and "is in the node's image cache" in body["message"]]

    assert site.store.wait_for(lambda: len(prefetched()) == 2, 60), site.store.notification_bodies(lease.slot)
    files = guest_files()
    cache = tmp_path / "image-cache"
    assert {n for n in os.listdir(cache) if len(n) == 64} == {files.kernel_sha256, files.initrd_sha256}
    seen = len(site.store.notification_bodies(lease.slot))
    site.vms.start(lease.id, [parse_vm_request(listed_guest("guest1"))])
    vm = site.vms.wait(lease.id, "guest1", {"running", "failed"}, 90)
    assert vm is not None and vm.state == "running", site.vms.get(lease.id, "guest1")
    after = site.store.notification_bodies(lease.slot)[seen:]
    assert [state for _, state, _, _ in after if state == "fetching"] == []  # the start downloaded nothing
    assert wait_for_line(str(tmp_path / "consoles" / "guest1.log"), GUEST_UP, 90)
    site.manager.release(lease.id)
    site.wait(lease, TERMINAL, 60)
    assert_node_clean(site, libvirt_qemu, lease, hugepages)


def as_guest_user(tries: dict[str, str]) -> dict[str, bool]:
    """Run each Python statement as libvirt-qemu (its uid, gid and groups: what an escaped guest is); for each,
    whether it was allowed (False: it raised OSError)."""
    user = pwd.getpwnam("libvirt-qemu")
    code = "import json, os\nout = {}\n" + "".join(
        f"try:\n    {statement}\n    out[{what!r}] = True\nexcept OSError:\n    out[{what!r}] = False\n"
        for what, statement in tries.items()) + "print(json.dumps(out))\n"
    result = subprocess.run(["/usr/bin/python3", "-I", "-c", code], user=user.pw_uid, group=user.pw_gid,
                            extra_groups=os.getgrouplist(user.pw_name, user.pw_gid), capture_output=True, text=True,
                            timeout=30, cwd="/")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


SEED_END = "workspace-pilot test guest seed end"


def seed_files_on_console(console: str) -> dict[str, str]:
    """The seed files the test guest printed on its console (name -> content)."""
    files, name, lines = {}, None, []
    with open(console, encoding="utf-8", errors="replace") as handle:
        for line in handle.read().splitlines():
            line = line.rstrip("\r")
            if line.startswith("workspace-pilot test guest seed file ") and line.endswith(":"):
                name, lines = line[len("workspace-pilot test guest seed file "):-1], []
            elif line == SEED_END and name is not None:
                files[name], name = "\n".join(lines), None
            elif name is not None:
                lines.append(line)
    return files


def test_a_guest_reads_its_cloud_init_seed_hostname_keys_user_data_and_peers(image_site, libvirt_qemu, tmp_path,
                                                                               hugepages):
    site, _server = image_site
    lease = site.manager.reserve(nodes=1, memory_mb=2 * LEASE_MB, duration_s=600)
    ready = site.wait(lease, {"ready"} | TERMINAL, 60)
    assert ready.state == "ready", ready.reason
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGm9seedtest alice@ops"
    user_data = "#cloud-config\nruncmd:\n - echo hello from user-data\n"

    head = listed_guest("head", context={"hostname": "head-node", "ssh_authorized_keys": [key],
                                         "user_data": user_data})
    site.vms.start(lease.id, [parse_vm_request(head), parse_vm_request(listed_guest("worker1", context={}))])
    for name in ("head", "worker1"):
        vm = site.vms.wait(lease.id, name, {"running", "failed"}, 90)
        assert vm is not None and vm.state == "running", site.vms.get(lease.id, name)
    console = str(tmp_path / "consoles" / "head.log")
    assert wait_for_line(console, SEED_END, 90), open(console, errors="replace").read()
    # The guest prints the seed before its first "alive": once that is there, the seed is all there.
    assert wait_for_line(console, "workspace-pilot test guest alive 1", 30)
    files = seed_files_on_console(console)
    # With the guest agent, its features and cloud-init's vendor-data that starts it (docs/hosting-vms.md).
    assert set(files) == {"meta-data", "peers", "user-data", "features", "workspace-pilot-agent", "vendor-data"}, \
        files
    assert f"mjf jobfeatures job_id {lease.slot}.head" in files["features"].splitlines()
    meta = json.loads(files["meta-data"])
    assert meta["local-hostname"] == "head-node" and meta["public-keys"] == [key]
    assert meta["instance-id"] == f"{lease.slot}-head"
    host = site.vms.get(lease.id, "head").host
    assert meta["workspace-peers"] == [{"name": "head", "host": host}, {"name": "worker1", "host": host}]
    assert files["user-data"] == user_data.rstrip("\n")
    assert files["peers"] == f"head {host}\nworker1 {host}"
    worker_console = str(tmp_path / "consoles" / "worker1.log")
    assert wait_for_line(worker_console, "workspace-pilot test guest alive 1", 90)
    worker = seed_files_on_console(worker_console)
    assert json.loads(worker["meta-data"])["local-hostname"] == "worker1"  # its name, none given
    seeds = os.path.join(site.journal_dir, "seeds")
    assert len(os.listdir(seeds)) == 2
    site.manager.release(lease.id)
    site.wait(lease, TERMINAL, 60)
    assert_node_clean(site, libvirt_qemu, lease, hugepages)
    assert os.listdir(seeds) == []  # the pilot's teardown removed its VMs' seeds
