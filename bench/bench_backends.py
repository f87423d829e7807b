#!/usr/bin/env python3
"""Benchmarks of every memory backend: reserve 1 GiB and restore it, through NodeMemory.

Run from the repository root (as root for the hugepages and cgroup parts)::

    .venv/bin/python bench/bench_backends.py [--json FILE] [--quick] [--only NAME[,NAME]]

Each backend is timed through the pilot's own path, ``NodeMemory.take(1024)``
and ``NodeMemory.give_back()``, so every number includes the node lock, the
check for dead pilots' entries (a directory listing), the fsync'd journal
writes (two per take, one write and one removal per give-back), the backend's
write and the read-back that verifies it. The journal is a fresh directory
(0700) under a temporary directory on the same disk as ``/tmp``; ``minmem``
is 0 and the verify timeout 10 s. One untimed round per backend comes first
(its times are kept as "first"). Log records are discarded.

Parts (names for ``--only``):

* ``hugepages-2M``: the real 2 MiB pool (512 pages). Holds the tests' machine
  lock (``/tmp/workspace-pilot-tests.hugepages.lock``) for the whole hugepage
  run; the pool is put back to its starting size in a ``finally`` and checked.
* ``hugepages-1G``: the real 1 GiB pool (1 page), only where the kernel has it.
* ``cgroup``: a fresh cgroup v1 memory cgroup with a 4 GiB limit, removed after.
* ``xen``: libvirt-python against libvirt's test driver (a node file with a
  running Domain-0, 8 GiB max, 6 GiB current; no daemon, no hypervisor).
* ``xl``: a fake ``xl`` (the tests' Python script keeping Domain-0's MB in a
  file, run as ``python -IS``), so only the pilot's side is measured; the
  fake's own cost per call is shown too (a take or a give-back calls it three
  times: read, mem-set, read back).
* ``none``: nothing is changed; the lock and the journal remain.
* ``journal``: one fsync'd ``Journal.write`` of an entry alone, one
  ``Journal.remove``, and the node lock with the dead-pilot check alone.

Every cgroup, file and directory made here is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from pilot.node.backends import BackendError  # noqa: E402  (after the sys.path fix above)
from pilot.node.journal import Entry, Journal, MemoryRecord  # noqa: E402
from pilot.node.memory import NodeMemory  # noqa: E402
from pilot.recovery import replay_dead  # noqa: E402
from pilot.node.owner import Owner  # noqa: E402

RESERVE_MB = 1024
HUGEPAGES_ROOT = "/sys/kernel/mm/hugepages"
HUGEPAGES_LOCK = "/tmp/workspace-pilot-tests.hugepages.lock"
MEMORY_V1 = "/sys/fs/cgroup/memory"
CGROUP_LIMIT = 4 * 2**30
VERIFY_TIMEOUT_S = 10.0

#: The Nimbus pilot's 2008 Xen measurements (dom0 shrink and restore).
NIMBUS_SHRINK_MS = 743.6
NIMBUS_RESTORE_MS = 1317.2

PARTS = ("hugepages-2M", "hugepages-1G", "cgroup", "xen", "xl", "none", "journal")
LABELS = {
    "hugepages-2M": "hugepages 2 MiB (512 pages)",
    "hugepages-1G": "hugepages 1 GiB (1 page)",
    "cgroup": "cgroup v1 (4 GiB limit -> 3 GiB)",
    "xen": "xen (libvirt test driver)",
    "xl": "xl (fake xl: measures the pilot's side only)",
    "none": "none (lock + journal only)",
}

NODE_XML = """\
<node>
  <cpu><mode>fixed</mode><nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads>
       <active>2</active><mhz>2000</mhz></cpu>
  <memory>16777216</memory>
  <domain type="test">
    <name>Domain-0</name>
    <memory unit="KiB">8388608</memory>
    <currentMemory unit="KiB">6291456</currentMemory>
    <vcpu>2</vcpu>
    <os><type arch="x86_64">hvm</type></os>
  </domain>
