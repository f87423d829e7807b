"""Stopping the daemons this process started (the embedded site's libvirtd, the test harnesses' clusters): by the
pid it holds, never by name."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def stop_in_order(processes: dict[str, subprocess.Popen], order: list[str], timeout: float,
                  pid_files: dict[str, str] | None = None) -> None:
    """SIGTERM each of ``order`` that still runs and wait up to ``timeout`` s, then SIGKILL; forget them all.

    ``pid_files`` names the pid file of a daemon run under a subreaper such as tini (which forwards the SIGTERM
    but cannot forward a SIGKILL, and puts its child in a process group of its own): that pid gets the SIGKILL
    too (if it is the subreaper's child), else the daemon would outlive its subreaper.
    """
    for name in order:
        process = processes.get(name)
        if process is None or process.poll() is not None:
            continue
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            if pid_files and name in pid_files:
                _kill_child_by_pid_file(pid_files[name], process.pid)
            process.kill()
            process.wait()
    processes.clear()


def _kill_child_by_pid_file(path: str, parent: int) -> None:
    """SIGKILL the pid in ``path`` if it is a child of ``parent`` (the subreaper we started): whatever the file
    says, nothing else is killed."""
    with contextlib.suppress(OSError, ValueError):  # no file, no number, or the process is gone
        with open(path, encoding="ascii") as handle:
            pid = int(handle.read().strip())
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            ppid = next(int(line.split()[1]) for line in handle if line.startswith("PPid:"))
        if ppid == parent:
            os.kill(pid, signal.SIGKILL)
