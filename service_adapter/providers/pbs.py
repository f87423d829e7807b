"""The ``pbs`` provider: qsub, qdel and qstat (Torque, OpenPBS/PBS Pro, or SchedMD's Slurm wrappers).

What differs between the three and is handled here:

- SchedMD's ``qsub`` always passes its own ``-o``/``-e`` to sbatch, so the
  output path goes on qsub's command line (``-o OUT -e OUT``: one file).
- ``qstat -x`` lists finished jobs on OpenPBS/PBS Pro, prints XML on Torque,
  and is refused by SchedMD's qstat: ``qstat_history = "auto"`` tries it
  once and remembers when it does not give history.
- A finished job is ``C`` with ``exit_status`` on Torque, ``F`` with
  ``Exit_status`` on PBS Pro (with -x), and ``C`` with no exit status on
  SchedMD's qstat: the last is ENDED, not COMPLETED.
- An unknown job id: Torque and PBS Pro say "Unknown Job Id" on stderr
  (exit 153); SchedMD's qstat says nothing, lists the ids it knows, and
  exits 153 only when it knows none of them. Ids missing silently from a
  longer query are asked again one at a time.
"""

from __future__ import annotations

import logging
import re
import shutil
from typing import Callable

from workspace_common.qstat import parse_full
from service_adapter.providers.base import JobState, PilotJob, ProviderError, split_job_ids
from service_adapter.providers.batch import BatchProvider, checked_job_id, signal_steps
from service_adapter.providers.commands import CommandResult
from service_adapter.providers.jobscript import PBS, JobTemplate, output_path, script_path, walltime_for
from service_adapter.providers.lrmtime import format_walltime
from service_adapter.providers.pbsscript import PBS_SCRIPT, render_pbs
from service_adapter.providers.scriptfile import write_job_script

log = logging.getLogger(__name__)

# 123, 123.server.domain, 123[].server (arrays): what qsub prints and qdel/qstat take.
_JOB_ID_RE = re.compile(r"[0-9]+(\[[0-9]*\])?(\.[A-Za-z0-9_.-]+)?")
# Torque/PBS Pro's "qstat: Unknown Job Id Error 123.srv" and "Invalid job id"; exit status 153 is
# PBSE_UNKJOBID (15001) modulo 256, which SchedMD's qstat also uses for "none of these jobs".
_UNKNOWN_JOB_RE = re.compile(r"unknown job id|invalid job id", re.IGNORECASE)
_UNKNOWN_JOB_RC = 153
_BAD_OPTION_RE = re.compile(r"(unknown|illegal|invalid|unrecognized) option", re.IGNORECASE)
# qdel of a job that has ended: "Unknown Job Id", "Request invalid for state of job",
# "Job has finished" (PBS Pro); SchedMD's qdel prints nothing for those and exits 1.
_DONE_RE = re.compile(r"unknown job id|invalid job id|invalid state|invalid for state|has finished|already",
                      re.IGNORECASE)

HISTORY_CHOICES = ("auto", "yes", "no")

#: PBS job_state letters as the provider reports them (C/F/X are decided by the exit status).
STATES = {
    "Q": JobState.PENDING,
    "W": JobState.PENDING,
    "H": JobState.HELD,
    "R": JobState.RUNNING,
    "E": JobState.RUNNING,
    "T": JobState.RUNNING,
    "S": JobState.RUNNING,
    "B": JobState.RUNNING,
}
_ENDED_LETTERS = frozenset("CFX")


def job_state(attributes: dict[str, str]) -> JobState:
    """A job's state from its ``qstat -f`` attributes (lower-case names).

    C/F/X (ended): COMPLETED for exit status 0, FAILED for any other, ENDED
    when no exit status is shown. A letter not known (SchedMD's ``U``,
    PBS Pro's ``M`` moved) is UNKNOWN.
    """
    letter = attributes.get("job_state", "").strip().upper()[:1]
    if letter in STATES:
        return STATES[letter]
    if letter in _ENDED_LETTERS:
        code = attributes.get("exit_status", "").strip()
        if not re.fullmatch(r"-?[0-9]+", code):
            return JobState.ENDED
        return JobState.COMPLETED if int(code) == 0 else JobState.FAILED
    log.warning("qstat reported job_state %r, which this provider does not know", letter)
    return JobState.UNKNOWN


