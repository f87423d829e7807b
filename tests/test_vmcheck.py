"""The node's checks of a VM spec (pilot.vm.check): real files in real directories, real hashing."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import struct
import threading

import pytest

from workspace_common.protocol import ImageFile, VmSpec
from pilot.vm.check import VmPolicy, VmRefused, check_spec, file_sha256
from pilot.vm.overlay import DiskBudget


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def node(tmp_path):
    """An image directory (root's, 0755) with a disk, a kernel and an initrd; a console directory not yet made."""
    os.chmod(tmp_path, 0o755)
    image_dir = tmp_path / "images"
    image_dir.mkdir(mode=0o755)
    files = {"disk.raw": b"D" * 5000, "vmlinuz": b"K" * 300, "initrd.img": b"I" * 200}
    for name, data in files.items():
        (image_dir / name).write_bytes(data)
    policy = VmPolicy(str(image_dir), str(tmp_path / "consoles"), overhead_mb=64, networks=("default",),
                      disks=DiskBudget(str(tmp_path / "vm-files")))
    return dataclasses.make_dataclass("Node", ["tmp", "images", "policy", "files"])(tmp_path, image_dir, policy, files)


def image(node, name: str, path: str | None = None) -> ImageFile:
    return ImageFile(path or name, sha(node.files[name]))


def check(node, spec, policy=None, reserved_mb=4096, in_use_mb=0):
    return check_spec(spec, policy or node.policy, reserved_mb=reserved_mb, in_use_mb=in_use_mb)


# -- memory --------------------------------------------------------------------------------------


def test_memory_over_the_reservation_counts_the_overhead_and_says_what_fits(node):
    spec = VmSpec("vm", 512, disk=image(node, "disk.raw"))
    with pytest.raises(VmRefused) as refused:
        check(node, spec, reserved_mb=600, in_use_mb=128)
    assert str(refused.value) == (
        "memory: 512 MB + 64 MB overhead would make 704 MB of the 600 MB reserved (in use 128 MB); at most 408 MB fits"
    )
    # Exactly what the message says fits does fit.
    assert check(node, dataclasses.replace(spec, memory_mb=408), reserved_mb=600, in_use_mb=128).spec.memory_mb == 408


def test_a_writable_disk_on_a_node_without_overlays_is_refused_and_a_readonly_one_is_not(node):
    spec = VmSpec("vm", 512, disk=image(node, "disk.raw"))
    bare = dataclasses.replace(node.policy, disks=None)
    with pytest.raises(VmRefused, match="^disk: this node gives VMs no writable disk; ask for readonly: true$"):
        check(node, spec, policy=bare)
    assert check(node, dataclasses.replace(spec, disk_readonly=True), policy=bare).disk.endswith("disk.raw")


def test_memory_is_checked_before_any_image_is_read(node):
    wrong = ImageFile("disk.raw", "0" * 64)
    with pytest.raises(VmRefused, match="^memory: "):
        check(node, VmSpec("vm", 4096, disk=wrong), reserved_mb=1024)


def test_hugepage_backed_memory_must_be_whole_pages(node):
    policy = dataclasses.replace(node.policy, hugepage_kb=2048)
    with pytest.raises(VmRefused) as refused:
        check(node, VmSpec("vm", 255, disk=image(node, "disk.raw")), policy)
    assert str(refused.value) == "memory: 255 MB is not a whole number of 2048 kB hugepages; ask for 254 or 256 MB"
    assert check(node, VmSpec("vm", 256, disk=image(node, "disk.raw")), policy).spec.memory_mb == 256
    gig = dataclasses.replace(node.policy, hugepage_kb=1048576)
    with pytest.raises(VmRefused, match="ask for 1024 MB$"):
        check(node, VmSpec("vm", 1000, disk=image(node, "disk.raw")), gig)


# -- network -------------------------------------------------------------------------------------


def test_a_network_not_allowed_is_refused_naming_the_allowed_ones(node):
    spec = VmSpec("vm", 128, disk=image(node, "disk.raw"), network="corp-lan")
    with pytest.raises(VmRefused) as refused:
        check(node, spec)
    assert str(refused.value) == "network: 'corp-lan' is not allowed here (allowed: default)"
    assert check(node, dataclasses.replace(spec, network="default")).spec.network == "default"


def test_no_network_is_allowed_when_the_node_lists_none(node):
    policy = dataclasses.replace(node.policy, networks=())
    with pytest.raises(VmRefused, match=r"allowed: none: this node gives VMs no network"):
        check(node, VmSpec("vm", 128, disk=image(node, "disk.raw"), network="default"), policy)
    assert check(node, VmSpec("vm", 128, disk=image(node, "disk.raw")), policy).spec.network is None


# -- image paths ---------------------------------------------------------------------------------


def test_right_sha256_gives_resolved_absolute_paths(node):
    kernel_abs = str(node.images / "vmlinuz")
    spec = VmSpec(
        "vm", 128, disk=image(node, "disk.raw"), kernel=image(node, "vmlinuz", kernel_abs),
        initrd=image(node, "initrd.img"), cmdline="console=ttyS0",
    )
    checked = check(node, spec)
    assert checked.spec == spec
    assert checked.disk == str(node.images / "disk.raw")
    assert checked.kernel == kernel_abs and checked.initrd == str(node.images / "initrd.img")
    assert checked.disk_format == "raw"
    assert checked.console is None


def test_wrong_sha256_is_refused_with_the_digest_found(node):
    spec = VmSpec("vm", 128, disk=ImageFile("disk.raw", "ab" * 32))
    with pytest.raises(VmRefused) as refused:
        check(node, spec)
    assert str(refused.value) == (
        f"disk: disk.raw has sha256 {sha(node.files['disk.raw'])}, not the {'ab' * 32} asked for; "
        "fix the image or the digest"
    )


def test_a_wrong_kernel_digest_is_refused_even_when_the_disk_is_right(node):
    spec = VmSpec("vm", 128, disk=image(node, "disk.raw"), kernel=ImageFile("vmlinuz", sha(b"other")))
    with pytest.raises(VmRefused, match="^kernel: vmlinuz has sha256 "):
        check(node, spec)


@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_an_image_outside_the_image_directory_is_refused(node, where):
    outside = node.tmp / "elsewhere.raw"
    outside.write_bytes(b"secret")
    path = str(outside) if where == "absolute" else "../elsewhere.raw"
    with pytest.raises(VmRefused) as refused:
        check(node, VmSpec("vm", 128, disk=ImageFile(path, sha(b"secret"))))
    assert str(refused.value) == (
        f"disk: {path} resolves to {outside}, outside the image directory {node.images}"
    )


def test_a_symlink_that_escapes_the_image_directory_is_refused(node):
    (node.tmp / "host-file").write_bytes(b"not yours")
    (node.images / "sneaky.raw").symlink_to(node.tmp / "host-file")
    with pytest.raises(VmRefused, match="outside the image directory"):
        check(node, VmSpec("vm", 128, disk=ImageFile("sneaky.raw", sha(b"not yours"))))


def test_a_symlink_within_the_image_directory_resolves_to_its_target(node):
    (node.images / "current.raw").symlink_to("disk.raw")
    checked = check(node, VmSpec("vm", 128, disk=ImageFile("current.raw", sha(node.files["disk.raw"]))))
    assert checked.disk == str(node.images / "disk.raw")


def test_a_missing_image_or_a_directory_is_refused(node):
    with pytest.raises(VmRefused, match=r"^disk: nothing\.raw: No such file or directory"):
        check(node, VmSpec("vm", 128, disk=ImageFile("nothing.raw", "0" * 64)))
    (node.images / "adir").mkdir()
    with pytest.raises(VmRefused, match="^disk: adir is not a regular file$"):
        check(node, VmSpec("vm", 128, disk=ImageFile("adir", "0" * 64)))


def test_an_unsafe_or_missing_image_directory_is_refused(node):
    spec = VmSpec("vm", 128, disk=image(node, "disk.raw"))
    os.chmod(node.images, 0o777)
    with pytest.raises(VmRefused, match="writable by group or others; chmod go-w it$"):
        check(node, spec)
    os.chmod(node.images, 0o755)
    missing = dataclasses.replace(node.policy, image_dir=str(node.tmp / "no-such-dir"))
    with pytest.raises(VmRefused, match="^image directory .*no-such-dir: No such file or directory$"):
        check(node, spec, missing)


def test_qcow2_is_recognised_and_one_with_a_backing_file_refused(node):
    standalone = b"QFI\xfb" + struct.pack(">IQ", 3, 0) + bytes(100)
    backed = b"QFI\xfb" + struct.pack(">IQ", 3, 512) + bytes(100)
    (node.images / "a.qcow2").write_bytes(standalone)
    (node.images / "b.qcow2").write_bytes(backed)
    assert check(node, VmSpec("vm", 128, disk=ImageFile("a.qcow2", sha(standalone)))).disk_format == "qcow2"
    with pytest.raises(VmRefused, match="qcow2 image with a backing file; only standalone images are allowed"):
        check(node, VmSpec("vm", 128, disk=ImageFile("b.qcow2", sha(backed))))


# -- console -------------------------------------------------------------------------------------


def test_the_console_log_is_confined_to_a_console_directory_made_0700(node):
    checked = check(node, VmSpec("vm", 128, disk=image(node, "disk.raw"), console_log="vm.log"))
    consoles = node.tmp / "consoles"
    assert checked.console == str(consoles / "vm.log")
    assert stat.S_IMODE(os.stat(consoles).st_mode) == 0o700


def test_an_existing_console_log_is_kept_and_a_symlink_there_refused(node):
    consoles = node.tmp / "consoles"
    consoles.mkdir(mode=0o700)
    (consoles / "old.log").write_text("earlier boot\n")
    checked = check(node, VmSpec("vm", 128, disk=image(node, "disk.raw"), console_log="old.log"))
    assert checked.console == str(consoles / "old.log")
    assert (consoles / "old.log").read_text() == "earlier boot\n"
    (consoles / "evil.log").symlink_to(node.tmp / "images" / "disk.raw")
    with pytest.raises(VmRefused, match="^console_log: .*evil.log exists and is not a regular file"):
        check(node, VmSpec("vm", 128, disk=image(node, "disk.raw"), console_log="evil.log"))


def test_an_unsafe_console_directory_is_refused(node):
    consoles = node.tmp / "consoles"
    consoles.mkdir()
    os.chmod(consoles, 0o777)
    with pytest.raises(VmRefused, match="^console directory .* is writable by group or others"):
        check(node, VmSpec("vm", 128, disk=image(node, "disk.raw"), console_log="vm.log"))


# -- spec shape, hashing --------------------------------------------------------------------------


def test_a_hand_built_spec_gets_the_protocol_checks(node):
    with pytest.raises(VmRefused, match="^vm.name: .* has characters that are not allowed$"):
        check(node, VmSpec("../x", 128, disk=image(node, "disk.raw")))


def test_a_digest_is_computed_once_per_file_version(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(b"A" * (3 * 1024 * 1024 + 7))  # several 1 MiB blocks and a tail
    first = file_sha256(str(path))
    assert first == sha(b"A" * (3 * 1024 * 1024 + 7))
    before = os.stat(path)
    # Same size, same inode, same mtime: the cache answers, without reading the new content.
    with open(path, "r+b") as handle:
        handle.write(b"B")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert file_sha256(str(path)) == first
    # A new mtime is a new version: hashed again.
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    assert file_sha256(str(path)) == sha(b"B" + b"A" * (3 * 1024 * 1024 + 6))


def test_hashing_stops_when_the_slot_is_torn_down(node):
    cancel = threading.Event()
    cancel.set()
    (node.images / "fresh.raw").write_bytes(b"never hashed before")
    spec = VmSpec("vm", 128, disk=ImageFile("fresh.raw", sha(b"never hashed before")))
    with pytest.raises(VmRefused, match="hashing stopped: the slot is being torn down"):
        check_spec(spec, node.policy, reserved_mb=4096, in_use_mb=0, cancel=cancel)


KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGm9 alice@ops"


@pytest.mark.parametrize("context,needle", [
    ({"hostname": "web_1"}, "vm.context.hostname"),
    ({"ssh_authorized_keys": ["not a key"]}, "vm.context.ssh_authorized_keys[]"),
    ({"ssh_authorized_keys": [KEY + "\nssh-rsa AAAA injected"]}, "vm.context.ssh_authorized_keys[]"),
    ({"ssh_authorized_keys": [KEY] * 17}, "at most 16 keys"),
    ({"user_data": "x" * (32 * 1024 + 1)}, "vm.context.user_data"),
    ({"peers": [{"name": "a", "host": "node1", "ip": "10.0.0.1"}]}, "vm.context.peers[]"),
    ({"colour": "blue"}, "vm.context: unknown field(s) colour"),
])
def test_a_bad_context_is_refused_naming_its_field(context, needle):
    from workspace_common.protocol import ProtocolError

    with pytest.raises(ProtocolError) as caught:
        VmSpec.from_dict({"name": "vm1", "memory_mb": 64, "boot": {"kernel": {"path": "k", "sha256": "0" * 64}},
                          "context": context})
    assert needle in str(caught.value)


def test_a_context_round_trips():
    context = {"hostname": "web1", "ssh_authorized_keys": [KEY], "user_data": "#cloud-config\nruncmd: [ls]\n",
               "peers": [{"name": "vm2", "host": "node2"}]}
    spec = {"name": "vm1", "memory_mb": 64, "vcpus": 1, "boot": {"kernel": {"path": "k", "sha256": "0" * 64}},
            "context": context}
    assert VmSpec.from_dict(spec).to_dict() == spec
