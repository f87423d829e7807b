"""When must this pilot unreserve on its own?

Two things bound a lease on a node: the duration the service asked for, and
the batch system's (LRM's) walltime, after which the LRM sends SIGTERM and,
KillWait later, SIGKILL. A pilot killed mid-restore leaves the node shrunk,
so the pilot keeps its own deadline: it starts unreserving early enough to
have finished restoring (at most ``grace_s``) ``margin_s`` before the LRM's
limit. It never counts on the LRM's own lag (Slurm checks limits only about
every 30 s, but that is not a promise).

The LRM's end of the job is looked up from every source this job may have,
first answer wins (see :func:`walltime_end`). A source that is missing,
slow, failing or talking nonsense is logged and skipped, never raised: the
pilot must start even when ``squeue`` hangs, and the requested duration
still bounds the lease.

Standard library only, nothing heavy at import: this is on the pilot's
start path.
"""

from __future__ import annotations

import logging
import math
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pilot.batchenv import BatchClient
from pilot.walltime import SOURCES, Query, SourceFailed

log = logging.getLogger(__name__)

#: An end further in the past than this is a stale or wrong answer, not "no time left".
_PAST_SLACK_S = 86400.0
#: An end further ahead than this is no limit at all (e.g. UNLIMITED read as a number).
_FUTURE_LIMIT_S = 3 * 366 * 86400.0


@dataclass(frozen=True)
class Deadline:
    """The moment this pilot starts unreserving on its own, and why.

    ``at`` is epoch seconds on the ``time.time()`` scale; ``source`` names
    what decided it (``"duration"`` or the walltime source, e.g.
    ``"SLURM_JOB_END_TIME"``, ``"squeue"``, ``"qstat -f"``, ``"PBS_WALLTIME"``);
    ``walltime_end`` is the LRM's end of the job when it is known, whichever
    won.
    """

    at: float
    source: str
    walltime_end: float | None

    def remaining(self, now: float | None = None) -> float:
        """Seconds from ``now`` (default: ``time.time()``) to :attr:`at`; negative once it has passed."""
        return self.at - (time.time() if now is None else now)


class DeadlineError(Exception):
    """No usable deadline: the walltime leaves no time to hold the slot. The message is one line."""


def walltime_end(
    env: Mapping[str, str],
    *,
    query_timeout: float,
    client: BatchClient = BatchClient(),
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
    now: Callable[[], float] = time.time,
) -> tuple[float, str] | None:
    """The LRM's end of this job (epoch seconds) and the name of the source that said so.

    Sources, in this order; the first that applies and answers sanely wins:

    1. ``SLURM_JOB_END_TIME`` (epoch seconds);
    2. ``squeue -h -j $SLURM_JOB_ID -o %e`` (local time);
    3. ``qstat -f $PBS_JOBID`` (Torque, PBS Pro/OpenPBS, or Slurm's Torque wrapper);
    4. ``PBS_WALLTIME`` (seconds) from this session leader's start
       (``"PBS_WALLTIME"``), or from ``now()`` when that cannot be read
       (``"PBS_WALLTIME (estimate: counted from now)"``);
    5. Grid Engine: ``qstat -j $JOB_ID`` (where ``client`` names an
       ``SGE_ROOT``) for the job's ``h_rt``/``s_rt``, counted from this
       session leader's start (the task ``qrsh -inherit`` started),
       ``"qstat -j"``.

    ``env`` holds the job's variables (checked by
    :func:`pilot.batchenv.job_variables`); nothing else of it reaches a
    command. Commands are found on ``client``'s path and run with
    ``client``'s environment (root-owned configuration, never the
    caller's), each bounded by ``query_timeout`` seconds. A source that
    fails, hangs, prints nonsense, or gives an end more than a day past or
    about three years ahead is logged as one warning line and skipped.
    Returns None when no source applies or none answered; never raises for
    a source's failure.
    """
    for name, probe in SOURCES:
        try:
            answer = probe(env, Query(client, query_timeout, run), now)
        except SourceFailed as exc:
            log.warning("walltime source %s: %s; trying the next source", name, exc)
            continue
        if answer is None:
            continue  # the source does not apply to this job: not worth a warning
        end, source = answer
        problem = _implausible(end, now())
        if problem:
            log.warning("walltime source %s: ignored, %s; trying the next source", name, problem)
            continue
        return end, source
    return None