def exec_hosts(value: str) -> list[str] | None:
    """The hosts of an ``exec_host`` attribute (``node1/0+node1/1+node2/0``), in order, each once; None if empty."""
    hosts: list[str] = []
    for part in value.replace(" ", "").split("+"):
        host = part.split("/", 1)[0]
        if host and host not in hosts:
            hosts.append(host)
    return hosts or None


def _short(job_id: str) -> str:
    return job_id.split(".", 1)[0]


class PbsProvider(BatchProvider):
    """Submits pilot jobs with qsub, cancels them with qdel, watches them with ``qstat -f``.

    ``use_pbs_python`` uses the pbs_python bindings instead of the commands
    when ``import pbs`` works (else one warning, and the commands).
    ``qstat_history``: "yes" always adds ``-x``, "no" never, "auto" tries it
    once. ``env`` is added to every command's environment.
    """

    name = PBS

    def __init__(self, template: JobTemplate = JobTemplate(), *, command_timeout_s: float = 30.0,
                 env: dict[str, str] | None = None, use_pbs_python: bool = False, qstat_history: str = "auto",
                 which: Callable[[str], str | None] = shutil.which):
        if qstat_history not in HISTORY_CHOICES:
            raise ValueError(f"qstat_history must be one of {', '.join(HISTORY_CHOICES)}, not {qstat_history!r}")
        super().__init__(template, PBS_SCRIPT, command_timeout_s=command_timeout_s, env=env, which=which)
        #: SchedMD's qsub (slurm-wlm-torque): sbatch reads the script's #PBS lines, a begin time in its own form.
        self.slurm_backed = which("sbatch") is not None and which("pbsdsh") is None
        self._history = {"auto": None, "yes": True, "no": False}[qstat_history]
        self._ifl = _load_pbs_python() if use_pbs_python else None

    # -- submit / cancel -------------------------------------------------------------------------

    def submit(self, job: PilotJob) -> str:
        """Write ``{output_dir}/{slot}.sh`` and ``qsub -o OUT -e OUT`` it; returns the job id qsub printed."""
        text = render_pbs(job, self.template, self.launcher, slurm_backed=self.slurm_backed)
        path = write_job_script(script_path(job, self.template), text)
        out = output_path(job, self.template)
        if self._ifl is not None:
            job_id = checked_job_id(self._ifl.submit(path, out), job, "qsub", _JOB_ID_RE)
        else:
            result = self._run(["qsub", "-o", out, "-e", out, path])
            job_id = self._submitted_id(result, job, "qsub", _JOB_ID_RE,
                                        lambda lines: lines[0].strip() if lines else "")
        log.info("slot %s: submitted PBS job %s (%d nodes)", job.slot, job_id, job.nodes)
        return job_id

    def cancel(self, job_id: str, force: bool = False) -> None:
        """``qdel ID``; a job that has ended or that the server no longer knows is not an error.

        On a Slurm-backed qsub (launcher srun) the gentle way is Slurm's:
        SIGTERM to the pilots' step only (see
        :func:`service_adapter.providers.batch.signal_steps`), because SchedMD's
        qdel also signals srun, which then SIGKILLs the pilots; ``qdel`` is
        then the ``force`` step, for a job still there after the release grace.
        """
        if not _JOB_ID_RE.fullmatch(str(job_id)):
            raise ProviderError(f"{job_id!r} is not a PBS job id")
        if not force and self.launcher.name == "srun" and self._ifl is None:
            signal_steps(self._run, str(job_id))
            return
        if self._ifl is not None:
            self._ifl.cancel(job_id)
            return
        result = self._run(["qdel", str(job_id)])
        if result.ok:
            return
        if result.exited and (_DONE_RE.search(result.output) or not result.output.strip()):
            log.debug("qdel %s: the job has already ended (rc %s, %s)", job_id, result.rc, result.message())
            return
        raise ProviderError(f"qdel {job_id} failed: {result.message()}")

    def extend(self, job_id: str, duration_s: float) -> None:
        """``qalter -l walltime=HH:MM:SS ID`` for the walltime a lease of ``duration_s`` needs.

        The server's policy decides (Torque and PBS Pro let a manager or
        operator raise a running job's walltime, within the queue's
        ``resources_max.walltime``; SchedMD's qalter has no ``-l`` at all);
        its refusal is raised as :class:`ProviderError`, nothing changed.
        """
        if not _JOB_ID_RE.fullmatch(str(job_id)):
            raise ProviderError(f"{job_id!r} is not a PBS job id")
        walltime = format_walltime(walltime_for(duration_s, self.template))
        result = self._run(["qalter", "-l", f"walltime={walltime}", str(job_id)])
        if not result.ok:
            raise ProviderError(f"qalter refused a walltime of {walltime} for job {job_id}: {result.message()}")
        log.info("job %s: walltime raised to %s", job_id, walltime)

    def allocated_hosts(self, job_id: str) -> list[str] | None:
        """The hosts of ``qstat -f``'s ``exec_host`` (``node1/0+node2/0-3``, Torque and PBS Pro), each once;
        None while the job has none (queued) or qstat could not say."""
        if not _JOB_ID_RE.fullmatch(str(job_id)):
            return None
        result = self._run(["qstat", "-f", str(job_id)])
        if not result.ok:
            log.warning("qstat failed, the hosts of job %s are unknown: %s", job_id, result.message())
            return None
        jobs = parse_full(result.stdout)
        attrs = jobs.get(job_id) or {_short(j): a for j, a in jobs.items()}.get(_short(job_id))
        return exec_hosts(attrs.get("exec_host", "")) if attrs else None

    # -- status ------------------------------------------------------------------------------------

    def status(self, job_ids: list[str]) -> dict[str, JobState]:
        """``qstat -f`` (with ``-x`` where it gives history) for all ids; UNKNOWN where qstat could not say."""
        states, asked = split_job_ids(job_ids, _JOB_ID_RE, "PBS")
        if not asked:
            return states
        if self._ifl is not None:
            states.update(self._ifl.status(asked))
            return states
        found, undecided, clean = self._query(asked)
        states.update(found)
        for job_id in undecided:
            if clean and len(asked) > 1:
                # Said nothing about it (SchedMD's qstat): asked alone, it answers 153 if it does not know it.
                alone, _, _ = self._query([job_id])
                states[job_id] = alone.get(job_id, JobState.UNKNOWN)
            else:
                states[job_id] = JobState.UNKNOWN
        return states

    def _query(self, job_ids: list[str]) -> tuple[dict[str, JobState], list[str], bool]:
        """One qstat: (states it decided, ids it said nothing about, whether it ran cleanly)."""
        result = self._qstat(job_ids)
        if not result.exited:
            log.warning("qstat failed, job states unknown: %s", result.message())
            return {job_id: JobState.UNKNOWN for job_id in job_ids}, [], False
        jobs = parse_full(result.stdout)
        by_short = {_short(job_id): attrs for job_id, attrs in jobs.items()}
        unknown_lines = [line for line in result.output.splitlines() if _UNKNOWN_JOB_RE.search(line)]
        other_lines = [
            line for line in result.stderr.splitlines() if line.strip() and not _UNKNOWN_JOB_RE.search(line)
        ]
        clean = result.rc in (0, _UNKNOWN_JOB_RC) and not other_lines
        if not clean and not jobs and not unknown_lines:
            log.warning("qstat failed, job states unknown: %s", result.message())
            return {job_id: JobState.UNKNOWN for job_id in job_ids}, [], False
        found: dict[str, JobState] = {}
        undecided = []
        for job_id in job_ids:
            attrs = jobs.get(job_id) or by_short.get(_short(job_id))
            if attrs is not None:
                found[job_id] = job_state(attrs)
            elif any(job_id in line or re.search(rf"\b{re.escape(_short(job_id))}\b", line) for line in unknown_lines):
                found[job_id] = JobState.GONE
            elif len(job_ids) == 1 and result.rc == _UNKNOWN_JOB_RC and not jobs and (clean or unknown_lines):
                found[job_id] = JobState.GONE
            else:
                undecided.append(job_id)
        return found, undecided, clean

    def _qstat(self, job_ids: list[str]) -> CommandResult:
        if self._history is not False:
            result = self._run(["qstat", "-f", "-x", *job_ids])
            if self._history is True or not result.exited:
                return result
            if result.rc != 0 and _BAD_OPTION_RE.search(result.output):
                log.info("qstat does not take -x here: finished jobs are seen only while qstat keeps them")
                self._history = False
            elif result.stdout.lstrip().startswith("<"):
                log.info("qstat -x prints XML here (Torque): asking without it")
                self._history = False
            else:
                if result.rc in (0, _UNKNOWN_JOB_RC):
                    self._history = True
                return result
        return self._run(["qstat", "-f", *job_ids])


