"""The ``slurm`` provider: sbatch, scancel, and squeue (sacct where accounting exists).

Every command runs with a time limit through :func:`run_command`. A status
query that fails or times out reports UNKNOWN for each job it asked about;
a job is COMPLETED only when Slurm itself says so.
"""

from __future__ import annotations

import logging
import re
import shutil
from typing import Callable

from service_adapter.providers.base import JobState, PilotJob, ProviderError, split_job_ids
from service_adapter.providers.batch import BatchProvider, signal_steps, slurm_job_ended
from service_adapter.providers.commands import Outcome
from service_adapter.providers.jobscript import SLURM, JobTemplate, script_path, walltime_for
from service_adapter.providers.scriptfile import write_job_script
from service_adapter.providers.slurmscript import SLURM_SCRIPT, render_slurm

log = logging.getLogger(__name__)

# What sbatch --parsable prints and scancel/squeue take: a number (an array task: 12_3).
_JOB_ID_RE = re.compile(r"[0-9]+(_[0-9]+)?")

#: Slurm's job states (squeue %T, sacct State) as the provider reports them.
STATES = {
    "PENDING": JobState.PENDING,
    "REQUEUED": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.HELD,
    "RESV_DEL_HOLD": JobState.HELD,
    "SPECIAL_EXIT": JobState.HELD,
    "CONFIGURING": JobState.RUNNING,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,
    "SUSPENDED": JobState.RUNNING,
    "STOPPED": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "COMPLETED": JobState.COMPLETED,
    "FAILED": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "DEADLINE": JobState.FAILED,
    "CANCELLED": JobState.CANCELLED,
    "PREEMPTED": JobState.CANCELLED,
    "REVOKED": JobState.CANCELLED,
    "TIMEOUT": JobState.TIMEOUT,
}
#: Pending reasons that mean someone holds the job (it will not start by itself).
HELD_REASONS = frozenset({"JobHeldUser", "JobHeldAdmin"})


def map_state(state: str, reason: str = "") -> JobState:
    """A Slurm state word (and squeue's reason) as a :class:`JobState`; UNKNOWN for a word not known."""
    word = state.strip().split(" ", 1)[0].rstrip("+").upper()  # sacct: "CANCELLED by 0", "RUNNING+"
    mapped = STATES.get(word, JobState.UNKNOWN)
    if mapped is JobState.PENDING and reason.strip() in HELD_REASONS:
        return JobState.HELD
    if mapped is JobState.UNKNOWN:
        log.warning("Slurm reported job state %r, which this provider does not know", state)
    return mapped


