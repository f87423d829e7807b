"""The ``cgroup`` backend: the lease's memory is taken off the memory limit of one host cgroup.

On a KVM host whose own services run in one cgroup (and the leased VMs
outside it), lowering that cgroup's limit by the lease's size keeps the
host's services from growing into the VMs' memory.

Levels are the limit in bytes. "No limit" is the level :data:`UNLIMITED`.
A limit at or above the host's ``MemTotal`` limits nothing, so takes start
from ``min(limit, MemTotal)`` and a give that climbs back to ``MemTotal``
becomes :data:`UNLIMITED` again. That keeps pilots composable: from no
limit, two leases go T-L1, T-L1-L2, then (either order) T-L2 or T-L1, then
no limit, exactly where the cgroup started. (A cgroup that started with a
finite limit at or above MemTotal ends as no limit, which means the same.)
"""

from __future__ import annotations

import errno
import os

from pilot.node.backends.base import BackendError, BalloonBackend, read_meminfo_kb

CGROUP_ROOT = "/sys/fs/cgroup"

#: The level that stands for "no limit": v1's ``-1`` and v2's ``max``.
#: 2**63-1 is above any real limit, so ``min(level, MemTotal)`` works on it unchanged.
UNLIMITED = 2**63 - 1

# cgroup v1 reports "no limit" as its page counter's maximum rounded down to the
# page size (9223372036854771712 with 4 KiB pages); any value this large is that,
# no machine has 4 EiB.
_V1_UNLIMITED_FROM = 2**62

_MIB = 2**20
_PAGE = os.sysconf("SC_PAGE_SIZE")

# version -> (limit file, usage file, what to write for no limit)
_FILES = {
    1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "-1"),
    2: ("memory.max", "memory.current", "max"),
}


def _checked_path(path: str) -> str:
    """``path`` normalised, or BackendError unless it is a real cgroup directory we may use."""
    if not isinstance(path, str) or not os.path.isabs(path):
        raise BackendError(f"cgroup: {path!r} is not an absolute path; set [memory] cgroup to the host cgroup's directory")
    normal = os.path.normpath(path)
    if not os.path.isdir(normal):
        raise BackendError(f"cgroup: {normal} is not an existing directory; create the host cgroup or fix [memory] cgroup")
    # A symlink anywhere in the path could point the pilot's writes at a file it
    # was never meant to touch; the configured path must be the real one.
    real = os.path.realpath(normal)
    if real != normal:
        raise BackendError(f"cgroup: {normal} goes through a symlink (it is really {real}); configure the real path")
    if not normal.startswith(CGROUP_ROOT + "/"):
        raise BackendError(f"cgroup: {normal} is not below {CGROUP_ROOT}/; configure a cgroup directory there")
    # A hierarchy's root is where it is mounted (/sys/fs/cgroup/memory on v1,
    # /sys/fs/cgroup itself on a pure v2 host): the whole machine, never ours to limit.
    if os.path.ismount(normal):
        raise BackendError(f"cgroup: {normal} is the root of a cgroup hierarchy; configure the host cgroup below it")
    return normal


