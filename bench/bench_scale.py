#!/usr/bin/env python3
"""10,000 pilots against one ``workspace-lease serve`` (issue 17), or several on one PostgreSQL store (issue 38).

One real service process (its store on disk, digest auth from per-node keys, signed bodies and
answers, the operator API, the lease manager) and PILOTS simulated pilots: asyncio clients
spread over ``--clients`` processes, each pilot with its own host name, node key, slot key,
connection and digest nonce. The batch system is the local provider: the bench records each
lease's job as run by the client process that simulates its nodes (``LocalProvider.adopt``), so
the service's allocation check and the lease manager's status calls see live jobs.

Run as root (or with a high enough ``ulimit -Hn``) from the repository root::

    .venv/bin/python bench/bench_scale.py [--pilots 10000] [--nodes-per-lease 10] [--clients 4]
                                          [--idle 30] [--store sqlite|postgresql] [--receivers N] [--json FILE]

``--store postgresql`` starts a PostgreSQL server of the bench's own (Debian's binaries, as the tests
do: tests/support/postgres.py) and serves from a database of it; ``--receivers N`` (PostgreSQL only)
runs N serve processes on the pilots' port (``reuse_port``), each with an operator port of its own
(the fan-out's API requests go to them in turn). "Service CPU" is then every receiver's, and the
PostgreSQL server's CPU is given beside it. Each simulated pilot has a connection of its own (as a
pilot's session does), so its digest nonce stays with the receiver that issued it.

Phases, in order:

1. **reserved burst**: every pilot posts ``reserved`` at once (its first request gets the digest
   challenge, the second is answered); latency per pilot from its first byte to its 200, p50/p99;
   then the store is counted: every notification stored, none lost.
2. **parked polls**: every pilot long-polls its commands (``wait`` = the pilot's default
   ``poll_wait``, 30 s) and asks again the moment an answer comes, as the pilot does; over
   ``--idle`` seconds the service's RSS and CPU (psutil on its pid).
3. **fan-out**: the operator starts one VM on every host (one API request per lease, all
   requests at once); the time from the first request sent until the last host has its
   ``start-vm`` command (stamped by the clients on the same clock).
4. **lease manager**: with serve stopped and the jobs still running, a lease manager over the
   service's store runs five cycles over the LEASES leases: how many status calls the batch
   system got (one per cycle is the goal, not one per lease) and how long a cycle takes.

All traffic is on 127.0.0.1; every process started here is stopped by its pid; the working
directory is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from workspace_common.protocol import (  # noqa: E402  (after the sys.path fix above)
    NOTIFICATIONS_PATH,
    SIGNATURE_HEADER,
    Notification,
    commands_path,
    digest_ha1,
    format_epoch,
    format_time,
    node_key,
    sign,
    sign_commands,
    slot_key,
    utc_now,
)
from workspace_common.protocol.digest import parse_params, response_digest  # noqa: E402

from bench.profiling import PhaseProfiler  # noqa: E402

PILOT_REALM = "workspace-pilot"
OPERATOR, OPERATOR_REALM = "bench", "workspace-lease"
POLL_WAIT_S = 30  # the pilot's default [vms] poll_wait
MEMORY_MB = 1024
VM_MB = 256
CHILD_TIMEOUT_S = 300.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def raise_fd_limit() -> int:
    """Soft open-file limit up to the hard one; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# -- the site ----------------------------------------------------------------------------------------


