"""The ``local`` provider: pilots as local processes, one per simulated node.

The embedded default for demos and tests. Each node of a job is a pilot
process with its own ``--host`` name (``local-node1``, ``local-node2``, ...);
cancelling a job sends SIGTERM to each of its pilots by pid, as an LRM's
``qdel`` would.

It survives a service restart the way an LRM does: every job is recorded
in ``jobs.json`` in its directory (:mod:`.localstate`: each pilot's host,
pid and process create time), so a new provider over the same directory
reports and cancels the jobs an earlier process started. A pid is trusted
only while the process holding it has the recorded create time: a pid
reused by an unrelated process is never signalled.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Callable

import psutil

from workspace_common.protocol import SLOT_SECRET_ENV
from service_adapter.providers.jobscript import pilot_arguments
from service_adapter.providers.base import JobState, PilotJob, Provider, ProviderError
from service_adapter.providers.localstate import JobFile, create_time, live_process, prune

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _LocalJob:
    job: PilotJob
    hosts: list[str]
    processes: list[subprocess.Popen]
    cancelled: bool = False
    end_recorded: bool = False
    timer: threading.Timer | None = None  # starts the pilots of a job that begins later


class LocalProvider(Provider):
    """Runs each job's pilots as child processes of this one, and remembers them in ``jobs.json``.

    ``output_dir`` (created 0700) receives each pilot's stdout and stderr as
    ``<slot>.<host>.out`` and holds the state file. ``close()`` ends any
    pilot this provider started that still runs (SIGTERM, then SIGKILL after
    ``kill_after`` seconds), always by its pid; pilots of earlier processes
    are left to their jobs.

    Each job's nodes get new names (``local-node1``, ``local-node2``, ...),
    unless ``fixed_hosts`` names a fixed set of nodes: then every job runs on the
    first ones it needs (jobs share them, as leases share a real node's
    memory), and a job asking for more is refused.
    """

    name = "local"
    excludes_nodes = True  # its simulated nodes are chosen here

    def __init__(self, output_dir: str, *, host_prefix: str = "local-node", python: str = sys.executable,
                 fixed_hosts: tuple[str, ...] | None = None):
        self.output_dir = output_dir
        self.host_prefix = host_prefix
        self.fixed_hosts = tuple(fixed_hosts) if fixed_hosts is not None else None
        self.python = python
        self._file = JobFile(output_dir)
        self._jobs: dict[str, _LocalJob] = {}
        self._lock = threading.Lock()
        #: Called with each simulated node's name before its first pilot starts (a LocalSite writes the
        #: node's key there, as a site admin installs a real node's key before it runs pilots).
        self.prepare_node: Callable[[str], object] | None = None

    def pilot_argv(self, job: PilotJob, host: str) -> list[str]:
        """The command line of one pilot."""
        return [self.python, "-m", "pilot", *pilot_arguments(job), "--host", host]

    # -- the interface -----------------------------------------------------------------------

    def submit(self, job: PilotJob) -> str:
        """Start one pilot process per node of ``job``; returns ``local-<12 hex digits>``, unique across processes.

        A job with a ``begin_at`` in the future is PENDING until then, when a
        timer of this provider starts its pilots (as an LRM's scheduler would);
        cancelled before, it never starts. Only this process starts it: a
        provider over the same directory after a restart reports it ENDED.
        """
        os.makedirs(self.output_dir, mode=0o700, exist_ok=True)
        job_id = f"local-{uuid.uuid4().hex[:12]}"
        later = job.begin_at is not None and job.begin_at > time.time()
        with self._lock, self._file.lock():
            state = self._file.read()
            first = int(state.get("next_host", 1))
            if self.fixed_hosts is None:
                hosts = [f"{self.host_prefix}{first + i}" for i in range(job.nodes + len(job.exclude_nodes))]
                hosts = [host for host in hosts if host not in job.exclude_nodes][:job.nodes]
            else:
                usable = [host for host in self.fixed_hosts if host not in job.exclude_nodes]
                if job.nodes > len(usable):
                    raise ProviderError(f"this local site has {len(usable)} node(s) the job may use; it asks for "
                                        f"{job.nodes}")
                hosts = usable[:job.nodes]
            for host in hosts:
                self.pilot_argv(job, host)  # validates the job before anything starts
            local = _LocalJob(job, hosts, [])
            prune(state)
            state["next_host"] = first + job.nodes + len(job.exclude_nodes)
            state["jobs"][job_id] = {
                "slot": job.slot, "lease": job.lease, "submitted_at": time.time(), "owner_pid": os.getpid(),
                "pilots": [], "cancelled": False, "exit_codes": None, "begin_at": job.begin_at if later else None,
            }
            if not later:
                self._spawn(job_id, local, state)
            self._jobs[job_id] = local
            self._file.write(state)
        if later:
            local.timer = threading.Timer(job.begin_at - time.time(), self._begin, args=(job_id,))
            local.timer.daemon = True
            local.timer.start()
            log.info("slot %s: local job %s waits for its begin time (%s)", job.slot, job_id, ", ".join(hosts))
        else:
            log.info("slot %s: local job %s started pilots %s", job.slot, job_id, ", ".join(hosts))
        return job_id

    def _begin(self, job_id: str) -> None:
        """The begin time of a job came: start its pilots unless it was cancelled meanwhile."""
        with self._lock, self._file.lock():
            local = self._jobs.get(job_id)
            state = self._file.read()
            if local is None or local.cancelled or state["jobs"].get(job_id, {}).get("cancelled"):
                return
            try:
                self._spawn(job_id, local, state)
            except ProviderError as exc:
                log.error("local job %s: %s", job_id, exc)
                local.cancelled = True
                state["jobs"][job_id]["cancelled"] = True
            self._file.write(state)
        log.info("slot %s: local job %s started pilots %s", local.job.slot, job_id, ", ".join(local.hosts))

    def _spawn(self, job_id: str, local: _LocalJob, state: dict) -> None:
        """Start the job's pilots (under both locks) and record them in ``state``; ProviderError if one cannot."""
        job, hosts = local.job, local.hosts
        for host in hosts:
            if self.prepare_node is not None:
                self.prepare_node(host)
        processes = []
        try:
            for host in hosts:
                out_path = os.path.join(self.output_dir, f"{job.slot}.{host}.out")
                with open(out_path, "ab") as out:
                    processes.append(subprocess.Popen(
                        self.pilot_argv(job, host), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                        start_new_session=True, env=dict(os.environ, **{SLOT_SECRET_ENV: job.slot_secret}),
                    ))
        except OSError as exc:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            raise ProviderError(f"could not start a pilot for slot {job.slot}: {exc}") from exc
        local.processes = processes
        state["jobs"][job_id]["pilots"] = [
            {"host": host, "pid": process.pid, "create_time": create_time(process.pid)}
            for host, process in zip(hosts, processes)
        ]
        state["jobs"][job_id]["begin_at"] = None

    def cancel(self, job_id: str, force: bool = False) -> None:
        """SIGTERM (``force``: SIGKILL, as an LRM after its kill delay) every live pilot of the job, by pid.

        A job that has ended or was never here is not an error.

        A pilot of an earlier process is signalled only if the process with
        its pid still has the recorded create time.
        """
        sig = signal.SIGKILL if force else signal.SIGTERM
        with self._lock:
            local = self._jobs.get(job_id)
            if local is not None:
                local.cancelled = True
                if local.timer is not None:
                    local.timer.cancel()
                for process in local.processes:
                    if process.poll() is None:
                        process.send_signal(sig)
        record = self._file.recorded().get(job_id)
        if record is None:
            if local is None:
                log.debug("cancel %s: no such local job (nothing to do)", job_id)
            return
        if local is None:
            for pilot in record["pilots"]:
                process = live_process(pilot)
                if process is not None:
                    try:
                        process.send_signal(sig)  # psutil re-checks the create time first
                    except psutil.NoSuchProcess:
                        pass
        if not record.get("cancelled"):
            self._file.update(job_id, cancelled=True)

    def status(self, job_ids: list[str]) -> dict[str, JobState]:
        """RUNNING while any pilot runs; then COMPLETED, CANCELLED or FAILED by exit codes.

        Exit codes are known for this provider's own pilots (and recorded for
        later providers); a job whose pilots ended unseen under an earlier
        process is CANCELLED if it was cancelled, else ENDED. An id never
        recorded here is GONE.
        """
        states = {}
        records = None
        checked: dict[tuple, bool] = {}  # (pid, create time) -> alive: asked once per call, however many jobs share it

        def alive(pilot: dict) -> bool:
            key = (pilot.get("pid"), pilot.get("create_time"))
            if key not in checked:
                checked[key] = live_process(pilot) is not None
            return checked[key]

        for job_id in job_ids:
            local = self._jobs.get(job_id)
            if local is not None and not local.processes:
                states[job_id] = JobState.CANCELLED if local.cancelled else JobState.PENDING
                continue
            if local is not None:
                codes = [p.poll() for p in local.processes]
                if any(code is None for code in codes):
                    states[job_id] = JobState.RUNNING
                    continue
                if not local.cancelled:
                    # Another provider over this directory (a restarted service) may have cancelled it.
                    if records is None:
                        records = self._file.recorded()
                    local.cancelled = bool(records.get(job_id, {}).get("cancelled"))
                self._record_end(job_id, local, codes)
                states[job_id] = _ended_state(codes, local.cancelled)
                continue
            if records is None:
                records = self._file.recorded()
            record = records.get(job_id)
            if record is None:
                states[job_id] = JobState.GONE
            elif not record["pilots"] and not record.get("cancelled") and record.get("begin_at"):
                # Waiting for its begin time in another provider's timer: pending while that process lives.
                states[job_id] = JobState.PENDING if psutil.pid_exists(record.get("owner_pid") or 0) else JobState.ENDED
            elif any(alive(pilot) for pilot in record["pilots"]):
                states[job_id] = JobState.RUNNING
            elif record.get("exit_codes") is not None:
                states[job_id] = _ended_state(record["exit_codes"], bool(record.get("cancelled")))
            else:
                states[job_id] = JobState.CANCELLED if record.get("cancelled") else JobState.ENDED
        return states

    def extend(self, job_id: str, duration_s: float) -> None:
        """Local pilots have no batch time limit: nothing to raise (ProviderError for a job never recorded here)."""
        if job_id not in self._jobs and job_id not in self._file.recorded():
            raise ProviderError(f"no local job {job_id}")

    def allocated_hosts(self, job_id: str) -> list[str] | None:
        """The simulated nodes of the job (None for a job this provider never started)."""
        try:
            return self.hosts(job_id)
        except (KeyError, OSError, ValueError):
            return None

    # -- for demos and tests -------------------------------------------------------------------

    def adopt(self, jobs: list[tuple[str, str, list[str]]], pid: int) -> list[str]:
        """Record jobs whose pilots another process runs, as if this provider had started them; their job ids.

        ``jobs`` holds (slot, lease, hosts) per job; every host's pilot is the
        process ``pid`` (one process simulating many nodes: ``bench/bench_scale.py``).
        They are RUNNING while that process runs, and cancelling one signals it.
        One state-file write for all of them.
        """
        os.makedirs(self.output_dir, mode=0o700, exist_ok=True)
        created = create_time(pid)
        if created is None:
            raise ProviderError(f"no process {pid} to adopt jobs for")
        ids = []
        with self._lock, self._file.lock():
            state = self._file.read()
            for slot, lease, hosts in jobs:
                job_id = f"local-{uuid.uuid4().hex[:12]}"
                state["jobs"][job_id] = {
                    "slot": slot, "lease": lease, "submitted_at": time.time(), "owner_pid": pid,
                    "pilots": [{"host": host, "pid": pid, "create_time": created} for host in hosts],
                    "cancelled": False, "exit_codes": None,
                }
                ids.append(job_id)
            self._file.write(state)
        return ids


    def hosts(self, job_id: str) -> list[str]:
        """The simulated node names of a job's pilots (KeyError for a job never recorded here)."""
        local = self._jobs.get(job_id)
        if local is not None:
            return list(local.hosts)
        return [pilot["host"] for pilot in self._file.recorded()[job_id]["pilots"]]

    def pids(self, job_id: str) -> list[int]:
        """The pids of a job's pilot processes (KeyError for a job never recorded here)."""
        local = self._jobs.get(job_id)
        if local is not None:
            return [p.pid for p in local.processes]
        return [pilot["pid"] for pilot in self._file.recorded()[job_id]["pilots"]]

    def wait(self, job_id: str, timeout: float) -> list[int | None]:
        """Wait up to ``timeout`` seconds in all for the pilots of a job this provider started.

        Returns their exit codes (None: still running).
        """
        local = self._jobs[job_id]
        deadline = time.monotonic() + timeout
        codes = []
        for process in local.processes:
            try:
                codes.append(process.wait(max(deadline - time.monotonic(), 0)))
            except subprocess.TimeoutExpired:
                codes.append(None)
        if all(code is not None for code in codes):
            self._record_end(job_id, local, codes)
        return codes

    def close(self, kill_after: float = 10.0) -> None:
        """End every pilot this provider started that still runs.

        SIGTERM (so it restores its node), SIGKILL if it hangs past ``kill_after``.
        """
        for job_id, local in list(self._jobs.items()):
            if any(p.poll() is None for p in local.processes) or (local.timer is not None and not local.processes):
                self.cancel(job_id)
        for job_id, local in list(self._jobs.items()):
            for process in local.processes:
                try:
                    process.wait(kill_after)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            self._record_end(job_id, local, [p.returncode for p in local.processes])


    def _record_end(self, job_id: str, local: _LocalJob, codes: list[int | None]) -> None:
        if local.end_recorded or any(code is None for code in codes):
            return
        local.end_recorded = True
        values = {"exit_codes": list(codes), "ended_at": time.time()}
        if local.cancelled:
            values["cancelled"] = True  # never unset: another provider may have cancelled it
        try:
            self._file.update(job_id, **values)
        except OSError as exc:  # status() must not raise; the next provider then reports ENDED
            log.warning("could not record the end of local job %s: %s", job_id, exc)


def _ended_state(codes: list[int], cancelled: bool) -> JobState:
    if any(code != 0 for code in codes):
        return JobState.FAILED
    return JobState.CANCELLED if cancelled else JobState.COMPLETED


