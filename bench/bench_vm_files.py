#!/usr/bin/env python3
"""Benchmark of what a VM's own files add to its start (issue 31): the overlay under the node's disk budget and
the copies of its kernel and initrd.

Run from the repository root (qemu-img installed: ``scripts/bootstrap.sh --vm``; the test guest built)::

    .venv/bin/python bench/bench_vm_files.py [--vms N]

For N VMs in a row, in a temporary directory on this machine's disk: the overlay of a 1 GiB raw image
(:meth:`pilot.vm.overlay.DiskBudget.make`: the budget's check under the node's flock, then
``qemu-img create -u``) and the copies of ``.cache/test-guest``'s kernel and initrd
(:meth:`~pilot.vm.overlay.DiskBudget.copy`). Prints the median and the maximum of each, in ms.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from pilot.vm.overlay import DiskBudget

GUEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "test-guest")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=20, help="VMs whose files are made in a row (default 20)")
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="bench-vm-files-")
    try:
        image = os.path.join(directory, "disk.raw")
        with open(image, "wb") as handle:
            handle.truncate(1 << 30)
        budget = DiskBudget(os.path.join(directory, "vm-files"), reserve_mb=0)
        steps = {
            "overlay of a 1 GiB raw image": lambda name: budget.make(name, image, "raw"),
            "kernel copy": lambda name: budget.copy(name, "kernel", os.path.join(GUEST, "vmlinuz")),
            "initrd copy": lambda name: budget.copy(name, "initrd", os.path.join(GUEST, "initrd.img")),
        }
        times: dict[str, list[float]] = {step: [] for step in steps}
        for index in range(args.vms):
            for step, make in steps.items():
                began = time.perf_counter()
                make(f"wp-bench-vm{index}")
                times[step].append((time.perf_counter() - began) * 1000)
        for step, taken in times.items():
            print(f"{step}: median {statistics.median(taken):.1f} ms, max {max(taken):.1f} ms ({args.vms} VMs)")
    finally:
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
