"""Batch job scripts for pilot jobs: the typed template and what every scheduler's script has.

A script holds the directives from the template's typed fields, then the
site's raw extra directives, then ONE line that starts the pilot on every
node of the job through a launcher (``exec srun ... sudo -n ... workspace-pilot
reserve ...``). An extra directive that would fight a typed field (a second
walltime, node count, output file, ...) is refused with
:class:`JobScriptError` before anything is written or submitted, so the
script always means what the lease asked for.

Each scheduler's own module renders its script and knows which of its
options set what a typed field sets (its :class:`ScriptDialect`):
:mod:`.slurmscript`, :mod:`.pbsscript`, :mod:`.sgescript`. This one keeps
only what all of them share.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
from collections.abc import Callable
from typing import TYPE_CHECKING

from workspace_common.protocol import MAX_MEMORY_MB, MAX_SLOT_LEN, PILOT_ENV, SLOT_SECRET_ENV, is_key
from service_adapter.providers.launchers import LAUNCHERS, Launcher, check_launcher_name, resolve_launcher

if TYPE_CHECKING:
    # Only for annotations: service_adapter.providers imports this module for its settings.
    from service_adapter.providers.base import PilotJob

SLURM = "slurm"
PBS = "pbs"
SGE = "sge"
#: Every scheduler's directive prefix: a line of another scheduler's is recognised and refused.
PREFIXES = {SLURM: "#SBATCH", PBS: "#PBS", SGE: "#$"}
#: Grid Engine's parallel environment for pilot jobs when a template names none: the site's PE that puts
#: one slot on each host (allocation_rule 1, control_slaves TRUE: docs/gridengine.md).
DEFAULT_SGE_PE = "workspace-pilot"

# The pilot protocol's slot syntax (workspace_common.protocol keeps its pattern private); it is also
# what makes a slot safe in file names and directive lines.
_SLOT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: A node a job may be kept off: a batch system's host name, nothing its directives or commands would read as more.
NODE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_EXCLUDED_NODES = 64
# Same words as the service config accepts for [provider] queue/account/job_name_prefix.
_WORD_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@+-]*")
_PREFIX_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,15}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class JobScriptError(ValueError):
    """A job or template that cannot become a correct script; the message is one line naming the problem."""


@dataclasses.dataclass(frozen=True)
class ScriptDialect:
    """One scheduler's directives: its ``name`` and ``prefix``, whether its options may be long (``--x``), and
    ``option_keys(words)``: which typed fields (keys of the conflict table) the options in ``words`` set."""

    name: str
    prefix: str
    long_options: bool
    option_keys: Callable[[list[str]], list[str]]


@dataclasses.dataclass(frozen=True)
class JobTemplate:
    """How a site's pilot jobs look; constructing one validates every field (ValueError, one line).

    ``memory_per_node_mb``: None asks each node for the lease's ``memory_mb``,
    0 writes no memory directive, a number asks for that many MB per node.
    The walltime is the lease's duration + ``walltime_padding_s``, rounded up
    to whole minutes (Slurm counts minutes). ``extra_directives`` are raw
    lines, with or without the ``#SBATCH ``/``#PBS `` prefix. ``sudo`` ""
    runs the pilot directly (sites whose jobs already run as root).
    ``launcher`` is a name from :data:`service_adapter.providers.launchers.LAUNCHER_NAMES`.
    """

    cores_per_node: int = 1
    memory_per_node_mb: int | None = None
    walltime_padding_s: float = 120
    queue: str = ""
    account: str = ""
    job_name_prefix: str = "wp"
    output_dir: str = "/var/log/workspace-pilot/jobs"
    extra_directives: tuple[str, ...] = ()
    sudo: str = "/usr/bin/sudo"
    pilot_command: str = "/usr/bin/workspace-pilot"
    launcher: str = "auto"
    parallel_environment: str = DEFAULT_SGE_PE
    """Grid Engine only: the PE a job asks for one slot per host of (``-pe PE N``)."""

    def __post_init__(self):
        if not _is_int(self.cores_per_node) or not 1 <= self.cores_per_node <= 100_000:
            raise ValueError(f"cores_per_node must be a whole number from 1 to 100000, not {self.cores_per_node!r}")
        if self.memory_per_node_mb is not None and (
            not _is_int(self.memory_per_node_mb) or not 0 <= self.memory_per_node_mb <= MAX_MEMORY_MB
        ):
            raise ValueError(
                f"memory_per_node_mb must be None (the lease's memory), 0 (no memory directive) or a number of MB, "
                f"not {self.memory_per_node_mb!r}"
            )
        if not _is_real(self.walltime_padding_s) or not 0 <= self.walltime_padding_s <= 10**8:
            raise ValueError(
                f"walltime_padding_s must be a number of seconds from 0 to 1e8, not {self.walltime_padding_s!r}"
            )
        for field in ("queue", "account"):
            value = getattr(self, field)
            if not isinstance(value, str) or (value and not _WORD_RE.fullmatch(value)):
                raise ValueError(f"{field} must be one word (letters, digits, _ . @ + -) or empty, not {value!r}")
        if not isinstance(self.job_name_prefix, str) or not _PREFIX_RE.fullmatch(self.job_name_prefix):
            raise ValueError(
                f"job_name_prefix must start with a letter and hold at most 16 letters, digits, _ or -, "
                f"not {self.job_name_prefix!r}"
            )
        _check_output_dir(self.output_dir)
        self._check_extra_directives()
        if not isinstance(self.sudo, str) or (self.sudo and not _is_abs_path(self.sudo)):
            raise ValueError(f"sudo must be an absolute path, or empty to run the pilot directly, not {self.sudo!r}")
        if not isinstance(self.pilot_command, str) or not _is_abs_path(self.pilot_command):
            raise ValueError(f"pilot_command must be an absolute path, not {self.pilot_command!r}")
        if not isinstance(self.launcher, str):
            raise ValueError(f"launcher must be a name, not {self.launcher!r}")
        if not isinstance(self.parallel_environment, str) or not _WORD_RE.fullmatch(self.parallel_environment):
            raise ValueError(f"parallel_environment must be one word (letters, digits, _ . @ + -), "
                             f"not {self.parallel_environment!r}")
        check_launcher_name(self.launcher)

    def _check_extra_directives(self) -> None:
        extras = self.extra_directives
        if isinstance(extras, str) or not isinstance(extras, (tuple, list)):
            raise ValueError(f"extra_directives must be a sequence of lines, not {extras!r}")
        lines = []
        for line in extras:
            if not isinstance(line, str):
                raise ValueError(f"extra directive {line!r} is not text")
            if "\n" in line or "\r" in line or "\x00" in line:
                raise ValueError(f"extra directive {line!r} holds a newline or NUL: give one directive per line")
            if _CONTROL_RE.search(line.replace("\t", " ")):
                raise ValueError(f"extra directive {line!r} holds a control character")
            if not line.strip():
                raise ValueError("an extra directive is empty")
            lines.append(line.strip())
        # Frozen: a list from a config loader is kept as the tuple the type promises.
        object.__setattr__(self, "extra_directives", tuple(lines))

    def check(self, dialect: ScriptDialect) -> None:
        """Raise :class:`JobScriptError` if the extra directives do not suit ``dialect`` or fight a typed field.

        Every conflict is template-level (memory counts as set unless
        ``memory_per_node_mb`` is 0), so providers call this when they are
        built: a bad config fails at start, not at the first lease.
        """
        normalised_extras(self, dialect, memory_set=self.memory_per_node_mb != 0)


# -- the parts of a script ---------------------------------------------------------------------


def walltime_s(job: PilotJob, template: JobTemplate) -> int:
    """The job's walltime in seconds: duration + padding, rounded UP to whole minutes (at least one)."""
    return walltime_for(job.duration_s, template)


