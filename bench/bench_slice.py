#!/usr/bin/env python3
"""Benchmarks of the notification path: one notification, receiver throughput.

Reserve/restore per backend: ``bench/bench_backends.py``; kill-all: ``bench/bench_killall.py``.

Run from the repository root::

    .venv/bin/python bench/bench_slice.py [--json FILE] [--quick] [--only PART ...]

Parts:

* ``roundtrip``: one ``Notifier.notify("heartbeat", ...).wait()`` against an
  in-process receiver on 127.0.0.1 (digest SHA-256, warm session), with the
  store at ``synchronous=FULL`` (the default) and ``NORMAL``.
* ``throughput``: 16 pilot-like senders against one receiver process; once
  with 16 client processes using requests + ``HTTPDigestAuth`` (the pilot's
  own stack) and once with one asyncio process of 16 aiohttp tasks that build
  the digest header themselves (a much cheaper client, so more of the two
  cores goes to the receiver).

All traffic goes to 127.0.0.1. Every process started here is stopped by its
pid; temporary directories are removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import multiprocessing
import os
import platform
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from workspace_common.protocol import (  # noqa: E402  (after the sys.path fix above)
    NOTIFICATIONS_PATH,
    SIGNATURE_HEADER,
    Notification,
    digest_ha1,
    format_time,
    sign,
    utc_now,
)

RESERVE_MB = 1024
REALM = "workspace-pilot"
CLIENTS = 16
# How long to wait for a child process to come up or go down before giving up on it.
CHILD_TIMEOUT_S = 60.0

#: Targets from the issue, and the Nimbus pilot's 2008 Xen measurements.
TARGET_RESERVE_MS = 50.0
TARGET_RESTORE_MS = 50.0
TARGET_ROUNDTRIP_MS = 5.0
TARGET_THROUGHPUT = 1000.0


# -- statistics ------------------------------------------------------------------------


def summarize(samples: list[float]) -> dict:
    """Median, p90 (inclusive method), min, max and count of ``samples``."""
    ordered = sorted(samples)
    if len(ordered) >= 2:
        p90 = statistics.quantiles(ordered, n=10, method="inclusive")[8]
    else:
        p90 = ordered[0]
    return {
        "runs": len(ordered),
        "median": statistics.median(ordered),
        "p90": p90,
        "min": ordered[0],
        "max": ordered[-1],
    }


# -- shared receiver setup ---------------------------------------------------------------


def slot_name(index: int) -> str:
    """The slot id of the ``index``-th benchmark pilot."""
    return f"bench-slot-{index:02d}"


def host_name(index: int) -> str:
    """The host name of the ``index``-th benchmark pilot."""
    return f"node{index:02d}"


def create_store(path: str, slots: int, synchronous: str = "FULL"):
    """A store at ``path`` with one lease and ``slots`` one-node slots (left open)."""
    from service_adapter.store import Store

    store = Store(path, synchronous=synchronous)
    for index in range(slots):  # one lease per pilot, as the service makes them
        store.create_lease(f"bench-lease-{index:02d}", slot_name(index), owner="bench", nodes=1, memory_mb=64,
                           duration_s=3600, now=time.time())
        store.set_job_id(slot_name(index), f"bench-job-{index}")  # as a submitted slot has
    return store


def pilot_keys(site_key: str, store, count: int) -> list[tuple[str, str]]:
    """(node key, (slot, host) key) of each of the first ``count`` benchmark pilots, as the service derives them."""
    from workspace_common.protocol import node_key, slot_key

    keys = []
    for index in range(count):
        key = node_key(site_key, host_name(index))
        keys.append((key, slot_key(key, slot_name(index), store.slot_secret(slot_name(index)))))
    return keys


def build_receiver(store, site_key: str):
    """A started in-process ``ReceiverThread`` on 127.0.0.1 whose node accounts derive from ``site_key``."""
    from service_adapter.digest import DigestVerifier
    from service_adapter.nodekeys import NodeAccounts
    from service_adapter.receiver import ReceiverThread, make_app

    verifier = DigestVerifier(REALM, NodeAccounts(site_key, REALM))
    receiver = ReceiverThread(make_app(store, verifier), host="127.0.0.1", port=0)
    receiver.start()
    return receiver


def count_notifications(db_path: str) -> int:
    """How many notifications the store at ``db_path`` holds (read-only look)."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM notifications").fetchone()[0]
    finally:
        conn.close()


