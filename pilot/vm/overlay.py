"""A writable disk's throw-away overlay, made by the pilot under a per-node disk budget.

A VM whose disk is not read-only writes to a qcow2 overlay whose backing
file is the checked image, so the image never takes a write. Overlays are
among the VM's own files (:mod:`pilot.vm.vmfiles`: ``<domain>.qcow2``),
made with ``qemu-img`` (absolute path, fixed environment) after the journal
says the slot may have VMs, and removed with the VM.

An overlay grows as its guest writes, up to its disk's virtual size plus
qcow2's own tables. Before one is made, the worst case of every overlay on
the node, the new one included, must fit twice over:

- in the node's disk budget (``[vms] disk_budget``, MB; 0: no fixed budget);
- in the overlay filesystem's free space, less ``[vms] disk_reserve``: what
  the existing overlays may still grow by is counted as taken already, so
  guests that fill their disks all at once still leave the reserve for the
  journal, the logs and the image cache beside them.

One flock on that directory makes the check and the creation one
step across every pilot and VM job of the node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import os
import struct
import subprocess

from pilot.vm.check import QCOW2_MAGIC, VmRefused
from pilot.vm.vmfiles import vm_file

#: Where qemu-img finds what it loads; never the caller's PATH or locale.
QEMU_IMG_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
QEMU_IMG_TIMEOUT_S = 30.0
SUFFIX = ".qcow2"  # the overlays among the VM files
_LOCK_NAME = ".budget.lock"
_MB = 1024 * 1024
#: The most one copy_file_range call is asked to copy.
COPY_CHUNK = 64 * _MB
# qcow2's header: magic, version, backing offset and size, cluster bits, then the virtual size at byte 24.
_VIRTUAL_SIZE = struct.Struct(">Q")


def virtual_size(path: str, disk_format: str) -> int:
    """The size in bytes the guest sees of the image at ``path`` (raw: the file's; qcow2: its header's)."""
    with open(path, "rb") as handle:
        if disk_format == "raw":
            return os.fstat(handle.fileno()).st_size
        header = handle.read(32)
    if not header.startswith(QCOW2_MAGIC) or len(header) < 32:
        raise ValueError(f"{path} is not a qcow2 image")
    return _VIRTUAL_SIZE.unpack_from(header, 24)[0]


def worst_case_bytes(size: int) -> int:
    """The most an overlay of a ``size``-byte disk can take on disk: the data, its tables, a header."""
    # 64 KiB clusters: 8 bytes of L2 table and 2 of refcount per cluster, well under size/4096; 1 MiB for the rest.
    return size + size // 4096 + _MB


@dataclasses.dataclass(frozen=True)
class DiskBudget:
    """The node's rule for overlays, made in ``directory`` (the VM files'): ``budget_mb`` in all (0: none),
    ``reserve_mb`` always left free on its filesystem."""

    directory: str
    budget_mb: int = 0
    reserve_mb: int = 1024
    qemu_img: str = "/usr/bin/qemu-img"

    def make(self, domain_name: str, image: str, disk_format: str) -> str:
        """Make the overlay of ``domain_name`` over ``image``; its path, or :class:`VmRefused` (one line).

        Refused, with nothing made, when the worst case would not fit (see
        the module's doc) or qemu-img fails.
        """
        try:
            size = virtual_size(image, disk_format)
        except (OSError, ValueError) as exc:
            raise VmRefused(f"disk: cannot read its size: {exc}") from None
        path = vm_file(self.directory, domain_name, "qcow2")
        with self._admitted(path, worst_case_bytes(size), "disk: its overlay may grow to",
                            "ask for readonly: true, or a smaller disk"):
            self._create(path, image, disk_format, size)
        return path

    def copy(self, domain_name: str, kind: str, source: str) -> str:
        """Copy ``source`` to the domain's file of ``kind`` (``kernel``, ``initrd``), root's 0600; its path.

        Counted like an overlay that is full already; :class:`VmRefused` when it does not fit.
        """
        path = vm_file(self.directory, domain_name, kind)
        with open(source, "rb") as original:
            size = os.fstat(original.fileno()).st_size
            with self._admitted(path, size, f"{kind}: its copy takes", "the VM's boot files must fit too"):
                temp = f"{path}.tmp-{os.getpid()}"
                try:
                    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                    with os.fdopen(fd, "wb") as copy:
                        _copy_all(original.fileno(), copy.fileno(), size)
                    os.replace(temp, path)
                except BaseException:
                    _unlink(temp)
                    raise
        return path

    @contextlib.contextmanager
    def _admitted(self, path: str, need: int, what: str, hint: str):
        """Hold the node's flock while ``need`` more bytes are checked against the rules and the file made."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        lock = os.open(os.path.join(self.directory, _LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            worst, growth = self._committed(exclude=path)
            if self.budget_mb and worst + need > self.budget_mb * _MB:
                raise VmRefused(
                    f"{what} {_in_mb(need)} MB and the node's VM files to {_in_mb(worst)} MB of the "
                    f"{self.budget_mb} MB disk budget; at most {_in_mb(max(self.budget_mb * _MB - worst, 0))} MB "
                    f"is left ({hint})")
            free = _free_bytes(self.directory)
            if need > free - growth - self.reserve_mb * _MB:
                raise VmRefused(
                    f"{what} {_in_mb(need)} MB; {self.directory} has {_in_mb(free)} MB free, of which the node's "
                    f"overlays may still take {_in_mb(growth)} MB and {self.reserve_mb} MB stays free ({hint})")
            yield
        finally:
            os.close(lock)

    def _committed(self, *, exclude: str) -> tuple[int, int]:
        """(the most every VM file there can take, what the overlays may still grow by), in bytes."""
        worst = growth = 0
        for path in glob.glob(os.path.join(glob.escape(self.directory), "*.*")):
            if path == exclude or os.path.basename(path).startswith("."):
                continue
            try:
                info = os.stat(path)
            except FileNotFoundError:
                continue  # removed with its VM meanwhile
            used = info.st_blocks * 512
            if not path.endswith(SUFFIX):
                worst += max(used, info.st_size)  # a copy: full already
                continue
            try:
                size = virtual_size(path, "qcow2")
            except (OSError, ValueError):
                size = info.st_size  # half-made or unreadable: counted by what it holds, never as nothing
            case = worst_case_bytes(size)
            worst += case
            growth += max(case - used, 0)
        return worst, growth

    def _create(self, path: str, image: str, disk_format: str, size: int) -> None:
        temp = f"{path}.tmp-{os.getpid()}"
        # -u: the size is given and the backing file is not opened again; -F: its format is never probed.
        argv = [self.qemu_img, "create", "-q", "-f", "qcow2", "-b", image, "-F", disk_format, "-u", temp, str(size)]
        try:
            result = subprocess.run(argv, env=QEMU_IMG_ENV, stdin=subprocess.DEVNULL, capture_output=True,
                                    timeout=QEMU_IMG_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            _unlink(temp)
            raise VmRefused(f"disk: cannot make its overlay with {self.qemu_img}: {exc}") from None
        if result.returncode != 0:
            _unlink(temp)
            why = result.stderr.decode(errors="replace").strip().splitlines()
            said = why[-1] if why else f"exit {result.returncode}"
            raise VmRefused(f"disk: {self.qemu_img} could not make its overlay: {said}")
        os.chmod(temp, 0o600)
        os.replace(temp, path)


def _copy_all(source: int, target: int, size: int) -> None:
    """Copy ``size`` bytes in the kernel (copy_file_range: a reflink where the filesystem shares blocks)."""
    done = 0
    while done < size:
        count = os.copy_file_range(source, target, min(size - done, COPY_CHUNK), done, done)
        if count == 0:
            raise OSError(f"the source ended after {done} of {size} bytes")
        done += count


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _free_bytes(directory: str) -> int:
    info = os.statvfs(directory)
    return info.f_bavail * info.f_frsize


def _in_mb(count: int) -> int:
    return -(-count // _MB)
