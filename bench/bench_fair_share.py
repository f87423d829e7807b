#!/usr/bin/env python3
"""What one node's attacks cost the others at a real ``workspace-lease serve`` (issue 32).

Run from the repository root, as root (real pilots hold real hugepages)::

    .venv/bin/python bench/bench_fair_share.py [--seconds 20] [--json FILE]

It starts ``serve`` (local provider, ``prlimit --nofile=1024:1024``, an approved 8 MiB image, the operators on
the pilots' listener: the worst case) and leases four nodes to real pilots. Then, one after another and at last
all at once, for ``--seconds`` each, an attacker with one node's own key (or, for the guesses, no key):

* ``polls``: ~300 parked command polls of its slot, a new one every few ms;
* ``downloads``: 40 image downloads that never read, re-opened as the service cuts them off;
* ``flood``: command polls (wait 0) on one keep-alive connection as fast as it can send them;
* ``guesses``: operator logins with a wrong password, from another address, as fast as it can.

Meanwhile, five times a second, it times what the others depend on: an operator's ``GET /api/v1/leases``
(a fresh digest session: challenge and answer) and another node's command poll (wait 0, its kept-alive
session). At the end, with every attack still running, the lease is released: the real pilots' ``unreserved``
notifications' delivery times are read from their logs. Prints median, p99 and max per attack, in ms.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import requests  # noqa: E402
from requests.auth import HTTPDigestAuth  # noqa: E402

from workspace_common.protocol import commands_path, image_path  # noqa: E402
from tests.support.pool import pool_pages  # noqa: E402
from tests.support.rawhttp import leased_with_an_image, node_auth, node_header  # noqa: E402
from tests.support.rawhttp import guess  # noqa: E402
from tests.support.rawhttp import session  # noqa: E402
from tests.support.site import OPERATOR, OPERATOR_SECRET, Site  # noqa: E402


class Attack(threading.Thread):
    """One attack, run until :meth:`stop`; counts what it sent."""

    def __init__(self, name: str, step, site: Site, host: str | None):
        super().__init__(name=name, daemon=True)
        self.step, self.site, self.host = step, site, host
        self.stopping = threading.Event()
        self.held: list[socket.socket] = []
        self.sent = 0
        self.errors = 0

    def run(self) -> None:
        # Each attack from its own loopback address: per-source limits (the guesses') must not touch the others.
        with session({"polls": "127.0.0.21", "downloads": "127.0.0.23", "flood": "127.0.0.24"}.get(self.name,
                                                                                                 "127.0.0.41")) as http:
            while not self.stopping.is_set():
                try:
                    self.step(self, http)
                    self.sent += 1
                except (OSError, requests.RequestException):
                    self.errors += 1
                    time.sleep(0.01)  # a refused connect: do not spin

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)
        for sock in self.held:
            sock.close()

    def open(self, path: str, address: str, rcvbuf: int | None = None) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((address, 0))
        sock.connect(("127.0.0.1", self.site.port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {node_header(self.site, self.host, path)}"
                     "\r\n\r\n".encode())
        return sock


def parked_polls(attack: Attack, _session) -> None:
    attack.held.append(attack.open(commands_path(attack.site.slot, attack.host) + "?after=0&wait=60", "127.0.0.21"))
    if len(attack.held) > 300:
        attack.held.pop(0).close()


def stalled_downloads(attack: Attack, _session) -> None:
    attack.held.append(attack.open(image_path(attack.site.slot, attack.host, attack.site.sha256), "127.0.0.23", 4096))
    if len(attack.held) > 40:
        attack.held.pop(0).close()
    time.sleep(0.05)


def request_flood(attack: Attack, session) -> None:
    session.auth = node_auth(attack.site, attack.host)
    session.get(attack.site.url + commands_path(attack.site.slot, attack.host) + "?after=0&wait=0", timeout=30)


def password_guesses(attack: Attack, session) -> None:
    url = attack.site.url + "/api/v1/leases"
    session.get(url, headers={"Authorization": guess(url, "wrong-guess")}, timeout=30)


def measure(site: Site, seconds: float) -> dict[str, list[float]]:
    """Operator and good-pilot answer times (ms), five times a second for ``seconds``."""
    times: dict[str, list[float]] = {"operator": [], "good pilot poll": []}
    good = site.hosts[1]
    url = site.url + commands_path(site.slot, good) + "?after=0&wait=0"
    deadline = time.monotonic() + seconds
    with requests.Session() as pilot:
        pilot.auth = node_auth(site, good)
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            answer = requests.get(site.url + "/api/v1/leases", auth=HTTPDigestAuth(OPERATOR, OPERATOR_SECRET),
                                  timeout=30)
            times["operator"].append((time.perf_counter() - t0) * 1000)
            assert answer.status_code == 200, answer.status_code
            t0 = time.perf_counter()
            answer = pilot.get(url, timeout=30)
            times["good pilot poll"].append((time.perf_counter() - t0) * 1000)
            assert answer.status_code == 200, answer.status_code
            time.sleep(0.2)
    return times


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"n": len(ordered), "median": round(statistics.median(ordered), 1),
            "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1), "max": round(ordered[-1], 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20, help="seconds per attack (default 20)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    import pathlib
    import tempfile

    site = Site(pathlib.Path(tempfile.mkdtemp(prefix="bench-fair-share-")))
    pages = pool_pages()
    results: dict[str, dict] = {}
    with leased_with_an_image(site) as site:
        results["quiet"] = {k: summary(v) for k, v in measure(site, args.seconds).items()}
        print("quiet", results["quiet"], flush=True)
        kinds = {"polls": (parked_polls, site.hosts[0]), "downloads": (stalled_downloads, site.hosts[2]),
                 "flood": (request_flood, site.hosts[3]), "guesses": (password_guesses, None)}
        for name, (step, host) in kinds.items():
            attack = Attack(name, step, site, host)
            attack.start()
            try:
                results[name] = {k: summary(v) for k, v in measure(site, args.seconds).items()}
            finally:
                attack.stop()
            results[name]["attacker requests"] = attack.sent
            print(name, results[name], flush=True)
        attacks = [Attack(name, step, site, host) for name, (step, host) in kinds.items()]
        for attack in attacks:
            attack.start()
        try:
            results["all at once"] = {k: summary(v) for k, v in measure(site, args.seconds).items()}
            print("all at once", results["all at once"], flush=True)
            released = site.cli("release", site.lease_id, "--wait", timeout=120)
            assert released.returncode == 0, released.stderr
            site.released = True
        finally:
            for attack in attacks:
                attack.stop()
        delivered = []
        for log in (site.root / "logs").glob(f"{site.slot}.*.log"):
            delivered += [float(ms) for ms in re.findall(r"notified unreserved \(seq \d+\) in ([0-9.]+) ms",
                                                         log.read_text(errors="replace"))]
        results["real pilots' unreserved under all attacks (ms)"] = sorted(delivered)
        print("real pilots' unreserved (ms):", sorted(delivered), flush=True)
    assert pool_pages() == pages, "the hugepage pool did not come back"
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
