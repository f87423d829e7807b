"""The base of the providers that drive a batch system through its commands (slurm, pbs).

Parsl's ``ClusterProvider`` has the same place between the provider
interface and each scheduler: running an LRM command with a time limit
(never hanging the service, never raising on a non-zero exit), and reading
what a submit command answered. And the gentle cancel of a job that Slurm
runs, which the pbs provider needs too on SchedMD's Slurm-backed qsub.
"""

from __future__ import annotations

import re
import shutil
from typing import Callable

from service_adapter.providers.base import PilotJob, Provider, ProviderError
from service_adapter.providers.commands import CommandResult, Outcome, run_command
from service_adapter.providers.jobscript import JobTemplate, ScriptDialect, job_name
from service_adapter.providers.launchers import resolve_launcher


class BatchProvider(Provider):
    """A provider whose LRM is driven by commands (sbatch, qsub, ...), each with ``command_timeout_s``.

    ``env`` is added to every command's environment (e.g. ``SLURM_CONF``).
    """

    def __init__(self, template: JobTemplate, script: ScriptDialect, *, command_timeout_s: float = 30.0,
                 env: dict[str, str] | None = None, which: Callable[[str], str | None] = shutil.which):
        template.check(script)
        self.template = template
        self.launcher = resolve_launcher(template.launcher, script.name, which)
        self.command_timeout_s = command_timeout_s
        self.env = dict(env) if env else None
        #: Called with every command's result (the service's metrics); must not raise.
        self.observe: Callable[[CommandResult], object] | None = None

    def _run(self, argv: list[str]) -> CommandResult:
        result = run_command(argv, timeout=self.command_timeout_s, env=self.env)
        if self.observe is not None:
            self.observe(result)
        return result

    def _submitted_id(self, result: CommandResult, job: PilotJob, command: str, job_id_re: re.Pattern,
                      pick: Callable[[list[str]], str]) -> str:
        """The job id a submit command printed (``pick`` takes it from its stdout lines); ProviderError, one line,
        for a timeout (the job may be queued anyway), a refusal, or no job id."""
        if result.outcome is Outcome.TIMED_OUT:
            raise ProviderError(
                f"{result.message()}: job {job_name(job, self.template)} for slot {job.slot} may be queued anyway"
            )
        if not result.ok:
            raise ProviderError(f"{command} refused the job for slot {job.slot}: {result.message()}")
        job_id = pick(result.stdout.strip().splitlines())
        return checked_job_id(job_id, job, command, job_id_re)


def checked_job_id(job_id: str, job: PilotJob, command: str, job_id_re: re.Pattern) -> str:
    """``job_id`` if it looks like one of the LRM's; ProviderError otherwise."""
    if not job_id_re.fullmatch(job_id):
        raise ProviderError(f"{command} printed no job id for slot {job.slot}: {job_id!r}")
    return job_id


def slurm_job_ended(output: str) -> bool:
    """Whether scancel's words say the job is gone or done (not an error for a cancel)."""
    text = output.lower()
    return "invalid job id" in text or "already complet" in text


def signal_steps(run: Callable[[list[str]], object], job_id: str) -> None:
    """End a Slurm job the gentle way: cancel it if it still queues, else SIGTERM its steps only.

    A plain ``scancel`` (and SchedMD's ``qdel``, which is the same kill)
    also signals the batch step, where ``srun`` runs: srun turns a SIGTERM
    of its own into a SIGKILL of its tasks ("srun: forcing job termination"),
    which races the pilots' restore and sometimes wins. ``--signal=TERM``
    without ``--full`` reaches only the steps' tasks, the pilots; once they
    have restored and exited, srun and the batch script end and the job
    completes by itself. Raises :class:`ProviderError` if Slurm cannot be asked.
    """
    queued = run(["scancel", "--state=PENDING", job_id])  # a no-op unless the job still waits
    if not queued.ok and not (queued.exited and slurm_job_ended(queued.output)):
        raise ProviderError(f"scancel --state=PENDING {job_id} failed: {queued.message()}")
    steps = run(["scancel", "--signal=TERM", job_id])
    if steps.ok or (steps.exited and (slurm_job_ended(steps.output) or "can not be altered" in steps.output.lower())):
        # "can not be altered": it was still pending a moment ago, and the first call cancelled it.
        return
    raise ProviderError(f"scancel --signal=TERM {job_id} failed: {steps.message()}")
