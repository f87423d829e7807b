"""Stopping the daemons this process started (the embedded site's libvirtd, the test harnesses' clusters): by the
pid it holds, never by name."""

from __future__ import annotations

import signal
import subprocess


def stop_in_order(processes: dict[str, subprocess.Popen], order: list[str], timeout: float) -> None:
    """SIGTERM each of ``order`` that still runs and wait up to ``timeout`` s, then SIGKILL; forget them all."""
    for name in order:
        process = processes.get(name)
        if process is None or process.poll() is not None:
            continue
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    processes.clear()