def walltime_for(duration_s: float, template: JobTemplate) -> int:
    """The walltime in seconds a lease of ``duration_s`` needs: with the padding, rounded UP to whole minutes."""
    total = float(duration_s) + float(template.walltime_padding_s)
    # The small tolerance keeps 180.00000000000003 s (float noise from adding) at 3 minutes, not 4.
    return max(1, math.ceil(total / 60 - 1e-9)) * 60


def memory_per_node_mb(job: PilotJob, template: JobTemplate) -> int:
    """The MB to ask per node; 0 means no memory directive."""
    if template.memory_per_node_mb is None:
        return int(job.memory_mb)
    return template.memory_per_node_mb


def job_name(job: PilotJob, template: JobTemplate) -> str:
    """``{prefix}-{slot[:8]}``."""
    return f"{template.job_name_prefix}-{job.slot[:8]}"


def output_path(job: PilotJob, template: JobTemplate) -> str:
    """Where the job's stdout and stderr (joined) go: ``{output_dir}/{slot}.out``."""
    return os.path.join(template.output_dir, f"{job.slot}.out")


def script_path(job: PilotJob, template: JobTemplate) -> str:
    """Where a provider writes the job's script: ``{output_dir}/{slot}.sh``."""
    return os.path.join(template.output_dir, f"{job.slot}.sh")