class Site:
    """A service's files under ``root``; :meth:`populate` writes the leases, :meth:`start` runs serve."""

    def __init__(self, root: str, store: str | None = None, receivers: int = 1):
        self.root = root
        self.receivers = receivers
        self.site_key = secrets.token_hex(32)
        self.operator_secret = secrets.token_urlsafe(24)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store_path = store or os.path.join(root, "service.sqlite")
        self.log_file = os.path.join(root, "service.log")
        self.state_dir = os.path.join(root, "local")
        site_key_file = self._private("site.key", self.site_key + "\n")
        ha1 = hashlib.sha256(f"{OPERATOR}:{OPERATOR_REALM}:{self.operator_secret}".encode()).hexdigest()
        accounts = self._private("operators.htdigest", f"{OPERATOR}:{OPERATOR_REALM}:{ha1}\n")
        pilot_config = self._private("pilot.conf", f"[service]\ncontact = {self.url}\n")
        self.operator_ports = [_free_port() for _ in range(receivers)] if receivers > 1 else []
        self.configs = [self._private(f"service-{index}.conf", (
            f"[service]\nport = {self.port}\nstore = {self.store_path}\nlog_file = {self.log_file}\n"
            "log_level = info\n" + ("reuse_port = yes\n" if receivers > 1 else "") +
            f"[pilots]\nsite_key_file = {site_key_file}\npilot_config = {pilot_config}\n"
            "status_interval = 2\nlost_after = 600\nqueue_timeout = 3600\n"
            f"[vms]\noverhead_mb = 64\n"
            f"[provider]\nname = local\nstate_dir = {self.state_dir}\noutput_dir = {os.path.join(root, 'jobs')}\n"
            f"[operators]\naccounts_file = {accounts}\n"
            + (f"listen = 127.0.0.1:{self.operator_ports[index]}\n" if receivers > 1 else "")
        )) for index in range(receivers)]
        #: Where the operator API is: the pilots' URL, or each receiver's own operator port.
        self.api_urls = [f"http://127.0.0.1:{port}" for port in self.operator_ports] or [self.url]
        self.processes: list[subprocess.Popen] = []

    def _private(self, name: str, text: str) -> str:
        path = os.path.join(self.root, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        return path

    def populate(self, leases: int, nodes: int, client_pids: list[int]) -> list[dict]:
        """Write ``leases`` leases of ``nodes`` hosts into the store, their jobs into the local provider's
        record (lease i's hosts simulated by client i mod len(client_pids)); returns the pilots."""
        from service_adapter.providers.local import LocalProvider
        from service_adapter.store import Store

        store = Store(self.store_path)
        pilots: list[dict] = []
        try:
            per_client: dict[int, list] = {pid: [] for pid in client_pids}
            for index in range(leases):
                lease_id, slot = str(uuid.uuid4()), str(uuid.uuid4())
                store.create_lease(lease_id, slot, owner=OPERATOR, nodes=nodes, memory_mb=MEMORY_MB,
                                   duration_s=86400, now=time.time())
                hosts = [f"n{index:05d}x{k:02d}" for k in range(nodes)]
                pid = client_pids[index % len(client_pids)]
                per_client[pid].append((slot, lease_id, hosts))
                secret = store.slot_secret(slot)
                for host in hosts:
                    key = node_key(self.site_key, host)
                    pilots.append({"lease": lease_id, "slot": slot, "host": host, "node_key": key,
                                   "sign_key": slot_key(key, slot, secret), "client": client_pids.index(pid)})
            provider = LocalProvider(self.state_dir)
            for pid, jobs in per_client.items():
                for (slot, _lease, _hosts), job_id in zip(jobs, provider.adopt(jobs, pid)):
                    store.set_job_id(slot, job_id, "pilot job queued")
        finally:
            store.close()
        return pilots

    def start(self) -> None:
        """Start each ``workspace-lease serve`` and wait for its 'serving on' line."""
        cli = os.path.join(os.path.dirname(sys.executable), "workspace-lease")
        for config in self.configs:
            process = subprocess.Popen([cli, "serve", "--config", config], stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
            self.processes.append(process)
            line = process.stdout.readline()
            if "serving on" not in line:
                raise RuntimeError(f"serve did not start: {line}{process.stdout.read()}")

    @property
    def pids(self) -> list[int]:
        """The serve processes' pids."""
        return [process.pid for process in self.processes]

    def stop(self) -> None:
        """SIGTERM each serve by its pid; SIGKILL one that does not stop."""
        for process in self.processes:
            if process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -- the simulated pilots (client processes) ---------------------------------------------------------


class SimulatedPilot:
    """One pilot's HTTP side: its own connection, digest nonce and nonce count, notification seq."""

    def __init__(self, session, url: str, info: dict):
        self.session = session
        self.url = url
        self.info = info
        self.ha1 = digest_ha1(info["host"], PILOT_REALM, info["node_key"])
        self.nonce: str | None = None
        self.nc = 0
        self.after = 0
        self.got_start_at: float | None = None
        self.polls_answered = 0

    def _authorization(self, method: str, uri: str) -> dict:
        if self.nonce is None:
            return {}
        self.nc += 1
        nc, cnonce = f"{self.nc:08x}", secrets.token_hex(8)
        answer = response_digest("SHA-256", self.ha1, self.nonce, nc, cnonce, method, uri)
        return {"Authorization": (
            f'Digest username="{self.info["host"]}", realm="{PILOT_REALM}", nonce="{self.nonce}", uri="{uri}", '
            f'algorithm=SHA-256, qop=auth, nc={nc}, cnonce="{cnonce}", response="{answer}"')}

    def _take_challenge(self, header: str) -> None:
        first = header.split(", Digest ")[0]
        self.nonce, self.nc = parse_params(first[7:])["nonce"], 0

    async def request(self, method: str, uri: str, body: bytes | None = None, headers=None, timeout=60):
        """One authenticated request (a 401 takes the new nonce and sends it again); (status, body, headers)."""
        for _ in range(3):
            sent = dict(headers or {}, **self._authorization(method, uri))
            async with self.session.request(method, self.url + uri, data=body, headers=sent,
                                            timeout=timeout) as response:
                data = await response.read()
                if response.status == 401 and "WWW-Authenticate" in response.headers:
                    self._take_challenge(response.headers["WWW-Authenticate"])
                    continue
                return response.status, data, response.headers
        raise RuntimeError(f"{self.info['host']}: still 401 after new nonces")

    async def reserved(self) -> tuple[float, int]:
        """Post 'reserved' (seq 1) the way a starting pilot does: no nonce yet. (seconds, status)."""
        body = Notification(slot=self.info["slot"], host=self.info["host"], state="reserved", seq=1,
                            sent_at=format_time(utc_now()), memory_mb=MEMORY_MB,
                            expires_at=format_epoch(time.time() + 86400)).to_json()
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self.info["sign_key"], body)}
        started = time.perf_counter()
        status, _, _ = await self.request("POST", NOTIFICATIONS_PATH, body, headers)
        return time.perf_counter() - started, status

    async def poll_forever(self) -> None:
        """Long-poll the commands, asking again at once; note when the first start-vm arrives."""
        path = commands_path(self.info["slot"], self.info["host"])
        while True:
            uri = f"{path}?after={self.after}&wait={POLL_WAIT_S}"
            status, data, headers = await self.request("GET", uri, timeout=POLL_WAIT_S + 30)
            if status != 200:
                raise RuntimeError(f"{self.info['host']}: poll answered {status} {data[:200]!r}")
            if headers.get(SIGNATURE_HEADER) != sign_commands(self.info["sign_key"], uri, data):
                raise RuntimeError(f"{self.info['host']}: a poll answer with a wrong signature")
            self.polls_answered += 1
            for command in json.loads(data)["commands"]:
                self.after = max(self.after, command["id"])
                if command["op"] == "start-vm" and self.got_start_at is None:
                    self.got_start_at = time.time()


