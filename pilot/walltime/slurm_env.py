"""Slurm's ``SLURM_JOB_END_TIME``: the job's end in epoch seconds, fixed when the job started."""

from __future__ import annotations

import re

from pilot.walltime.base import SourceFailed, quote


def probe(env, query, now):
    """The end from the job's environment; None without the variable."""
    value = env.get("SLURM_JOB_END_TIME")
    if value is None:
        return None
    if not re.fullmatch(r"\s*[0-9]+\s*", value) or int(value) <= 0:
        raise SourceFailed(f"not an epoch time: {quote(value)}")
    return float(int(value)), "SLURM_JOB_END_TIME"
