"""A writable disk's throw-away overlay, made by the pilot under a per-node disk budget.

A VM whose disk is not read-only writes to a qcow2 overlay whose backing
file is the checked image, so the image never takes a write. Overlays are
``<journal dir>/overlays/<domain name>.qcow2``, root's, made with
``qemu-img`` (absolute path, fixed environment) after the journal says the
slot may have VMs, and removed with the VM; whoever undoes a dead pilot's
entry removes its slot's.

An overlay grows as its guest writes, up to its disk's virtual size plus
qcow2's own tables. Before one is made, the worst case of every overlay on
the node, the new one included, must fit twice over:

- in the node's disk budget (``[vms] disk_budget``, MB; 0: no fixed budget);
- in the overlay filesystem's free space, less ``[vms] disk_reserve``: what
  the existing overlays may still grow by is counted as taken already, so
  guests that fill their disks all at once still leave the reserve for the
  journal, the logs and the image cache beside them.

One flock on the overlay directory makes the check and the creation one
step across every pilot and VM job of the node.
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import os
import struct
import subprocess

from pilot.vm.check import QCOW2_MAGIC, VmRefused

#: Where qemu-img finds what it loads; never the caller's PATH or locale.
QEMU_IMG_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
QEMU_IMG_TIMEOUT_S = 30.0
SUFFIX = ".qcow2"
_LOCK_NAME = ".budget.lock"
_MB = 1024 * 1024
# qcow2's header: magic, version, backing offset and size, cluster bits, then the virtual size at byte 24.
_VIRTUAL_SIZE = struct.Struct(">Q")


def overlay_dir_of(journal_dir: str) -> str:
    """Where the node's overlays are: ``overlays/`` in the journal directory."""
    return os.path.join(journal_dir, "overlays")


def overlay_path(overlay_dir: str, domain_name: str) -> str:
    """The overlay of the domain ``domain_name``."""
    return os.path.join(overlay_dir, domain_name + SUFFIX)


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
    """The node's rule for overlays: ``budget_mb`` in all (0: none), ``reserve_mb`` always left free."""

    overlay_dir: str
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
        need = worst_case_bytes(size)
        os.makedirs(self.overlay_dir, mode=0o700, exist_ok=True)
        path = overlay_path(self.overlay_dir, domain_name)
        lock = os.open(os.path.join(self.overlay_dir, _LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            worst, growth = self._committed(exclude=path)
            if self.budget_mb and worst + need > self.budget_mb * _MB:
                raise VmRefused(
                    f"disk: its overlay may grow to {_in_mb(need)} MB and the node's overlays to "
                    f"{_in_mb(worst)} MB of the {self.budget_mb} MB disk budget; at most "
                    f"{_in_mb(max(self.budget_mb * _MB - worst, 0))} MB is left (ask for readonly: true, or a smaller disk)")
            free = _free_bytes(self.overlay_dir)
            room = free - growth - self.reserve_mb * _MB
            if need > room:
                raise VmRefused(
                    f"disk: its overlay may grow to {_in_mb(need)} MB; {self.overlay_dir} has {_in_mb(free)} MB free, "
                    f"of which the node's overlays may still take {_in_mb(growth)} MB and {self.reserve_mb} MB stays "
                    f"free (ask for readonly: true, or a smaller disk)")
            self._create(path, image, disk_format, size)
        finally:
            os.close(lock)
        return path

    def _committed(self, *, exclude: str) -> tuple[int, int]:
        """(worst case of every overlay there, what they may still grow by), in bytes."""
        worst = growth = 0
        for path in glob.glob(os.path.join(glob.escape(self.overlay_dir), "*" + SUFFIX)):
            if path == exclude:
                continue
            try:
                size = virtual_size(path, "qcow2")
                used = os.stat(path).st_blocks * 512
            except FileNotFoundError:
                continue  # removed with its VM meanwhile
            except (OSError, ValueError):
                # Unreadable: count it whole (its file's size as what it holds), never as nothing.
                size, used = 0, 0
                try:
                    size = os.stat(path).st_size
                except OSError:
                    pass
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
            raise VmRefused(f"disk: {self.qemu_img} could not make its overlay: {why[-1] if why else result.returncode}")
        os.chmod(temp, 0o600)
        os.replace(temp, path)


def remove_overlay(overlay_dir: str, domain_name: str) -> None:
    """Remove the domain's overlay (and a half-made one), if there."""
    path = overlay_path(overlay_dir, domain_name)
    for leftover in [path, *glob.glob(glob.escape(path) + ".tmp-*")]:
        _unlink(leftover)


def remove_overlays(overlay_dir: str, prefix: str) -> list[str]:
    """Remove every overlay whose domain name starts with ``prefix`` (a slot's); the paths removed."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(overlay_dir), glob.escape(prefix) + "*" + SUFFIX + "*")):
        if _unlink(path):
            removed.append(path)
    return removed


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _free_bytes(directory: str) -> int:
    info = os.statvfs(directory)
    return info.f_bavail * info.f_frsize


def _in_mb(count: int) -> int:
    return -(-count // _MB)