def client_main(url: str, pilots: list[dict], conn) -> None:
    """A client process: run its pilots as the parent's commands on ``conn`` say."""
    raise_fd_limit()
    asyncio.run(_client(url, pilots, conn))


async def _client(url: str, infos: list[dict], conn) -> None:
    import aiohttp

    loop = asyncio.get_running_loop()
    # A session (one connection) per pilot: its nonce stays with the receiver that issued it.
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1, keepalive_timeout=POLL_WAIT_S + 60))
                for _ in infos]
    try:
        await _run_pilots(loop, [SimulatedPilot(s, url, info) for s, info in zip(sessions, infos)], conn)
    finally:
        await asyncio.gather(*(s.close() for s in sessions))


async def _run_pilots(loop, pilots: list, conn) -> None:
    """Run the pilots as the parent's commands on ``conn`` say."""
    polls: list[asyncio.Task] = []
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        if command == "burst":
            results = await asyncio.gather(*(p.reserved() for p in pilots), return_exceptions=True)
            conn.send([r if isinstance(r, tuple) else (None, repr(r)) for r in results])
        elif command == "poll":
            polls = [asyncio.create_task(p.poll_forever()) for p in pilots]
            conn.send("polling")
        elif command == "stamps":
            failed = [repr(t.exception()) for t in polls if t.done() and not t.cancelled() and t.exception()]
            conn.send({"stamps": [p.got_start_at for p in pilots], "failed": failed[:5], "nfailed": len(failed),
                       "polls_answered": sum(p.polls_answered for p in pilots)})
        elif command == "stop":
            for task in polls:
                task.cancel()
            await asyncio.gather(*polls, return_exceptions=True)
            conn.send("stopped")
            return


# -- the operator's side ---------------------------------------------------------------------------------