# -- pbs_python ------------------------------------------------------------------------------------


def _load_pbs_python():
    try:
        import pbs  # noqa: F401  (pbs_python: SWIG bindings to the site's libtorque/libpbs)
    except Exception as exc:  # an ImportError, or the bindings failing to load their library
        log.warning("use_pbs_python is set but pbs_python cannot be loaded (%s): using qsub, qdel and qstat", exc)
        return None
    return _PbsPython(pbs)


_PBSE_UNKJOBID = 15001
_PBSE_BADSTATE = 15018


class _PbsPython:
    """The pbs_python (IFL) path: pbs_connect, pbs_submit, pbs_deljob, pbs_statjob.

    Kept small on purpose: pbs_python cannot load on the machines this
    project is tested on (no Torque/OpenPBS library), so this path is not
    exercised by the tests; only the fallback to the commands is. Each call
    opens and closes its own connection to the default server.
    """

    def __init__(self, module):
        self.pbs = module

    def _connect(self) -> int:
        conn = self.pbs.pbs_connect(self.pbs.pbs_default() or "")
        if conn is None or conn <= 0:
            raise ProviderError(f"pbs_connect failed: {self._error()}")
        return conn

    def _error(self) -> str:
        errno, text = self.pbs.error()
        return f"{text} ({errno})"

    def submit(self, script: str, out: str) -> str:
        conn = self._connect()
        try:
            attrs = self.pbs.new_attropl(2)
            attrs[0].name, attrs[0].value = self.pbs.ATTR_o, out
            attrs[1].name, attrs[1].value = self.pbs.ATTR_e, out
            job_id = self.pbs.pbs_submit(conn, attrs, script, None, None)
            if not job_id:
                raise ProviderError(f"pbs_submit refused the job: {self._error()}")
            return job_id
        finally:
            self.pbs.pbs_disconnect(conn)

    def cancel(self, job_id: str) -> None:
        conn = self._connect()
        try:
            if self.pbs.pbs_deljob(conn, job_id, None) != 0:
                errno, _ = self.pbs.error()
                if errno not in (_PBSE_UNKJOBID, _PBSE_BADSTATE):
                    raise ProviderError(f"pbs_deljob {job_id} failed: {self._error()}")
        finally:
            self.pbs.pbs_disconnect(conn)

    def status(self, job_ids: list[str]) -> dict[str, JobState]:
        try:
            conn = self._connect()
        except ProviderError as exc:
            log.warning("%s: job states unknown", exc)
            return {job_id: JobState.UNKNOWN for job_id in job_ids}
        try:
            states = {}
            for job_id in job_ids:
                found = self.pbs.pbs_statjob(conn, job_id, None, None)
                if found:
                    attrs = {a.name.lower(): a.value for a in found[0].attribs if not a.resource}
                    states[job_id] = job_state(attrs)
                else:
                    errno, _ = self.pbs.error()
                    states[job_id] = JobState.GONE if errno == _PBSE_UNKJOBID else JobState.UNKNOWN
            return states
        finally:
            self.pbs.pbs_disconnect(conn)