</node>
"""



class Skipped(Exception):
    """This part cannot run on this machine; the message says why."""


# -- statistics ------------------------------------------------------------------------


from bench_slice import summarize  # noqa: E402  (the same statistics as the other benchmarks)


# -- the measurement shared by every backend ---------------------------------------------


def measure(backend, workdir: str, rounds: int) -> dict:
    """Time ``take(1024)`` and ``give_back()`` through NodeMemory, ``rounds`` times after one untimed round.

    Checks that the level and the journal end where they started.
    """
    journal = Journal(os.path.join(workdir, f"journal-{backend.name}-{uuid.uuid4().hex[:8]}"), lock_timeout=5.0)
    journal.prepare()
    memory = NodeMemory(
        journal, backend, Entry(f"bench-{uuid.uuid4()}", "benchnode", Owner.current()),
        minmem_mb=0, verify_timeout=VERIFY_TIMEOUT_S, replay=replay_dead,
    )
    start_level = backend.read()
    reserve_ms: list[float] = []
    restore_ms: list[float] = []
    first: dict = {}
    held = None
    try:
        for index in range(rounds + 1):
            started = time.perf_counter()
            held = memory.take(RESERVE_MB)
            reserved = time.perf_counter()
            memory.give_back()
            restored = time.perf_counter()
            if index == 0:
                first = {"reserve_ms": (reserved - started) * 1000, "restore_ms": (restored - reserved) * 1000}
            else:
                reserve_ms.append((reserved - started) * 1000)
                restore_ms.append((restored - reserved) * 1000)
    finally:
        if memory.held is not None:
            memory.give_back()
    end_level = backend.read()
    assert end_level == start_level, f"{backend.name}: level ended at {end_level}, started at {start_level}"
    left = journal.entries()
    assert not left, f"{backend.name}: the journal still holds {left}"
    return {
        "backend": backend.describe(),
        "memory_mb": held.memory_mb,
        "units": held.units,
        "unit": backend.unit,
        "level_start": start_level,
        "level_end": end_level,
        "first": first,
        "reserve_ms": summarize(reserve_ms),
        "restore_ms": summarize(restore_ms),
    }


# -- hugepages ---------------------------------------------------------------------------


def read_int(path: str) -> int:
    """The integer in a /proc or /sys file."""
    with open(path, encoding="ascii") as handle:
        return int(handle.read())


def write_int(path: str, value: int) -> None:
    """Write an integer to a /proc or /sys file."""
    with open(path, "w", encoding="ascii") as handle:
        handle.write(str(value))


@contextlib.contextmanager
def hugepages_machine_lock():
    """The exclusive flock the tests hold around the pool (``machine_lock("hugepages")`` in conftest)."""
    with open(HUGEPAGES_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def bench_hugepages(page_kb: int, workdir: str, rounds: int) -> dict:
    """The real pool of ``page_kb`` pages; the caller holds the machine lock. Put back in a ``finally``."""
    from pilot.node.backends.hugepages import HugepagesBackend

    pool = os.path.join(HUGEPAGES_ROOT, f"hugepages-{page_kb}kB", "nr_hugepages")
    if not os.path.exists(pool):
        raise Skipped("not on this kernel")
    if os.geteuid() != 0:
        raise Skipped("needs root")
    if not os.access(pool, os.W_OK):
        raise Skipped(f"{pool} is not writable")
    start_pages = read_int(pool)
    try:
        result = measure(HugepagesBackend(page_kb=page_kb), workdir, rounds)
    finally:
        if read_int(pool) != start_pages:
            write_int(pool, start_pages)
    end_pages = read_int(pool)
    assert end_pages == start_pages, f"{pool}: pool left at {end_pages} pages, started at {start_pages}"
    result.update(pool_start_pages=start_pages, pool_end_pages=end_pages)
    return result


# -- cgroup ------------------------------------------------------------------------------


def bench_cgroup(workdir: str, rounds: int) -> dict:
    """A fresh v1 memory cgroup with a 4 GiB limit; removed in a ``finally``."""
    from pilot.node.backends.cgroup import CgroupBackend

    if os.geteuid() != 0:
        raise Skipped("needs root (creates a cgroup)")
    if not os.path.isfile(os.path.join(MEMORY_V1, "memory.limit_in_bytes")):
        raise Skipped(f"no cgroup v1 memory hierarchy at {MEMORY_V1}")
    path = os.path.join(MEMORY_V1, f"workspace-pilot-bench-{uuid.uuid4().hex[:12]}")
    os.mkdir(path)
    try:
        write_int(os.path.join(path, "memory.limit_in_bytes"), CGROUP_LIMIT)
        result = measure(CgroupBackend(path), workdir, rounds)
        result["cgroup"] = path
        return result
    finally:
        for attempt in range(50):  # the kernel may take a moment to let go of a cgroup
            try:
                os.rmdir(path)
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or attempt == 49:
                    raise
                time.sleep(0.02)


# -- xen, xl, none -----------------------------------------------------------------------


def bench_xen(workdir: str, rounds: int) -> dict:
    """XenBackend on libvirt's test driver: Domain-0 8 GiB max, 6 GiB current."""
    try:
        import libvirt  # noqa: F401
    except ImportError as exc:
        raise Skipped(f"libvirt-python is missing ({exc})") from None
    from pilot.node.backends.xen import XenBackend

    node = os.path.join(workdir, "node.xml")
    with open(node, "w", encoding="utf-8") as handle:
        handle.write(NODE_XML)
    backend = XenBackend(uri=f"test://{os.path.abspath(node)}")
    try:
        return measure(backend, workdir, rounds)
    finally:
        backend.close()