async def start_vms_everywhere(site: Site, leases: dict[str, list[str]]) -> tuple[float, list[int]]:
    """One start request per lease (a VM per host), all at once, spread over the receivers' operator ports in
    turn; (time the first was sent, statuses)."""
    import aiohttp

    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64 // len(site.api_urls)))
                for _ in site.api_urls]
    try:
        digests = [_OperatorDigest(site, url) for url in site.api_urls]
        for digest, session in zip(digests, sessions):
            await digest.prime(session)
        first_sent = time.time()
        statuses = await asyncio.gather(*(
            digests[index % len(digests)].post(sessions[index % len(sessions)], f"/api/v1/leases/{lease}/vms", {
                "vms": [{"name": f"vm-{host}", "memory_mb": VM_MB,
                         "boot": {"kernel": {"path": "vmlinuz", "sha256": "0" * 64}, "cmdline": "console=ttyS0"}}
                        for host in hosts]})
            for index, (lease, hosts) in enumerate(leases.items())))
    finally:
        await asyncio.gather(*(session.close() for session in sessions))
    return first_sent, statuses


class _OperatorDigest:
    """The operator's digest answers with one nonce and increasing nonce counts (as a client library would)."""

    def __init__(self, site: Site, url: str):
        self.site = site
        self.url = url
        self.ha1 = digest_ha1(OPERATOR, OPERATOR_REALM, site.operator_secret)
        self.nonce = ""
        self.nc = 0

    async def prime(self, session) -> None:
        async with session.get(self.url + "/api/v1/leases") as response:
            await response.read()
            self.nonce = parse_params(response.headers["WWW-Authenticate"].split(", Digest ")[0][7:])["nonce"]

    async def post(self, session, uri: str, payload: dict) -> int:
        for _ in range(3):
            self.nc += 1
            nc, cnonce = f"{self.nc:08x}", secrets.token_hex(8)
            answer = response_digest("SHA-256", self.ha1, self.nonce, nc, cnonce, "POST", uri)
            header = (f'Digest username="{OPERATOR}", realm="{OPERATOR_REALM}", nonce="{self.nonce}", uri="{uri}", '
                      f'algorithm=SHA-256, qop=auth, nc={nc}, cnonce="{cnonce}", response="{answer}"')
            async with session.post(self.url + uri, json=payload, headers={"Authorization": header},
                                    timeout=120) as response:
                await response.read()
                if response.status == 401:
                    self.nonce = parse_params(response.headers["WWW-Authenticate"].split(", Digest ")[0][7:])["nonce"]
                    continue
                return response.status
        return 401


# -- measuring -------------------------------------------------------------------------------------------


def count_rows(db_path: str, sql: str) -> int:
    """One COUNT on the store, read-only."""
    if db_path.startswith("postgresql://"):
        from tests.support.postgres import rows_elsewhere

        return rows_elsewhere(db_path, sql)[0][0]
    import sqlite3

    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


