"""Reading ``qstat -f`` output (Torque, PBS Pro/OpenPBS, SchedMD's Slurm wrapper): one parser for everyone."""

from __future__ import annotations

import re

_JOB_RE = re.compile(r"Job Id:\s*(\S+)")


def parse_full(text: str) -> dict[str, dict[str, str]]:
    """``qstat -f`` output as {job id: {attribute name in lower case: value}}, jobs in the order printed.

    Attribute lines are ``name = value`` (indented by spaces on Torque, by a
    tab on SchedMD's qstat); a line without `` = `` continues the previous
    value (Torque wraps long values).
    """
    jobs: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    last = None
    for line in text.splitlines():
        match = _JOB_RE.match(line)
        if match:
            current = jobs.setdefault(match.group(1), {})
            last = None
        elif current is not None and " = " in line:
            name, _, value = line.partition(" = ")
            last = name.strip().lower()
            current[last] = value.strip()
        elif current is not None and last is not None and line.strip():
            current[last] += line.strip()
    return jobs