class SlurmProvider(BatchProvider):
    """Submits pilot jobs with sbatch, cancels them with scancel, watches them with squeue and sacct.

    ``env`` is added to the environment of every Slurm command (e.g.
    ``SLURM_CONF``); each command gets ``command_timeout_s`` seconds.
    """

    name = SLURM
    excludes_nodes = True  # sbatch --exclude

    def __init__(self, template: JobTemplate = JobTemplate(), *, command_timeout_s: float = 30.0,
                 env: dict[str, str] | None = None, which: Callable[[str], str | None] = shutil.which):
        super().__init__(template, SLURM_SCRIPT, command_timeout_s=command_timeout_s, env=env, which=which)
        self._accounting: bool | None = None  # None: not asked yet; False: sacct said it is disabled

    def submit(self, job: PilotJob) -> str:
        """Write ``{output_dir}/{slot}.sh`` and ``sbatch --parsable`` it; returns Slurm's job id.

        A conflicting template raises JobScriptError before anything is
        written; a refusal raises :class:`ProviderError` with sbatch's message.
        """
        text = render_slurm(job, self.template, self.launcher)
        path = write_job_script(script_path(job, self.template), text)
        result = self._run(["sbatch", "--parsable", path])
        # --parsable prints "id" or "id;cluster" on a federated or multi-cluster site.
        job_id = self._submitted_id(result, job, "sbatch", _JOB_ID_RE,
                                    lambda lines: lines[-1].split(";", 1)[0].strip() if lines else "")
        log.info("slot %s: submitted Slurm job %s (%d nodes)", job.slot, job_id, job.nodes)
        return job_id

    def cancel(self, job_id: str, force: bool = False) -> None:
        """End the job: gently (SIGTERM to the pilots' step only) or, with ``force``, ``scancel ID``.

        See :func:`signal_steps` for why the gentle way leaves srun alone. A
        job Slurm no longer knows or that has ended is not an error.
        """
        if not _JOB_ID_RE.fullmatch(str(job_id)):
            raise ProviderError(f"{job_id!r} is not a Slurm job id")
        if not force:
            signal_steps(self._run, str(job_id))
            return
        result = self._run(["scancel", str(job_id)])
        if result.ok:
            return
        if result.exited and slurm_job_ended(result.output):
            log.debug("scancel %s: the job has already ended (%s)", job_id, result.message())
            return
        raise ProviderError(f"scancel {job_id} failed: {result.message()}")

    def extend(self, job_id: str, duration_s: float) -> None:
        """``scontrol update JobId=ID TimeLimit=MIN`` for the walltime a lease of ``duration_s`` needs.

        Slurm lets an operator or administrator raise a limit past the
        partition's MaxTime (a plain user may only lower it), so the
        partition's MaxTime is checked here first: an extension beyond it is
        refused, naming the partition and its limit. A job whose limit is
        already long enough is left alone. Raises :class:`ProviderError`
        (nothing changed) with Slurm's or the partition's reason.
        """
        if not _JOB_ID_RE.fullmatch(str(job_id)):
            raise ProviderError(f"{job_id!r} is not a Slurm job id")
        want = walltime_for(duration_s, self.template) // 60
        job = self._show("job", str(job_id))
        current = slurm_minutes(job.get("TimeLimit", ""))
        if current is None or current >= want:
            log.info("job %s: its time limit (%s) already covers %d min", job_id, job.get("TimeLimit"), want)
            return
        for partition in filter(None, job.get("Partition", "").split(",")):
            limit = self._show("partition", partition).get("MaxTime", "")
            most = slurm_minutes(limit)
            if most is not None and want > most:
                raise ProviderError(f"partition {partition} allows at most {limit} ({most} min): the job would "
                                    f"need a time limit of {want} min")
        result = self._run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={want}"])
        if not result.ok:
            raise ProviderError(f"Slurm refused a time limit of {want} min for job {job_id}: {result.message()}")
        log.info("job %s: time limit raised from %s to %d min", job_id, job.get("TimeLimit"), want)

    def _show(self, kind: str, name: str) -> dict[str, str]:
        """``scontrol show KIND NAME -o`` as its Key=Value pairs; ProviderError when Slurm could not say."""
        result = self._run(["scontrol", "show", kind, name, "-o"])
        if not result.ok:
            raise ProviderError(f"scontrol show {kind} {name} failed: {result.message()}")
        return scontrol_fields(result.stdout)

    def allocated_hosts(self, job_id: str) -> list[str] | None:
        """``squeue -o %N`` for the job's node list, expanded by ``scontrol show hostnames``; None while
        it has none (pending) or a command failed."""
        if not _JOB_ID_RE.fullmatch(str(job_id)):
            return None
        listed = self._run(["squeue", "-h", "-j", str(job_id), "-o", "%N"])
        nodelist = listed.stdout.strip() if listed.ok else ""
        if not nodelist or nodelist.startswith("("):
            if not listed.ok:
                log.warning("squeue failed, the nodes of job %s are unknown: %s", job_id, listed.message())
            return None
        expanded = self._run(["scontrol", "show", "hostnames", nodelist])
        if not expanded.ok:
            log.warning("scontrol show hostnames %s failed: %s", nodelist, expanded.message())
            return None
        return [line.strip() for line in expanded.stdout.splitlines() if line.strip()] or None

    def status(self, job_ids: list[str]) -> dict[str, JobState]:
        """One squeue call for all ids; sacct (if any) for those squeue no longer lists.

        A job neither lists is GONE; an id that is not a Slurm job id at all
        is GONE too (Slurm cannot know it). A failed or timed-out squeue makes
        every asked id UNKNOWN.
        """
        states, asked = split_job_ids(job_ids, _JOB_ID_RE, "Slurm")
        if not asked:
            return states
        result = self._run(["squeue", "-h", "--states=all", "-j", ",".join(asked), "-o", "%i|%T|%r"])
        if result.ok:
            listed = _parse_squeue(result.stdout)
        elif len(asked) == 1 and result.exited and "invalid job id" in result.output.lower():
            # squeue names no id in this error; it comes only for a single id it does not know
            # (with several, it lists the known ones and exits 0).
            listed = {}
        else:
            log.warning("squeue failed, job states unknown: %s", result.message())
            states.update({job_id: JobState.UNKNOWN for job_id in asked})
            return states
        missing = []
        for job_id in asked:
            if job_id in listed:
                states[job_id] = listed[job_id]
            else:
                missing.append(job_id)
        if missing:
            states.update(self._accounted(missing))
        return states

    def _accounted(self, job_ids: list[str]) -> dict[str, JobState]:
        """States from sacct for jobs slurmctld has forgotten; GONE where accounting has none."""
        if self._accounting is False:
            return {job_id: JobState.GONE for job_id in job_ids}
        result = self._run(["sacct", "-n", "-P", "-X", "-j", ",".join(job_ids), "-o", "JobID,State"])
        if result.outcome is Outcome.NOT_RUN or (
            result.exited and not result.ok and "accounting storage is disabled" in result.output.lower()
        ):
            log.info("Slurm has no job accounting here: jobs squeue no longer lists are reported gone")
            self._accounting = False
            return {job_id: JobState.GONE for job_id in job_ids}
        if not result.ok:
            log.warning("sacct failed, job states unknown: %s", result.message())
            return {job_id: JobState.UNKNOWN for job_id in job_ids}
        self._accounting = True
        found = {}
        for line in result.stdout.splitlines():
            job_id, _, state = line.partition("|")
            if job_id.strip() in job_ids and state:
                found[job_id.strip()] = map_state(state)
        return {job_id: found.get(job_id, JobState.GONE) for job_id in job_ids}