def bench_xl(workdir: str, rounds: int) -> dict:
    """XlBackend on a fake xl (Domain-0 at 6144 MB); also times one bare call of the fake."""
    from pilot.node.backends.xl import XlBackend

    from tests.support.fakes import install_fake_xl

    directory = os.path.join(workdir, "xl")
    os.mkdir(directory)
    fake = install_fake_xl(directory, 6144)
    result = measure(XlBackend(command=fake), workdir, rounds)
    calls = []
    for _ in range(rounds):
        started = time.perf_counter()
        subprocess.run([fake, "list", "0"], stdin=subprocess.DEVNULL, capture_output=True, check=True, timeout=30)
        calls.append((time.perf_counter() - started) * 1000)
    result["fake_call_ms"] = summarize(calls)
    return result


def bench_none(workdir: str, rounds: int) -> dict:
    """NoBackend: the node lock, the dead-pilot check and the journal, nothing else."""
    from pilot.node.backends.none import NoBackend

    return measure(NoBackend(), workdir, rounds)


# -- the journal alone -------------------------------------------------------------------


def bench_journal(workdir: str, rounds: int) -> dict:
    """One fsync'd ``Journal.write`` (a ``held`` entry), one ``Journal.remove``, one lock + dead-pilot check."""
    journal = Journal(os.path.join(workdir, "journal-alone"), lock_timeout=5.0)
    journal.prepare()
    record = MemoryRecord("hugepages", {"page_kb": 2048}, "held", 512, RESERVE_MB)
    entry = Entry(f"bench-{uuid.uuid4()}", "benchnode", Owner.current(), memory=record)
    writes, removes, locks = [], [], []
    for index in range(rounds + 1):
        started = time.perf_counter()
        journal.write(entry)
        written = time.perf_counter()
        journal.remove(entry)
        removed = time.perf_counter()
        with journal.lock():
            report = replay_dead(journal, VERIFY_TIMEOUT_S)
        checked = time.perf_counter()
        assert report.clean and not report.live, report
        if index:
            writes.append((written - started) * 1000)
            removes.append((removed - written) * 1000)
            locks.append((checked - removed) * 1000)
    return {
        "entry_bytes": len(entry.to_json()),
        "write_ms": summarize(writes),
        "remove_ms": summarize(removes),
        "lock_and_check_ms": summarize(locks),
    }


# -- report ------------------------------------------------------------------------------


def machine() -> dict:
    """What the numbers were measured on (and where the journal's disk is)."""
    from bench_slice import machine as common

    return {**common(), "tmp_filesystem": filesystem_of(tempfile.gettempdir())}


def filesystem_of(path: str) -> str:
    """``device type`` of the mount that holds ``path`` (from /proc/self/mounts)."""
    path = os.path.realpath(path)
    best, found = "", "unknown"
    with contextlib.suppress(OSError), open("/proc/self/mounts", encoding="utf-8") as handle:
        for line in handle:
            device, mount, kind = line.split()[:3]
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, found = mount, f"{device} {kind} on {mount}"
    return found