def pilot_arguments(job: PilotJob) -> list[str]:
    """``reserve --slot S [--lease L] --memory M --duration D --grace G [--contact URL] [--config PATH]``.

    The one definition of the pilot's command line, shared by job scripts
    and the local provider. ``--contact``/``--config`` are left out when
    the job has none (the pilot's own config then decides).
    """
    check_job(job)
    argv = ["reserve", "--slot", job.slot] + (["--lease", job.lease] if job.lease else []) + [
        "--memory", str(int(job.memory_mb)),
        "--duration", format_number(job.duration_s), "--grace", format_number(job.grace_s),
    ]
    if job.contact:
        argv += ["--contact", job.contact]
    if job.pilot_config:
        argv += ["--config", job.pilot_config]
    if job.warn_before_s:
        argv += ["--warn-before", format_number(job.warn_before_s)]
    return argv


def pilot_argv(job: PilotJob, template: JobTemplate) -> list[str]:
    """The per-node command: ``[sudo -n --preserve-env=<PILOT_ENV>] pilot_command reserve ...``.

    ``-n`` because nobody can type a password in a batch job (sudo fails
    instead of waiting); ``--preserve-env`` because sudo would otherwise
    drop the batch variables the pilot reads (its walltime, node name) and
    the slot's secret.
    """
    words = []
    if template.sudo:
        words += [template.sudo, "-n", "--preserve-env=" + ",".join(PILOT_ENV)]
    return words + [template.pilot_command, *pilot_arguments(job)]


