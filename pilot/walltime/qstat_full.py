"""PBS's ``qstat -f $PBS_JOBID`` (Torque, PBS Pro/OpenPBS, or SchedMD's Torque wrapper): the job's end, asked live."""

from __future__ import annotations

import re

from pilot.walltime.base import SourceFailed, local_epoch, parse_walltime, quote
from workspace_common.qstat import parse_full


def probe(env, query, now):
    """The end from the job's qstat -f; None outside a PBS job."""
    job = env.get("PBS_JOBID")
    if not job:
        return None
    output = query("qstat", "-f", job)
    return qstat_full_end(output, now(), job), "qstat -f"


def qstat_full_end(output: str, now: float, job: str) -> float:
    """The job's end from ``qstat -f`` output, whichever PBS flavour printed it.

    - Torque: ``Walltime.Remaining`` (seconds), else ``start_time`` + ``Resource_List.walltime``.
    - PBS Pro/OpenPBS: ``stime`` + ``Resource_List.walltime``, else the walltime less
      ``resources_used.walltime``.
    - SchedMD's Torque wrapper for Slurm (slurm-wlm-torque): no start_time; it prints Slurm's
      start time as ``mtime`` and Slurm's end time as ``ctime``. There the earlier of
      ``mtime`` + walltime and ``ctime`` counts. In real PBS, ctime is the creation time and
      mtime the last change, so those are read only when none of the above is present.
    """
    jobs = parse_full(output)
    if not jobs:
        raise SourceFailed(f"no job {job} in its output ({quote(output.strip())})")
    # qstat was asked for one job: never mix in another job's attributes. Names are lower case.
    attributes = next(iter(jobs.values()))

    def duration(key: str) -> float | None:
        value = attributes.get(key.lower())
        if value is None:
            return None
        try:
            return float(parse_walltime(value))
        except ValueError:
            raise SourceFailed(f"unparsable {key} {quote(value)}") from None

    def moment(key: str) -> float | None:
        value = attributes.get(key.lower())
        if value is None:
            return None
        try:
            return parse_ctime(value)
        except ValueError:
            raise SourceFailed(f"unparsable {key} {quote(value)}") from None

    remaining = duration("Walltime.Remaining")
    if remaining is not None:
        return now + remaining
    limit = duration("Resource_List.walltime")
    start = moment("start_time") if "start_time" in attributes else moment("stime")
    if start is not None and limit is not None:
        return start + limit
    used = duration("resources_used.walltime")
    if used is not None and limit is not None:
        return now + limit - used
    if start is None and "mtime" in attributes:
        # slurm-wlm-torque: mtime is Slurm's start_time, ctime Slurm's end_time (printed only when set).
        began = moment("mtime")
        ends = [began + limit] if limit is not None else []
        ended = moment("ctime")
        if ended is not None and ended > began:
            ends.append(ended)
        if ends:
            return min(ends)
    raise SourceFailed(
        f"job {job}: neither Walltime.Remaining nor a start time with Resource_List.walltime in its output"
    )


MONTHS = {name: number for number, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}


def parse_ctime(text: str) -> float:
    """Epoch seconds from a ctime(3)-style local time, ``Sat Nov 21 10:00:00 2026`` (or epoch digits).

    Month names are matched in English whatever the locale: Perl's scalar
    ``localtime`` (slurm-wlm-torque) and Torque print them so.
    """
    value = text.strip()
    if re.fullmatch(r"[0-9]+", value):
        return float(value)
    match = re.fullmatch(
        r"(?:[A-Z][a-z]{2}\s+)?([A-Z][a-z]{2})\s+([0-9]{1,2})\s+([0-9]{1,2}):([0-9]{2}):([0-9]{2})\s+([0-9]{4})", value
    )
    if not match or match.group(1) not in MONTHS:
        raise ValueError(f"not a time: {text!r}")
    month, day, hour, minute, second, year = match.groups()
    return local_epoch(int(year), MONTHS[month], int(day), int(hour), int(minute), int(second))
