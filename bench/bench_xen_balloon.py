#!/usr/bin/env python3
"""Shrinking and restoring a real Xen dom0 with the pilot's ``xl`` or ``xen`` backend, command and settle apart.

Run from the repository root after ``scripts/bootstrap.sh --xen``::

    .venv/bin/python bench/bench_xen_balloon.py [--backend xl|xen] [--rounds 10] [--mb 256,1024] [--json FILE]

It boots the tests' Xen host (``tests.support.xen_host.XenHost``: Xen 4.17 under QEMU's software emulation,
dom0_mem=2048M, its balloon's maximum 3072M) and runs, in dom0, the pilot's own ``XlBackend`` and
``settle`` for each size: per round ``write`` (``xl mem-set 0 <MB>m``: the command, until it returns),
then ``settle`` (``xl list 0`` read back until the level is the target: what the pilot waits on before it
reports), then the same to restore; then one ``xl list 0`` alone (what each look of the settle costs).
With ``--backend xen`` the same through the pilot's ``XenBackend``: libvirt's Xen driver in a libvirtd
started in dom0 (``setMemoryFlags`` on Domain-0, read back with ``info()``), one connection for the run.
The balloon driver's own count (``current_kb``) is checked against the target after each settle (within
10 s: Xen counts a page as dom0's a moment before the driver does; how long it lagged is reported). The
original Nimbus pilot's 743.6 ms (shrink) and 1317.2 ms (restore) were measured on real Xen hardware in
2008; everything here runs under emulation, which inflates dom0's work (xl's start, its hypercalls, the
balloon driver's page handling) by an order of magnitude or more.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support.xen_host import BALLOON_KB, LIBVIRT_URI, XenHost  # noqa: E402

#: Run in dom0 with the pilot's code: one JSON line of timings (seconds) per round.
DOM0_SCRIPT = """
import json, sys, time
from pilot.node.backends.xen import XenBackend
from pilot.node.backends.xl import XlBackend
from pilot.node.memory import settle
mb, rounds, kind = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
backend = XlBackend() if kind == "xl" else XenBackend("{uri}")
per_mb = 1024 if backend.unit == "KiB" else 1  # the xen backend's levels are KiB, xl's MB
boot = backend.read() // per_mb

def driver_mb():
    with open("{balloon}") as handle:
        return int(handle.read()) // 1024

for _ in range(rounds):
    row = {{}}
    for phase, target in (("shrink", boot - mb), ("restore", boot)):
        started = time.monotonic()
        backend.write(target * per_mb)
        written = time.monotonic()
        level = settle(backend, target * per_mb, 120)
        settled = time.monotonic()
        # Xen counts a page as dom0's (what xl and libvirt read) a moment before the balloon driver counts it:
        # how long the driver's own count lagged behind, if at all.
        while driver_mb() != target and time.monotonic() - settled < 10:
            time.sleep(0.001)
        row[phase] = {{"command_s": written - started, "settle_s": settled - written, "level": level // per_mb,
                      "driver_mb": driver_mb(), "target": target, "driver_lag_s": time.monotonic() - settled}}
    started = time.monotonic()
    backend.read()
    row["read_s"] = time.monotonic() - started  # one read (`xl list 0`, or libvirt's info()): each look's cost
    print(json.dumps(row), flush=True)
"""


def summary(values: list[float]) -> dict:
    """Median, min and max in ms."""
    ms = sorted(v * 1000 for v in values)
    return {"median_ms": round(statistics.median(ms), 1), "min_ms": round(ms[0], 1), "max_ms": round(ms[-1], 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("xl", "xen"), default="xl",
                        help="the pilot's memory backend: xl (the command) or xen (libvirt's Xen driver)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--mb", default="256,1024", help="sizes to take from dom0, comma-separated (MB)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    sizes = [int(size) for size in args.mb.split(",")]
    results = {"backend": args.backend, "rounds": args.rounds, "dom0_mb": 2048, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-xen-") as workdir:
        host = XenHost(workdir, dom0_mb=2048, dom0_max_mb=3072, memory_mb=3584)
        host.start()
        try:
            if args.backend == "xen":
                host.start_libvirtd()
            host.write_file("/tmp/bench.py", DOM0_SCRIPT.format(balloon=BALLOON_KB, uri=LIBVIRT_URI), mode=0o644)
            for mb in sizes:
                out = host.check(f"PYTHONPATH=/opt/workspace-pilot/src:/opt/workspace-pilot/lib "
                                 f"python3 /tmp/bench.py {mb} {args.rounds} {args.backend}", timeout=60 * args.rounds)
                rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
                for row in rows:
                    for phase in ("shrink", "restore"):
                        step = row[phase]
                        if step["level"] != step["target"] or step["driver_mb"] != step["target"]:
                            raise SystemExit(f"{phase} of {mb} MB did not reach {step['target']} MB: {step}")
                results["sizes"][mb] = {
                    phase: {part: summary([row[phase][part] for row in rows])
                            for part in ("command_s", "settle_s", "driver_lag_s")}
                    | {"total": summary([row[phase]["command_s"] + row[phase]["settle_s"] for row in rows])}
                    for phase in ("shrink", "restore")
                } | {"read": summary([row["read_s"] for row in rows])}
        finally:
            host.stop()
    print(f"{'MB':>6} {'phase':>8} {'command ms (median, min-max)':>30} {'settle ms':>24} {'total ms':>24}")
    for mb, phases in results["sizes"].items():
        for phase, parts in phases.items():
            if phase == "read":
                print(f"{mb:>6} {'read':>8} {parts['median_ms']:>24.0f} ({parts['min_ms']:.0f}-{parts['max_ms']:.0f})")
                continue
            cells = [f"{p['median_ms']:.0f} ({p['min_ms']:.0f}-{p['max_ms']:.0f})"
                     for p in (parts["command_s"], parts["settle_s"], parts["total"])]
            lag = parts["driver_lag_s"]["max_ms"]
            print(f"{mb:>6} {phase:>8} {cells[0]:>30} {cells[1]:>24} {cells[2]:>24}  driver lag max {lag:.0f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