# -- 3: one notification round trip ------------------------------------------------------


def bench_roundtrip(count: int, warmup: int, synchronous: str) -> dict:
    """Time ``Notifier.notify(...).wait()`` ``count`` times after ``warmup`` untimed ones."""
    from pilot.credentials import PilotCredentials
    from pilot.notifier import Notifier, Outcome

    workdir = tempfile.mkdtemp(prefix="bench-roundtrip-")
    site_key = secrets.token_hex(32)
    store = receiver = notifier = None
    samples: list[float] = []
    try:
        store = create_store(os.path.join(workdir, "service.sqlite"), 1, synchronous)
        receiver = build_receiver(store, site_key)
        (node, sign_key), = pilot_keys(site_key, store, 1)
        notifier = Notifier(receiver.url, PilotCredentials(host_name(0), node, sign_key), slot_name(0), host_name(0))
        for index in range(warmup + count):
            started = time.perf_counter()
            delivery = notifier.notify("heartbeat", 64, deliver_within=5)
            outcome = delivery.wait(timeout=10)  # bounded: a dead sender thread must not hang the run
            elapsed = time.perf_counter() - started
            if outcome is not Outcome.DELIVERED:
                raise RuntimeError(f"notification {index + 1}: {outcome} {delivery.status} {delivery.detail}")
            if index >= warmup:
                samples.append(elapsed * 1000)
    finally:
        if notifier is not None:
            notifier.close()
        if receiver is not None:
            receiver.stop()
        if store is not None:
            store.close()
        shutil.rmtree(workdir)
    return {"synchronous": synchronous, "warmup": warmup, "roundtrip_ms": summarize(samples)}


# -- 4: receiver throughput --------------------------------------------------------------


def receiver_process(db_path: str, site_key: str, conn, stop) -> None:
    """Child process: serve the receiver on 127.0.0.1, send its URL on ``conn``, run until ``stop``."""
    from service_adapter.store import Store

    store = Store(db_path)
    receiver = build_receiver(store, site_key)
    conn.send(receiver.url)
    stop.wait()
    receiver.stop()
    store.close()
    conn.send("stopped")
    conn.close()


def notification_body(index: int, seq: int) -> bytes:
    """A heartbeat body of the ``index``-th pilot with sequence number ``seq``."""
    return Notification(
        slot=slot_name(index), host=host_name(index), state="heartbeat", seq=seq,
        sent_at=format_time(utc_now()), memory_mb=64,
    ).to_json()


def requests_client(index: int, url: str, keys: tuple[str, str], duration: float, barrier, results) -> None:
    """Child process: one pilot-like sender (requests + HTTPDigestAuth) posting for ``duration`` s.

    Sends seq 1 before the barrier (digest challenge, keep-alive connection),
    then posts signed heartbeats with increasing seq until the time is up.
    Puts ``(index, ok, statuses, seconds, cpu_seconds)`` on ``results``.
    """
    import requests
    from requests.auth import HTTPDigestAuth

    node, key = keys
    target = url + NOTIFICATIONS_PATH
    session = requests.Session()
    session.auth = HTTPDigestAuth(host_name(index), node)
    session.headers["Content-Type"] = "application/json"

    def post(seq: int) -> int:
        body = notification_body(index, seq)
        response = session.post(target, data=body, headers={SIGNATURE_HEADER: sign(key, body)}, timeout=10)
        return response.status_code

    try:
        first = post(1)
        if first != 200:
            raise RuntimeError(f"client {index}: warm-up answered {first}")
        barrier.wait(timeout=CHILD_TIMEOUT_S)
        ok, statuses, seq = 0, {}, 1
        started, cpu_started = time.perf_counter(), time.process_time()
        deadline = started + duration
        while time.perf_counter() < deadline:
            seq += 1
            status = post(seq)
            if status == 200:
                ok += 1
            else:
                statuses[status] = statuses.get(status, 0) + 1
        results.put((index, ok, statuses, time.perf_counter() - started, time.process_time() - cpu_started))
    except BaseException as exc:
        results.put((index, None, repr(exc), 0.0, 0.0))
        raise
    finally:
        session.close()


