"""The pilot's wake-up flag: set from threads and from signal handlers that interrupt its own wait."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest

from pilot.wakeup import Wakeup


def test_a_set_before_the_wait_ends_it_and_clear_forgets_it():
    wakeup = Wakeup()
    wakeup.set()
    wakeup.set()  # twice: one clear forgets both
    assert wakeup.is_set() and wakeup.wait(30)
    wakeup.clear()
    assert not wakeup.is_set()
    assert not wakeup.wait(0.01)
    assert not wakeup.wait(0)


def test_a_set_from_another_thread_ends_a_wait_without_limit():
    wakeup = Wakeup()
    waiting = threading.Barrier(2)

    def setter():
        waiting.wait()
        wakeup.set()

    thread = threading.Thread(target=setter)
    thread.start()
    waiting.wait()
    assert wakeup.wait(None)
    thread.join()


def test_a_full_pipe_does_not_block_the_setter():
    wakeup = Wakeup()
    for _ in range(200_000):  # far more bytes than a pipe holds (64 KiB)
        wakeup.set()
    assert wakeup.wait(0)
    wakeup.clear()
    assert not wakeup.wait(0)


# A pilot's main loop (clear, check, wait) while two signals arrive microseconds apart; their handlers
# set the flag from inside the loop's own wait, clear or set. With threading.Event this hangs within a
# few hundred rounds (the handler waits for the Event's lock, held by the same thread it interrupted).
# The signals are sent from a second thread, which the kernel then often hands them to: without
# wake_on_signals the main thread would sleep through them.
NESTED_SIGNALS = textwrap.dedent("""
    import os, random, signal, sys, threading, time
    from pilot.wakeup import Wakeup, wake_on_signals

    rng = random.Random(12)
    for round in range(int(sys.argv[1])):
        wake, stopped = Wakeup(), []
        def request_stop(reason):
            stopped.append(reason)
            wake.set()
        signal.signal(signal.SIGTERM, lambda n, f: request_stop("term"))
        signal.signal(signal.SIGINT, lambda n, f: request_stop("int"))
        wake_on_signals()
        gap = rng.uniform(0, 0.0002)
        def send():
            time.sleep(0.0005)
            os.kill(os.getpid(), signal.SIGTERM)
            start = time.perf_counter()
            while time.perf_counter() - start < gap:
                pass
            os.kill(os.getpid(), rng.choice((signal.SIGTERM, signal.SIGINT)))
        sender = threading.Thread(target=send)
        sender.start()
        while True:
            wake.clear()
            if stopped:
                break
            wake.wait(None)  # a lost wake-up hangs here
        sender.join()
    print("rounds", round + 1)
""")


def test_nested_signal_handlers_inside_the_wait_never_hang_it():
    rounds = 1500
    done = subprocess.run([sys.executable, "-c", NESTED_SIGNALS, str(rounds)], capture_output=True, text=True,
                          timeout=120)  # a hang would otherwise stop the suite; a run takes about a second
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["rounds", str(rounds)]


# The main thread blocks SIGUSR1, so the kernel must give it to the second thread, as it may give any
# process-directed signal (a pilot's SIGTERM) to the notifier's or the poller's thread; Python then only
# notes it there, and the main thread's wait must still end (its handler runs right after).
SIGNAL_TO_ANOTHER_THREAD = textwrap.dedent("""
    import os, signal, sys, threading
    from pilot.wakeup import Wakeup, wake_on_signals

    wake = Wakeup()
    signal.signal(signal.SIGUSR1, lambda n, f: wake.set())
    if sys.argv[1] == "routed":
        wake_on_signals()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    main = threading.get_native_id()
    def other_thread():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        while "poll" not in open(f"/proc/self/task/{main}/wchan").read():
            pass  # until the main thread sleeps in the wait's poll(2)
        os.kill(os.getpid(), signal.SIGUSR1)
    threading.Thread(target=other_thread).start()
    while not wake.is_set():
        wake.wait(None)
    print("woken")
""")


def test_a_signal_given_to_another_thread_ends_the_wait():
    done = subprocess.run([sys.executable, "-c", SIGNAL_TO_ANOTHER_THREAD, "routed"], capture_output=True,
                          text=True, timeout=60)  # without the route the wait never ends
    assert (done.returncode, done.stdout) == (0, "woken\n"), done.stderr


def test_without_the_route_such_a_signal_waits_for_the_timeout():
    # Why wake_on_signals exists: the same program without it sleeps through the signal.
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", SIGNAL_TO_ANOTHER_THREAD, "bare"], capture_output=True, timeout=2)