class CgroupBackend(BalloonBackend):
    """The memory limit of one existing host cgroup (v1 ``memory.limit_in_bytes`` or v2 ``memory.max``).

    Touches only the limit and usage files inside ``path``. The version is
    whichever limit file ``path`` has. On v1 (no swap) a limit below what
    the cgroup's processes use is refused with EBUSY and the old limit
    stays; v2 accepts it and reclaims, or OOM-kills inside the cgroup.
    """

    name = "cgroup"
    unit = "bytes"

    def __init__(self, path: str, meminfo: str = "/proc/meminfo"):
        self.path = _checked_path(path)
        self.meminfo = meminfo
        for version, (limit_file, _, _) in _FILES.items():
            if os.path.isfile(os.path.join(self.path, limit_file)):
                self.version = version
                break
        else:
            raise BackendError(
                f"cgroup: {self.path} has neither memory.limit_in_bytes (v1) nor memory.max (v2); "
                "configure a cgroup of a hierarchy with the memory controller"
            )
        limit_file, usage_file, self._unlimited_text = _FILES[self.version]
        self.limit_path = os.path.join(self.path, limit_file)
        self.usage_path = os.path.join(self.path, usage_file)

    def params(self) -> dict:
        """The cgroup directory (and the meminfo path when not the default)."""
        params = {"path": self.path}
        if self.meminfo != "/proc/meminfo":
            params["meminfo"] = self.meminfo
        return params

    def _read_file(self, path: str) -> str:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                return os.read(fd, 64).decode("ascii").strip()
            finally:
                os.close(fd)
        except OSError as exc:
            raise BackendError(f"cgroup: cannot read {path}: {exc.strerror}") from None

    def read(self) -> int:
        """The current limit in bytes, or :data:`UNLIMITED` when the cgroup has none."""
        text = self._read_file(self.limit_path)
        if text == "max":
            return UNLIMITED
        try:
            value = int(text)
        except ValueError:
            raise BackendError(f"cgroup: {self.limit_path} holds {text!r}, not a limit in bytes") from None
        return UNLIMITED if value >= _V1_UNLIMITED_FROM else value

    def _usage(self) -> str:
        try:
            return f"{int(self._read_file(self.usage_path))} bytes"
        except (BackendError, ValueError):
            return "an unknown amount"

    def write(self, level: int) -> None:
        """Set the limit to ``level`` bytes (:data:`UNLIMITED`: no limit); the kernel rounds down to whole pages.

        Raises BackendError, with the old limit still in place, when the
        kernel refuses (v1: the cgroup's processes use more than ``level``).
        """
        if not isinstance(level, int) or not 0 <= level <= UNLIMITED:
            raise BackendError(f"cgroup: {level!r} is not a memory limit in bytes; nothing changed")
        text = self._unlimited_text if level == UNLIMITED else str(level)
        try:
            # os.write, not a buffered file: the kernel's answer to this one write is the answer.
            fd = os.open(self.limit_path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.write(fd, text.encode("ascii"))
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise BackendError(
                    f"cgroup: cannot lower the limit of {self.path} to {level} bytes: its processes use "
                    f"{self._usage()}, more than the new limit; nothing changed (ask for less memory or "
                    "stop some of them)"
                ) from None
            hint = " (the pilot must run as root)" if exc.errno in (errno.EPERM, errno.EACCES) else ""
            raise BackendError(
                f"cgroup: cannot write {text} to {self.limit_path}: {exc.strerror}{hint}; nothing changed"
            ) from None

    def _total(self) -> int:
        return read_meminfo_kb("MemTotal", self.meminfo) * 1024

    def units_for(self, memory_mb: int) -> int:
        """``memory_mb`` in bytes."""
        return memory_mb * _MIB

    def mb_of(self, units: int) -> int:
        """Whole MB in ``units`` bytes."""
        return units // _MIB

    def level_after_take(self, level: int, units: int) -> int:
        """The limit, counted from at most MemTotal, lowered by ``units`` (negative: write refuses it)."""
        return min(level, self._total()) - units

    def level_after_give(self, level: int, units: int) -> int:
        """The limit raised by ``units``; :data:`UNLIMITED` once it reaches MemTotal."""
        total = self._total()
        raised = min(level, total) + units
        return UNLIMITED if raised >= total else raised

    def host_mb(self, level: int) -> int:
        """What the cgroup may use at ``level``, in MB (MemTotal when unlimited)."""
        return min(level, self._total()) // _MIB

    def boot_level(self, boot_mb: int | str) -> int:
        """``"max"``: :data:`UNLIMITED`; an int: that many MB as a limit in bytes."""
        if boot_mb == "max":
            return UNLIMITED
        if isinstance(boot_mb, int) and not isinstance(boot_mb, bool) and boot_mb > 0:
            return self.units_for(boot_mb)
        raise BackendError(f"cgroup: boot_mb must be the cgroup's boot limit in MB or max, not {boot_mb!r}")

    def reached(self, level: int, target: int) -> bool:
        """Exact, or ``target`` rounded down to whole pages (the kernel keeps limits in pages)."""
        if level == target:
            return True
        return target != UNLIMITED and level == target - target % _PAGE