def print_table(results: dict) -> None:
    """A readable table of whatever was measured."""
    print()
    head = (f"{'backend':<46} {'reserve ms':>10} {'p90':>8} {'restore ms':>11} {'p90':>8} {'N':>4}"
            f"  {'1st res/rest ms':>16}")
    print(head)
    print("-" * len(head))
    for name in PARTS:
        if name == "journal" or name not in results["backends"]:
            continue
        entry = results["backends"][name]
        if "reserve_ms" not in entry:
            print(f"{LABELS[name]:<46} {entry.get('skipped') or 'FAILED: ' + entry.get('failed', '')}")
            continue
        res, rest, first = entry["reserve_ms"], entry["restore_ms"], entry["first"]
        print(f"{LABELS[name]:<46} {res['median']:>10.2f} {res['p90']:>8.2f} {rest['median']:>11.2f} "
              f"{rest['p90']:>8.2f} {res['runs']:>4}  {first['reserve_ms']:>7.2f}/{first['restore_ms']:<8.2f}")
        if "fake_call_ms" in entry:
            call = entry["fake_call_ms"]
            print(f"{'  one call of the fake xl alone':<46} {call['median']:>10.2f} {call['p90']:>8.2f}"
                  f" {'':>11} {'':>8} {call['runs']:>4}")
    journal = results["backends"].get("journal")
    if journal:
        print()
        for key, label in (("write_ms", "journal write alone (fsync + rename + dir fsync)"),
                           ("remove_ms", "journal remove alone (unlink + dir fsync)"),
                           ("lock_and_check_ms", "node lock + dead-pilot check alone")):
            stats = journal[key]
            print(f"{label:<46} {stats['median']:>10.2f} {stats['p90']:>8.2f} ms{'':>17} {stats['runs']:>4}")
    print()
    print(f"Anchors, Nimbus pilot 2008 (Xen): {NIMBUS_SHRINK_MS} ms to shrink dom0, "
          f"{NIMBUS_RESTORE_MS} ms to restore it.")
    print("A reserve writes the journal twice (taking, held); a restore writes it once and removes it once.")
    print()


def parse_only(text: str) -> tuple[str, ...]:
    """``NAME[,NAME]`` -> the names, each one of :data:`PARTS`."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown part(s) {', '.join(unknown) or '(none)'}; known: {', '.join(PARTS)}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke test)")
    parser.add_argument("--rounds", type=int, metavar="N", help="timed rounds per backend (default 50, --quick 10)")
    parser.add_argument(
        "--only", type=parse_only, default=PARTS, metavar="NAME[,NAME]",
        help=f"run only these parts, of: {', '.join(PARTS)}",
    )
    return parser.parse_args(argv)


def run_part(name: str, workdir: str, rounds: int) -> dict:
    """One part; a skip or a backend failure becomes a result, not a crash."""
    try:
        if name == "hugepages-2M":
            return bench_hugepages(2048, workdir, rounds)
        if name == "hugepages-1G":
            return bench_hugepages(1048576, workdir, rounds)
        if name == "cgroup":
            return bench_cgroup(workdir, rounds)
        if name == "xen":
            return bench_xen(workdir, rounds)
        if name == "xl":
            return bench_xl(workdir, rounds)
        if name == "none":
            return bench_none(workdir, rounds)
        return bench_journal(workdir, rounds)
    except Skipped as exc:
        return {"skipped": str(exc)}
    except BackendError as exc:
        return {"failed": str(exc)}


def main(argv=None) -> int:
    """Run the chosen parts, print the table, write JSON if asked."""
    args = parse_args(argv)
    rounds = args.rounds or (10 if args.quick else 50)
    # NodeMemory logs every take (and the none backend warns loudly each time): not part of this output.
    logging.getLogger().addHandler(logging.NullHandler())
    results: dict = {
        "machine": machine(), "quick": args.quick, "rounds": rounds, "reserve_mb": RESERVE_MB,
        "command": " ".join([".venv/bin/python"] + sys.argv), "backends": {},
    }
    workdir = tempfile.mkdtemp(prefix="bench-backends-")  # 0700
    try:
        hugepage_parts = [name for name in args.only if name.startswith("hugepages-")]
        if hugepage_parts:
            with hugepages_machine_lock():
                for name in hugepage_parts:
                    results["backends"][name] = run_part(name, workdir, rounds)
        for name in args.only:
            if not name.startswith("hugepages-"):
                results["backends"][name] = run_part(name, workdir, rounds)
    finally:
        shutil.rmtree(workdir)
    print_table(results)
    if args.json:
        from bench_slice import write_json

        write_json(args.json, results)
    failed = [name for name, entry in results["backends"].items() if "failed" in entry]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
