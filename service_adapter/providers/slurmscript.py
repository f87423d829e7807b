"""Slurm's pilot job script (``#SBATCH``): its rendering and which sbatch options fight the template's fields."""

from __future__ import annotations

from typing import TYPE_CHECKING

from service_adapter.providers.jobscript import (
    PREFIXES, SLURM, JobTemplate, ScriptDialect, check_job, exec_line, head, job_name,
    memory_per_node_mb, normalised_extras, output_path, walltime_s,
)
from service_adapter.providers.lrmtime import format_walltime, slurm_time
from service_adapter.providers.launchers import Launcher

if TYPE_CHECKING:
    from service_adapter.providers.base import PilotJob

# sbatch's options that set what a typed field sets, long and short spellings.
_SLURM_LONG = {
    "job-name": "name", "nodes": "nodes", "ntasks": "tasks", "ntasks-per-node": "tasks",
    "cpus-per-task": "cpus", "mem": "memory", "mem-per-cpu": "memory", "mem-per-gpu": "memory",
    "time": "walltime", "partition": "queue", "account": "account", "output": "output", "error": "output",
    "exclude": "exclude", "nodelist": "exclude",
}
_SLURM_SHORT = {
    "J": "name", "N": "nodes", "n": "tasks", "c": "cpus", "t": "walltime", "p": "queue", "A": "account",
    "o": "output", "e": "output", "x": "exclude", "w": "exclude",
}


def _slurm_keys(words: list[str]) -> list[str]:
    keys = []
    for word in words:
        if word.startswith("--") and len(word) > 2:
            name = word[2:].split("=", 1)[0]
            key = _SLURM_LONG.get(name)
            if key is None:
                # sbatch (getopt_long) takes any unambiguous abbreviation: --ti=10 is --time=10.
                # An abbreviation of a watched option is refused even when it is ambiguous,
                # since sbatch would refuse that line anyway.
                key = next((k for long, k in _SLURM_LONG.items() if long.startswith(name)), None)
            if key:
                keys.append(key)
        elif word.startswith("-") and len(word) > 1 and word[1] != "-":
            key = _SLURM_SHORT.get(word[1])
            if key:
                keys.append(key)
    return keys


SLURM_SCRIPT = ScriptDialect(SLURM, PREFIXES[SLURM], long_options=True, option_keys=_slurm_keys)


def render_slurm(job: PilotJob, template: JobTemplate, launcher: Launcher | str) -> str:
    """The whole Slurm batch script for ``job`` (raises :class:`JobScriptError` before returning anything)."""
    check_job(job)
    memory = memory_per_node_mb(job, template)
    extras = normalised_extras(template, SLURM_SCRIPT, memory_set=memory != 0, job=job)
    lines = head(job) + [
        f"#SBATCH --job-name={job_name(job, template)}",
        f"#SBATCH --nodes={job.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --cpus-per-task={template.cores_per_node}",
    ]
    if memory:
        lines.append(f"#SBATCH --mem={memory}M")
    lines.append(f"#SBATCH --time={format_walltime(walltime_s(job, template))}")
    if job.begin_at is not None:
        lines.append(f"#SBATCH --begin={slurm_time(job.begin_at)}")
    if job.exclude_nodes:
        lines.append(f"#SBATCH --exclude={','.join(job.exclude_nodes)}")
    if template.queue:
        lines.append(f"#SBATCH --partition={template.queue}")
    if template.account:
        lines.append(f"#SBATCH --account={template.account}")
    # No --error: without it Slurm writes stderr to the --output file too.
    lines.append(f"#SBATCH --output={output_path(job, template)}")
    lines += extras
    lines.append(exec_line(job, template, launcher, SLURM))
    return "\n".join(lines) + "\n"
