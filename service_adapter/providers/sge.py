"""The ``sge`` provider: Grid Engine's qsub, qdel, qstat and qacct (Son of Grid Engine 8.1.9 seen here).

- ``qsub -terse`` prints the job id alone; the script asks one slot on each
  host through the template's parallel environment (``-pe PE N``, a PE with
  ``allocation_rule 1``: docs/gridengine.md) and ``-notify``.
- A cancel is ``qdel``: Grid Engine has no per-step signal. With ``-notify``
  every task gets SIGUSR2 the queue's ``notify`` time before its SIGKILL (or
  the queue's ``terminate_method``): that time is the pilots' grace.
- ``qstat -xml`` lists the jobs the qmaster holds (state letters: ``qw``,
  ``hqw``, ``r``, ``t``, ``Eqw``, ``s``, ``dr``, ...); a job it no longer lists
  is asked of ``qacct -j``, where a parallel job has one record per
  ``qrsh -inherit`` task and the job script's own record last: that last
  one's ``failed`` and ``exit_status`` decide. No record: GONE.
"""

from __future__ import annotations

import logging
import re
import shutil
import xml.etree.ElementTree as ET
from typing import Callable

from service_adapter.providers.base import JobState, PilotJob, ProviderError, split_job_ids
from service_adapter.providers.batch import BatchProvider
from service_adapter.providers.jobscript import SGE, JobTemplate, script_path
from service_adapter.providers.scriptfile import write_job_script
from service_adapter.providers.sgescript import SGE_SCRIPT, render_sge

log = logging.getLogger(__name__)

_JOB_ID_RE = re.compile(r"[0-9]+")
# qdel of a job the qmaster no longer has: "denied: job "123" does not exist".
_GONE_RE = re.compile(r"does not exist", re.IGNORECASE)
_RECORD_SPLIT = re.compile(r"^=+$", re.M)


def map_state(letters: str) -> JobState:
    """Grid Engine's state letters (``qstat``'s ``state`` column) as a :class:`JobState`."""
    code = letters.strip()
    if "E" in code:
        return JobState.HELD  # an error state: the job waits for an admin's qmod -cj
    if "d" in code:
        return JobState.RUNNING  # being deleted: still on its hosts until its tasks end
    if "h" in code and "q" in code:
        return JobState.HELD
    if "q" in code or code == "w":
        return JobState.PENDING
    if any(letter in code for letter in "rtRsST"):
        return JobState.RUNNING
    log.warning("Grid Engine reported job state %r, which this provider does not know", letters)
    return JobState.UNKNOWN


def parse_qstat_xml(text: str) -> dict[str, JobState]:
    """Job id -> state from ``qstat -xml`` (running jobs in queue_info, waiting ones in job_info)."""
    states = {}
    for job in ET.fromstring(text).iter("job_list"):
        number, state = job.findtext("JB_job_number"), job.findtext("state")
        if number and state:
            states[number.strip()] = map_state(state)
    return states


def accounted_state(text: str) -> JobState | None:
    """The job's end from ``qacct -j ID``'s output (its last record); None when there is none."""
    records = [r for r in _RECORD_SPLIT.split(text) if "exit_status" in r]
    if not records:
        return None
    fields = dict(line.split(None, 1) for line in records[-1].strip().splitlines() if len(line.split(None, 1)) == 2)
    failed = fields.get("failed", "0").split()[0]
    status = fields.get("exit_status", "").split()[0]
    if failed != "0":
        return JobState.FAILED
    if not status.isdigit():
        return JobState.ENDED
    return JobState.COMPLETED if int(status) == 0 else JobState.FAILED