def digest_header(user: str, ha1: str, nonce: str, nc: int, uri: str) -> str:
    """A preemptive RFC 7616 SHA-256 ``Authorization`` header for a POST to ``uri``."""
    from service_adapter.digest import response_digest

    cnonce = secrets.token_hex(8)
    response = response_digest("SHA-256", ha1, nonce, f"{nc:08x}", cnonce, "POST", uri)
    return (
        f'Digest username="{user}", realm="{REALM}", nonce="{nonce}", uri="{uri}", '
        f'algorithm=SHA-256, qop=auth, nc={nc:08x}, cnonce="{cnonce}", response="{response}"'
    )


def challenge_nonce(www_authenticate: str) -> str:
    """The nonce of a ``Digest`` challenge."""
    from requests.utils import parse_dict_header

    scheme, _, params = www_authenticate.partition(" ")
    if scheme.lower() != "digest":
        raise RuntimeError(f"not a digest challenge: {www_authenticate!r}")
    return parse_dict_header(params)["nonce"]


class AiohttpPilot:
    """One pilot-like sender on a shared aiohttp session, with its own nonce, nc and seq.

    The first request goes without credentials and takes the nonce from the
    401 challenge; every later one carries a preemptive ``Authorization``
    header with the nonce count incremented.
    """

    def __init__(self, session, index: int, url: str, keys: tuple[str, str]):
        self.session = session
        self.index = index
        self.target = url + NOTIFICATIONS_PATH
        node, self.sign_key = keys
        self.ha1 = digest_ha1(host_name(index), REALM, node)
        self.nonce: str | None = None
        self.nc = 0
        self.seq = 0

    async def post(self) -> int:
        """Post the next heartbeat; on a 401 take the new nonce and keep the seq for the retry."""
        seq = self.seq + 1
        body = notification_body(self.index, seq)
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self.sign_key, body)}
        if self.nonce is not None:
            self.nc += 1
            headers["Authorization"] = digest_header(host_name(self.index), self.ha1, self.nonce, self.nc,
                                                     NOTIFICATIONS_PATH)
        async with self.session.post(self.target, data=body, headers=headers) as response:
            await response.read()
            if response.status == 401:
                self.nonce, self.nc = challenge_nonce(response.headers["WWW-Authenticate"]), 0
            elif response.status == 200:
                self.seq = seq
            return response.status

    async def warm_up(self) -> None:
        """Get a nonce and deliver seq 1 (untimed)."""
        first, second = await self.post(), await self.post()
        if (first, second) != (401, 200):
            raise RuntimeError(f"pilot {self.index}: warm-up answered {first}, {second}")

    async def run(self, duration: float) -> dict:
        """Post until ``duration`` seconds are up; count 200s and every other status."""
        ok, statuses = 0, {}
        deadline = time.perf_counter() + duration
        while time.perf_counter() < deadline:
            status = await self.post()
            if status == 200:
                ok += 1
            else:
                statuses[status] = statuses.get(status, 0) + 1
        return {"ok": ok, "statuses": statuses}


