"""Slurm's ``squeue -h -j $SLURM_JOB_ID -o %e``: the job's end in local time, asked live (an extension shows)."""

from __future__ import annotations

import re

from pilot.walltime.base import SourceFailed, local_epoch, quote

#: What squeue's %e prints when the job has no known end.
UNKNOWN = frozenset({"N/A", "Unknown", "NONE"})


def probe(env, query, now):
    """The earliest end squeue prints for the job; None outside a Slurm job."""
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    output = query("squeue", "-h", "-j", job, "-o", "%e")
    ends = []
    for line in output.splitlines():
        text = line.strip()
        if not text or text in UNKNOWN:
            continue
        match = re.fullmatch(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})", text)
        if not match:
            raise SourceFailed(f"unparsable end time {quote(text)} for job {job}")
        try:
            ends.append(local_epoch(*(int(field) for field in match.groups())))
        except ValueError:
            raise SourceFailed(f"no such local time {quote(text)} for job {job}") from None
    if not ends:
        raise SourceFailed(f"no end time known for job {job} (printed {quote(output.strip())})")
    # Several lines (a heterogeneous job's components): the earliest end is the one that kills us.
    return min(ends), "squeue"
