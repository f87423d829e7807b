#!/usr/bin/env python3
"""What a slow, rude or hostile client costs a real ``workspace-lease serve`` (issue 12).

Run from the repository root::

    .venv/bin/python bench/bench_rude_clients.py [--flood N] [--junk N] [--json FILE]

It starts ``serve`` (local provider, SQLite store, log under a temporary
directory, ``prlimit --nofile=1024:1024``) on a free 127.0.0.1 port and measures:

* how long a half-sent request head stays open (``[service] request_timeout``, 30 s);
* the operator API's answer time while ``--flood`` idle connections (half of
  them with a head begun) are open, the service's peak open descriptors, and
  the connections it held;
* the log bytes written for ``--junk`` requests with an 8 KB malformed header;
* ``socket.accept() out of system resource`` lines in the log (0 wanted).

All traffic is on 127.0.0.1; every socket is closed and the service stopped by its pid.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import requests  # noqa: E402
from requests.auth import HTTPDigestAuth  # noqa: E402

from tests.support.site import OPERATOR, OPERATOR_SECRET, Site, serving  # noqa: E402


def connect(site: Site) -> socket.socket:
    return socket.create_connection(("127.0.0.1", site.port))


def operator_ms(site: Site, rounds: int = 20) -> list[float]:
    """Answer times of GET /api/v1/leases with digest (a fresh session each: challenge + answer)."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        answer = requests.get(site.url + "/api/v1/leases", auth=HTTPDigestAuth(OPERATOR, OPERATOR_SECRET), timeout=30)
        times.append((time.perf_counter() - t0) * 1000)
        assert answer.status_code == 200, answer.status_code
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flood", type=int, default=1100, help="idle connections to open (default 1100)")
    parser.add_argument("--junk", type=int, default=1000, help="malformed-header requests to send (default 1000)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.flood + 1024), hard))
    import tempfile
    import pathlib

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-rude-") as root:
        site = Site(pathlib.Path(root))
        with serving(site, wrapper=("prlimit", "--nofile=1024:1024")) as process:
            results["operator_idle_ms"] = statistics.median(operator_ms(site))

            half = connect(site)
            half.sendall(b"POST /pilot/v2/notifications HTTP/1.1\r\nHost: x\r\n")
            t0 = time.monotonic()
            half.settimeout(120)
            assert half.recv(1) == b""
            results["half_sent_head_closed_after_s"] = round(time.monotonic() - t0, 1)
            half.close()

            peak = [0]
            done = threading.Event()

            def sample() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], len(os.listdir(f"/proc/{process.pid}/fd")))
                    done.wait(0.01)

            sampler = threading.Thread(target=sample)
            sampler.start()
            flood = []
            try:
                for index in range(args.flood):
                    sock = connect(site)
                    if index % 2:
                        sock.sendall(b"GET /api/v1/leases HTTP/1.1\r\nHost: x\r\n")
                    flood.append(sock)
                results["operator_during_flood_ms"] = statistics.median(operator_ms(site))
                open_now = 0
                for sock in flood:
                    sock.setblocking(False)
                    try:
                        open_now += sock.recv(1) != b""
                    except BlockingIOError:
                        open_now += 1
                    except OSError:
                        pass
                results["flood_connections_still_held"] = open_now
            finally:
                done.set()
                sampler.join()
                for sock in flood:
                    sock.close()
            results["service_peak_fds_of_1024"] = peak[0]

            before = site.log_file.stat().st_size
            junk = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"\x01" * 8000 + b"\r\n\r\n"
            for _ in range(args.junk):
                sock = connect(site)
                sock.sendall(junk)
                sock.settimeout(10)
                while sock.recv(65536):
                    pass
                sock.close()
            results["log_bytes_for_junk"] = site.log_file.stat().st_size - before
        text = site.log_file.read_text(errors="replace")
        results["accept_out_of_resource_lines"] = text.count("out of system resource")
        results["connection_cap"] = int(text.split("holding at most ", 1)[1].split()[0])
    results.update(flood=args.flood, junk=args.junk)
    for key, value in results.items():
        print(f"{key:32} {value:.1f}" if isinstance(value, float) else f"{key:32} {value}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
