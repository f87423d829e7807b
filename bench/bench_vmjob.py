#!/usr/bin/env python3
"""Benchmark of a VM job: start to the command's first line, in a VM of its own vs the same command without one.

Run from the repository root, as root::

    .venv/bin/python bench/bench_vmjob.py [--rounds N] [--backend hugepages|none] [--json FILE]

Each round runs, as new processes and for real, ``workspace-vmjob run --image test --memory 128 --
sh -c 'echo first; ...'`` (libvirtd with QEMU under TCG, the test guest from scripts/build-test-guest.sh,
virtiofsd for the shares, the VM's memory from the hugepage pool) and the same ``sh -c`` without a VM,
and times each from the spawn to the first line on its stdout and to its exit. The wrapper's log gives the
split, in seconds since its ``main()``: image ready (the list read, the files hashed), memory taken,
domain created (run directory, two virtiofsd, createXML), guest started (the guest wrote
control/started: its boot), first output, status, node restored. Both runs are outside Slurm: a job's
dispatch (0.3-0.9 s here, BENCHMARKS.md) is the same with or without the VM. The pool is checked
back at its start after every round.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.support.libvirt_daemon import GUEST_DIR, LibvirtDaemon, guest_files  # noqa: E402

NR_HUGEPAGES = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
VMJOB = os.path.join(os.path.dirname(sys.executable), "workspace-vmjob")
COMMAND = ["sh", "-c", "echo first; echo second"]
PHASES = ("image_ready", "memory_taken", "domain_created", "guest_started", "first_output", "status",
          "domain_destroyed", "shares_stopped", "restored")


def pool() -> int:
    with open(NR_HUGEPAGES, encoding="ascii") as handle:
        return int(handle.read())


def write_config(directory: str, backend: str) -> str:
    files = guest_files()
    images = os.path.join(directory, "images.conf")
    with open(images, "w", encoding="utf-8") as handle:
        handle.write(f"[test]\nkernel = vmlinuz\nkernel_sha256 = {files.kernel_sha256}\ninitrd = initrd.img\n"
                     f"initrd_sha256 = {files.initrd_sha256}\ncmdline = console=ttyS0 panic=-1 quiet\n")
    path = os.path.join(directory, "pilot.conf")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"[memory]\nbackend = {backend}\nminmem = 512\n[journal]\ndir = {directory}/journal\n"
                     f"[libvirt]\nuri = qemu:///system\n[vms]\nimage_dir = {GUEST_DIR}\n"
                     f"console_dir = {directory}/consoles\nvirt_type = qemu\n[vmjob]\nimages = {images}\n"
                     f"run_dir = {directory}/run\n[logging]\ndir = {directory}/logs\n")
    return path


def timed(argv: list[str], cwd: str) -> tuple[float, float, int, str]:
    """(seconds to the first stdout line, seconds to exit, exit status, stdout) of a new process."""
    t0 = time.monotonic()
    process = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first, out = None, b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            selector.select()
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break
            if first is None and b"\n" in out + chunk:
                first = time.monotonic() - t0
            out += chunk
    status = process.wait()
    return first if first is not None else float("nan"), time.monotonic() - t0, status, out.decode()


def wrapper_moments(log_dir: str) -> dict[str, float]:
    """The last ``vmjob timings`` line of the newest wrapper log."""
    logs = sorted((os.path.join(log_dir, n) for n in os.listdir(log_dir) if re.fullmatch(r"vmjob-vmjob\d+\.log", n)),
                  key=os.path.getmtime)
    with open(logs[-1], encoding="utf-8") as handle:
        lines = [line for line in handle if "vmjob timings" in line]
    return json.loads(lines[-1].split("vmjob timings ", 1)[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--backend", choices=("hugepages", "none"), default="hugepages")
    parser.add_argument("--json", metavar="FILE", help="write every round's numbers here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_vmjob: needs root (libvirtd, hugepages)", file=sys.stderr)
        return 2
    directory = tempfile.mkdtemp(prefix="bench-vmjob-")
    daemon = LibvirtDaemon(directory).start()
    rounds = []
    try:
        config = write_config(directory, args.backend)
        work = os.path.join(directory, "work")
        os.mkdir(work)
        start_pool = pool()
        for index in range(args.rounds):
            vm_first, vm_total, vm_status, vm_out = timed(
                [VMJOB, "run", "--config", config, "--image", "test", "--memory", "128", "--", *COMMAND], work)
            if (vm_status, vm_out) != (0, "first\nsecond\n"):
                raise SystemExit(f"round {index}: the VM job ended {vm_status} with {vm_out!r}")
            moments = wrapper_moments(os.path.join(directory, "logs"))
            bare_first, bare_total, _, _ = timed(COMMAND, work)
            if pool() != start_pool:
                raise SystemExit(f"round {index}: the pool is at {pool()} pages, not {start_pool}")
            rounds.append({"vm_first_s": vm_first, "vm_total_s": vm_total, "bare_first_s": bare_first,
                           "bare_total_s": bare_total, **{f"at_{k}_s": moments.get(k) for k in PHASES}})
            print(f"round {index + 1}: VM job first line {vm_first * 1000:.0f} ms, exit {vm_total * 1000:.0f} ms; "
                  f"without a VM {bare_first * 1000:.1f} ms", flush=True)
    finally:
        daemon.stop()
    med = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    print(f"\n{args.rounds} rounds, backend {args.backend}, medians:")
    print(f"  start to first line: VM job {med['vm_first_s'] * 1000:.0f} ms, without a VM "
          f"{med['bare_first_s'] * 1000:.1f} ms")
    print(f"  start to exit:       VM job {med['vm_total_s'] * 1000:.0f} ms, without a VM "
          f"{med['bare_total_s'] * 1000:.1f} ms")
    previous = 0.0
    print("  the VM job's split (wrapper's main() = 0):")
    for phase in PHASES:
        at = med[f"at_{phase}_s"]
        print(f"    {phase:<15} at {at * 1000:7.0f} ms  (+{(at - previous) * 1000:.0f} ms)")
        previous = at
    print(f"  before main() (interpreter, imports): {(med['vm_first_s'] - med['at_first_output_s']) * 1000:.0f} ms "
          "+ the poll's share of the first line")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"rounds": rounds, "median": med, "backend": args.backend}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
