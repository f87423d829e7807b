"""Torque's ``PBS_WALLTIME``: the job's walltime in seconds, counted from the job script's start (fixed at the start)."""

from __future__ import annotations

from pilot.walltime.base import SourceFailed, from_session_start, parse_walltime, quote


def probe(env, query, now):
    """The session leader's start plus PBS_WALLTIME; None without the variable."""
    value = env.get("PBS_WALLTIME")
    if value is None:
        return None
    try:
        seconds = parse_walltime(value)
    except ValueError:
        raise SourceFailed(f"not a walltime: {quote(value)}") from None
    # Torque starts the job script as a session leader, so its start is the job's start.
    return from_session_start(seconds, "PBS_WALLTIME", now)
