"""``workspace-lease demo``: one lease through the embedded local site, narrated step by step."""

from __future__ import annotations

import os
import sys
import tempfile
import time

from service_adapter.lease import LeaseFailed
from service_adapter.local_site import LocalSite

HUGEPAGES_DIR = "/sys/kernel/mm/hugepages/hugepages-2048kB"


class DemoError(Exception):
    """The demo cannot run here; the message says why and what to do."""


def _pool_pages() -> int:
    with open(os.path.join(HUGEPAGES_DIR, "nr_hugepages"), encoding="ascii") as handle:
        return int(handle.read())


def run_demo(nodes: int, memory_mb: int, duration_s: float, grace_s: float,
             release_after_s: float | None, workdir: str | None, out=sys.stdout,
             journal_dir: str = "/var/lib/workspace-pilot") -> int:
    """Run the demo; returns 0 when the lease ran and the hugepage pool is back where it started."""
    if os.geteuid() != 0:
        raise DemoError("the demo reserves real hugepages and must run as root")
    if not os.access(os.path.join(HUGEPAGES_DIR, "nr_hugepages"), os.W_OK):
        raise DemoError(f"{HUGEPAGES_DIR}/nr_hugepages is not writable (no 2 MiB hugepage support?)")
    t0 = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - t0:8.3f} s] {text}", file=out, flush=True)

    workdir = workdir or tempfile.mkdtemp(prefix="workspace-lease-demo-")
    before = _pool_pages()
    say(f"hugepage pool before: {before} pages of 2 MiB ({before * 2} MB)")
    site = LocalSite(workdir, grace_s=grace_s, journal_dir=journal_dir)
    try:
        say(f"store {site.store.path} (SQLite, WAL)")
        say(f"receiver listening on {site.url}/pilot/v2/notifications (digest SHA-256)")
        lease = site.leases.reserve(nodes, memory_mb, duration_s)
        hosts = site.provider.hosts(lease.job_id)
        say(f"lease {lease.id}: {nodes} x {memory_mb} MB for {duration_s:g} s, slot {lease.slot}")
        say(f"local provider started pilots {', '.join(hosts)} (pids {site.provider.pids(lease.job_id)})")
        seen = 0

        def report_new() -> None:
            nonlocal seen
            rows = site.store.notifications(lease.slot)
            for host, seq, state, code in rows[seen:]:
                say(f"  {host}: {state}" + (f" (code {code})" if code else "") + f" [seq {seq}]")
            seen = len(rows)

        def watch(until, timeout: float) -> bool:
            """Print notifications as they are stored until ``until()`` holds or ``timeout`` passes."""
            def check() -> bool:
                report_new()
                return until()
            return site.store.wait_for(check, timeout)

        try:
            ready = lease.wait_reserved(timeout=60)
        except LeaseFailed as exc:
            report_new()
            say(f"FAILED: {exc}")
            return 1
        report_new()
        if not ready:
            say("FAILED: the pilots did not all report 'reserved' within 60 s")
            return 1
        held = _pool_pages()
        say(f"lease ready: hugepage pool now {held} pages ({held * 2} MB, +{(held - before) * 2} MB)")
        if release_after_s is not None:
            watch(lambda: False, release_after_s)
            say(f"releasing the lease after {release_after_s:g} s (SIGTERM to each pilot, like qdel)")
            lease.release()
        else:
            say(f"holding until the pilots' own deadline ({duration_s:g} s after they started)")
        done = watch(lambda: lease.count("unreserved") == nodes, duration_s + grace_s + 30)
        codes = site.provider.wait(lease.job_id, grace_s + 5)
        report_new()
        after = _pool_pages()
        say(f"pilots exited with {codes}; logs in {site.log_dir}")
        say(f"hugepage pool after: {after} pages ({after * 2} MB)")
        if done and after == before and all(code == 0 for code in codes):
            say("lease released; the node's hugepages are back where they started")
            return 0
        say("FAILED: " + ("pool not restored" if after != before else "the lease did not end cleanly"))
        return 1
    finally:
        site.close()
