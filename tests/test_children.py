"""Stopping the daemons a process started (service_adapter/children.py), with real processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time

import pytest

from service_adapter.children import stop_in_order
from service_adapter.localvirt import SYSTEM_DIRS


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().strip()
    except FileNotFoundError:
        return ""


def _pid_written(path: str) -> int:
    deadline = time.monotonic() + 10
    while not _read(path):
        assert time.monotonic() < deadline, "the daemon never wrote its pid"
        time.sleep(0.01)  # the shell writes it once it runs; nothing to wait on
    return int(_read(path))


def test_a_daemon_that_ignores_sigterm_is_killed_after_the_timeout(tmp_path):
    pidfile = tmp_path / "pid"
    process = subprocess.Popen(["sh", "-c", f"trap '' TERM; echo $$ > {pidfile}; while :; do sleep 1; done"],
                               start_new_session=True)
    _pid_written(str(pidfile))
    processes = {"stubborn": process}
    stop_in_order(processes, ["stubborn"], 0.3)
    assert process.returncode == -9 and processes == {}


def test_under_a_subreaper_the_sigkill_reaches_the_daemon_too(tmp_path):
    tini = shutil.which("tini", path=SYSTEM_DIRS)
    if tini is None:
        pytest.skip("tini not installed: run scripts/bootstrap.sh --vm")
    pidfile = tmp_path / "pid"
    process = subprocess.Popen([tini, "-s", "--", "sh", "-c",
                                f"trap '' TERM; echo $$ > {pidfile}; while :; do sleep 1; done"],
                               start_new_session=True)
    daemon = _pid_written(str(pidfile))
    try:
        stop_in_order({"daemon": process}, ["daemon"], 0.3, pid_files={"daemon": str(pidfile)})
        # tini forwarded the SIGTERM, which the daemon ignored; it cannot forward the SIGKILL: the pid file's pid got
        # it.
        deadline = time.monotonic() + 10
        while _alive(daemon) and time.monotonic() < deadline:
            time.sleep(0.01)  # the kernel ends it at once; it is reparented and reaped by PID 1 or a subreaper
        assert not _alive(daemon)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon, signal.SIGKILL)


def test_a_pid_file_naming_a_process_that_is_not_the_subreapers_child_kills_nothing_else(tmp_path):
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        pidfile = tmp_path / "pid"
        pidfile.write_text(f"{bystander.pid}\n")  # what a wrong or planted pid file could say
        ready = tmp_path / "ready"
        process = subprocess.Popen(["sh", "-c", f"trap '' TERM; echo $$ > {ready}; while :; do sleep 1; done"],
                                   start_new_session=True)
        _pid_written(str(ready))  # the trap is set: the SIGTERM will be ignored
        stop_in_order({"daemon": process}, ["daemon"], 0.3, pid_files={"daemon": str(pidfile)})
        assert process.returncode == -9
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
