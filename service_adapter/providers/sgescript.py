"""Grid Engine's pilot job script (``#$``): its rendering and which qsub options fight the template's fields."""

from __future__ import annotations

from typing import TYPE_CHECKING

from service_adapter.providers.jobscript import (
    PREFIXES, SGE, JobTemplate, ScriptDialect, check_job, exec_line, head, job_name,
    memory_per_node_mb, normalised_extras, output_path, walltime_s,
)
from service_adapter.providers.lrmtime import format_walltime, pbs_time
from service_adapter.providers.launchers import Launcher

if TYPE_CHECKING:
    from service_adapter.providers.base import PilotJob

# Grid Engine's qsub options (-l resources apart; -pe sets the node count).
_SGE_OPTIONS = {"-N": "name", "-q": "queue", "-A": "account", "-o": "output", "-e": "output", "-j": "output",
                "-pe": "nodes"}
_SGE_RESOURCES = {"h_rt": "walltime", "s_rt": "walltime", "h_vmem": "memory", "s_vmem": "memory",
                  "mem_free": "memory", "virtual_free": "memory", "h": "exclude", "hostname": "exclude"}


def _sge_keys(words: list[str]) -> list[str]:
    keys = []
    index = 0
    while index < len(words):
        word = words[index]
        index += 1
        if word == "-l" and index < len(words):
            for item in words[index].split(","):
                key = _SGE_RESOURCES.get(item.split("=", 1)[0].strip().lower())
                if key:
                    keys.append(key)
            index += 1
        elif word in _SGE_OPTIONS:
            keys.append(_SGE_OPTIONS[word])
    return keys


SGE_SCRIPT = ScriptDialect(SGE, PREFIXES[SGE], long_options=False, option_keys=_sge_keys)


def render_sge(job: PilotJob, template: JobTemplate, launcher: Launcher | str) -> str:
    """The whole Grid Engine batch script for ``job`` (raises :class:`JobScriptError` before returning anything).

    One slot on each of ``nodes`` hosts through the template's parallel
    environment; ``h_rt`` the walltime; ``-notify`` so that a ``qdel`` or a
    suspend warns the pilot (SIGUSR2, SIGUSR1) before SIGKILL/SIGSTOP; memory
    as ``mem_free`` per slot (one slot per host: per node), which the
    scheduler matches against the hosts' free memory, never ``h_vmem``, a
    limit on the pilot's own processes (at a lease's size it crashes Python
    and Grid Engine's own tools: the pilot takes that memory from the host,
    it does not use it). ``-V`` is not used: the script carries what it needs.
    """
    check_job(job)
    memory = memory_per_node_mb(job, template)
    extras = normalised_extras(template, SGE_SCRIPT, memory_set=memory != 0, job=job)
    lines = head(job) + [
        "#$ -S /bin/sh",
        f"#$ -N {job_name(job, template)}",
        f"#$ -pe {template.parallel_environment} {job.nodes}",
        f"#$ -l h_rt={format_walltime(walltime_s(job, template))}",
        "#$ -notify",
    ]
    if job.begin_at is not None:
        lines.append(f"#$ -a {pbs_time(job.begin_at)}")
    if memory:
        lines.append(f"#$ -l mem_free={memory}M")
    if job.exclude_nodes:  # Grid Engine's resource expression: not this host and not that one
        lines.append("#$ -l h=" + "&".join(f"!{node}" for node in job.exclude_nodes))
    if template.queue:
        lines.append(f"#$ -q {template.queue}")
    if template.account:
        lines.append(f"#$ -A {template.account}")
    lines += ["#$ -j y", f"#$ -o {output_path(job, template)}"]
    lines += extras
    lines.append(exec_line(job, template, launcher, SGE))
    return "\n".join(lines) + "\n"
