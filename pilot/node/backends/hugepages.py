"""The ``hugepages`` backend: the lease's memory becomes hugepages that the leased VMs are backed by."""

from __future__ import annotations

import os

from pilot.node.backends.base import BackendError, BalloonBackend, read_meminfo_kb

SYSFS_ROOT = "/sys/kernel/mm/hugepages"


class HugepagesBackend(BalloonBackend):
    """The kernel's persistent hugepage pool of one page size; the level is the pool's size in pages.

    Works on ``<sysfs_root>/hugepages-<page_kb>kB/nr_hugepages`` (2 MiB
    pages by default, 1 GiB where asked). The kernel may grant fewer pages
    than asked when memory is short or fragmented; callers read back.
    """

    name = "hugepages"
    unit = "pages"

    def __init__(self, page_kb: int = 2048, sysfs_root: str = SYSFS_ROOT, meminfo: str = "/proc/meminfo"):
        self.page_kb = page_kb
        self.sysfs_root = sysfs_root
        self.meminfo = meminfo
        self.path = os.path.join(sysfs_root, f"hugepages-{page_kb}kB", "nr_hugepages")
        if not os.path.exists(self.path):
            raise BackendError(
                f"this kernel has no {page_kb} kB hugepages ({self.path} is missing); "
                "set [memory] hugepage_size to a size it has"
            )

    def params(self) -> dict:
        """The page size and the sysfs root (and meminfo path) this backend works on."""
        params = {"page_kb": self.page_kb}
        if self.sysfs_root != SYSFS_ROOT:
            params["sysfs_root"] = self.sysfs_root
        if self.meminfo != "/proc/meminfo":
            params["meminfo"] = self.meminfo
        return params

    def read(self) -> int:
        """The pool's current size in pages."""
        try:
            with open(self.path, encoding="ascii") as handle:
                return int(handle.read())
        except OSError as exc:
            raise BackendError(f"cannot read {self.path}: {exc.strerror}") from None

    def write(self, level: int) -> None:
        """Ask the kernel for a pool of ``level`` pages (it may grant fewer)."""
        try:
            with open(self.path, "w", encoding="ascii") as handle:
                handle.write(str(level))
        except OSError as exc:
            hint = " (the pilot must run as root)" if exc.errno in (1, 13) else ""
            raise BackendError(f"cannot write {self.path}: {exc.strerror}{hint}") from None

    def units_for(self, memory_mb: int) -> int:
        """Pages that hold ``memory_mb`` (rounded up to whole pages)."""
        return -(-memory_mb * 1024 // self.page_kb)

    def mb_of(self, units: int) -> int:
        """MB in ``units`` pages."""
        return units * self.page_kb // 1024

    def level_after_take(self, level: int, units: int) -> int:
        """Taking memory grows the pool."""
        return level + units

    def level_after_give(self, level: int, units: int) -> int:
        """Giving back shrinks the pool (never below empty)."""
        return max(level - units, 0)

    def host_mb(self, level: int) -> int:
        """MemTotal less every hugepage pool, with this size's pool at ``level``."""
        total_kb = read_meminfo_kb("MemTotal", self.meminfo)
        hugetlb_kb = read_meminfo_kb("Hugetlb", self.meminfo)
        others_kb = max(hugetlb_kb - self.read() * self.page_kb, 0)
        return (total_kb - others_kb - level * self.page_kb) // 1024

    def boot_level(self, boot_mb: int | str) -> int:
        """The pool size in pages that ``boot_mb`` MB of hugepages makes (usually 0)."""
        if not isinstance(boot_mb, int):
            raise BackendError(f"hugepages: boot_mb must be the pool's boot size in MB, not {boot_mb!r}")
        return self.units_for(boot_mb)
