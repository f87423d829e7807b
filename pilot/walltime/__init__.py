"""The batch system's end of this job, from every source it may have: one module per source, tried in order.

Each source module has ``probe(env, query, now)``: None when it does not
apply to this job, ``(end, name)`` when it answers, :class:`SourceFailed`
when it applies but has no usable answer (:mod:`.base` says more).
:func:`pilot.deadline.walltime_end` asks them in :data:`SOURCES`' order.
"""

from __future__ import annotations

from pilot.walltime import pbs_env, qstat_full, sge, slurm_env, squeue
from pilot.walltime.base import Query, SourceFailed

__all__ = ["SOURCES", "Query", "SourceFailed"]

#: (name, probe), first that answers sanely wins: the job's own end time, Slurm asked live, PBS asked live,
#: Torque's walltime from the job's start, Grid Engine's run-time limit.
SOURCES = (
    ("SLURM_JOB_END_TIME", slurm_env.probe),
    ("squeue", squeue.probe),
    ("qstat -f", qstat_full.probe),
    ("PBS_WALLTIME", pbs_env.probe),
    ("qstat -j", sge.probe),
)