def format_number(value: float) -> str:
    """A number as the pilot's argument parser reads it back exactly: ``20``, ``20.5`` (never ``2e+07``)."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def check_job(job: PilotJob) -> None:
    """Raise :class:`JobScriptError` for a job whose values cannot safely go into a script or a command line."""
    if not isinstance(job.slot, str) or not _SLOT_RE.fullmatch(job.slot) or len(job.slot) > MAX_SLOT_LEN:
        raise JobScriptError(f"slot {job.slot!r} is not a valid slot name (letters, digits, . _ -)")
    if not isinstance(job.lease, str) or (job.lease and not _SLOT_RE.fullmatch(job.lease)):
        raise JobScriptError(f"lease {job.lease!r} is not a valid lease name (letters, digits, . _ -)")
    if not _is_int(job.nodes) or job.nodes < 1:
        raise JobScriptError(f"a job needs a whole number of nodes above 0, not {job.nodes!r}")
    if not _is_int(job.memory_mb) or not 1 <= job.memory_mb <= MAX_MEMORY_MB:
        raise JobScriptError(f"memory_mb must be a whole number of MB above 0, not {job.memory_mb!r}")
    if not _is_real(job.duration_s) or job.duration_s <= 0:
        raise JobScriptError(f"duration_s must be a number of seconds above 0, not {job.duration_s!r}")
    if not _is_real(job.grace_s) or job.grace_s < 0:
        raise JobScriptError(f"grace_s must be a number of seconds from 0, not {job.grace_s!r}")
    if not isinstance(job.contact, str) or _CONTROL_RE.search(job.contact):
        raise JobScriptError(f"contact {job.contact!r} is not a URL")
    if not isinstance(job.pilot_config, str) or (job.pilot_config and not _is_abs_path(job.pilot_config)):
        raise JobScriptError(f"pilot_config {job.pilot_config!r} must be an absolute path on the nodes")
    if job.begin_at is not None and (not _is_real(job.begin_at) or not 0 < job.begin_at < 2**33):
        raise JobScriptError(f"begin_at must be a time in epoch seconds, not {job.begin_at!r}")
    if not _is_real(job.warn_before_s) or job.warn_before_s < 0:
        raise JobScriptError(f"warn_before_s must be a number of seconds from 0, not {job.warn_before_s!r}")
    if (not isinstance(job.exclude_nodes, tuple) or len(job.exclude_nodes) > MAX_EXCLUDED_NODES
            or not all(isinstance(node, str) and NODE_NAME_RE.fullmatch(node) for node in job.exclude_nodes)):
        raise JobScriptError(f"exclude_nodes must be at most {MAX_EXCLUDED_NODES} node names (letters, digits, "
                             f". _ -), not {job.exclude_nodes!r}"[:300])
    if not is_key(job.slot_secret):
        raise JobScriptError("the job's slot secret must be 64 lowercase hex digits")


# -- rendering: the lines every script has ---------------------------------------------------------


def head(job: PilotJob) -> list[str]:
    """The script's first lines: the shell, and which lease and slot it is."""
    return ["#!/bin/sh", f"# workspace-pilot job: lease {job.lease or '-'}, slot {job.slot}"]


def exec_line(job: PilotJob, template: JobTemplate, launcher: Launcher | str, lrm: str) -> str:
    """The script's last line: the slot's secret into the environment, then the launcher starting the pilots."""
    if isinstance(launcher, str):
        try:
            launcher = LAUNCHERS[launcher] if launcher != "auto" else resolve_launcher("auto", lrm)
        except (KeyError, ValueError) as exc:
            raise JobScriptError(f"launcher {launcher!r}: {exc}") from None
    try:
        argv = launcher(pilot_argv(job, template), job.nodes)
    except ValueError as exc:
        raise JobScriptError(str(exc)) from None
    # The slot's secret rides in the job's environment to every node (the launcher passes it on, sudo
    # keeps it): never in argv, which any user on a node can read. The script itself is 0600.
    # exec: the pilots' launcher becomes the job's main process, so the LRM's
    # SIGTERM on cancel reaches it directly rather than a waiting shell.
    return (f"{SLOT_SECRET_ENV}={job.slot_secret}; export {SLOT_SECRET_ENV}\n"
            "exec " + " ".join(shlex.quote(word) for word in argv))


# -- extra directives and the typed fields they may fight --------------------------------------

