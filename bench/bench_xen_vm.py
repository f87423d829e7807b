#!/usr/bin/env python3
"""A leased PV guest on a real Xen: the pilot's start of it and its lease's teardown, through a real service.

Run from the repository root after ``scripts/bootstrap.sh --xen``::

    .venv/bin/python bench/bench_xen_vm.py [--backend xen|xl] [--rounds 5] [--json FILE]

It boots the tests' Xen host (``tests.support.xen_host.XenHost``: Xen 4.17 under QEMU's software emulation,
dom0 1024 MB) and a real receiver on this machine, and per round: a real ``workspace-pilot reserve`` of
256 MB in dom0 (``tests.support.dom0site``), which reports ``reserved``; the service's ``start-vm`` for a
128 MB PV guest (dom0's kernel and the build's busybox initramfs) queued; then SIGTERM to the pilot. It
reports, ms median (min-max):

- *start-vm*: from the command's queueing to the pilot's ``vm-running`` stored (both the service's clock:
  the long poll's wake-up, the image checks, libvirt's ``createXML`` through libxl, the outcome's POST);
- *guest alive*: from the queueing until the guest's own console (xenconsoled's log in dom0) shows its
  first "alive" line, as seen from here through dom0's console (a command's round trip, about 0.3 s,
  included);
- *teardown*: from sending SIGTERM (through dom0's console) until the service stored ``unreserved``: the
  pilot destroys the guest, gives dom0 its 256 MB back and waits for the balloon to settle; within it, as
  the pilot's own log says, *destroy* (libvirt's ``destroy`` of the guest) and *give back* (the restore,
  command and settle).

Each round checks that the guest got 128 MB (``xl list``) and that dom0 is back at 1024 MB with no guest
afterwards. Everything in dom0 runs under emulation: these are not a Xen host's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support.dom0site import BOOT_MB, Dom0Site  # noqa: E402
from tests.support.service import Service  # noqa: E402
from tests.support.xen_host import XenHost  # noqa: E402


def summary(values: list[float]) -> dict:
    """Median, min and max in ms."""
    ms = sorted(v * 1000 for v in values)
    return {"median_ms": round(statistics.median(ms), 1), "min_ms": round(ms[0], 1), "max_ms": round(ms[-1], 1)}


def one_round(site: Dom0Site) -> dict:
    """One lease with one guest, started and torn down; its timings in seconds."""
    pilot, domain = site.lease_with_a_guest(256, "vm1")
    [row] = [row for row in site.service.store.commands(pilot.slot) if row.op == "start-vm"]
    if not site.guest_said(domain, "workspace-pilot xen guest alive"):
        raise SystemExit(f"the guest {domain} said nothing on its console")
    alive = time.time()
    if site.host.check(f"xl list {domain}").split()[-4] != "128":
        raise SystemExit(f"the guest {domain} does not have 128 MB")
    terminated = time.time()
    pilot.signal("TERM")
    site.wait_state(pilot.slot, "unreserved")
    unreserved = time.time()
    if pilot.exit_code() != 0 or site.host.domains() != ["Domain-0"] or site.host.balloon_mb() != BOOT_MB:
        raise SystemExit(f"the lease did not end cleanly: {pilot.output()}")
    log = pilot.output()
    destroyed = re.search(r"destroyed VM vm1 \(domain \S+\) in ([0-9.]+) ms", log)
    gave_back = re.search(r"gave 256 MB back to the host .* in ([0-9.]+) ms", log)
    if destroyed is None or gave_back is None:
        raise SystemExit(f"the pilot's log does not say how long its teardown took: {log}")
    return {"start_vm_s": row.done_at - row.created_at, "guest_alive_s": alive - row.created_at,
            "teardown_s": unreserved - terminated, "destroy_s": float(destroyed.group(1)) / 1000,
            "give_back_s": float(gave_back.group(1)) / 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("xen", "xl"), default="xen",
                        help="the pilot's memory backend: xen (libvirt's Xen driver) or xl (the command)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-xen-vm-") as workdir:
        host = XenHost(os.path.join(workdir, "host"))
        os.makedirs(host.workdir)
        host.start()
        service = Service(os.path.join(workdir, "service"))
        try:
            site = Dom0Site(host, service, pathlib.Path(workdir), backend=args.backend)
            for _ in range(args.rounds):
                rows.append(one_round(site))
        finally:
            service.close()
            host.stop()
    results = {"backend": args.backend, "rounds": args.rounds,
               "measures": {key: summary([row[key] for row in rows]) for key in rows[0]}}
    for key, measure in results["measures"].items():
        print(f"{key:>14}: {measure['median_ms']:.0f} ms ({measure['min_ms']:.0f}-{measure['max_ms']:.0f})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