def scontrol_fields(text: str) -> dict[str, str]:
    """The ``Key=Value`` words of one ``scontrol show ... -o`` line (values without blanks, which is all we read)."""
    fields = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


def slurm_minutes(text: str) -> int | None:
    """A Slurm time limit (``[D-]HH:MM:SS``, ``MM:SS``, ``MM``) in whole minutes, rounded up; None for
    UNLIMITED, INFINITE or what is no time limit at all."""
    text = text.strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not match:
        return None
    days, first, second, third = match.groups()
    days = int(days or 0)
    if third is not None:
        hours, minutes, seconds = int(first), int(second), int(third)
    elif second is not None:
        # D-HH:MM, or MM:SS without days (Slurm's own reading of two fields).
        hours, minutes, seconds = (int(first), int(second), 0) if match.group(1) else (0, int(first), int(second))
    else:
        hours, minutes, seconds = (int(first), 0, 0) if match.group(1) else (0, int(first), 0)
    return days * 1440 + hours * 60 + minutes + (1 if seconds else 0)


def _parse_squeue(text: str) -> dict[str, JobState]:
    states = {}
    for line in text.splitlines():
        parts = line.strip().split("|", 2)
        if len(parts) >= 2 and parts[0]:
            states[parts[0]] = map_state(parts[1], parts[2] if len(parts) > 2 else "")
    return states
