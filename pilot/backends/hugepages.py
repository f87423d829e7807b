"""The ``hugepages`` backend: the lease's memory becomes hugepages that the leased VMs are backed by."""

from __future__ import annotations

import logging
import os
import re

from pilot.backends.base import BackendError, BalloonBackend, Taken

log = logging.getLogger(__name__)


class HugepagesBackend(BalloonBackend):
    """Grows and shrinks the kernel's persistent hugepage pool of one page size.

    Works on ``<sysfs dir>/nr_hugepages`` (for example
    ``/sys/kernel/mm/hugepages/hugepages-2048kB``). The kernel may grant
    fewer pages than asked when memory is short or fragmented, so every
    write is read back.
    """

    name = "hugepages"

    def __init__(self, sysfs_dir: str):
        match = re.search(r"hugepages-(\d+)kB$", sysfs_dir.rstrip("/"))
        if not match:
            raise BackendError(f"{sysfs_dir}: not a hugepages-<size>kB directory")
        self.page_kb = int(match.group(1))
        self.path = os.path.join(sysfs_dir, "nr_hugepages")

    def pages_for(self, memory_mb: int) -> int:
        """How many pages hold ``memory_mb`` (rounded up to whole pages)."""
        return -(-memory_mb * 1024 // self.page_kb)

    def read_pages(self) -> int:
        """The pool's current size in pages."""
        try:
            with open(self.path, encoding="ascii") as handle:
                return int(handle.read())
        except OSError as exc:
            raise BackendError(f"cannot read {self.path}: {exc.strerror}") from None

    def _write_pages(self, pages: int) -> int:
        try:
            with open(self.path, "w", encoding="ascii") as handle:
                handle.write(str(pages))
        except OSError as exc:
            hint = " (the pilot must run as root)" if exc.errno in (1, 13) else ""
            raise BackendError(f"cannot write {self.path}: {exc.strerror}{hint}") from None
        return self.read_pages()

    def read_mb(self) -> int:
        """The memory in the pool, in MB."""
        return self.read_pages() * self.page_kb // 1024

    def take(self, memory_mb: int) -> Taken:
        """Grow the pool by the pages for ``memory_mb``; give back a partial grant and fail."""
        if memory_mb <= 0:
            raise BackendError(f"memory must be above 0 MB, got {memory_mb}")
        wanted = self.pages_for(memory_mb)
        before = self.read_pages()
        after = self._write_pages(before + wanted)
        granted = after - before
        if granted >= wanted:
            return Taken(self.name, wanted, wanted * self.page_kb // 1024)
        if granted > 0:
            now = self._write_pages(after - granted)
            if now != before:
                raise BackendError(
                    f"the kernel granted {granted} of {wanted} hugepages and giving them back left "
                    f"the pool at {now} pages instead of {before}"
                )
        raise BackendError(
            f"the kernel granted {max(granted, 0)} of {wanted} hugepages of {self.page_kb} kB "
            f"({memory_mb} MB asked); not enough free memory; nothing kept"
        )

    def give_back(self, taken: Taken) -> None:
        """Shrink the pool by the pages ``taken`` holds; verify the kernel did."""
        current = self.read_pages()
        target = max(current - taken.units, 0)
        if current < taken.units:
            log.warning(
                "hugepage pool has %d pages, fewer than the %d this pilot took: someone else shrank it",
                current, taken.units,
            )
        now = self._write_pages(target)
        if now != target:
            raise BackendError(
                f"asked the kernel to shrink the hugepage pool to {target} pages, it is at {now}: "
                "pages still in use (by a VM?) stay as surplus and are freed when released"
            )