class SgeProvider(BatchProvider):
    """Submits pilot jobs with qsub, cancels them with qdel, watches them with qstat -xml and qacct."""

    name = SGE
    excludes_nodes = True  # qsub -l h=!NODE

    def __init__(self, template: JobTemplate = JobTemplate(), *, command_timeout_s: float = 30.0,
                 env: dict[str, str] | None = None, which: Callable[[str], str | None] = shutil.which):
        super().__init__(template, SGE_SCRIPT, command_timeout_s=command_timeout_s, env=env, which=which)

    def submit(self, job: PilotJob) -> str:
        """Write ``{output_dir}/{slot}.sh`` and ``qsub -terse`` it; returns Grid Engine's job id."""
        text = render_sge(job, self.template, self.launcher)
        path = write_job_script(script_path(job, self.template), text)
        result = self._run(["qsub", "-terse", path])
        job_id = self._submitted_id(result, job, "qsub", _JOB_ID_RE, lambda lines: lines[-1].strip() if lines else "")
        log.info("slot %s: submitted Grid Engine job %s (%d nodes)", job.slot, job_id, job.nodes)
        return job_id

    def cancel(self, job_id: str, force: bool = False) -> None:
        """``qdel ID`` (``-f`` with ``force``); a job the qmaster no longer has is not an error."""
        if not _JOB_ID_RE.fullmatch(str(job_id)):
            raise ProviderError(f"{job_id!r} is not a Grid Engine job id")
        result = self._run(["qdel", *(["-f"] if force else []), str(job_id)])
        if result.ok:
            return
        if result.exited and _GONE_RE.search(result.output):
            log.debug("qdel %s: the job has already ended (%s)", job_id, result.message())
            return
        raise ProviderError(f"qdel {job_id} failed: {result.message()}")

    def extend(self, job_id: str, duration_s: float) -> None:
        """Refused: Grid Engine applies a changed ``h_rt`` only when a job restarts or migrates (qalter(1)),
        so a running pilot job cannot be given a longer limit."""
        raise ProviderError("Grid Engine applies a changed h_rt only when the job restarts (qalter(1)): "
                            "a running pilot job's time limit cannot be raised")

    def allocated_hosts(self, job_id: str) -> list[str] | None:
        """The hosts of the job's slots (``qstat -s r -xml``'s queue instances); None while it has none."""
        if not _JOB_ID_RE.fullmatch(str(job_id)):
            return None
        result = self._run(["qstat", "-s", "r", "-g", "t", "-xml"])
        if not result.ok:
            log.warning("qstat failed, the hosts of job %s are unknown: %s", job_id, result.message())
            return None
        hosts = []
        for job in ET.fromstring(result.stdout).iter("job_list"):
            if (job.findtext("JB_job_number") or "").strip() == str(job_id):
                queue = (job.findtext("queue_name") or "").strip()  # all.q@sgenode1
                host = queue.rpartition("@")[2]
                if host and host not in hosts:
                    hosts.append(host)
        return hosts or None

    def status(self, job_ids: list[str]) -> dict[str, JobState]:
        """One ``qstat -xml`` for all; ``qacct -j`` for each id it no longer lists; UNKNOWN if qstat fails."""
        states, asked = split_job_ids(job_ids, _JOB_ID_RE, "Grid Engine")
        if not asked:
            return states
        result = self._run(["qstat", "-u", "*", "-xml"])
        if not result.ok:
            log.warning("qstat failed, job states unknown: %s", result.message())
            states.update({job_id: JobState.UNKNOWN for job_id in asked})
            return states
        try:
            listed = parse_qstat_xml(result.stdout)
        except ET.ParseError as exc:
            log.warning("qstat -xml answered what is not XML (%s): job states unknown", exc)
            states.update({job_id: JobState.UNKNOWN for job_id in asked})
            return states
        for job_id in asked:
            states[job_id] = listed[job_id] if job_id in listed else self._accounted(job_id)
        return states

    def _accounted(self, job_id: str) -> JobState:
        result = self._run(["qacct", "-j", job_id])
        if result.ok:
            return accounted_state(result.stdout) or JobState.GONE
        if result.exited:
            return JobState.GONE  # "error: job id N not found", or no accounting file at all
        log.warning("qacct failed, the state of job %s is unknown: %s", job_id, result.message())
        return JobState.UNKNOWN
