#!/usr/bin/env python3
"""A time-accelerated soak of the service's store (issue 32): days of leases and heartbeats, the file's size by day.

Run from the repository root::

    .venv/bin/python bench/bench_store_soak.py [--days 21] [--json FILE]

Each simulated day, ``--leases`` leases of ``--hosts`` hosts each are recorded through the real store (SQLite on
this machine's disk, the service's own writer thread and SQL): every host says ``reserved``, then
``--heartbeats`` heartbeats of the largest size the protocol allows (256 VM names and a 4 KiB message, ~21 KB:
a node flooding at its rate limit, scaled down to what a day of this bench can write), then ``unreserved``;
each lease ends that simulated day. One more lease lives through the whole soak, its one host flooding every
day. After each day one compaction pass runs at that day's end with the service's defaults scaled to the
soak (``--retention-days``, ``--host-store-mb``), as the service's compactor does every minute.

It runs twice: bounded (as the service runs now) and unbounded (no retention, no cap: the store before issue
32), and prints the store's size (the database file and its WAL) at the end of each day for both.
Only the day's clock is simulated (``ended_at`` and the compaction's now); every write is real.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid

from workspace_common.protocol import Notification, format_time, utc_now
from service_adapter.store import Store

DAY_S = 86400.0
BIG = {"vms": tuple(f"vm-{i:03d}-" + "x" * 56 for i in range(256)), "message": "m" * 4096}


def notification(slot: str, host: str, seq: int, state: str, **fields) -> Notification:
    return Notification(slot=slot, host=host, state=state, seq=seq, sent_at=format_time(utc_now()), memory_mb=64,
                        **fields)


def record(store: Store, n: Notification) -> None:
    verdict = store.record_notification(n, n.to_json(), n.host).result()
    if verdict.name != "ACCEPTED":
        raise SystemExit(f"{n.slot}/{n.host} seq {n.seq}: {verdict.name}")


def size_mb(path: str) -> float:
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p)) / 1e6


def soak(directory: str, args, bounded: bool) -> list[dict]:
    path = os.path.join(directory, f"{'bounded' if bounded else 'unbounded'}.sqlite")
    store = Store(path, synchronous="NORMAL",
                  host_store_bytes=int(args.host_store_mb * 1024 * 1024) if bounded else None)
    start = time.time()
    live, live_seq = str(uuid.uuid4()), 0
    store.create_lease("live", live, owner="bench", nodes=1, memory_mb=64, duration_s=args.days * DAY_S, now=start)
    days = []
    try:
        for day in range(args.days):
            day_end = start + (day + 1) * DAY_S
            if day == 0:
                live_seq += 1
                record(store, notification(live, "live-node", live_seq, "reserved"))
            for _ in range(args.heartbeats):
                live_seq += 1
                record(store, notification(live, "live-node", live_seq, "heartbeat", **BIG))
            for index in range(args.leases):
                lease, slot = f"d{day}-{index}", str(uuid.uuid4())
                store.create_lease(lease, slot, owner="bench", nodes=args.hosts, memory_mb=64, duration_s=DAY_S,
                                   now=day_end - DAY_S)
                for h in range(args.hosts):
                    host = f"node{h}"
                    record(store, notification(slot, host, 1, "reserved"))
                    for seq in range(2, args.heartbeats + 2):
                        record(store, notification(slot, host, seq, "heartbeat", **BIG))
                    record(store, notification(slot, host, args.heartbeats + 2, "unreserved"))
                store.transition_lease(lease, "pending", "released", "the day's lease ended", now=day_end - 60,
                                       ended=True)
            compacted = store.compact(args.retention_days * DAY_S, day_end) if bounded else (0, 0, 0, 0)
            rows = store.read(lambda conn: conn.execute("SELECT COUNT(*) FROM notifications").fetchone()[0])
            days.append({"day": day + 1, "store_mb": round(size_mb(path), 1), "notifications": rows,
                         "leases_compacted": compacted[0]})
            if not args.quiet:
                print(f"{'bounded' if bounded else 'unbounded'} day {day + 1}: {days[-1]['store_mb']} MB, "
                      f"{rows} notifications", flush=True)
    finally:
        store.close()
    return days


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=21, help="simulated days (default 21)")
    parser.add_argument("--leases", type=int, default=4, help="leases that start and end each day (default 4)")
    parser.add_argument("--hosts", type=int, default=4, help="hosts per lease (default 4)")
    parser.add_argument("--heartbeats", type=int, default=100,
                        help="largest-size heartbeats per host per day (default 100, ~2 MB)")
    parser.add_argument("--retention-days", type=float, default=3, help="[service] retention, in days (default 3)")
    parser.add_argument("--host-store-mb", type=float, default=1, help="[service] host_store_mb (default 1)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-store-soak-") as directory:
        bounded = soak(directory, args, bounded=True)
        unbounded = soak(directory, args, bounded=False)
    print("| day | bounded store (MB) | notifications kept | unbounded store (MB) | notifications |")
    print("|---|---|---|---|---|")
    for b, u in zip(bounded, unbounded):
        print(f"| {b['day']} | {b['store_mb']} | {b['notifications']} | {u['store_mb']} | {u['notifications']} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"options": vars(args), "bounded": bounded, "unbounded": unbounded}, handle, indent=1)


if __name__ == "__main__":
    main()
