"""What the walltime sources share: the command runner, the failure they raise, time parsing, the session's start.

A source (one module each in this package) returns None when it does not
apply to this job, ``(end, name)`` when it answers, and raises
:class:`SourceFailed` when it applies but has no usable answer.
Standard library only, nothing heavy at import: this is on the pilot's start path.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time

from pilot.batchenv import BatchClient

log = logging.getLogger("pilot.deadline")

#: Where the session leader's start time is read; a module constant so a test can hide it.
PROC = "/proc"


class SourceFailed(Exception):
    """A walltime source that applies but gave no usable answer (logged, then the next is tried)."""


class Query:
    """Runs one LRM command found on ``client``'s path, with ``client``'s environment, for at most ``timeout`` s."""

    def __init__(self, client: BatchClient, timeout: float, run):
        self.client, self.timeout, self.run = client, timeout, run

    def __call__(self, name: str, *args: str) -> str:
        """The command's stdout, or SourceFailed saying why not."""
        path = self.client.which(name)
        if path is None:
            raise SourceFailed(f"{name} not found in [batch] path {self.client.path}")
        try:
            done = self.run(
                [path, *args], env=self.client.environment(), stdin=subprocess.DEVNULL, capture_output=True,
                encoding="utf-8", errors="replace", timeout=self.timeout, check=False,
            )
        except subprocess.TimeoutExpired:
            raise SourceFailed(f"{path} gave no answer within {self.timeout:g} s") from None
        except OSError as exc:
            raise SourceFailed(f"cannot run {path}: {exc.strerror or exc}") from None
        if done.returncode != 0:
            said = next((line.strip() for line in (done.stderr or "").splitlines() if line.strip()), "")
            raise SourceFailed(f"{path} exited with status {done.returncode}" + (f": {quote(said)}" if said else ""))
        return done.stdout or ""


def parse_walltime(text: str) -> int:
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


def local_epoch(year: int, month: int, day: int, hour: int, minute: int, second: int) -> float:
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


def from_session_start(seconds: float, source: str, now) -> tuple[float, str]:
    """(this session leader's start + ``seconds``, ``source``); counted from ``now()``, and said so, when the
    start cannot be read."""
    try:
        return session_start() + seconds, source
    except (OSError, ValueError, IndexError) as exc:
        log.warning("%s: cannot read the session leader's start (%s); counting from now, "
                    "an estimate that may end later than the LRM's limit", source, exc)
        return now() + seconds, f"{source} (estimate: counted from now)"


def session_start() -> float:
    """Epoch seconds at which this process's session leader started (OSError/ValueError if unknown)."""
    leader = os.getsid(0)
    if leader <= 0:
        raise OSError("the session leader is outside this pid namespace")
    with open(f"{PROC}/{leader}/stat", "rb") as handle:
        stat = handle.read()
    # Field 22, starttime, in clock ticks since boot; split after the last ")" since the
    # command name (field 2) may hold spaces and parentheses.
    ticks = int(stat[stat.rindex(b")") + 2:].split()[19])
    return boot_time() + ticks / os.sysconf("SC_CLK_TCK")


def boot_time() -> float:
    """Epoch seconds of the boot, on the scale /proc/<pid>/stat's starttime counts from.

    /proc/stat's ``btime`` is this same value (realtime minus boottime, taken
    when read) cut to whole seconds; CLOCK_BOOTTIME gives it to the
    microsecond, so a start time is off by a clock tick at most, not a second.
    """
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    if clock is not None:
        return time.time() - time.clock_gettime(clock)
    with open(f"{PROC}/stat", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("btime "):
                return float(line.split()[1])
    raise ValueError(f"no btime in {PROC}/stat")


def quote(text: str, limit: int = 120) -> str:
    """``text`` as a short one-line repr for a log line."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
