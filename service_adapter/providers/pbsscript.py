"""PBS's pilot job script (``#PBS``: Torque, OpenPBS/PBS Pro, SchedMD's qsub): its rendering and which qsub
options fight the template's fields."""

from __future__ import annotations

from typing import TYPE_CHECKING

from service_adapter.providers.jobscript import (
    PREFIXES, PBS, JobScriptError, JobTemplate, ScriptDialect, check_job, exec_line, head, job_name,
    memory_per_node_mb, normalised_extras, output_path, walltime_s,
)
from service_adapter.providers.lrmtime import format_walltime, pbs_time, slurm_time
from service_adapter.providers.launchers import Launcher

if TYPE_CHECKING:
    from service_adapter.providers.base import PilotJob

# qsub's options (-l resources listed apart).
_PBS_SHORT = {"N": "name", "q": "queue", "A": "account", "o": "output", "e": "output", "j": "output", "k": "output"}
_PBS_RESOURCES = {
    "nodes": "nodes", "select": "nodes", "procs": "nodes", "ncpus": "cpus", "walltime": "walltime",
    "mem": "memory", "pmem": "memory",
}


def _pbs_keys(words: list[str]) -> list[str]:
    keys = []
    index = 0
    while index < len(words):
        word = words[index]
        index += 1
        if not word.startswith("-") or len(word) < 2:
            continue
        letter = word[1]
        if letter == "l":
            resources = word[2:]
            if not resources and index < len(words):
                resources = words[index]
                index += 1
            for item in resources.split(","):
                key = _PBS_RESOURCES.get(item.split("=", 1)[0].strip().lower())
                if key:
                    keys.append(key)
        elif letter in _PBS_SHORT:
            keys.append(_PBS_SHORT[letter])
    return keys


PBS_SCRIPT = ScriptDialect(PBS, PREFIXES[PBS], long_options=False, option_keys=_pbs_keys)


def render_pbs(job: PilotJob, template: JobTemplate, launcher: Launcher | str, *, slurm_backed: bool = False) -> str:
    """The whole PBS batch script for ``job`` (raises :class:`JobScriptError` before returning anything).

    A begin time is ``-a CCYYMMDDhhmm.SS`` (Torque, PBS Pro), or with
    ``slurm_backed`` (SchedMD's qsub, whose sbatch reads the ``#PBS`` lines
    and hands ``-a`` to ``--begin`` as it is) ``YYYY-MM-DDThh:mm:ss``.

    Memory is ``-l mem=<M>mb``: SchedMD's qsub turns it into ``--mem=<M>M``
    and sbatch's own ``#PBS`` parser reads it the same way, both per node;
    ``pmem`` is ignored by both. (On a real Torque ``mem`` is the whole
    job's: such sites set ``memory_per_node_mb = 0`` and say what they need
    in ``extra_directives``.)
    """
    check_job(job)
    if job.exclude_nodes:
        raise JobScriptError("a PBS job cannot be kept off named nodes (qsub has no such option): reserve without "
                             "exclude_nodes (a COBalD pool: exclude_blackholed: false)")
    memory = memory_per_node_mb(job, template)
    extras = normalised_extras(template, PBS_SCRIPT, memory_set=memory != 0, job=job)
    lines = head(job) + [
        f"#PBS -N {job_name(job, template)}",
        f"#PBS -l nodes={job.nodes}:ppn={template.cores_per_node}",
        f"#PBS -l walltime={format_walltime(walltime_s(job, template))}",
    ]
    if job.begin_at is not None:
        lines.append(f"#PBS -a {slurm_time(job.begin_at) if slurm_backed else pbs_time(job.begin_at)}")
    if memory:
        lines.append(f"#PBS -l mem={memory}mb")
    if template.queue:
        lines.append(f"#PBS -q {template.queue}")
    if template.account:
        lines.append(f"#PBS -A {template.account}")
    lines += ["#PBS -j oe", f"#PBS -o {output_path(job, template)}"]
    lines += extras
    lines.append(exec_line(job, template, launcher, PBS))
    return "\n".join(lines) + "\n"