# key -> (what such a directive sets, the typed field that sets it, why it cannot be set twice)
_FIELDS = {
    "name": ("the job name", "job_name_prefix", "the script names the job {name}"),
    "nodes": ("the node count", "the lease's nodes", "the script asks for exactly the lease's {nodes} node(s)"),
    "tasks": ("the task count", "the one-pilot-per-node layout", "the script runs one task (one pilot) per node"),
    "cpus": ("the cores", "cores_per_node", "the script asks for cores_per_node cores on each node"),
    "memory": ("the memory", "memory_per_node_mb", "set memory_per_node_mb = 0 to give the memory here instead"),
    "walltime": ("the walltime", "walltime_padding_s", "the walltime is the lease's duration + walltime_padding_s"),
    "queue": ("the queue/partition", "queue", "leave queue empty to choose it here instead"),
    "account": ("the account", "account", "leave account empty to choose it here instead"),
    "output": ("the job's output", "output_dir", "the output always goes to {output}"),
    "exclude": ("the nodes to avoid or use", "the lease's exclude_nodes", "the script keeps the job off {exclude}"),
}

def normalised_extras(
    template: JobTemplate, dialect: ScriptDialect, *, memory_set: bool, job: PilotJob | None = None,
) -> list[str]:
    """The extra directives as full lines of ``dialect`` (``#SBATCH ...``); JobScriptError for one that cannot
    stay."""
    lrm = dialect.name
    context = {
        "name": job_name(job, template) if job else f"{template.job_name_prefix}-<slot>",
        "nodes": job.nodes if job else "N",
        "output": output_path(job, template) if job else os.path.join(template.output_dir, "<slot>.out"),
        "exclude": ",".join(job.exclude_nodes) if job else "",
    }
    prefix = dialect.prefix
    active = {"name", "nodes", "tasks", "cpus", "walltime", "output"}
    if memory_set:
        active.add("memory")
    if template.queue:
        active.add("queue")
    if template.account:
        active.add("account")
    if job is not None and job.exclude_nodes:
        active.add("exclude")
    lines = []
    for line in template.extra_directives:
        for other_lrm, other_prefix in PREFIXES.items():
            if other_lrm != lrm and starts_with_word(line, other_prefix):
                raise JobScriptError(
                    f"extra directive {line!r} is a {other_prefix} line ({other_lrm}); "
                    f"a {lrm} job script takes {prefix} lines"
                )
        if starts_with_word(line, prefix):
            rest = line[len(prefix):].strip()
        elif line.startswith("#"):
            raise JobScriptError(f"extra directive {line!r} is neither a {prefix} line nor bare options")
        else:
            rest = line
        try:
            words = shlex.split(rest, comments=True)
        except ValueError as exc:
            raise JobScriptError(f"extra directive {line!r} cannot be read: {exc}") from None
        if not words or not words[0].startswith("-"):
            raise JobScriptError(f"extra directive {line!r} does not start with an option")
        if not dialect.long_options and any(word.startswith("--") for word in words):
            raise JobScriptError(
                f"extra directive {line!r} holds a long (Slurm) option; {lrm.upper()} directives take -x options"
            )
        keys = dialect.option_keys(words)
        for key in keys:
            if key in active:
                what, field, why = _FIELDS[key]
                why = why.format(**context)
                raise JobScriptError(f"extra directive {line!r} sets {what}, which conflicts with {field}: {why}")
        lines.append(f"{prefix} {rest}")
    return lines


def starts_with_word(line: str, prefix: str) -> bool:
    """Whether ``line`` is ``prefix`` or starts with it and a space."""
    return line == prefix or (line.startswith(prefix) and line[len(prefix)].isspace())


# -- small checks ----------------------------------------------------------------------------------


def _check_output_dir(path) -> None:
    if not isinstance(path, str) or not _is_abs_path(path):
        raise ValueError(f"output_dir must be an absolute path, not {path!r}")
    # It is written into directive lines: whitespace would split them, '%' is Slurm's
    # file-name pattern character and ':' PBS's host:path separator.
    if re.search(r"[\s%:#]", path):
        raise ValueError(f"output_dir {path!r} must not hold whitespace, '%', ':' or '#' (it goes into directives)")


def _is_abs_path(path: str) -> bool:
    return isinstance(path, str) and path.startswith("/") and not _CONTROL_RE.search(path)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
