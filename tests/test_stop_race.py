"""The service's release command and the batch system's SIGTERM at the same instant: every pilot restores.

A pilot hears "stop" from two sides: its poller thread gets the service's
``release`` command, and the batch system sends SIGTERM (scancel, qdel,
walltime), sometimes twice (the step and a relaying sudo). Each round
starts real pilot processes on the real hugepage pool and fires both at
them together, in varied orders and offsets; every pilot must give the
node back, tell the service, and exit 0.
"""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time

import pytest

from pilot.exitcodes import ExitCode
from tests.support.pilots import journal_files, pilot_config, read_until, start_pilot
from tests.support.pool import pool_pages

ORDERS = ("release-then-term", "term-then-release", "release-then-burst", "burst-then-release")
ROUNDS, PILOTS = 32, 8  # 256 stops
GRACE_S = 5
SEED = 20261201


def spin(seconds: float) -> None:
    """Wait ``seconds`` on this thread's clock; finer than sleep() for gaps of microseconds."""
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        pass


def fire(order: str, offset: float, gap: float, send_release, pilot: subprocess.Popen) -> None:
    """Send one pilot its stops in ``order``: the release and the signals ``offset`` s apart.

    A burst is SIGTERM, SIGINT, SIGTERM, SIGINT, ``gap`` s apart (a step's
    SIGTERM, a relaying sudo's, a user's ^C): each handler may land inside
    the last one, or inside the main loop's wait.
    """
    def burst(count: int):
        def send():
            for index in range(count):
                if index:
                    spin(gap)
                pilot.send_signal(signal.SIGTERM if index % 2 == 0 else signal.SIGINT)
        return send

    first, second = {
        "release-then-term": (send_release, burst(1)),
        "term-then-release": (burst(1), send_release),
        "release-then-burst": (send_release, burst(4)),
        "burst-then-release": (burst(4), send_release),
    }[order]
    first()
    time.sleep(offset)
    second()


def test_release_and_sigterm_together_always_restore_the_node(tmp_path, hugepages, service):
    rng = random.Random(SEED)  # the same orders and offsets every run: a failure can be replayed
    config = pilot_config(tmp_path, service.url, service.node_key_file(), sections={"vms": {"poll_wait": 30}})
    for round_number in range(ROUNDS):
        hosts = [f"node{i + 1}" for i in range(PILOTS)]
        slots = [service.add_slot() for _ in hosts]
        pilots = [start_pilot(config, slot, memory=2, duration=300, grace=GRACE_S, host=host)
                  for slot, host in zip(slots, hosts)]
        plans = [(rng.choice(ORDERS), rng.uniform(0, 0.006), rng.uniform(0, 0.0003)) for _ in pilots]
        try:
            for pilot in pilots:
                read_until(pilot, "polling ", 30)  # holding the node, and its poller asks for commands
            start = threading.Barrier(len(pilots))

            def stop(index):
                start.wait()
                fire(*plans[index], lambda: service.send_release(slots[index], hosts[index]), pilots[index])

            threads = [threading.Thread(target=stop, args=(i,)) for i in range(len(pilots))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            for index, pilot in enumerate(pilots):
                try:
                    # A hang detector, not a timing goal: a pilot exits within its grace or never.
                    code = pilot.wait(timeout=GRACE_S + 25)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"round {round_number}: pilot {hosts[index]} ({plans[index]}) did not exit")
                assert code == ExitCode.OK, (round_number, plans[index], pilot.stdout.read())
                states = [state for host, _seq, state, _code in service.store.notifications(slots[index])
                          if host == hosts[index]]
                assert states[-1] == "unreserved", (round_number, plans[index], states)
        finally:
            for pilot in pilots:
                if pilot.poll() is None:
                    pilot.kill()
                    pilot.wait()
                pilot.stdout.close()
        assert pool_pages() == hugepages, f"round {round_number}: the pool was not given back"
        assert journal_files(tmp_path) == []
