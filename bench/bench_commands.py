#!/usr/bin/env python3
"""Command latency: from the service queuing a command to the pilot's poller handing it on, for 1 and 200 pilots.

The issue's measure: "Command latency (queued on the service to seen by the
pilot) with 1 pilot and with 200 connected pilots: median and 95th
percentile. Target: under 20 ms median at 200 pilots, where the original
paid one SSH process per node."

What runs, for each N in ``--pilots`` and each store mode in ``--synchronous``:

* **The service** (this process): a real :class:`service_adapter.store.Store`
  on disk (a temporary directory), ``make_app`` from
  ``service_adapter.receiver`` served by ``ReceiverThread`` on 127.0.0.1,
  real digest verification (SHA-256, one pilot account). One lease of N
  nodes with its one slot, written with ``Store.create_lease``; the lease is
  moved ``pending -> ready`` with ``Store.transition_lease`` once every
  host has reserved (standing in for the lease manager, which is not run:
  there is no LRM here).
* **N pilots** spread over ``--processes`` worker processes (N = 1: one
  process). Each pilot is the pilot's own code: a ``pilot.notifier.Notifier``
  (its ``requests.Session`` with ``HTTPDigestAuth`` and its HA1 key) sends a
  signed ``reserved`` over HTTP, so every (slot, host) is a held slot on the
  service; then a ``pilot.poller.CommandPoller`` on that session
  long-polls ``wait=--wait`` seconds. ``on_commands`` takes ``time.time()``
  first thing and sends it to this process on a multiprocessing queue.
* **Warm-up**: one ``start-vm`` for every host in one ``Store.start_vms``
  (so every pilot has answered once and holds a warm connection), then
  ``--warmup`` single samples; none of these is counted.
* **Single samples** (``--samples``): pick a random pilot, take
  ``time.time()``, call ``Store.stop_vm`` on that host's VM (the operator
  API's own call: the stop-vm is inserted and the VM set ``stopping`` in one
  transaction; after the commit the store wakes the long-poll), and wait
  until that pilot reports the command seen. Latency = seen - queued.
  Between samples the bench waits a random 50-300 ms (so the pilot's next
  poll is normally parked again, and the samples spread over more than one
  poll cycle, including the moments when many polls expire together).
* **Bursts** (N > 1, ``--bursts``): one ``Store.start_vms`` that queues one
  start-vm for every host in one transaction ("start a VM on every node
  of the lease"); per-pilot latency from the one queue time.
* **Idle CPU** (N > 1, first store mode): the service's threads' CPU over
  ``--idle`` seconds with N pilots parked and no command queued (one full
  poll cycle at the default: every poll expires and is renewed once).

The breakdown comes from a ``CommandBoard`` subclass that notes the time
of each wake: ``wake()`` is called by the store's writer right after the
commit (queued -> committed: hand-off to the writer thread, the
transaction and its fsync) and ``_wake_on_loop`` when the receiver's loop
runs it (committed -> on the loop); the rest (loop -> seen) is the poll's
re-read, the signed answer, HTTP on 127.0.0.1 and the pilot checking the
signature and parsing the commands.

Run from the repository root::

    .venv/bin/python bench/bench_commands.py [--pilots 1,200] [--samples 200] [--processes 4] [--json FILE]

All traffic is on 127.0.0.1. Every process started here is stopped by its
pid; the store is closed and the temporary directory removed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import random
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.bench_slice import machine, stop_process, write_json  # noqa: E402

REALM = "workspace-pilot"
LEASE = "bench-commands"
SLOT = "bench-commands-slot"
#: What each pilot reports reserving, and each VM's size: room for every VM the bench queues.
HOST_MB = 65536
VM_MB = 16
IMAGE = ("/var/lib/workspace-pilot/images/bench.qcow2", "0" * 64)  # never opened: no VM is run
TARGET_MEDIAN_MS = 20.0
#: Seconds to wait for a child to come up, a pilot to see a sample, a burst to be seen by all.
CHILD_TIMEOUT_S = 60.0
SAMPLE_TIMEOUT_S = 10.0
GAP_S = (0.05, 0.30)


def host_name(index: int) -> str:
    """The host name of the ``index``-th pilot."""
    return f"node{index:03d}"


# -- the pilots' side (child processes) ---------------------------------------------------------


def pilot_worker(indices: list[int], url: str, keys: tuple[str, str], wait_s: float, events, control) -> None:
    """Child process: one real pilot channel per index (Notifier: signed ``reserved``; CommandPoller).

    Puts ``("ready", pid, count)`` on ``events`` once every pilot's
    ``reserved`` was accepted and its poller runs, ``("seen", index,
    [(id, op, vm), ...], time)`` for each answer with commands, and
    ``("gone", ...)`` / ``("error", ...)`` if something goes wrong. Stops when
    ``control`` says so (or closes). ``keys`` is (the site key, the slot's secret): each pilot derives
    its own node's key and (slot, host) key from them, as the service does.
    """
    from pilot.credentials import PilotCredentials
    from pilot.notifier import Notifier, Outcome
    from pilot.poller import CommandPoller
    from workspace_common.protocol import node_key, slot_key

    site_key, slot_secret = keys

    def credentials(host: str) -> PilotCredentials:
        key = node_key(site_key, host)
        return PilotCredentials(host, key, slot_key(key, SLOT, slot_secret))

    def seen(index: int):
        def on_commands(commands) -> None:
            at = time.time()  # first thing: this is "seen by the pilot"
            events.put(("seen", index, [(c.id, c.op, c.vm_name) for c in commands], at))
        return on_commands

    def gone(index: int):
        return lambda reason: events.put(("gone", index, reason))

    try:
        notifiers = [(index, Notifier(url, credentials(host_name(index)), SLOT, host_name(index))) for index in indices]
        deliveries = [n.notify("reserved", HOST_MB, deliver_within=30) for _, n in notifiers]
        for (index, _), delivery in zip(notifiers, deliveries):
            if delivery.wait(35) is not Outcome.DELIVERED:
                raise RuntimeError(f"{host_name(index)}: reserved {delivery.outcome} {delivery.status} {delivery.detail}")
        pollers = []
        for index, notifier in notifiers:
            poller = CommandPoller(notifier.session, url, notifier.key, SLOT, host_name(index),
                                   on_commands=seen(index), on_gone=gone(index), wait_s=wait_s)
            poller.start()
            pollers.append(poller)
        events.put(("ready", os.getpid(), len(pollers)))
        try:
            control.recv()
        except EOFError:
            pass
        for poller in pollers:
            poller.stop()
    except BaseException as exc:
        events.put(("error", os.getpid(), repr(exc)))
        raise


# -- the service's side (this process) ----------------------------------------------------------


def timed_board_class():
    """A CommandBoard that notes when each wake left the store's writer and when the loop ran it."""
    from service_adapter.commandboard import CommandBoard

    class TimedBoard(CommandBoard):
        def __init__(self):
            super().__init__()
            self.committed: list[tuple[float, frozenset]] = []  # (time, targets) per wake() from the writer
            self.on_loop: list[tuple[float, frozenset]] = []
            self.polls_started = 0  # every poll that reached the board (after digest and slot checks)

        def wake(self, targets):
            targets = frozenset(targets)
            self.committed.append((time.time(), targets))
            super().wake(targets)

        def _wake_on_loop(self, targets):
            self.on_loop.append((time.time(), frozenset(targets)))
            super()._wake_on_loop(targets)

        def poll_started(self, target):
            self.polls_started += 1
            return super().poll_started(target)

        def clear(self) -> None:
            self.committed.clear()
            self.on_loop.clear()

        def first(self, records, target, since: float) -> float | None:
            return next((at for at, targets in list(records) if at >= since and target in targets), None)

    return TimedBoard


class Bench:
    """One configuration: a service with ``pilots`` pilots in ``processes`` worker processes."""

    def __init__(self, ctx, pilots: int, processes: int, synchronous: str, wait_s: float):
        from service_adapter.digest import DigestVerifier
        from service_adapter.nodekeys import NodeAccounts, new_site_key
        from service_adapter.receiver import ReceiverThread, make_app
        from service_adapter.store import Store

        self.ctx = ctx
        self.pilots = pilots
        self.processes = max(1, min(processes, pilots))
        self.synchronous = synchronous
        self.wait_s = wait_s
        self.hosts = [host_name(i) for i in range(pilots)]
        self.workdir = tempfile.mkdtemp(prefix="bench-commands-")
        self.site_key = new_site_key()
        self.workers: list = []
        self.controls: list = []
        self.events = ctx.Queue()
        self.store = Store(os.path.join(self.workdir, "service.sqlite"), synchronous=synchronous)
        self.board = timed_board_class()()
        verifier = DigestVerifier(REALM, NodeAccounts(self.site_key, REALM))
        self.receiver = ReceiverThread(make_app(self.store, verifier, board=self.board), host="127.0.0.1", port=0)
        self.url = self.receiver.start()
        self.store.create_lease(LEASE, SLOT, owner="bench", nodes=pilots, memory_mb=HOST_MB, duration_s=3600,
                                now=time.time(), reason="bench: no pilot job, the pilots are started by the bench")
        self.spread: list[int] = []
        self.late: list = []  # events that arrived while waiting for another

    # -- set-up and tear-down ----------------------------------------------------------------

    def start_pilots(self) -> float:
        """Start the worker processes; returns seconds until every host reserved and has a poll parked."""
        started = time.monotonic()
        chunks = [list(range(self.pilots))[p::self.processes] for p in range(self.processes)]
        self.spread = [len(chunk) for chunk in chunks]
        for number, chunk in enumerate(chunks):
            mine, theirs = self.ctx.Pipe()
            worker = self.ctx.Process(target=pilot_worker, name=f"pilots{number}",
                                      args=(chunk, self.url, (self.site_key, self.store.slot_secret(SLOT)),
                                            self.wait_s, self.events, theirs))
            worker.start()
            theirs.close()
            self.workers.append(worker)
            self.controls.append(mine)
        ready = 0
        while ready < len(self.workers):
            event = self.events.get(timeout=CHILD_TIMEOUT_S)
            if event[0] == "ready":
                ready += 1
            else:
                raise RuntimeError(f"pilot process: {event}")
        moved = self.store.transition_lease(LEASE, "pending", "ready", f"all {self.pilots} pilots reserved (bench)",
                                            now=time.time(), ready_at=time.time())
        if not moved:
            raise RuntimeError("the lease did not move pending -> ready")
        self.wait_parked()
        return time.monotonic() - started

    def wait_parked(self, timeout: float = CHILD_TIMEOUT_S) -> None:
        """Until every host has a poll open on the service (the board's heartbeat says silent for 0 s)."""
        deadline = time.monotonic() + timeout
        while any(self.board.silent_for((SLOT, host)) > 0 for host in self.hosts):
            if time.monotonic() > deadline:
                missing = [h for h in self.hosts if self.board.silent_for((SLOT, h)) > 0]
                raise RuntimeError(f"{len(missing)} pilot(s) have no poll open after {timeout:g} s: {missing[:5]}")
            time.sleep(0.01)  # a bench: the board has no "all parked" event to wait on

    def close(self) -> dict:
        """Stop the pilots (by pid), the receiver and the store; remove the directory. Returns timings."""
        timings = {}
        started = time.monotonic()
        for control in self.controls:
            try:
                control.send("stop")
            except OSError:
                pass
            control.close()
        for worker in self.workers:
            if worker.pid is not None:
                stop_process(worker)
        timings["pilots_stopped_s"] = time.monotonic() - started
        started = time.monotonic()
        self.receiver.stop()
        timings["receiver_stopped_s"] = time.monotonic() - started
        self.store.close()
        self.events.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return timings

    # -- measuring ----------------------------------------------------------------------------

    def next_seen(self, timeout: float):
        """The next "seen" event (others raise), or None on timeout."""
        try:
            event = self.events.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None
        if event[0] != "seen":
            raise RuntimeError(f"pilot process: {event}")
        return event

    def wait_for(self, wanted: dict[int, tuple[str, str]], timeout: float) -> dict[int, float]:
        """Seen times of ``wanted`` ({pilot index: (op, vm)}); events for others are kept in ``late``."""
        seen: dict[int, float] = {}
        deadline = time.monotonic() + timeout
        while len(seen) < len(wanted):
            event = self.next_seen(deadline - time.monotonic())
            if event is None:
                break
            _, index, commands, at = event
            if index in wanted and any((op, vm) == wanted[index] for _, op, vm in commands):
                seen.setdefault(index, at)
            else:
                self.late.append(event)
        return seen

    def start_everywhere(self, label: str) -> dict:
        """One Store.start_vms with a start-vm for every host (one transaction); per-pilot latency (ms)."""
        from workspace_common.protocol import ImageFile, VmSpec

        image = ImageFile(*IMAGE)
        wanted = {i: ("start-vm", f"{label}-{i:03d}") for i in range(self.pilots)}
        requests = [(VmSpec(vm, VM_MB, disk=image), self.hosts[i]) for i, (_, vm) in wanted.items()]
        self.board.clear()
        queued = time.time()
        self.store.start_vms(LEASE, requests, overhead_mb=0, now=queued)
        returned = time.time()
        seen = self.wait_for(wanted, CHILD_TIMEOUT_S)
        latencies = sorted((at - queued) * 1000 for at in seen.values())
        committed = self.board.first(self.board.committed, (SLOT, self.hosts[0]), queued)
        return {
            "pilots": self.pilots,
            "seen": len(seen),
            "missed": self.pilots - len(seen),
            "latency_ms": stats(latencies) if latencies else None,
            "all_seen_ms": latencies[-1] if len(seen) == self.pilots else None,
            "queued_to_committed_ms": (committed - queued) * 1000 if committed else None,
            "start_vms_call_ms": (returned - queued) * 1000,
        }

    def sample(self, rng: random.Random) -> dict | None:
        """One single command (Store.stop_vm) to a random pilot; None if it was not seen in time."""
        index = rng.randrange(self.pilots)
        host, vm = self.hosts[index], f"warm-{index:03d}"
        target = (SLOT, host)
        self.board.clear()
        queued = time.time()
        self.store.stop_vm(LEASE, vm, force=False, now=queued)
        returned = time.time()
        seen = self.wait_for({index: ("stop-vm", vm)}, SAMPLE_TIMEOUT_S)
        if index not in seen:
            return None
        committed = self.board.first(self.board.committed, target, queued)
        on_loop = self.board.first(self.board.on_loop, target, queued)
        at = seen[index]
        return {
            "latency_ms": (at - queued) * 1000,
            "stop_vm_call_ms": (returned - queued) * 1000,
            "queued_to_committed_ms": (committed - queued) * 1000 if committed else None,
            "committed_to_loop_ms": (on_loop - committed) * 1000 if committed and on_loop else None,
            "loop_to_seen_ms": (at - on_loop) * 1000 if on_loop else None,
        }

    def cpu_window(self, seconds: float | None, work=None) -> dict:
        """CPU seconds of the service's threads and of the pilot processes over ``work()`` or ``seconds`` idle."""
        import psutil

        me = psutil.Process()
        loop_tid = self.receiver._thread.native_id  # the receiver's event loop thread
        writer_tid = self.store._writer.native_id  # the store's writer thread
        workers = [psutil.Process(w.pid) for w in self.workers]

        def snapshot():
            threads = {t.id: t.user_time + t.system_time for t in me.threads()}
            own = me.cpu_times()
            return (threads.get(loop_tid, 0.0), threads.get(writer_tid, 0.0), own.user + own.system,
                    sum(w.cpu_times().user + w.cpu_times().system for w in workers), self.board.polls_started)

        before, started = snapshot(), time.monotonic()
        result = work() if work is not None else time.sleep(seconds)
        after, wall = snapshot(), time.monotonic() - started
        loop_s, writer_s, process_s, pilots_s, polls = (a - b for a, b in zip(after, before))
        return {
            "wall_s": wall,
            "polls_started": polls,
            "receiver_loop_cpu_s": loop_s,
            "store_writer_cpu_s": writer_s,
            "service_process_cpu_s": process_s,
            "pilot_processes_cpu_s": pilots_s,
            "receiver_loop_pct_of_core": 100 * loop_s / wall,
            "service_process_pct_of_core": 100 * process_s / wall,
            "pilot_processes_pct_of_core": 100 * pilots_s / wall,
            "result": result,
        }


def stats(values: list[float]) -> dict:
    """Count, median, p95 (inclusive method), p90, mean, min and max of ``values``."""
    ordered = sorted(values)
    if len(ordered) >= 2:
        cuts = statistics.quantiles(ordered, n=20, method="inclusive")
        p90, p95 = cuts[17], cuts[18]
    else:
        p90 = p95 = ordered[0]
    return {"runs": len(ordered), "median": statistics.median(ordered), "p90": p90, "p95": p95,
            "mean": statistics.fmean(ordered), "min": ordered[0], "max": ordered[-1]}


def run_config(ctx, pilots: int, processes: int, synchronous: str, args, idle: bool) -> dict:
    """Set up one configuration, warm up, measure, tear down; the results."""
    rng = random.Random(f"{pilots}-{synchronous}")
    bench = Bench(ctx, pilots, processes, synchronous, args.wait)
    out: dict = {"pilots": pilots, "synchronous": synchronous, "wait_s": args.wait}
    try:
        out["setup_s"] = bench.start_pilots()
        out["processes"] = bench.spread
        first = bench.start_everywhere("warm")  # cold: first command of every pilot; not counted
        out["first_start_vm_everywhere"] = first
        if first["missed"]:
            raise RuntimeError(f"{first['missed']} pilot(s) never saw their first start-vm")
        bench.wait_parked()
        for _ in range(args.warmup):
            bench.sample(rng)
            time.sleep(rng.uniform(*GAP_S))
        bench.late.clear()
        if idle and args.idle > 0:
            bench.wait_parked()
            out["idle_cpu"] = bench.cpu_window(args.idle)
            del out["idle_cpu"]["result"]

        def singles():
            done, lost = [], 0
            for _ in range(args.samples):
                time.sleep(rng.uniform(*GAP_S))
                sample = bench.sample(rng)
                if sample is None:
                    lost += 1
                else:
                    done.append(sample)
            return done, lost

        window = bench.cpu_window(None, singles)
        done, lost = window.pop("result")
        out["sampling_cpu"] = window
        out["lost"] = lost
        out["late_events"] = len(bench.late)
        out["samples"] = done
        for key in ("latency_ms", "stop_vm_call_ms", "queued_to_committed_ms", "committed_to_loop_ms",
                    "loop_to_seen_ms"):
            values = [s[key] for s in done if s[key] is not None]
            out[key] = stats(values) if values else None
        if pilots > 1 and args.bursts > 0:
            def bursts():
                done = []
                for number in range(args.bursts):
                    bench.wait_parked()
                    time.sleep(rng.uniform(*GAP_S))
                    done.append(bench.start_everywhere(f"b{number}"))
                return done

            window = bench.cpu_window(None, bursts)
            out["bursts"] = window.pop("result")
            out["bursts_cpu"] = window
    finally:
        out["teardown"] = bench.close()
    return out


# -- report -------------------------------------------------------------------------------------


def print_table(results: dict) -> None:
    """The stdout table."""
    print()
    print(f"command latency, Store queues -> CommandPoller.on_commands; long-poll wait {results['wait_s']:g} s; "
          f"target < {TARGET_MEDIAN_MS:g} ms median at 200 pilots")
    header = (f"{'pilots':>6} {'processes':<16} {'store':<6} {'samples':>7} {'median':>8} {'p95':>8} {'max':>8}"
              f" {'->commit':>9} {'->loop':>7} {'->seen':>7} {'lost':>4}")
    print(header)
    print("-" * len(header))
    for entry in results["runs"]:
        lat = entry["latency_ms"]
        counts = entry["processes"]
        spread = f"{len(counts)} x {counts[0]}" if len(set(counts)) == 1 else f"{len(counts)}: {','.join(map(str, counts))}"
        print(f"{entry['pilots']:>6} {spread:<16} {entry['synchronous']:<6} {lat['runs']:>7} {lat['median']:>5.2f} ms"
              f" {lat['p95']:>5.2f} ms {lat['max']:>5.1f} ms {entry['queued_to_committed_ms']['median']:>6.2f} ms"
              f" {entry['committed_to_loop_ms']['median']:>4.2f} ms {entry['loop_to_seen_ms']['median']:>4.2f} ms"
              f" {entry['lost']:>4}")
    print("  (->commit, ->loop, ->seen: medians of queued->committed, committed->receiver loop, loop->pilot saw it)")
    for entry in results["runs"]:
        call = entry["stop_vm_call_ms"]
        print(f"  {entry['pilots']} pilots, {entry['synchronous']}: Store.stop_vm() call median {call['median']:.2f} ms, "
              f"p95 {call['p95']:.2f} ms; set-up {entry['setup_s']:.1f} s; first start-vm on every host: all seen in "
              f"{entry['first_start_vm_everywhere']['all_seen_ms']:.1f} ms")
        cpu = entry["sampling_cpu"]
        print(f"    while sampling ({cpu['wall_s']:.1f} s): receiver loop {cpu['receiver_loop_pct_of_core']:.1f} % of a core, "
              f"service process {cpu['service_process_pct_of_core']:.1f} %, pilot processes "
              f"{cpu['pilot_processes_pct_of_core']:.1f} %")
        if "idle_cpu" in entry:
            cpu = entry["idle_cpu"]
            print(f"    idle, {entry['pilots']} polls parked ({cpu['wall_s']:.1f} s): receiver loop "
                  f"{cpu['receiver_loop_pct_of_core']:.2f} % of a core ({cpu['receiver_loop_cpu_s']:.3f} s), "
                  f"service process {cpu['service_process_pct_of_core']:.2f} %, "
                  f"pilot processes {cpu['pilot_processes_pct_of_core']:.2f} %; {cpu['polls_started']} polls renewed")
        for number, burst in enumerate(entry.get("bursts", []), 1):
            lat = burst["latency_ms"]
            print(f"    burst {number}: start-vm to all {burst['pilots']} in one transaction: per pilot median "
                  f"{lat['median']:.1f} ms, p95 {lat['p95']:.1f} ms, last {lat['max']:.1f} ms; "
                  f"committed after {burst['queued_to_committed_ms']:.1f} ms; missed {burst['missed']}")
        if "bursts_cpu" in entry:
            cpu, count = entry["bursts_cpu"], len(entry["bursts"])
            print(f"    CPU per burst: receiver loop {cpu['receiver_loop_cpu_s'] / count * 1000:.0f} ms, store writer "
                  f"{cpu['store_writer_cpu_s'] / count * 1000:.0f} ms, pilot processes "
                  f"{cpu['pilot_processes_cpu_s'] / count * 1000:.0f} ms")
    print()


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pilots", default="1,200", help="comma-separated pilot counts (default 1,200)")
    parser.add_argument("--samples", type=int, default=200, help="single samples per configuration (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="uncounted single samples first (default 20)")
    parser.add_argument("--processes", type=int, default=4, help="pilot worker processes (default 4)")
    parser.add_argument("--wait", type=float, default=30.0, help="the pilots' long-poll wait, seconds (default 30)")
    parser.add_argument("--bursts", type=int, default=5, help="start-vm-everywhere bursts for N > 1 (default 5)")
    parser.add_argument("--idle", type=float, default=None,
                        help="seconds of idle CPU measurement for N > 1 (default: the poll wait)")
    parser.add_argument("--synchronous", default="FULL,NORMAL",
                        help="store modes to run, comma-separated (default FULL,NORMAL)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    args.pilot_counts = [int(n) for n in args.pilots.split(",") if n.strip()]
    args.modes = [m.strip().upper() for m in args.synchronous.split(",") if m.strip()]
    if args.idle is None:
        args.idle = args.wait
    if not args.pilot_counts or min(args.pilot_counts) < 1 or args.samples < 1 or args.processes < 1:
        parser.error("--pilots, --samples and --processes must be 1 or more")
    return args


def main(argv=None) -> int:
    """Run every configuration, print the table, write JSON if asked."""
    args = parse_args(argv)
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that has threads
    results: dict = {
        "machine": machine(), "command": " ".join([".venv/bin/python"] + sys.argv), "wait_s": args.wait,
        "gap_s": list(GAP_S), "warmup": args.warmup, "target_median_ms_at_200": TARGET_MEDIAN_MS, "runs": [],
    }
    started = time.monotonic()
    for pilots in args.pilot_counts:
        for number, mode in enumerate(args.modes):
            entry = run_config(ctx, pilots, args.processes, mode, args, idle=pilots > 1 and number == 0)
            lat = entry["latency_ms"]
            print(f"{pilots} pilots, store {mode}: median {lat['median']:.2f} ms, p95 {lat['p95']:.2f} ms "
                  f"({lat['runs']} samples, {entry['lost']} lost) after {time.monotonic() - started:.0f} s",
                  flush=True)
            results["runs"].append(entry)
    results["total_s"] = time.monotonic() - started
    print_table(results)
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
