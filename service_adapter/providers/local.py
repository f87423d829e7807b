"""The ``local`` provider: pilots as local processes, one per simulated node.

The embedded default for demos and tests. Each node of a job is a pilot
process with its own ``--host`` name (``local-node1``, ``local-node2``, ...);
cancelling a job sends SIGTERM to each of its pilots by pid, as an LRM's
``qdel`` would.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import subprocess
import sys
import threading
import time

from service_adapter.providers.base import JobState, PilotJob, Provider


@dataclasses.dataclass
class _LocalJob:
    job: PilotJob
    hosts: list[str]
    processes: list[subprocess.Popen]
    cancelled: bool = False


class LocalProvider(Provider):
    """Runs each job's pilots as child processes of this one.

    ``output_dir`` receives each pilot's stdout and stderr as
    ``<slot>.<host>.out``. ``close()`` ends any pilot still running (SIGTERM,
    then SIGKILL after ``kill_after`` seconds), always by its pid.
    """

    def __init__(self, output_dir: str, *, host_prefix: str = "local-node", python: str = sys.executable):
        self.output_dir = output_dir
        self.host_prefix = host_prefix
        self.python = python
        self._jobs: dict[str, _LocalJob] = {}
        self._job_ids = itertools.count(1)
        self._host_ids = itertools.count(1)
        self._lock = threading.Lock()

    def pilot_argv(self, job: PilotJob, host: str) -> list[str]:
        """The command line of one pilot."""
        return [
            self.python, "-m", "pilot", "reserve",
            "--slot", job.slot, "--memory", str(job.memory_mb),
            "--duration", f"{job.duration_s:g}", "--grace", f"{job.grace_s:g}",
            "--contact", job.contact, "--config", job.pilot_config, "--host", host,
        ]

    def submit(self, job: PilotJob) -> str:
        """Start one pilot process per node of ``job``; returns ``local-<n>``."""
        os.makedirs(self.output_dir, exist_ok=True)
        with self._lock:
            job_id = f"local-{next(self._job_ids)}"
            hosts = [f"{self.host_prefix}{next(self._host_ids)}" for _ in range(job.nodes)]
            processes = []
            for host in hosts:
                out_path = os.path.join(self.output_dir, f"{job.slot}.{host}.out")
                with open(out_path, "ab") as out:
                    processes.append(
                        subprocess.Popen(
                            self.pilot_argv(job, host), stdin=subprocess.DEVNULL,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                        )
                    )
            self._jobs[job_id] = _LocalJob(job, hosts, processes)
        return job_id

    def cancel(self, job_id: str) -> None:
        """SIGTERM every live pilot of the job (by pid)."""
        local = self._jobs[job_id]
        local.cancelled = True
        for process in local.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    def status(self, job_ids: list[str]) -> dict[str, JobState]:
        """RUNNING while any pilot runs; then COMPLETED, CANCELLED or FAILED by exit codes."""
        states = {}
        for job_id in job_ids:
            local = self._jobs.get(job_id)
            if local is None:
                states[job_id] = JobState.UNKNOWN
                continue
            codes = [p.poll() for p in local.processes]
            if any(code is None for code in codes):
                states[job_id] = JobState.RUNNING
            elif any(code != 0 for code in codes):
                states[job_id] = JobState.FAILED
            else:
                states[job_id] = JobState.CANCELLED if local.cancelled else JobState.COMPLETED
        return states

    def hosts(self, job_id: str) -> list[str]:
        """The simulated node names of a job's pilots."""
        return list(self._jobs[job_id].hosts)

    def pids(self, job_id: str) -> list[int]:
        """The pids of a job's pilot processes."""
        return [p.pid for p in self._jobs[job_id].processes]

    def wait(self, job_id: str, timeout: float) -> list[int | None]:
        """Wait up to ``timeout`` seconds in all for the job's pilots; their exit codes (None: still running)."""
        deadline = time.monotonic() + timeout
        codes = []
        for process in self._jobs[job_id].processes:
            try:
                codes.append(process.wait(max(deadline - time.monotonic(), 0)))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes

    def close(self, kill_after: float = 10.0) -> None:
        """End every pilot still running: SIGTERM (so it restores its node), SIGKILL if it hangs."""
        for job_id, local in self._jobs.items():
            if any(p.poll() is None for p in local.processes):
                self.cancel(job_id)
        for local in self._jobs.values():
            for process in local.processes:
                try:
                    process.wait(kill_after)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
