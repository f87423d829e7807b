"""The node's checks of a VM spec against its slot, before anything is created.

The protocol (:mod:`workspace_common.protocol`) checks a spec's shape; this module
checks what only the node can: that the VM fits in the slot's memory, that
its network is one the node allows, and that every image it names is a
regular file inside the node's image directory whose content has the
sha256 the service asked for. What passes comes back as a
:class:`CheckedVm` with resolved absolute paths, the only paths the domain
XML is ever rendered from. What fails raises :class:`VmRefused` with one
line that says what is wrong and what would be allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import struct
import threading
from typing import TYPE_CHECKING

from workspace_common.protocol import ImageFile, ProtocolError, VmSpec
from pilot.node.safedir import directory_problem

if TYPE_CHECKING:
    from pilot.vm.overlay import DiskBudget

HASH_BLOCK = 1024 * 1024
QCOW2_MAGIC = b"QFI\xfb"
# qcow2 header fields read here: magic, version, backing_file_offset; v3 adds incompatible_features at 72.
_QCOW2_HEADER = struct.Struct(">4sIQ")
_QCOW2_INCOMPAT_EXTERNAL_DATA = 1 << 2


class VmRefused(Exception):
    """A VM the node will not start; ``str()`` is one line: what is wrong and what would be allowed."""


@dataclasses.dataclass(frozen=True)
class VmPolicy:
    """What the node allows its slots' VMs.

    ``image_dir``: the only directory site-local images (disk, kernel,
    initrd given by path) may come from; ``console_dir``: where console logs go; ``overhead_mb``: memory a
    VM costs beyond its guest memory (the hypervisor process); ``networks``:
    the libvirt networks a VM may join (none when empty); ``hugepage_kb``:
    set when guests are backed by hugepages of that size, whose memory must
    then be a whole number of pages.
    """

    image_dir: str
    console_dir: str
    overhead_mb: int = 0
    networks: tuple[str, ...] = ()
    hugepage_kb: int | None = None
    image_cache_dir: str | None = None
    """Where images named by an image list are (the node's image cache); None: such images are refused."""
    seed_dir: str | None = None
    """Where VMs' cloud-init seeds are written (root's alone); None: a VM that asks for one is refused."""
    disks: "DiskBudget | None" = None
    """Where writable disks' overlays are made and how much they may take (:mod:`pilot.vm.overlay`);
    None: a VM whose disk is not read-only is refused."""


@dataclasses.dataclass(frozen=True)
class CheckedVm:
    """A spec that passed :func:`check_spec`, with the absolute, resolved paths to use.

    ``disk_format`` is ``"qcow2"`` or ``"raw"`` (by the image's magic bytes)
    when there is a disk. ``console`` is the console log's path (the file may
    already exist: it is appended to), or None for no log.
    """

    spec: VmSpec
    disk: str | None = None
    disk_format: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    console: str | None = None
    seed: str | None = None
    """The VM's cloud-init seed (written just before the domain is created), or None."""
    overlay: str | None = None
    """The writable disk's qcow2 overlay (made just before the domain is created), or None."""
    interface: dict | None = None
    """Its NIC: on a lease network ``bridge``, ``tap``, ``mac``, ``mtu`` (:mod:`pilot.net`); a VM job's
    ``{"type": "user"}`` (QEMU's user-mode NAT); or None (no NIC but a libvirt network the spec names)."""


def check_memory(spec: VmSpec, policy: VmPolicy, *, reserved_mb: int, in_use_mb: int) -> None:
    """Raise :class:`VmRefused` unless the VM, with its overhead, fits beside ``in_use_mb`` in ``reserved_mb``.

    With hugepage backing, the guest memory must also be a whole number of pages.
    """
    need = spec.memory_mb + policy.overhead_mb
    if need + in_use_mb > reserved_mb:
        room = max(reserved_mb - in_use_mb - policy.overhead_mb, 0)
        raise VmRefused(
            f"memory: {spec.memory_mb} MB + {policy.overhead_mb} MB overhead would make {need + in_use_mb} MB "
            f"of the {reserved_mb} MB reserved (in use {in_use_mb} MB); at most {room} MB fits"
        )
    if policy.hugepage_kb:
        page_kb = policy.hugepage_kb
        if (spec.memory_mb * 1024) % page_kb:
            pages = spec.memory_mb * 1024 // page_kb
            below, above = pages * page_kb // 1024, (pages + 1) * page_kb // 1024
            near = f"{below} or {above} MB" if below else f"{above} MB"
            raise VmRefused(
                f"memory: {spec.memory_mb} MB is not a whole number of {page_kb} kB hugepages; ask for {near}"
            )


def check_spec(
    spec: VmSpec, policy: VmPolicy, *, reserved_mb: int, in_use_mb: int, cancel: threading.Event | None = None
) -> CheckedVm:
    """Check ``spec`` against the slot and the node; the :class:`CheckedVm` to render, or :class:`VmRefused`.

    Cheap checks come first (shape, memory, network, directories, paths);
    the images are hashed last, each one at most once per pilot process
    while its (device, inode, size, mtime) stays the same. ``cancel``, when
    set during hashing, refuses the VM (the slot is being torn down).
    Creates ``console_dir`` (mode 0700) when it is missing.
    """
    try:
        # The one definition of a valid spec; a VmSpec built by hand gets the same checks as one off the wire.
        VmSpec.from_dict(spec.to_dict())
    except ProtocolError as exc:
        raise VmRefused(str(exc)) from None
    check_memory(spec, policy, reserved_mb=reserved_mb, in_use_mb=in_use_mb)
    if spec.network is not None and spec.network not in policy.networks:
        allowed = ", ".join(policy.networks) if policy.networks else "none: this node gives VMs no network"
        raise VmRefused(f"network: {spec.network!r} is not allowed here (allowed: {allowed})")

    images = {field: image for field, image in (("disk", spec.disk), ("kernel", spec.kernel), ("initrd", spec.initrd))
              if image is not None}
    image_dir = _safe_dir("image directory", policy.image_dir) if any(not i.named for i in images.values()) else ""
    paths = {field: _cached_path(field, image, policy) if image.named else _image_path(field, image, image_dir)
             for field, image in images.items()}
    console = _console_path(spec.console_log, policy.console_dir) if spec.console_log else None
    if spec.context is not None and policy.seed_dir is None:
        raise VmRefused("context: this node cannot give VMs a cloud-init seed")
    if spec.disk is not None and not spec.disk_readonly and policy.disks is None:
        raise VmRefused("disk: this node gives VMs no writable disk; ask for readonly: true")
    for field, image in images.items():
        digest = file_sha256(paths[field], cancel=cancel)
        if digest != image.sha256:
            raise VmRefused(
                f"{field}: {image.label} has sha256 {digest}, not the {image.sha256} asked for; "
                "fix the image or the digest"
            )
    disk_format = _disk_format(paths["disk"]) if "disk" in paths else None
    return CheckedVm(spec, paths.get("disk"), disk_format, paths.get("kernel"), paths.get("initrd"), console)


def _safe_dir(what: str, path: str) -> str:
    problem = directory_problem(path)
    if problem is not None:
        raise VmRefused(f"{what} {path}{problem}")
    return os.path.realpath(path)


def _inside(directory: str, path: str) -> bool:
    return path != directory and os.path.commonpath([directory, path]) == directory


def _image_path(field: str, image: ImageFile, image_dir: str) -> str:
    """The image's resolved absolute path, if it is a regular file inside ``image_dir``."""
    # A relative path is relative to the image directory; realpath then follows every symlink,
    # so a link inside the directory that points out of it is judged by where it points.
    resolved = os.path.realpath(os.path.join(image_dir, image.path))
    if not _inside(image_dir, resolved):
        raise VmRefused(f"{field}: {image.path} resolves to {resolved}, outside the image directory {image_dir}")
    try:
        info = os.stat(resolved)
    except OSError as exc:
        raise VmRefused(f"{field}: {image.path}: {exc.strerror} (images must be in {image_dir})") from None
    if not stat.S_ISREG(info.st_mode):
        raise VmRefused(f"{field}: {image.path} is not a regular file")
    return resolved


def _cached_path(field: str, image: ImageFile, policy: VmPolicy) -> str:
    """A named image's file in the node's image cache (put there, verified, before the check runs)."""
    if policy.image_cache_dir is None:
        raise VmRefused(f"{field}: {image.label}: this node has no image cache; give a path in its image directory")
    if not image.resolved:
        raise VmRefused(f"{field}: {image.label}: the service did not say its sha256 and size")
    path = os.path.join(_safe_dir("image cache", policy.image_cache_dir), image.sha256)
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise VmRefused(f"{field}: {image.label}: not in the image cache: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise VmRefused(f"{field}: {image.label}: {path} is not a regular file")
    return path


def _console_path(name: str, console_dir: str) -> str:
    try:
        os.makedirs(console_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise VmRefused(f"console directory {console_dir}: cannot create it: {exc.strerror}") from None
    directory = _safe_dir("console directory", console_dir)
    # The protocol allows no slash and no leading dot; kept here too: the hypervisor appends to this path as root.
    if os.sep in name or name.startswith("."):
        raise VmRefused(f"console_log: {name!r} must be a plain file name")
    path = os.path.join(directory, name)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise VmRefused(f"console_log: {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        # lstat: a symlink is refused wherever it points.
        raise VmRefused(f"console_log: {path} exists and is not a regular file; pick another name")
    return path


def _disk_format(path: str) -> str:
    """``"qcow2"`` or ``"raw"``; refuses a qcow2 image that would make the hypervisor open other files."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(80)
    except OSError as exc:
        raise VmRefused(f"disk: {path}: cannot read it: {exc.strerror}") from None
    if not header.startswith(QCOW2_MAGIC):
        return "raw"
    if len(header) < _QCOW2_HEADER.size:
        raise VmRefused(f"disk: {path} has a truncated qcow2 header")
    _, version, backing_offset = _QCOW2_HEADER.unpack_from(header)
    # A backing file or an external data file names another path that QEMU would open as root,
    # outside what was checked and hashed here.
    if backing_offset:
        raise VmRefused(f"disk: {path} is a qcow2 image with a backing file; only standalone images are allowed")
    if version >= 3 and len(header) >= 80:
        (incompatible,) = struct.unpack_from(">Q", header, 72)
        if incompatible & _QCOW2_INCOMPAT_EXTERNAL_DATA:
            raise VmRefused(f"disk: {path} is a qcow2 image with an external data file; only standalone images are allowed")
    return "qcow2"


def known_sha256(path: str, digest: str) -> None:
    """Record ``digest`` as the file's sha256 for this process (it was just computed while the file was
    written, as the image cache does), so that :func:`file_sha256` need not read it again."""
    info = os.stat(path)
    with _digests_lock:
        _digests[(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)] = digest


_digests: dict[tuple[int, int, int, int], str] = {}
_digest_locks: dict[tuple[int, int, int, int], threading.Lock] = {}
_digests_lock = threading.Lock()


def file_sha256(path: str, *, cancel: threading.Event | None = None) -> str:
    """The sha256 of a regular file as lowercase hex, cached per (device, inode, size, mtime) for the process.

    Streams the file in 1 MiB blocks; two callers asking for the same file
    at once hash it once. Raises :class:`VmRefused` when the file cannot be
    read, is not a regular file, or ``cancel`` gets set meanwhile.
    """
    try:
        # O_NONBLOCK: a FIFO planted in place of the file must not hang the pilot in open().
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise VmRefused(f"{path}: cannot read it: {exc.strerror}") from None
    with os.fdopen(fd, "rb", buffering=0) as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise VmRefused(f"{path} is not a regular file")
        # The key comes from the opened file itself, so what is hashed is what the key names.
        key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        with _digests_lock:
            if key in _digests:
                return _digests[key]
            lock = _digest_locks.setdefault(key, threading.Lock())
        with lock:
            with _digests_lock:
                if key in _digests:
                    return _digests[key]
            digest = hashlib.sha256()
            buffer = bytearray(HASH_BLOCK)
            view = memoryview(buffer)
            while True:
                if cancel is not None and cancel.is_set():
                    raise VmRefused(f"{path}: hashing stopped: the slot is being torn down")
                try:
                    count = handle.readinto(view)
                except OSError as exc:
                    raise VmRefused(f"{path}: cannot read it: {exc.strerror}") from None
                if not count:
                    break
                digest.update(view[:count])
            with _digests_lock:
                _digests[key] = digest.hexdigest()
                _digest_locks.pop(key, None)
                return _digests[key]