async def aiohttp_clients(url: str, keys: list[tuple[str, str]], duration: float, clients: int) -> dict:
    """Run ``clients`` aiohttp pilot tasks in this process; all start posting together."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        pilots = [AiohttpPilot(session, index, url, keys[index]) for index in range(clients)]
        await asyncio.gather(*(pilot.warm_up() for pilot in pilots))
        started, cpu_started = time.perf_counter(), time.process_time()
        outcomes = await asyncio.gather(*(pilot.run(duration) for pilot in pilots))
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    statuses: dict = {}
    for outcome in outcomes:
        for status, number in outcome["statuses"].items():
            statuses[status] = statuses.get(status, 0) + number
    return {"ok": sum(o["ok"] for o in outcomes), "statuses": statuses, "seconds": seconds, "client_cpu_s": cpu}


@contextlib.contextmanager
def receiver_in_child(ctx, db_path: str, site_key: str):
    """Start the receiver process; yield ``(url, process)``; stop it (by pid) at the end."""
    parent_conn, child_conn = ctx.Pipe()
    stop = ctx.Event()
    process = ctx.Process(target=receiver_process, args=(db_path, site_key, child_conn, stop), name="receiver")
    process.start()
    child_conn.close()
    try:
        if not parent_conn.poll(CHILD_TIMEOUT_S):
            raise RuntimeError("the receiver process did not start")
        yield parent_conn.recv(), process
    finally:
        stop.set()
        if parent_conn.poll(CHILD_TIMEOUT_S):
            parent_conn.recv()
        stop_process(process)
        parent_conn.close()


def stop_process(process) -> None:
    """Join a child; if it does not end in time, terminate then kill it by its pid."""
    process.join(CHILD_TIMEOUT_S)
    if process.is_alive():
        os.kill(process.pid, signal.SIGTERM)
        process.join(5)
    if process.is_alive():
        os.kill(process.pid, signal.SIGKILL)
        process.join()


def run_requests_clients(ctx, url: str, keys: list[tuple[str, str]], duration: float, clients: int) -> dict:
    """Start ``clients`` requests-based sender processes, release them together, collect counts."""
    barrier = ctx.Barrier(clients + 1)
    results = ctx.Queue()
    processes = [
        ctx.Process(target=requests_client, args=(i, url, keys[i], duration, barrier, results), name=f"client{i}")
        for i in range(clients)
    ]
    try:
        for process in processes:
            process.start()
        barrier.wait(timeout=CHILD_TIMEOUT_S)
        started = time.perf_counter()
        outcomes = [results.get(timeout=duration + CHILD_TIMEOUT_S) for _ in processes]
        seconds = time.perf_counter() - started
    finally:
        for process in processes:
            if process.pid is not None:
                stop_process(process)
    failed = [o for o in outcomes if o[1] is None]
    if failed:
        raise RuntimeError(f"client(s) failed: {failed}")
    statuses: dict = {}
    for _, _, client_statuses, _, _ in outcomes:
        for status, number in client_statuses.items():
            statuses[status] = statuses.get(status, 0) + number
    return {
        "ok": sum(o[1] for o in outcomes),
        "statuses": statuses,
        "seconds": seconds,
        "client_cpu_s": sum(o[4] for o in outcomes),
    }


def throughput_run(ctx, client: str, duration: float, clients: int) -> dict:
    """One run: fresh store with ``clients`` slots, receiver process, senders for ``duration`` s."""
    import psutil

    workdir = tempfile.mkdtemp(prefix="bench-throughput-")
    db_path = os.path.join(workdir, "service.sqlite")
    site_key = secrets.token_hex(32)
    try:
        store = create_store(db_path, clients)
        keys = pilot_keys(site_key, store, clients)
        store.close()
        with receiver_in_child(ctx, db_path, site_key) as (url, process):
            server = psutil.Process(process.pid)
            cpu_before = server.cpu_times()
            if client == "requests":
                outcome = run_requests_clients(ctx, url, keys, duration, clients)
            else:
                outcome = asyncio.run(aiohttp_clients(url, keys, duration, clients))
            cpu_after = server.cpu_times()
        # Each sender stored seq 1 during warm-up, before the clock started.
        stored = count_notifications(db_path) - clients
    finally:
        shutil.rmtree(workdir)
    server_cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    if stored != outcome["ok"]:
        raise RuntimeError(f"clients counted {outcome['ok']} answers of 200, the store holds {stored}")
    return {
        **outcome,
        "per_second": outcome["ok"] / outcome["seconds"],
        "non_200": sum(outcome["statuses"].values()),
        "server_cpu_s": server_cpu,
        "server_cpu_ms_per_notification": server_cpu * 1000 / max(outcome["ok"], 1),
    }


def bench_throughput(client: str, runs: int, duration: float, clients: int = CLIENTS) -> dict:
    """``runs`` throughput runs with ``client`` ("requests" or "aiohttp") senders; summary and raw runs."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that has threads
    per_run = [throughput_run(ctx, client, duration, clients) for _ in range(runs)]
    return {
        "client": client,
        "clients": clients,
        "seconds_per_run": duration,
        "per_second": summarize([r["per_second"] for r in per_run]),
        "non_200": sum(r["non_200"] for r in per_run),
        "server_cpu_ms_per_notification": summarize([r["server_cpu_ms_per_notification"] for r in per_run]),
        "runs": per_run,
    }