def compute_deadline(
    *,
    started: float,
    duration_s: float,
    grace_s: float,
    margin_s: float,
    env: Mapping[str, str],
    query_timeout: float,
    client: BatchClient = BatchClient(),
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
    now: Callable[[], float] = time.time,
) -> Deadline:
    """The earlier of ``started + duration_s`` and ``walltime_end - margin_s - grace_s``.

    ``started`` is the pilot's start in epoch seconds. The walltime end comes
    from :func:`walltime_end` (``env``, ``query_timeout``, ``client``, ``run``
    and ``now`` are passed on). On a tie the duration wins (it is what was asked for).
    Raises :class:`DeadlineError` when the walltime-derived deadline is at or
    before ``now()``: the pilot could not even restore in time, so it must not
    reserve anything.
    """
    by_duration = started + duration_s
    found = walltime_end(env, query_timeout=query_timeout, client=client, run=run, now=now)
    if found is None:
        return Deadline(by_duration, "duration", None)
    end, source = found
    by_walltime = end - margin_s - grace_s
    current = now()
    if by_walltime <= current:
        left = end - current
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(end))
        relative = f"in {left:.0f} s" if left >= 0 else f"{-left:.0f} s ago"
        raise DeadlineError(
            f"the walltime ends at {when} ({relative}, from {source}), which leaves no time to hold "
            f"the slot after the walltime margin of {margin_s:g} s and the grace of {grace_s:g} s; "
            "ask for a longer walltime or a smaller walltime_margin"
        )
    if by_walltime < by_duration:
        return Deadline(by_walltime, source, end)
    return Deadline(by_duration, "duration", end)


#: Walltime sources read from the job's environment: fixed when the job started, so blind to an extension.
_STATIC_SOURCES = ("SLURM_JOB_END_TIME", "PBS_WALLTIME")


def extended_deadline(
    old: Deadline,
    *,
    started: float,
    duration_s: float,
    grace_s: float,
    margin_s: float,
    env: Mapping[str, str],
    query_timeout: float,
    client: BatchClient = BatchClient(),
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
    now: Callable[[], float] = time.time,
) -> Deadline:
    """The deadline after the lease's duration became ``duration_s``: never earlier than ``old``.

    The earlier of ``started + duration_s`` and the LRM's end of the job
    less ``margin_s`` and ``grace_s``, as :func:`compute_deadline`; but the
    LRM is asked again (``squeue``, ``qstat``) without the variables fixed at
    the job's start, which cannot know of a raised limit. When no live
    source answers, the end known before (``old.walltime_end``) still
    bounds it: the pilot never holds past a limit it has not seen raised.
    """
    live = {key: value for key, value in env.items() if key not in _STATIC_SOURCES}
    found = walltime_end(live, query_timeout=query_timeout, client=client, run=run, now=now)
    end, source = found if found is not None else (old.walltime_end, old.source)
    at, why = started + duration_s, "duration"
    if end is not None and end - margin_s - grace_s < at:
        at, why = end - margin_s - grace_s, source
    if at <= old.at:
        return old
    return Deadline(at, why, end)


def _implausible(end: float, now: float) -> str | None:
    """Why ``end`` cannot be this job's end, or None when it can."""
    if not math.isfinite(end):
        return f"the end {end} is not a time"
    if end < now - _PAST_SLACK_S:
        return f"the end is {now - end:.0f} s in the past"
    if end > now + _FUTURE_LIMIT_S:
        return f"the end is {end - now:.0f} s ahead, more than about three years"
    return None