def wait_for(predicate, timeout: float, what: str, every: float = 0.2) -> float:
    """Wait until ``predicate()``; seconds it took; RuntimeError after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{what}: not within {timeout:g} s")
        time.sleep(every)
    return time.monotonic() - started


def _tree_cpu(processes) -> float:
    """CPU seconds of ``processes`` and of their live children (a PostgreSQL server's backends)."""
    import psutil

    total = 0.0
    for process in processes:
        for member in [process, *process.children(recursive=True)]:
            try:
                times = member.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
    return total


def service_usage(pids: list[int], seconds: float, store_pid: int | None) -> dict:
    """The receivers' RSS (MB, at the end) and CPU (% of one core, all of them) over ``seconds``; the
    PostgreSQL server's CPU beside it."""
    import psutil

    services = [psutil.Process(pid) for pid in pids]
    store = [psutil.Process(store_pid)] if store_pid else []
    before, store_before, started = _tree_cpu(services), _tree_cpu(store), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    return {"rss_mb": sum(p.memory_info().rss for p in services) / 2**20,
            "cpu_percent": (_tree_cpu(services) - before) / elapsed * 100,
            "store_cpu_percent": (_tree_cpu(store) - store_before) / elapsed * 100, "seconds": elapsed,
            "threads": sum(p.num_threads() for p in services), "fds": sum(p.num_fds() for p in services)}


class CpuMeter:
    """CPU seconds used by the receivers, the PostgreSQL server and the client processes between :meth:`start`
    and :meth:`stop`."""

    def __init__(self, service_pids: list[int], client_pids: list[int], store_pid: int | None = None):
        import psutil

        self.services = [psutil.Process(pid) for pid in service_pids]
        self.clients = [psutil.Process(pid) for pid in client_pids]
        self.store = [psutil.Process(store_pid)] if store_pid else []

    def start(self) -> None:
        """Note the counters now."""
        self._service, self._clients = _tree_cpu(self.services), _tree_cpu(self.clients)
        self._store, self._wall = _tree_cpu(self.store), time.monotonic()

    def stop(self) -> dict:
        """Seconds of wall time, receivers' CPU, the store server's and the clients' CPU since :meth:`start`."""
        return {"wall_s": time.monotonic() - self._wall, "service_cpu_s": _tree_cpu(self.services) - self._service,
                "store_cpu_s": _tree_cpu(self.store) - self._store,
                "clients_cpu_s": _tree_cpu(self.clients) - self._clients}


class CountingProvider:
    """The local provider as the service runs it, counting its status calls (and the job ids of each)."""

    def __init__(self, provider):
        self.provider = provider
        self.calls: list[int] = []

    def status(self, job_ids):
        """The provider's answer; notes the call."""
        self.calls.append(len(job_ids))
        return self.provider.status(job_ids)

    def __getattr__(self, name):
        return getattr(self.provider, name)


def manager_cycles(site: Site, ticks: int = 5) -> dict:
    """A lease manager over the service's store (serve stopped, the client processes still running the jobs):
    ``ticks`` cycles over every lease, the status calls they made and how long each cycle took."""
    from service_adapter.lease import LeaseManager
    from service_adapter.providers.local import LocalProvider
    from service_adapter.store import Store

    store = Store(site.store_path)
    provider = CountingProvider(LocalProvider(site.state_dir))
    try:
        manager = LeaseManager(store, provider, contact=site.url, pilot_config="/nonexistent", status_interval_s=0.001)
        spans, changes = [], 0
        for _ in range(ticks):
            time.sleep(0.002)  # past the status interval: every tick asks the provider afresh
            started = time.perf_counter()
            changes += len(manager.tick())
            spans.append((time.perf_counter() - started) * 1000)
        watched = len(store.leases_to_watch())
    finally:
        store.close()
    return {"leases_watched": watched, "ticks": ticks, "status_calls": len(provider.calls),
            "ids_per_call": provider.calls[0] if provider.calls else 0, "tick_ms_median": statistics.median(spans),
            "transitions": changes}


def run(args) -> dict:
    """All four phases; the figures."""
    raise_fd_limit()
    leases = args.pilots // args.nodes_per_lease
    workdir = tempfile.mkdtemp(prefix="bench-scale-")
    ctx = multiprocessing.get_context("spawn")
    database = None
    if args.store == "postgresql":
        from tests.support.postgres import PostgresServer

        database = PostgresServer()
    site = Site(workdir, store=database.new_database() if database else None, receivers=args.receivers)
    clients: list = []
    results: dict = {"pilots": leases * args.nodes_per_lease, "leases": leases, "clients": args.clients,
                     "store": args.store, "receivers": args.receivers,
                     "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    try:
        pipes = []
        # Clients first (their pids are the adopted jobs' pilots), then the store, then serve.
        for index in range(args.clients):
            parent, child = ctx.Pipe()
            pipes.append((parent, child))
        placeholders = [ctx.Process(target=_wait_for_work, args=(child,), daemon=True) for _, child in pipes]
        for process in placeholders:
            process.start()
        clients = placeholders
        pilots = site.populate(leases, args.nodes_per_lease, [p.pid for p in clients])
        for index, (parent, _child) in enumerate(pipes):
            parent.send((site.url, [p for p in pilots if p["client"] == index]))
        site.start()
        print(f"bench-scale: serve pids {site.pids}, {len(pilots)} pilots in {leases} leases, "
              f"{args.clients} client processes", flush=True)

        store_pid = database.process.pid if database else None
        meter = CpuMeter(site.pids, [p.pid for p in clients], store_pid)
        profiler = PhaseProfiler(args.profile, site.pids) if args.profile else None
        profiled = profiler.phase if profiler else (lambda _name: contextlib.nullcontext())
        # 1. the reserved burst
        meter.start()
        latencies, statuses = [], {}
        with profiled("burst"):
            for parent, _ in pipes:
                parent.send("burst")
            for parent, _ in pipes:
                for seconds, status in parent.recv():
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        latencies.append(seconds * 1000)
        stored = count_rows(site.store_path, "SELECT COUNT(*) FROM notifications WHERE state = 'reserved'")
        results["burst"] = {**meter.stop(), "statuses": {str(k): v for k, v in statuses.items()}, "stored": stored,
                            "p50_ms": statistics.median(latencies), "p99_ms": percentile(latencies, 99),
                            "max_ms": max(latencies)}
        print(f"burst: {statuses}, stored {stored}, p50 {results['burst']['p50_ms']:.0f} ms, "
              f"p99 {results['burst']['p99_ms']:.0f} ms, max {results['burst']['max_ms']:.0f} ms", flush=True)
        ready = "SELECT COUNT(*) FROM leases WHERE state = 'ready'"
        results["ready_after_s"] = wait_for(lambda: count_rows(site.store_path, ready) == leases, 120,
                                            "every lease ready")

        def stamps():
            found = []
            for parent, _ in pipes:
                parent.send("stamps")
                found.append(parent.recv())
            return found

        # 2. parked polls
        for parent, _ in pipes:
            parent.send("poll")
        for parent, _ in pipes:
            parent.recv()
        print("polls parking", flush=True)
        time.sleep(5)  # every poll sent and parked (the first answers only come after POLL_WAIT_S)
        answered_before = sum(s["polls_answered"] for s in stamps())
        with profiled("parked"):
            results["parked"] = service_usage(site.pids, args.idle, store_pid)
        renewals = sum(s["polls_answered"] for s in stamps()) - answered_before
        # Each answered poll is asked again at once: a renewal is one answer and one new request.
        results["parked"].update(renewals=renewals, cpu_us_per_renewal=(
            results["parked"]["cpu_percent"] / 100 * results["parked"]["seconds"] / renewals * 1e6 if renewals else None))
        print(f"parked: {results['parked']}", flush=True)

        # 3. fan-out
        by_lease: dict[str, list[str]] = {}
        for pilot in pilots:
            by_lease.setdefault(pilot["lease"], []).append(pilot["host"])
        answered_before = sum(s["polls_answered"] for s in stamps())
        meter.start()

        with profiled("fanout"):
            first_sent, api_statuses = asyncio.run(start_vms_everywhere(site, by_lease))
            api_done = time.time()
            wait_for(lambda: all(None not in s["stamps"] for s in stamps()), 120, "every host's start-vm", every=0.5)
        usage, found = meter.stop(), stamps()
        every = [t for s in found for t in s["stamps"]]
        # One answer per host carries its start-vm; the rest are parked polls whose wait ran out meanwhile (they
        # come in waves, every poll_wait, and some runs' fan-outs overlap one: the service CPU is theirs too).
        results["fanout"] = {**usage, "polls_answered": sum(s["polls_answered"] for s in found) - answered_before,
                             "api_statuses": {str(k): api_statuses.count(k) for k in set(api_statuses)},
                             "api_s": api_done - first_sent, "last_host_s": max(every) - first_sent,
                             "median_host_s": statistics.median(every) - first_sent}
        print(f"fan-out: {results['fanout']}", flush=True)
        site.stop()
        results["manager"] = manager_cycles(site)
        print(f"manager: {results['manager']}", flush=True)
        for parent, _ in pipes:
            parent.send("stop")
            parent.recv()
    finally:
        site.stop()
        for process in clients:
            process.join(30)
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
                process.join()
        if database is not None:
            database.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")
    return results


def _wait_for_work(conn) -> None:
    """A client process that exists before its pilots are known (its pid is their jobs' pilot)."""
    url, pilots = conn.recv()
    client_main(url, pilots, conn)


def main(argv=None) -> int:
    """Run the bench; print the figures, and write them as JSON with ``--json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pilots", type=int, default=10000, help="simulated pilots (default 10000)")
    parser.add_argument("--nodes-per-lease", type=int, default=10, help="hosts per lease (default 10)")
    parser.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds the parked polls are watched (default 30)")
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite",
                        help="the store: a SQLite file (default), or a PostgreSQL server the bench starts")
    parser.add_argument("--receivers", type=int, default=1,
                        help="serve processes on the pilots' port (default 1; more needs --store postgresql)")
    parser.add_argument("--json", metavar="FILE", help="write the figures here")
    parser.add_argument("--profile", metavar="DIR",
                        help="sample each serve with py-spy during each phase into DIR (profiles, not figures)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (service log, store)")
    args = parser.parse_args(argv)
    if args.receivers < 1 or (args.receivers > 1 and args.store != "postgresql"):
        parser.error("--receivers: 1, or more with --store postgresql (a SQLite file has one service)")
    results = run(args)
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
