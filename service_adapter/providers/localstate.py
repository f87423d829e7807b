"""The ``local`` provider's memory of its jobs: ``jobs.json`` in its directory, and the pilots' processes.

Every job is recorded with each pilot's host, pid and process create
time, so a provider in a later process reports and cancels the jobs an
earlier one started, as an LRM does across a service restart. A pid is
trusted only while the process holding it has the recorded create time
(:func:`live_process`): a pid reused by an unrelated process is never
signalled.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time

import psutil

log = logging.getLogger("service_adapter.providers.local")

STATE_FILE = "jobs.json"
LOCK_FILE = "jobs.lock"
STATE_VERSION = 1
#: Ended jobs older than this are dropped from the state file when a job is submitted.
KEEP_ENDED_S = 7 * 24 * 3600
# psutil derives create times from the boot time and the process start tick: equal for one
# process whoever asks, so a small tolerance only absorbs float rounding.
_CREATE_TIME_TOLERANCE_S = 0.05


class JobFile:
    """``jobs.json`` (and its lock file) in ``directory``: read whole, replaced whole, one writer at a time."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, STATE_FILE)
        self._seen: tuple[tuple, dict] | None = None  # (the file's identity, its jobs) for readers

    @contextlib.contextmanager
    def lock(self):
        """Hold the directory's lock (several providers, processes, may share it): one read-modify-write at a time."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.directory, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def recorded(self) -> dict:
        """The state file's jobs, for reading only: parsed again only when the file was replaced.

        Every write replaces the file (a new inode), so its identity says whether what was parsed
        is still what is on disk; with a thousand jobs a parse costs milliseconds, and the
        allocation check asks once per job.
        """
        try:
            info = os.stat(self.path)
        except OSError:
            return self.read()["jobs"]
        identity = (info.st_ino, info.st_mtime_ns, info.st_size)
        seen = self._seen
        if seen is not None and seen[0] == identity:
            return seen[1]
        jobs = self.read()["jobs"]
        self._seen = (identity, jobs)
        return jobs

    def read(self) -> dict:
        """The whole state (``{"version", "jobs"}``); no lock needed: the file is only ever replaced whole."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                state = json.load(handle)
        except FileNotFoundError:
            state = {}
        except (OSError, ValueError) as exc:
            log.error("local provider state %s is unreadable (%s): its jobs are unknown to this process",
                      self.path, exc)
            state = {}
        if not isinstance(state.get("jobs"), dict):
            state["jobs"] = {}
        state["version"] = STATE_VERSION
        return state

    def write(self, state: dict) -> None:
        """Replace the file with ``state`` (temp file, fsync, rename, directory fsync); under :meth:`lock`."""
        tmp = f"{self.path}.tmp.{os.getpid()}.{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(state, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)

    def update(self, job_id: str, **values) -> None:
        """Set ``values`` in one job's record (nothing when the file does not know it)."""
        with self.lock():
            state = self.read()
            record = state["jobs"].get(job_id)
            if record is None:
                return
            record.update(values)
            self.write(state)


def create_time(pid: int) -> float | None:
    """The process's create time (psutil's), or None when it is already gone."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None  # already gone: it will never count as alive


def live_process(pilot: dict) -> psutil.Process | None:
    """The pilot's process if it still runs as the recorded one (same pid and create time), else None."""
    recorded = pilot.get("create_time")
    if recorded is None:
        return None
    try:
        process = psutil.Process(int(pilot["pid"]))
        if abs(process.create_time() - float(recorded)) > _CREATE_TIME_TOLERANCE_S:
            return None  # the pid now belongs to another process
        if process.status() == psutil.STATUS_ZOMBIE:
            return None  # exited, not yet reaped by its parent
        return process
    except psutil.Error:
        return None


def prune(state: dict) -> None:
    """Drop ended jobs submitted more than :data:`KEEP_ENDED_S` ago from ``state``."""
    cutoff = time.time() - KEEP_ENDED_S
    for job_id, record in list(state["jobs"].items()):
        if record.get("submitted_at", 0) < cutoff and not any(live_process(p) for p in record["pilots"]):
            del state["jobs"][job_id]
