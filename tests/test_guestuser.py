"""Whom guests run as and what of the node they are let near (pilot.vm.guestuser, pilot.vm.vmprep), on real files.

The user is the machine's libvirt-qemu (made by scripts/bootstrap.sh --vm); its reach is judged by the modes
and owners the pilot sets, and checked by really opening the files as that user.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import stat
import subprocess

import pytest

from workspace_common.protocol import ImageFile, VmSpec
from pilot.vm import vmprep
from pilot.vm.check import CheckedVm, VmRefused
from pilot.vm.guestuser import GuestUser, guest_user, reach_problem, search_problem
from pilot.vm.overlay import DiskBudget

CAPS = ("<capabilities><host><secmodel><model>none</model></secmodel><secmodel><model>dac</model><doi>0</doi>"
        "<baselabel type='kvm'>+64055:+994</baselabel><baselabel type='qemu'>+107:+107</baselabel></secmodel>"
        "</host></capabilities>")


def test_the_guest_user_is_libvirts_dac_label_for_the_domain_type():
    assert guest_user(CAPS, "qemu") == GuestUser(107, 107)
    assert guest_user(CAPS, "kvm") == GuestUser(64055, 994)
    assert guest_user(CAPS, "xen") == GuestUser(64055, 994)  # no label of its own: the first one
    assert guest_user("<capabilities><host><secmodel><model>testSecurity</model></secmodel></host></capabilities>",
                      "test") is None
    assert guest_user("not xml", "qemu") is None
    assert guest_user(CAPS.replace("+107:+107", "+0:+0"), "qemu").root


@pytest.fixture
def qemu_user(guest_reachable):
    if os.geteuid() != 0:
        pytest.skip("changing owners needs root")
    try:
        entry = pwd.getpwnam("libvirt-qemu")
    except KeyError:
        pytest.skip("no libvirt-qemu user: run scripts/bootstrap.sh --vm")
    return GuestUser(entry.pw_uid, entry.pw_gid)


def opens_as(user: GuestUser, path: str, mode: str = "rb") -> bool:
    """Whether ``user`` (with its groups) can open ``path`` in ``mode``, really tried."""
    name = pwd.getpwuid(user.uid).pw_name
    result = subprocess.run(["/usr/bin/python3", "-I", "-c", f"open({path!r}, {mode!r}).close()"], user=user.uid,
                            group=user.gid, extra_groups=os.getgrouplist(name, user.gid), capture_output=True,
                            timeout=30, cwd="/")
    return result.returncode == 0


def test_make_opens_the_way_to_a_cached_disk_for_reading_and_gives_the_vm_its_own_files(tmp_path, qemu_user):
    os.chmod(tmp_path, 0o711)
    journal, cache = tmp_path / "journal", tmp_path / "image-cache"
    for directory in (journal, journal / "seeds", cache):
        directory.mkdir(mode=0o700)
    disk_bytes = b"D" * 4096
    digest = hashlib.sha256(disk_bytes).hexdigest()
    (cache / digest).write_bytes(disk_bytes)
    os.chmod(cache / digest, 0o400)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"K" * 1000)
    seed = journal / "seeds" / "wp-a-vm.iso"
    seed.write_bytes(b"S" * 100)
    os.chmod(seed, 0o600)
    spec = VmSpec("vm", 64, disk=ImageFile.from_dict("disk", {"image": "d", "sha256": digest, "size": 4096}),
                  kernel=ImageFile("vmlinuz", "0" * 64))
    checked = CheckedVm(spec, disk=str(cache / digest), disk_format="raw", kernel=str(kernel), seed=str(seed))
    disks = DiskBudget(str(journal / "vm-files"), reserve_mb=0)
    planned = vmprep.plan(checked, domain_name="wp-a-vm", disks=disks, user=qemu_user)
    assert planned.overlay == str(journal / "vm-files" / "wp-a-vm.qcow2")
    assert planned.kernel == str(journal / "vm-files" / "wp-a-vm.kernel") and planned.disk == checked.disk
    vmprep.make(planned, checked, domain_name="wp-a-vm", disks=disks, user=qemu_user, image_cache_dir=str(cache))

    def owner_mode(path) -> tuple[int, int, str]:
        info = os.stat(path)
        return info.st_uid, info.st_gid, oct(stat.S_IMODE(info.st_mode))

    gid = qemu_user.gid
    # Through the journal and the cache (search, not list); the cached disk readable by the group, never writable.
    for directory in (journal, journal / "seeds", journal / "vm-files", cache):
        assert owner_mode(directory) == (0, gid, "0o710"), directory
    assert owner_mode(cache / digest) == (0, gid, "0o440")
    # The VM's own files are its user's: the overlay to write, the kernel copy and the seed to read.
    assert owner_mode(planned.overlay) == (qemu_user.uid, gid, "0o600")
    assert owner_mode(planned.kernel) == (qemu_user.uid, gid, "0o400")
    assert owner_mode(seed) == (qemu_user.uid, gid, "0o400")
    assert open(planned.kernel, "rb").read() == kernel.read_bytes()
    # Really opened as libvirt-qemu: what it needs, and nothing more.
    assert opens_as(qemu_user, str(cache / digest)) and opens_as(qemu_user, planned.overlay, "r+b")
    assert opens_as(qemu_user, planned.kernel) and opens_as(qemu_user, str(seed))
    assert not opens_as(qemu_user, str(cache / digest), "ab") and not opens_as(qemu_user, str(seed), "ab")


def test_a_site_image_the_guest_user_cannot_reach_is_refused_in_the_sites_words(tmp_path, qemu_user):
    os.chmod(tmp_path, 0o700)
    image = tmp_path / "disk.raw"
    image.write_bytes(b"D" * 512)
    problem = reach_problem(str(image), qemu_user)
    assert problem == f"{tmp_path} is root:root 0700: the guests' user (uid {qemu_user.uid}) cannot search it"
    assert search_problem(str(tmp_path), qemu_user) == problem
    os.chmod(tmp_path, 0o711)
    os.chmod(image, 0o600)
    assert reach_problem(str(image), qemu_user) == (
        f"{image} is root:root 0600: the guests' user (uid {qemu_user.uid}) cannot read it")
    os.chmod(image, 0o644)
    assert reach_problem(str(image), qemu_user) is None and search_problem(str(tmp_path), qemu_user) is None
    assert reach_problem(str(image), GuestUser(0, 0)) is None and reach_problem(str(image), None) is None

    spec = VmSpec("vm", 64, disk=ImageFile("disk.raw", "0" * 64), disk_readonly=True)
    checked = CheckedVm(spec, disk=str(image), disk_format="raw")
    os.chmod(image, 0o600)
    with pytest.raises(VmRefused, match=r"^disk: .* cannot read it$"):
        vmprep.make(checked, checked, domain_name="wp-a-vm", disks=None, user=qemu_user, image_cache_dir=None)
