#!/usr/bin/env python3
"""aiohttp's own CPU under bench_scale's burst shape: the floor under the service's first ``reserved`` (issue 38).

A server with one trivial handler (no store, no digest, no validation: a request without an
``Authorization`` header gets a 401 with a ``WWW-Authenticate`` header and its body unread, any other
gets its body read and a small JSON 200) takes ``--pilots`` clients at once, each on a connection of its
own, as bench_scale's simulated pilots do: ``two`` requests per connection (the digest challenge, then
the answer: what a starting pilot sends), ``one`` (an answer without a challenge) or ``challenge`` (the
401 alone). The server's CPU (user + system, psutil) for all of them is the figure, with CPython's
default collector and with serve's (``service_adapter.collector.settle``).

Run from the repository root (as root, or with ``ulimit -Hn`` at 20,000 or more)::

    .venv/bin/python bench/bench_http_floor.py [--pilots 10000] [--clients 4] [--runs 2] [--json FILE]

All traffic is on 127.0.0.1; every process started here is stopped by its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import resource
import socket
import sys
import time

BODY = b'{"version": 2, "state": "reserved", "padding": "' + b"x" * 200 + b'"}'
SHAPES = {"two": (False, True), "one": (True,), "challenge": (False,)}  # per connection: with Authorization?


def _raise_fd_limit() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(port: int, tuned: bool, ready) -> None:
    """The trivial server (a process of its own); with ``tuned``, serve's collector settings."""
    from aiohttp import web

    _raise_fd_limit()

    async def handle(request: web.Request) -> web.Response:
        if "Authorization" not in request.headers:
            return web.json_response({"result": "unauthorized"}, status=401,
                                     headers={"WWW-Authenticate": 'Digest realm="floor", nonce="abc"'})
        await request.read()
        return web.json_response({"result": "accepted"})

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/n", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        if tuned:
            from service_adapter.collector import settle

            settle()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def client(port: int, count: int, shape: str, results) -> None:
    """``count`` connections at once, each sending the shape's requests in turn; puts how many ended in 200/401."""
    import aiohttp

    _raise_fd_limit()

    async def one() -> int:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            status = 0
            for authorized in SHAPES[shape]:
                headers = {"Authorization": "Digest floor"} if authorized else {}
                async with session.post(f"http://127.0.0.1:{port}/n", data=BODY, headers=headers) as response:
                    await response.read()
                    status = response.status
            return status

    async def main() -> list[int]:
        return await asyncio.gather(*(one() for _ in range(count)))

    results.put(sum(1 for status in asyncio.run(main()) if status in (200, 401)))


def _cpu_s(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def measure(pilots: int, clients: int, shape: str, tuned: bool) -> dict:
    """One run: a fresh server, ``pilots`` connections from ``clients`` processes; the server's CPU seconds."""
    ctx = multiprocessing.get_context("spawn")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ready = ctx.Event()
    server = ctx.Process(target=serve, args=(port, tuned, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("the trivial server did not start")
        results = ctx.Queue()
        workers = [ctx.Process(target=client, args=(port, pilots // clients, shape, results)) for _ in range(clients)]
        before, started = _cpu_s(server.pid), time.monotonic()
        for worker in workers:
            worker.start()
        answered = sum(results.get(timeout=600) for _ in workers)
        for worker in workers:
            worker.join(30)
        return {"shape": shape, "collector": "serve's" if tuned else "default", "answered": answered,
                "wall_s": round(time.monotonic() - started, 2), "server_cpu_s": round(_cpu_s(server.pid) - before, 2)}
    finally:
        server.terminate()
        server.join(30)


def main(argv=None) -> int:
    """Run each shape with each collector; print the figures, and write them as JSON with ``--json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pilots", type=int, default=10000, help="connections (default 10000)")
    parser.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    parser.add_argument("--runs", type=int, default=2, help="runs of each (default 2)")
    parser.add_argument("--json", metavar="FILE", help="write the figures here")
    args = parser.parse_args(argv)
    _raise_fd_limit()
    figures = []
    for shape in SHAPES:
        for tuned in (False, True):
            for _ in range(args.runs):
                figures.append(measure(args.pilots, args.clients, shape, tuned))
                print(json.dumps(figures[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
