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
import os
import re
import subprocess
import time
from dataclasses import dataclass

from pilot.batchenv import BatchClient
from workspace_common.qstat import parse_full

from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

#: An end further in the past than this is a stale or wrong answer, not "no time left".
_PAST_SLACK_S = 86400.0
#: An end further ahead than this is no limit at all (e.g. UNLIMITED read as a number).
_FUTURE_LIMIT_S = 3 * 366 * 86400.0
#: Where the session leader's start time is read; a module constant so a test can hide it.
_PROC = "/proc"

#: What squeue's %e prints when the job has no known end.
_SQUEUE_UNKNOWN = frozenset({"N/A", "Unknown", "NONE"})


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


class _SourceFailed(Exception):
    """A walltime source that applies but gave no usable answer (logged, then the next is tried)."""


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
    for name, probe in _SOURCES:
        try:
            answer = probe(env, _Query(client, query_timeout, run), now)
        except _SourceFailed as exc:
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


# --- the sources ------------------------------------------------------------------------------------
# Each returns None when it does not apply (its variable is not set), (end, source) when it answers,
# and raises _SourceFailed when it applies but has no usable answer.


def _from_slurm_end_time(env, query, now):
    value = env.get("SLURM_JOB_END_TIME")
    if value is None:
        return None
    if not re.fullmatch(r"\s*[0-9]+\s*", value) or int(value) <= 0:
        raise _SourceFailed(f"not an epoch time: {_quote(value)}")
    return float(int(value)), "SLURM_JOB_END_TIME"


def _from_squeue(env, query, now):
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    output = query("squeue", "-h", "-j", job, "-o", "%e")
    ends = []
    for line in output.splitlines():
        text = line.strip()
        if not text or text in _SQUEUE_UNKNOWN:
            continue
        match = re.fullmatch(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})", text)
        if not match:
            raise _SourceFailed(f"unparsable end time {_quote(text)} for job {job}")
        try:
            ends.append(_local_epoch(*(int(field) for field in match.groups())))
        except ValueError:
            raise _SourceFailed(f"no such local time {_quote(text)} for job {job}") from None
    if not ends:
        raise _SourceFailed(f"no end time known for job {job} (printed {_quote(output.strip())})")
    # Several lines (a heterogeneous job's components): the earliest end is the one that kills us.
    return min(ends), "squeue"


def _from_qstat(env, query, now):
    job = env.get("PBS_JOBID")
    if not job:
        return None
    output = query("qstat", "-f", job)
    return _qstat_full_end(output, now(), job), "qstat -f"


def _from_pbs_walltime(env, query, now):
    value = env.get("PBS_WALLTIME")
    if value is None:
        return None
    try:
        seconds = _parse_walltime(value)
    except ValueError:
        raise _SourceFailed(f"not a walltime: {_quote(value)}") from None
    # Torque starts the job script as a session leader, so its start is the job's start.
    return _from_session_start(seconds, "PBS_WALLTIME", now)


def _from_session_start(seconds: float, source: str, now) -> tuple[float, str]:
    """(this session leader's start + ``seconds``, ``source``); counted from ``now()``, and said so, when the
    start cannot be read."""
    try:
        return _session_start() + seconds, source
    except (OSError, ValueError, IndexError) as exc:
        log.warning("%s: cannot read the session leader's start (%s); counting from now, "
                    "an estimate that may end later than the LRM's limit", source, exc)
        return now() + seconds, f"{source} (estimate: counted from now)"


def _from_sge(env, query, now):
    job = env.get("JOB_ID")
    if not job or not query.client.sge_root:
        return None
    output = query("qstat", "-j", job)
    limit = sge_runtime_limit(output)
    if limit is None:
        raise _SourceFailed(f"qstat -j {job} shows no h_rt or s_rt in the job's hard resource list")
    # The pilot's session leader is the task qrsh -inherit started, moments after the job did: the end
    # counted from it is late by that moment, which the walltime margin covers.
    return _from_session_start(limit, "qstat -j", now)


def sge_runtime_limit(output: str) -> int | None:
    """The least of ``h_rt`` and ``s_rt`` (seconds) in ``qstat -j``'s ``hard resource_list`` line, or None."""
    limits = []
    for line in output.splitlines():
        name, _, value = line.partition(":")
        if name.strip() != "hard resource_list":
            continue
        for item in value.split(","):
            key, _, text = item.strip().partition("=")
            if key in ("h_rt", "s_rt"):
                try:
                    limits.append(_parse_walltime(text))
                except ValueError:
                    raise _SourceFailed(f"not a run-time limit: {_quote(item.strip())}") from None
    return min(limits) if limits else None


_SOURCES = (
    ("SLURM_JOB_END_TIME", _from_slurm_end_time),
    ("squeue", _from_squeue),
    ("qstat -f", _from_qstat),
    ("PBS_WALLTIME", _from_pbs_walltime),
    ("qstat -j", _from_sge),
)


# --- helpers -----------------------------------------------------------------------------------------


class _Query:
    """Runs one LRM command found on ``client``'s path, with ``client``'s environment, for at most ``timeout`` s."""

    def __init__(self, client: BatchClient, timeout: float, run):
        self.client, self.timeout, self.run = client, timeout, run

    def __call__(self, name: str, *args: str) -> str:
        """The command's stdout, or _SourceFailed saying why not."""
        path = self.client.which(name)
        if path is None:
            raise _SourceFailed(f"{name} not found in [batch] path {self.client.path}")
        try:
            done = self.run(
                [path, *args], env=self.client.environment(), stdin=subprocess.DEVNULL, capture_output=True,
                encoding="utf-8", errors="replace", timeout=self.timeout, check=False,
            )
        except subprocess.TimeoutExpired:
            raise _SourceFailed(f"{path} gave no answer within {self.timeout:g} s") from None
        except OSError as exc:
            raise _SourceFailed(f"cannot run {path}: {exc.strerror or exc}") from None
        if done.returncode != 0:
            said = next((line.strip() for line in (done.stderr or "").splitlines() if line.strip()), "")
            raise _SourceFailed(f"{path} exited with status {done.returncode}" + (f": {_quote(said)}" if said else ""))
        return done.stdout or ""


