"""The machine's real 2 MiB hugepage pool, as the tests see it, and one lock per machine-wide resource."""

from __future__ import annotations

import contextlib
import fcntl
import os

import pytest

HUGEPAGES_DIR = "/sys/kernel/mm/hugepages/hugepages-2048kB"
NR_HUGEPAGES = os.path.join(HUGEPAGES_DIR, "nr_hugepages")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def pool_pages() -> int:
    """The 2 MiB hugepage pool's size."""
    with open(NR_HUGEPAGES, encoding="ascii") as handle:
        return int(handle.read())



@contextlib.contextmanager
def machine_lock(name: str):
    """An exclusive flock on /tmp/workspace-pilot-tests.<name>.lock for the block.

    The hugepage pool is one per machine: test runs started side by side
    (two checkouts, a benchmark) take turns instead of seeing each other's pages.
    """
    with open(f"/tmp/workspace-pilot-tests.{name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield



def pool_checked():
    """The pool's size for a fixture to yield; after it, the test fails (and the pool is put back) unless it ended
    where it started."""
    start = pool_pages()
    yield start
    end = pool_pages()
    if end != start:
        with open(NR_HUGEPAGES, "w", encoding="ascii") as handle:
            handle.write(str(start))  # leave the machine clean even when the test failed
        pytest.fail(f"hugepage pool ended at {end} pages, started at {start}")
