"""Running one LRM command (sbatch, squeue, qsub, qstat, ...) with a time limit.

Providers never let a batch-system command hang the service or raise on a
non-zero exit: :func:`run_command` always returns a :class:`CommandResult`
saying whether the command exited (and with what), timed out, or could not
be started at all.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import signal
import subprocess
import time

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """How a command ended, before looking at its exit code."""

    EXITED = "exited"
    """It ran and exited; see ``rc``."""
    TIMED_OUT = "timed out"
    """It did not exit within the time limit and was killed."""
    NOT_RUN = "not run"
    """It could not be started (OSError: not installed, not executable, ...)."""


@dataclasses.dataclass(frozen=True)
class CommandResult:
    """What one command did: outcome, exit code (None unless it exited), its output, how long it took."""

    argv: tuple[str, ...]
    outcome: Outcome
    rc: int | None
    stdout: str
    stderr: str
    duration_s: float
    error: str = ""
    """The OSError's text when the command was NOT_RUN."""

    @property
    def exited(self) -> bool:
        """Whether the command ran to its own end (any exit code)."""
        return self.outcome is Outcome.EXITED

    @property
    def ok(self) -> bool:
        """Whether the command exited with 0."""
        return self.exited and self.rc == 0

    @property
    def output(self) -> str:
        """stderr then stdout, as one text (LRM commands put their errors in either)."""
        return "\n".join(part for part in (self.stderr, self.stdout) if part)

    def message(self) -> str:
        """One line for an operator: why the command failed (or what it printed)."""
        name = os.path.basename(self.argv[0]) if self.argv else "command"
        if self.outcome is Outcome.TIMED_OUT:
            return f"{name} did not finish within {self.duration_s:.1f} s"
        if self.outcome is Outcome.NOT_RUN:
            return f"{name} could not be run: {self.error}"
        return one_line(self.stderr, self.stdout) or f"{name} exited with {self.rc} and printed nothing"


def one_line(*texts: str, limit: int = 400) -> str:
    """The most telling line of a command's outputs (most telling first, e.g. stderr, stdout).

    The last line naming an error or fatal in any of them, else the last line
    of the first that printed anything. LRM wrappers print chatty preambles
    (SchedMD's qsub, on stdout: "There was an error running the Slurm sbatch
    command. The command was: ...") before the line that matters.
    """
    found = []
    for text in texts:
        lines = [line.strip().strip("'\"").strip() for line in text.splitlines()]
        found.append([line for line in lines if line])
    errors = [line for lines in found for line in lines if "error" in line.lower() or "fatal" in line.lower()]
    if errors:
        line = errors[-1]
    else:
        line = next((lines[-1] for lines in found if lines), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def run_command(argv: list[str], *, timeout: float, env: dict[str, str] | None = None) -> CommandResult:
    """Run ``argv`` with ``timeout`` seconds, ``env`` added to this process's environment; never raises.

    The command runs in a session of its own so that, on timeout, the whole
    process group it started is killed (SchedMD's qsub is a Perl script that
    runs sbatch through a shell: killing only the script would leave sbatch
    running). stdin is /dev/null so a command can never wait for input.
    """
    argv = [str(word) for word in argv]
    full_env = None
    if env:
        full_env = dict(os.environ)
        full_env.update(env)
    start = time.monotonic()
    try:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=full_env, start_new_session=True,
        )
    except OSError as exc:
        duration = time.monotonic() - start
        log.debug("could not run %s (%.3f s): %s", argv[0], duration, exc)
        return CommandResult(tuple(argv), Outcome.NOT_RUN, None, "", "", duration, error=str(exc))
    try:
        out, err = process.communicate(timeout=timeout)
        outcome = Outcome.EXITED
    except subprocess.TimeoutExpired:
        _kill_group(process)
        out, err = process.communicate()
        outcome = Outcome.TIMED_OUT
    duration = time.monotonic() - start
    stdout = out.decode("utf-8", errors="replace")
    stderr = err.decode("utf-8", errors="replace")
    rc = process.returncode if outcome is Outcome.EXITED else None
    log.debug("%s: %s in %.3f s (rc %s)", " ".join(argv), outcome.value, duration, rc)
    return CommandResult(tuple(argv), outcome, rc, stdout, stderr, duration)


def _kill_group(process: subprocess.Popen) -> None:
    # The group is the one start_new_session created for this very child: its id is the child's pid.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:
        process.kill()