def _qstat_full_end(output: str, now: float, job: str) -> float:
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
        raise _SourceFailed(f"no job {job} in its output ({_quote(output.strip())})")
    # qstat was asked for one job: never mix in another job's attributes. Names are lower case.
    attributes = next(iter(jobs.values()))

    def duration(key: str) -> float | None:
        value = attributes.get(key.lower())
        if value is None:
            return None
        try:
            return float(_parse_walltime(value))
        except ValueError:
            raise _SourceFailed(f"unparsable {key} {_quote(value)}") from None

    def moment(key: str) -> float | None:
        value = attributes.get(key.lower())
        if value is None:
            return None
        try:
            return _parse_ctime(value)
        except ValueError:
            raise _SourceFailed(f"unparsable {key} {_quote(value)}") from None

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
    raise _SourceFailed(
        f"job {job}: neither Walltime.Remaining nor a start time with Resource_List.walltime in its output"
    )


def _parse_walltime(text: str) -> int:
    """Seconds in a PBS walltime: ``[[HH:]MM:]SS``, ``D:HH:MM:SS`` or ``D-HH:MM:SS``.

    The leading field is unbounded (``48:00:00`` and ``90:00`` are fine, and
    Slurm's wrapper prints hours past 24); every later field must be below
    60 (hours below 24 after a day). Raises ValueError otherwise.
    """
    value = text.strip()
    match = re.fullmatch(r"([0-9]+)-([0-9]+):([0-9]+):([0-9]+)", value)
    if match:
        fields = [int(field) for field in match.groups()]
    elif re.fullmatch(r"[0-9]+(?::[0-9]+){0,3}", value):
        fields = [int(field) for field in value.split(":")]
    else:
        raise ValueError(f"not a walltime: {text!r}")
    limits = (None, 24, 60, 60)[4 - len(fields):]
    for field, limit in zip(fields[1:], limits[1:]):
        if field >= limit:
            raise ValueError(f"not a walltime: {text!r}")
    seconds = 0
    for field, scale in zip(fields, (86400, 3600, 60, 1)[4 - len(fields):]):
        seconds += field * scale
    return seconds


_MONTHS = {name: number for number, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}


def _parse_ctime(text: str) -> float:
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
    if not match or match.group(1) not in _MONTHS:
        raise ValueError(f"not a time: {text!r}")
    month, day, hour, minute, second, year = match.groups()
    return _local_epoch(int(year), _MONTHS[month], int(day), int(hour), int(minute), int(second))


def _local_epoch(year: int, month: int, day: int, hour: int, minute: int, second: int) -> float:
    """Epoch seconds of a local wall-clock time; the earlier one when a DST change repeats that hour.

    time.mktime alone guesses in the repeated hour and silently normalises
    impossible dates (Feb 31); a guess an hour late would let the LRM kill
    the pilot, so both readings are tried and only exact round trips count.
    """
    wanted = (year, month, day, hour, minute, second)
    readings = []
    for isdst in (0, 1):
        try:
            epoch = time.mktime((*wanted, 0, 0, isdst))
        except (OverflowError, ValueError):
            continue
        back = time.localtime(epoch)
        if tuple(back)[:6] == wanted and back.tm_isdst == isdst:
            readings.append(epoch)
    if not readings:
        raise ValueError(f"no such local time: {wanted}")
    return min(readings)


def _session_start() -> float:
    """Epoch seconds at which this process's session leader started (OSError/ValueError if unknown)."""
    leader = os.getsid(0)
    if leader <= 0:
        raise OSError("the session leader is outside this pid namespace")
    with open(f"{_PROC}/{leader}/stat", "rb") as handle:
        stat = handle.read()
    # Field 22, starttime, in clock ticks since boot; split after the last ")" since the
    # command name (field 2) may hold spaces and parentheses.
    ticks = int(stat[stat.rindex(b")") + 2:].split()[19])
    return _boot_time() + ticks / os.sysconf("SC_CLK_TCK")


def _boot_time() -> float:
    """Epoch seconds of the boot, on the scale /proc/<pid>/stat's starttime counts from.

    /proc/stat's ``btime`` is this same value (realtime minus boottime, taken
    when read) cut to whole seconds; CLOCK_BOOTTIME gives it to the
    microsecond, so a start time is off by a clock tick at most, not a second.
    """
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    if clock is not None:
        return time.time() - time.clock_gettime(clock)
    with open(f"{_PROC}/stat", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("btime "):
                return float(line.split()[1])
    raise ValueError(f"no btime in {_PROC}/stat")


def _implausible(end: float, now: float) -> str | None:
    """Why ``end`` cannot be this job's end, or None when it can."""
    if not math.isfinite(end):
        return f"the end {end} is not a time"
    if end < now - _PAST_SLACK_S:
        return f"the end is {now - end:.0f} s in the past"
    if end > now + _FUTURE_LIMIT_S:
        return f"the end is {end - now:.0f} s ahead, more than about three years"
    return None


def _quote(text: str, limit: int = 120) -> str:
    """``text`` as a short one-line repr for a log line."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