# -- report ------------------------------------------------------------------------------


def machine() -> dict:
    """What the numbers were measured on."""
    os_release = {}
    with contextlib.suppress(OSError), open("/etc/os-release", encoding="utf-8") as handle:
        for line in handle:
            name, _, value = line.strip().partition("=")
            os_release[name] = value.strip('"')
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as handle:
        model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "os": os_release.get("PRETTY_NAME", platform.platform()),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def row(name: str, stats: dict, unit: str, target: str, anchor: str = "") -> str:
    """One line of the stdout table."""
    return (
        f"{name:<44} {stats['median']:>10.2f} {stats['p90']:>10.2f} {unit:<7} {stats['runs']:>5}"
        f"  {target:<10} {anchor}"
    )


def print_table(results: dict) -> None:
    """A readable table of whatever was measured."""
    print()
    print(f"{'measure':<44} {'median':>10} {'p90':>10} {'unit':<7} {'runs':>5}  {'target':<10} Nimbus 2008")
    print("-" * 110)
    for entry in results.get("roundtrip", []):
        print(row(f"notification round trip, store {entry['synchronous']}", entry["roundtrip_ms"], "ms", "< 5 ms"))
    for entry in results.get("throughput", []):
        print(row(f"receiver, {entry['clients']} {entry['client']} senders", entry["per_second"], "notif/s",
                  ">= 1000", f"non-200: {entry['non_200']}"))
        print(row(f"  receiver CPU per notification ({entry['client']})",
                  entry["server_cpu_ms_per_notification"], "ms", ""))
        for number, run in enumerate(entry["runs"], 1):
            print(f"    run {number}: {run['ok']} in {run['seconds']:.2f} s; CPU used: receiver "
                  f"{run['server_cpu_s']:.2f} s, senders {run['client_cpu_s']:.2f} s "
                  f"(of {run['seconds'] * (os.cpu_count() or 1):.2f} s on {os.cpu_count()} cores)")
    print()


def write_json(path: str, results: dict) -> None:
    """Write ``results`` to ``path`` (its directory created) and say so."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2, sort_keys=True)
        handle.write("\n")
    print(f"results written to {path}")


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and shorter runs (smoke test)")
    parser.add_argument(
        "--only", nargs="+", choices=("roundtrip", "throughput"),
        default=("roundtrip", "throughput"), help="run only these parts",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Run the chosen parts, print the table, write JSON if asked."""
    args = parse_args(argv)
    rt_count, rt_warmup = (50, 20) if args.quick else (500, 20)
    tp_runs, tp_seconds = (1, 2.0) if args.quick else (3, 5.0)
    results: dict = {"machine": machine(), "quick": args.quick, "command": " ".join([".venv/bin/python"] + sys.argv)}
    if "roundtrip" in args.only:
        results["roundtrip"] = [bench_roundtrip(rt_count, rt_warmup, mode) for mode in ("FULL", "NORMAL")]
    if "throughput" in args.only:
        results["throughput"] = [bench_throughput(client, tp_runs, tp_seconds) for client in ("requests", "aiohttp")]
    print_table(results)
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
